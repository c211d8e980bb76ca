//! Connecting a node to its cluster's Redis: one RESP3 client, connection managers that fail
//! fast (so a stopped Redis turns into `unavailable` answers, not hanging requests) and reconnect
//! on their own.

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion};

/// Longest wait for one Redis reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for `url` that speaks RESP3 (pub/sub pushes share the connection with commands).
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    let info = url.into_connection_info().with_context(|| format!("--redis {url}: not a valid Redis URL"))?;
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    Ok(redis::Client::open(info.set_redis_settings(settings))?)
}

/// Timeouts and reconnection for every connection manager of a node.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(1))
}

/// A command connection; fails at start with a clear message when Redis is not there.
pub async fn commands(client: &redis::Client, url: &str) -> anyhow::Result<ConnectionManager> {
    ConnectionManager::new_with_config(client.clone(), manager_config())
        .await
        .with_context(|| format!("--redis {url}: cannot reach Redis"))
}
