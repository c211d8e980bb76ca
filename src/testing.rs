//! What the conformance suites share: unique prefixes, the rule for absent servers, where the
//! test servers are, and a Redis and a NATS for one test whose nodes share presence and the
//! registry as a cluster's nodes do.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::backend::nats::{Buckets, Instance as NatsInstance, NatsPresence, NatsRegistry, kv};
use crate::backend::redis::{Conn, Instance, Keys, RedisClock, RedisPresence, RedisRegistry};

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

/// `SWITCHYARD_TEST_REDIS_CLUSTER`, else the Redis Cluster `scripts/redis-cluster.sh start` runs.
pub(crate) fn redis_cluster_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_CLUSTER")
        .unwrap_or_else(|_| "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".into())
}

/// A command connection to the test Redis Cluster, or `None` (see [`absent`]) when it is not
/// running (`scripts/redis-cluster.sh start` runs one).
pub(crate) async fn redis_cluster(test: &str) -> Option<Conn> {
    let url = redis_cluster_url();
    match tokio::time::timeout(Duration::from_secs(5), Conn::cluster(&url)).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => absent(test, &format!("no Redis Cluster at {url} (scripts/redis-cluster.sh start): {e:#}")),
        Err(_) => absent(test, &format!("no Redis Cluster at {url}: timed out after 5 s")),
    }
}

/// `SWITCHYARD_TEST_NATS`, else the NATS on the default port.
pub(crate) fn nats_url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `SWITCHYARD_TEST_AMQP`, else the RabbitMQ on the default port as guest.
pub(crate) fn amqp_url() -> String {
    std::env::var("SWITCHYARD_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A Redis (or Redis Cluster) for one test: a connection, a sampled clock and a prefix no other
/// test uses.
pub(crate) struct TestRedis {
    pub(crate) conn: Conn,
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
            Ok(Ok(conn)) => Conn::Single(conn),
            Ok(Err(e)) => return absent(test, &format!("no Redis at {url}: {e:#}")),
            Err(_) => return absent(test, &format!("no Redis at {url}: timed out after 3 s")),
        };
        let clock = Arc::new(RedisClock::default());
        clock.sample(&mut conn).await.unwrap();
        Some(Self { conn, clock, prefix: unique_prefix() })
    }

    /// [`TestRedis::start`] on the test Redis Cluster ([`redis_cluster_url`]).
    pub(crate) async fn start_cluster(test: &str) -> Option<Self> {
        let mut conn = redis_cluster(test).await?;
        let clock = Arc::new(RedisClock::default());
        clock.sample(&mut conn).await.unwrap();
        Some(Self { conn, clock, prefix: unique_prefix() })
    }

    pub(crate) fn keys(&self) -> Keys {
        match self.conn.clustered() {
            true => Keys::cluster(&self.prefix),
            false => Keys::new(&self.prefix),
        }
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

    /// Every key of this test (a SCAN of every master is fine here: tests only).
    pub(crate) async fn keys_left(&self) -> Vec<String> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut masters: Vec<(String, u16)> =
            conn.slots().await.unwrap().into_iter().map(|r| r.master.unwrap_or_default()).collect();
        masters.sort();
        masters.dedup();
        for master in masters {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor).arg("MATCH").arg(format!("{}:*", self.prefix)).arg("COUNT").arg(1000);
                let (next, page): (u64, Vec<String>) =
                    redis::from_redis_value(conn.on_node(&master, scan).await.unwrap()).unwrap();
                keys.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys
    }

    /// Deletes every key of this test, as a Redis that restarted empty would have.
    pub(crate) async fn flush(&self) {
        let keys = self.keys_left().await;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut self.conn.clone()).await.unwrap();
        }
    }
}

/// Presence and registry buckets on NATS for one test, under a prefix no other test uses, whose
/// nodes share them as a cluster's nodes do; [`TestNats::finish`] deletes them.
pub(crate) struct TestNats {
    pub(crate) buckets: Buckets,
    /// When its nodes count an instance dead.
    dead_after: Duration,
    /// The registries of the nodes made so far, to keep the live ones fresh in [`TestNats::kill`].
    registries: Mutex<Vec<(Arc<str>, Weak<NatsRegistry>)>>,
}

/// One node's presence and registry on a [`TestNats`], sharing one instance as a node does.
pub(crate) struct NatsNode {
    pub(crate) presence: Arc<NatsPresence>,
    pub(crate) registry: Arc<NatsRegistry>,
}

impl TestNats {
    /// Opens the buckets on the test NATS, whose nodes count an instance dead after `dead_after`;
    /// `None` (see [`absent`]) when NATS is unreachable.
    pub(crate) async fn start(test: &str, dead_after: Duration) -> Option<Self> {
        let url = crate::store::tests::nats_url();
        let options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
        let client = match options.connect(url.as_str()).await {
            Ok(client) => client,
            Err(e) => return absent(test, &format!("no NATS at {url}: {e}")),
        };
        let buckets = Buckets::open(client, &unique_prefix(), 1).await.expect("JetStream answers");
        Some(Self { buckets, dead_after, registries: Mutex::new(Vec::new()) })
    }

    /// A new process of node `id`: its presence and registry share one instance.
    pub(crate) fn node(&self, id: &str) -> NatsNode {
        let (buckets, instance) = (self.buckets.clone(), Arc::new(NatsInstance::new(Arc::from(id))));
        let registry = Arc::new(NatsRegistry::new(buckets.clone(), instance.clone(), self.dead_after));
        self.registries.lock().unwrap().push((Arc::from(id), Arc::downgrade(&registry)));
        NatsNode { presence: Arc::new(NatsPresence::new(buckets, instance, self.dead_after)), registry }
    }

    /// Lets every instance of node `id` die: waits until their last heartbeat is older than the
    /// dead-after time (the server's clock judges, and it cannot be moved), while every other node
    /// that heart-beat before heart-beats again.
    pub(crate) async fn kill(&self, id: &str) {
        let prefix = format!("n.{}=40", crate::backend::nats::keys::token(id));
        assert!(self.keys_left().await.iter().any(|k| k.starts_with(&prefix)), "{id} never heart-beat");
        tokio::time::sleep(self.dead_after + Duration::from_millis(300)).await;
        let others: Vec<Arc<NatsRegistry>> = {
            let registries = self.registries.lock().unwrap();
            registries.iter().filter(|(node, _)| &**node != id).filter_map(|(_, r)| r.upgrade()).collect()
        };
        for registry in others {
            registry.beat_again().await;
        }
    }

    /// Every key of both buckets.
    pub(crate) async fn keys_left(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for bucket in [&self.buckets.presence, &self.buckets.nodes] {
            let listing = kv::Listing::start(bucket, ">", false).await.unwrap();
            keys.extend(listing.all().await.unwrap().1.into_iter().map(|listed| listed.key));
        }
        keys.sort();
        keys
    }

    /// The messages both buckets' streams hold, delete markers included.
    pub(crate) async fn messages_left(&self) -> u64 {
        let mut messages = 0;
        for bucket in [&self.buckets.presence, &self.buckets.nodes] {
            messages += bucket.stream.clone().info().await.unwrap().state.messages;
        }
        messages
    }

    /// Removes every key, as a NATS that restarted empty would have.
    pub(crate) async fn flush(&self) {
        for bucket in [&self.buckets.presence, &self.buckets.nodes] {
            kv::purge(bucket, ">").await.unwrap();
        }
    }

    /// Deletes the buckets.
    pub(crate) async fn finish(self) {
        self.buckets.destroy().await;
    }
}
