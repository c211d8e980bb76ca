//! The RabbitMQ a cluster's bus may run on: `SWITCHYARD_TEST_AMQP`, or the machine's own
//! (guest on 127.0.0.1:5672). Each deployment takes an exchange of its own through its unique
//! `--prefix`. Without a broker the test prints SKIP and passes, except under `CI=true`, where it
//! fails.

use std::net::SocketAddr;

use crate::sql_server::{available as reachable, parts};

/// The URL tests give `--bus` for RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("SWITCHYARD_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn amqp_addr() -> SocketAddr {
    let hostport = parts(&amqp_url()).1;
    hostport.parse().unwrap_or_else(|_| panic!("the test RabbitMQ's address must be IP:PORT, not {hostport}"))
}

/// [`amqp_url`] with its host and port replaced by `via` (a fault proxy).
pub fn amqp_url_via(via: SocketAddr) -> String {
    let (user, _, path) = parts(&amqp_url());
    format!("amqp://{user}{via}{path}")
}

/// Whether the RabbitMQ of [`amqp_url`] accepts connections.
pub fn available() -> bool {
    reachable("RabbitMQ", &amqp_url())
}
