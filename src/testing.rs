//! What the conformance suites share: unique prefixes, the rule for absent servers, the test
//! servers' URLs, and a Redis for one test whose nodes share presence and the registry as a cluster's nodes do.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::backend::redis::{Instance, Keys, RedisClock, RedisPresence, RedisRegistry};

/// A prefix no other test uses.
pub(crate) fn unique_prefix() -> String {
    format!("t_{:016x}", fastrand::u64(..))
}

/// Skips a test whose server is absent, or fails it under `CI=true`.
pub(crate) fn absent<T>(test: &str, why: &str) -> Option<T> {
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{test}: {why}");
    eprintln!("SKIP {test}: {why}");
    None
}

/// `SWITCHYARD_TEST_REDIS`, else the Redis on the default port.
pub(crate) fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// `SWITCHYARD_TEST_AMQP`, else the RabbitMQ on the default port as guest.
pub(crate) fn amqp_url() -> String {
    std::env::var("SWITCHYARD_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A Redis for one test: a connection, a sampled clock and a prefix no other test uses.
pub(crate) struct TestRedis {
    pub(crate) conn: ConnectionManager,
    pub(crate) clock: Arc<RedisClock>,
    pub(crate) prefix: String,
}

/// One node's presence and registry on a [`TestRedis`], sharing one instance as a node does.
pub(crate) struct RedisNode {
    pub(crate) instance: Arc<Instance>,
    pub(crate) presence: RedisPresence,
    pub(crate) registry: RedisRegistry,
}

impl TestRedis {
    /// Connects, or answers `None` (see [`absent`]) when Redis is unreachable.
    pub(crate) async fn start(test: &str) -> Option<Self> {
        let url = redis_url();
        let client = crate::backend::redis::client(&url).unwrap();
        let connecting = crate::backend::redis::commands(&client, &url);
        let mut conn = match tokio::time::timeout(Duration::from_secs(3), connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return absent(test, &format!("no Redis at {url}: {e:#}")),
            Err(_) => return absent(test, &format!("no Redis at {url}: timed out after 3 s")),
        };
        let clock = Arc::new(RedisClock::default());
        clock.sample(&mut conn).await.unwrap();
        Some(Self { conn, clock, prefix: unique_prefix() })
    }

    pub(crate) fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    /// A new process of node `id`: its presence and registry share one instance.
    pub(crate) fn node(&self, id: &str) -> RedisNode {
        self.node_as(Arc::new(Instance::new(Arc::from(id))), self.clock.clone())
    }

    /// The presence and registry of `instance` with `clock` as its estimate of Redis's clock.
    pub(crate) fn node_as(&self, instance: Arc<Instance>, clock: Arc<RedisClock>) -> RedisNode {
        RedisNode {
            presence: RedisPresence::new(self.conn.clone(), clock.clone(), self.keys(), instance.clone()),
            registry: RedisRegistry::new(self.conn.clone(), clock, self.keys(), instance.clone()),
            instance,
        }
    }

    /// Makes every instance of node `id` look as if its last heartbeat was long ago.
    pub(crate) async fn kill(&self, id: &str) {
        let mut conn = self.conn.clone();
        let registry = self.keys().nodes();
        let members: Vec<String> =
            redis::cmd("ZRANGE").arg(&registry).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
        let dead: Vec<&String> = members.iter().filter(|m| m.starts_with(&format!("{id}@"))).collect();
        assert!(!dead.is_empty(), "{id} never heart-beat");
        for member in dead {
            let _: () = redis::cmd("ZADD").arg(&registry).arg(1).arg(member).query_async(&mut conn).await.unwrap();
        }
    }

    /// Every key of this test (a SCAN is fine here: tests only).
    pub(crate) async fn keys_left(&self) -> Vec<String> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(page);
            if next == 0 {
                keys.sort();
                return keys;
            }
            cursor = next;
        }
    }

    /// Deletes every key of this test, as a Redis that restarted empty would have.
    pub(crate) async fn flush(&self) {
        let keys = self.keys_left().await;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut self.conn.clone()).await.unwrap();
        }
    }
}
