//! The PostgreSQL a test's store may live in: `SWITCHYARD_TEST_POSTGRES`, or the machine's own on
//! 127.0.0.1:5432 (database `test`). Each deployment takes a schema of its own through its
//! unique `--prefix`. Without a server the test prints SKIP and passes, except under `CI=true`,
//! where it fails.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The URL tests give `--store`.
pub fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether the PostgreSQL of [`postgres_url`] accepts connections.
pub fn postgres_available() -> bool {
    let url = postgres_url();
    let hostport = url.split('@').next_back().and_then(|rest| rest.split('/').next()).unwrap_or("");
    let reachable = hostport
        .parse::<SocketAddr>()
        .is_ok_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("no PostgreSQL at {hostport}; CI must start it");
    }
    eprintln!("SKIP: no PostgreSQL at {hostport}, so this PostgreSQL variant cannot run");
    false
}
