//! What only a registry shared by several nodes shows, on one shared server with a unique prefix
//! per test, each check its own test per backend (see `cluster_suite!`): dead nodes reaped once by
//! another, nodes the cluster forgot, restarted nodes. Then late writes, on Redis. Skipped with a
//! printed reason when the server is absent, except under `CI=true`.

use std::time::Duration;

use super::*;
use crate::backend::nats::keys::{self, token};
use crate::backend::nats::kv;
use crate::backend::redis::RedisClock;

/// How soon the nodes of a NATS cluster under test count an instance dead: a NATS node is killed
/// by waiting that long (the server's clock judges), so short, but long enough for a check to
/// run between a kill and the next heartbeat of the nodes that stay.
const NATS_DEAD_AFTER: Duration = Duration::from_secs(3);

/// The shared server of one test's cluster.
enum Cluster {
    Redis(TestRedis),
    /// Boxed: its buckets' handles are large.
    Nats(Box<TestNats>),
}

/// One node of a [`Cluster`]: a process's presence and registry, sharing its instance.
struct Node {
    registry: Arc<dyn Registry>,
    presence: Arc<dyn Presence>,
}

impl Cluster {
    async fn redis() -> Option<Self> {
        TestRedis::start("redis registry, cluster").await.map(Self::Redis)
    }

    async fn redis_cluster() -> Option<Self> {
        TestRedis::start_cluster("redis cluster registry, cluster").await.map(Self::Redis)
    }

    async fn nats() -> Option<Self> {
        TestNats::start("nats registry, cluster", NATS_DEAD_AFTER).await.map(|nats| Self::Nats(Box::new(nats)))
    }

    /// A new process of node `id`.
    fn node(&self, id: &str) -> Node {
        match self {
            Self::Redis(redis) => {
                let node = redis.node(id);
                Node { registry: Arc::new(node.registry), presence: Arc::new(node.presence) }
            }
            Self::Nats(nats) => {
                let node = nats.node(id);
                Node { registry: node.registry, presence: node.presence }
            }
        }
    }

    /// Makes every instance of node `id` dead, and no other.
    async fn kill(&self, id: &str) {
        match self {
            Self::Redis(redis) => redis.kill(id).await,
            Self::Nats(nats) => nats.kill(id).await,
        }
    }

    /// Every key of the test but reap locks (which expire on their own).
    async fn keys_left(&self) -> Vec<String> {
        match self {
            Self::Redis(redis) => redis.keys_left().await.into_iter().filter(|k| !k.contains(":reap:")).collect(),
            Self::Nats(nats) => nats.keys_left().await,
        }
    }

    /// The keys of [`Cluster::keys_left`] that name an instance of node `id`.
    async fn keys_of(&self, id: &str) -> Vec<String> {
        let instance = match self {
            Self::Redis(_) => format!("{id}@"),
            Self::Nats(_) => format!("{}=40", token(id)),
        };
        self.keys_left().await.into_iter().filter(|k| k.contains(&instance)).collect()
    }

    /// Removes every key, as a server that restarted empty would have.
    async fn lose_state(&self) {
        match self {
            Self::Redis(redis) => redis.flush().await,
            Self::Nats(nats) => nats.flush().await,
        }
    }

    async fn finish(self) {
        match self {
            Self::Redis(redis) => redis.flush().await,
            Self::Nats(nats) => nats.finish().await,
        }
    }
}

/// One test per check below for the cluster that `$open` (an async `fn() -> Option<Cluster>`)
/// opens.
macro_rules! cluster_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! check {
                ($check:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        let Some(cluster) = ($open)().await else { return };
                        super::$check(&cluster).await;
                        cluster.finish().await;
                    }
                };
            }

            check!(nodes_lists_every_live_node_sorted_and_deregistered_nodes_leave_no_keys);
            check!(a_dead_node_is_reaped_once_by_another);
            check!(a_reaped_node_is_forgotten_once_then_known);
            check!(a_node_whose_backend_lost_its_state_is_forgotten);
            check!(a_node_restarted_under_the_same_id_does_not_adopt_its_predecessor);
            check!(a_big_dead_node_is_reaped_in_batches);
        }
    };
}

cluster_suite!(redis, Cluster::redis);
cluster_suite!(redis_cluster, Cluster::redis_cluster);
cluster_suite!(nats, Cluster::nats);

async fn nodes_lists_every_live_node_sorted_and_deregistered_nodes_leave_no_keys(cluster: &Cluster) {
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    b.registry.heartbeat(&node_info("node-b")).await.unwrap();
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-a", "node-b"]);

    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
    a.registry.deregister("node-a").await.unwrap();
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-b"]);
    assert_eq!(b.presence.session_counts(&[user("alice")]).await.unwrap(), vec![0]);
    assert_eq!(b.presence.room(&room("lobby"), 10).await.unwrap().0, 0);
    b.registry.deregister("node-b").await.unwrap();
    let keys = cluster.keys_left().await;
    assert!(keys.is_empty(), "deregistered nodes leave no keys: {keys:?}");
}

async fn a_dead_node_is_reaped_once_by_another(cluster: &Cluster) {
    let (a, b, c) = (cluster.node("node-a"), cluster.node("node-b"), cluster.node("node-c"));
    let (lobby, chat, alice, bob) = (room("lobby"), room("chat"), user("alice"), user("bob"));
    for (node, id) in [(&a, "node-a"), (&b, "node-b"), (&c, "node-c")] {
        node.registry.heartbeat(&node_info(id)).await.unwrap();
    }
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    a.presence.connect(&info("bob", 2, "node-a")).await.unwrap();
    b.presence.connect(&info("alice", 3, "node-b")).await.unwrap();
    assert!(a.presence.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(a.presence.join(&chat, &alice, SessionId(1)).await.unwrap());
    assert!(a.presence.join(&lobby, &bob, SessionId(2)).await.unwrap());
    assert!(!b.presence.join(&lobby, &alice, SessionId(3)).await.unwrap());

    cluster.kill("node-a").await;
    // Dead but not reaped yet: its sessions already stop counting, and it is no longer listed.
    assert_eq!(b.presence.session_counts(&[alice.clone(), bob.clone()]).await.unwrap(), vec![1, 0]);
    let nodes: Vec<String> = b.presence.sessions(&alice).await.unwrap().iter().map(|s| s.node.to_string()).collect();
    assert_eq!(nodes, ["node-b"]);
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-b", "node-c"]);

    let (from_b, from_c) = tokio::join!(b.registry.reap(), c.registry.reap());
    let (from_b, from_c) = (from_b.unwrap(), from_c.unwrap());
    assert!(from_b.is_empty() || from_c.is_empty(), "reaped twice: {from_b:?} and {from_c:?}");
    let mut left = [from_b, from_c].concat();
    left.sort();
    assert_eq!(left, vec![(chat.clone(), alice.clone()), (lobby.clone(), bob.clone())]);
    assert!(b.registry.reap().await.unwrap().is_empty(), "a second reap finds nothing");

    assert_eq!(c.presence.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]), "alice stays in via node B");
    assert_eq!(c.presence.room(&chat, 10).await.unwrap(), (0, vec![]));
    assert_eq!(c.presence.session_counts(&[alice.clone(), bob.clone()]).await.unwrap(), vec![1, 0]);
    let keys = cluster.keys_of("node-a").await;
    assert!(keys.is_empty(), "left behind: {keys:?}");
    assert!(b.presence.leave(&lobby, &alice, SessionId(3)).await.unwrap(), "counts stayed consistent");
}

/// Node A was only cut off: its next heartbeat finds that the cluster forgot it, and it is known
/// again after that one; what it records again counts.
async fn a_reaped_node_is_forgotten_once_then_known(cluster: &Cluster) {
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
    cluster.kill("node-a").await;
    assert_eq!(b.registry.reap().await.unwrap(), vec![(room("lobby"), user("alice"))]);

    assert_eq!(a.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Forgotten);
    assert_eq!(a.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Known);
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap(), "registered again");
    assert_eq!(b.presence.session_counts(&[user("alice")]).await.unwrap(), vec![1]);
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-a"]);
}

/// A server that restarted empty forgot every node: each one's next heartbeat says so.
async fn a_node_whose_backend_lost_its_state_is_forgotten(cluster: &Cluster) {
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    for (node, id) in [(&a, "node-a"), (&b, "node-b")] {
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Known);
    }
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    cluster.lose_state().await;
    for (node, id) in [(&a, "node-a"), (&b, "node-b")] {
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Forgotten, "{id}");
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Known, "{id}");
    }
}

async fn a_node_restarted_under_the_same_id_does_not_adopt_its_predecessor(cluster: &Cluster) {
    let (old, lobby, alice) = (cluster.node("node-a"), room("lobby"), user("alice"));
    old.registry.heartbeat(&node_info("node-a")).await.unwrap();
    old.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(old.presence.join(&lobby, &alice, SessionId(1)).await.unwrap());

    let new = cluster.node("node-a");
    assert_eq!(new.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Known);
    assert_eq!(new.registry.nodes().await.unwrap().len(), 1, "one node, however many instances");
    cluster.kill("node-a").await;
    new.registry.heartbeat(&node_info("node-a")).await.unwrap();

    assert_eq!(new.registry.reap().await.unwrap(), vec![(lobby.clone(), alice.clone())]);
    assert_eq!(new.presence.session_counts(&[alice]).await.unwrap(), vec![0]);
    assert_eq!(new.registry.nodes().await.unwrap().len(), 1);
}

async fn a_big_dead_node_is_reaped_in_batches(cluster: &Cluster) {
    let (a, b, big) = (cluster.node("node-a"), cluster.node("node-b"), room("big"));
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    let n = 1_234;
    for i in 0..n {
        let name = format!("u{i}");
        a.presence.connect(&info(&name, i + 1, "node-a")).await.unwrap();
        assert!(a.presence.join(&big, &user(&name), SessionId(i + 1)).await.unwrap());
    }
    cluster.kill("node-a").await;
    assert_eq!(b.registry.reap().await.unwrap().len(), n as usize);
    assert_eq!(b.presence.room(&big, 10).await.unwrap(), (0, vec![]));
    assert_eq!(b.presence.session_counts(&[user("u0"), user("u1233")]).await.unwrap(), vec![0, 0]);
    let keys = cluster.keys_left().await;
    assert!(keys.is_empty(), "left behind: {keys:?}");
}

/// A reaper that stopped half-way leaves its claim: the dead node is its own for a while, then
/// another node takes the reaping over and answers what was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaping_whose_reaper_stopped_is_taken_over_on_nats() {
    let Some(nats) = TestNats::start("nats registry, stopped reaper", NATS_DEAD_AFTER).await else { return };
    let (a, b, lobby, alice) = (nats.node("node-a"), nats.node("node-b"), room("lobby"), user("alice"));
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    b.registry.heartbeat(&node_info("node-b")).await.unwrap();
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&lobby, &alice, SessionId(1)).await.unwrap());
    nats.kill("node-a").await;
    let keys = nats.keys_left().await;
    let instance = keys.iter().find_map(|k| keys::instance_of(k).filter(|i| i.starts_with("node-a=40"))).unwrap();
    kv::put(&nats.buckets.nodes, &keys::claim(instance), "a reaper that stopped".into()).await.unwrap();
    let claimed = tokio::time::Instant::now();

    assert!(b.registry.reap().await.unwrap().is_empty(), "the claim is held");
    assert_eq!(b.presence.room(&lobby, 10).await.unwrap().0, 1);
    while claimed.elapsed() < NATS_DEAD_AFTER * 3 + Duration::from_millis(300) {
        b.registry.heartbeat(&node_info("node-b")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(b.registry.reap().await.unwrap(), vec![(lobby.clone(), alice)], "taken over");
    assert_eq!(b.presence.room(&lobby, 10).await.unwrap().0, 0);
    let keys = nats.keys_left().await;
    assert_eq!(keys.iter().filter(|k| k.contains("node-a=40")).count(), 0, "claim and entry gone: {keys:?}");
    nats.finish().await;
}

/// Whether `result` is the answer to a write that Redis ran after its deadline.
fn late<T>(result: Result<T, RegistryError>) -> bool {
    matches!(result, Err(RegistryError::Unavailable(m)) if m.contains("deadline"))
}

/// Heartbeats, reaps and deregistrations that Redis runs after their deadline answer
/// `unavailable` and write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_redis_runs_after_its_deadline_does_nothing() {
    let Some(redis) = TestRedis::start("redis registry, late writes").await else { return };
    let late_clock = Arc::new(RedisClock::late_by(60_000));
    let (a, b) = (redis.node("node-a"), redis.node("node-b"));
    let (late_a, late_b) =
        (redis.node_as(a.instance.clone(), late_clock.clone()), redis.node_as(b.instance.clone(), late_clock));

    assert!(late(late_a.registry.heartbeat(&node_info("node-a")).await));
    assert!(redis.keys_left().await.is_empty(), "a late heartbeat wrote {:?}", redis.keys_left().await);
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    b.registry.heartbeat(&node_info("node-b")).await.unwrap();
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());

    assert!(late(late_a.registry.deregister("node-a").await));
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-a", "node-b"], "a late deregistration did nothing");
    redis.kill("node-a").await;
    assert!(late(late_b.registry.reap().await));
    assert_eq!(b.presence.room(&room("lobby"), 10).await.unwrap().0, 1, "a late reap did nothing");
    assert_eq!(b.registry.reap().await.unwrap(), vec![(room("lobby"), user("alice"))], "nor claimed the dead node");
    redis.flush().await;
}
