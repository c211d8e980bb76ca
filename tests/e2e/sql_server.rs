//! The PostgreSQL and MySQL servers a test's store may live in: `SWITCHYARD_TEST_POSTGRES` /
//! `SWITCHYARD_TEST_MYSQL`, or the machine's own (127.0.0.1:5432 and :3306, database `test`).
//! Each deployment takes a schema or table prefix of its own through its unique `--prefix`.
//! Without a server the test prints SKIP and passes, except under `CI=true`, where it fails.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The URL tests give `--store` for PostgreSQL.
pub fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The URL tests give `--store` for MySQL.
pub fn mysql_url() -> String {
    std::env::var("SWITCHYARD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// The `(credentials@, host:port, /rest)` of a URL: `scheme://[user@]host:port/rest`.
pub fn parts(url: &str) -> (String, String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(user, rest)| (user, rest));
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let user = if user.is_empty() { String::new() } else { format!("{user}@") };
    (user, hostport.to_owned(), format!("/{path}"))
}

fn addr(url: &str) -> SocketAddr {
    parts(url).1.parse().unwrap_or_else(|_| panic!("the test server's address must be IP:PORT in {url}"))
}

pub fn postgres_addr() -> SocketAddr {
    addr(&postgres_url())
}

pub fn mysql_addr() -> SocketAddr {
    addr(&mysql_url())
}

/// [`postgres_url`] with its host and port replaced by `via` (a fault proxy).
pub fn postgres_url_via(via: SocketAddr) -> String {
    let (user, _, path) = parts(&postgres_url());
    format!("postgres://{user}{via}{path}")
}

/// [`mysql_url`] with its host and port replaced by `via` (a fault proxy).
pub fn mysql_url_via(via: SocketAddr) -> String {
    let (user, _, path) = parts(&mysql_url());
    format!("mysql://{user}{via}{path}")
}

/// Whether the server of `url` accepts connections; prints SKIP when not, or panics under `CI=true`.
pub fn available(what: &str, url: &str) -> bool {
    let hostport = parts(url).1;
    let reachable = hostport
        .parse::<SocketAddr>()
        .is_ok_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("no {what} at {hostport}; CI must start it");
    }
    eprintln!("SKIP: no {what} at {hostport}, so this {what} test cannot run");
    false
}

/// Whether the PostgreSQL of [`postgres_url`] accepts connections.
pub fn postgres_available() -> bool {
    available("PostgreSQL", &postgres_url())
}

/// Whether the MySQL of [`mysql_url`] accepts connections.
pub fn mysql_available() -> bool {
    available("MySQL", &mysql_url())
}
