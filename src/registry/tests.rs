//! One registry suite for every backend, each check its own test per backend (see
//! `registry_suite!`): the in-process registry, Redis (`SWITCHYARD_TEST_REDIS`, default
//! 127.0.0.1:6379) and NATS key-value buckets (`SWITCHYARD_TEST_NATS`, default
//! nats://127.0.0.1:4222), with a unique prefix per test, removed at the end; skipped with a
//! printed reason when the server is absent, except under `CI=true`. A registry is checked with
//! the presence of the same backend, which it reaps. Then what only a cluster shows
//! ([`cluster`], on Redis and on NATS): several nodes sharing one server, dead ones reaped once,
//! nodes the cluster forgot, late writes (Redis).

use std::sync::Arc;

use super::{NodeInfo, Registry, RegistryError, Standing};
use crate::backend::memory::{MemoryPresence, MemoryRegistry};
use crate::backend::nats::DEAD_AFTER;
use crate::bus::SessionId;
use crate::presence::Presence;
use crate::presence::tests::{info, room, user};
use crate::protocol::now_ms;
use crate::testing::{TestNats, TestRedis};

pub(crate) mod checks;
mod cluster;

/// What node `id` reports in its heartbeats.
pub(crate) fn node_info(id: &str) -> NodeInfo {
    NodeInfo {
        id: Arc::from(id),
        address: format!("{id}.local:8080"),
        started_at: 42,
        last_seen: 43,
        sessions: 1,
        users: 1,
    }
}

/// The ids of `nodes`, in order.
pub(crate) fn ids(nodes: &[NodeInfo]) -> Vec<String> {
    nodes.iter().map(|n| n.id.to_string()).collect()
}

/// One node's registry and presence, on one backend, and the Redis keys or NATS buckets it
/// removes afterwards.
pub(crate) struct Subject {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) presence: Arc<dyn Presence>,
    redis: Option<TestRedis>,
    nats: Option<TestNats>,
}

impl Subject {
    pub(crate) async fn finish(self) {
        if let Some(redis) = self.redis {
            redis.flush().await;
        }
        if let Some(nats) = self.nats {
            nats.finish().await;
        }
    }
}

/// Node `n1`.
pub(crate) async fn open_memory() -> Option<Subject> {
    let presence = Arc::new(MemoryPresence::new());
    Some(Subject { registry: Arc::new(MemoryRegistry::new(presence.clone())), presence, redis: None, nats: None })
}

/// Node `n1`.
pub(crate) async fn open_redis() -> Option<Subject> {
    let redis = TestRedis::start("redis registry").await?;
    let node = redis.node("n1");
    let (registry, presence) = (Arc::new(node.registry), Arc::new(node.presence));
    Some(Subject { registry, presence, redis: Some(redis), nats: None })
}

/// Node `n1`, on the test Redis Cluster.
pub(crate) async fn open_redis_cluster() -> Option<Subject> {
    let redis = TestRedis::start_cluster("redis cluster registry").await?;
    let node = redis.node("n1");
    let (registry, presence) = (Arc::new(node.registry), Arc::new(node.presence));
    Some(Subject { registry, presence, redis: Some(redis), nats: None })
}

/// Node `n1`.
pub(crate) async fn open_nats() -> Option<Subject> {
    let nats = TestNats::start("nats registry", DEAD_AFTER).await?;
    let node = nats.node("n1");
    Some(Subject { registry: node.registry, presence: node.presence, redis: None, nats: Some(nats) })
}

/// One test per check of [`checks`] for the backend that `$open` (an async
/// `fn() -> Option<Subject>`) opens.
macro_rules! registry_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! check {
                ($check:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        let Some(subject) = ($open)().await else { return };
                        checks::$check(&*subject.registry, &*subject.presence).await;
                        subject.finish().await;
                    }
                };
            }

            check!(heartbeats_of_a_known_node_answer_known);
            check!(a_node_lists_itself_until_it_deregisters);
            check!(a_live_node_is_not_reaped);
            check!(deregistering_removes_what_the_node_still_had);
            check!(a_node_that_deregistered_registers_again_as_known);
            check!(a_node_cannot_deregister_another);
        }
    };
}

registry_suite!(memory, open_memory);
registry_suite!(redis, open_redis);
registry_suite!(redis_cluster, open_redis_cluster);
registry_suite!(nats, open_nats);
