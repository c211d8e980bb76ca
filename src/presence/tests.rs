//! One presence suite for every backend, each check its own test per backend (see
//! `presence_suite!`): the in-process presence, Redis (`SWITCHYARD_TEST_REDIS`, default
//! 127.0.0.1:6379) and NATS key-value buckets (`SWITCHYARD_TEST_NATS`, default
//! nats://127.0.0.1:4222), with a unique prefix per test, removed at the end. Without a reachable
//! server its tests are skipped with a printed reason, except under `CI=true`, where they fail.
//! Then what only a shared server shows: two nodes on one prefix, very large rooms, late writes
//! (Redis), racing writers and erased keys (NATS). The node registry, which reaps presence, has
//! its own suite (`crate::registry`).

use std::sync::Arc;

use super::{Presence, PresenceError, SessionInfo};
use crate::backend::memory::MemoryPresence;
use crate::backend::nats::DEAD_AFTER;
use crate::backend::redis::RedisClock;
use crate::bus::SessionId;
use crate::protocol::{RoomName, UserId};
use crate::testing::{TestNats, TestRedis};

pub(crate) mod checks;

pub(crate) fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

pub(crate) fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

/// Session `session` of `user_id` on `node`.
pub(crate) fn info(user_id: &str, session: u64, node: &str) -> SessionInfo {
    SessionInfo {
        session: SessionId(session),
        user: user(user_id),
        node: Arc::from(node),
        device: Some(format!("dev-{session}")),
        connected_at: 1_000 + session,
    }
}

/// A presence under test and the Redis keys or NATS buckets it removes afterwards.
pub(crate) struct Subject {
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

pub(crate) async fn open_memory() -> Option<Subject> {
    Some(Subject { presence: Arc::new(MemoryPresence::new()), redis: None, nats: None })
}

pub(crate) async fn open_redis() -> Option<Subject> {
    let redis = TestRedis::start("redis presence").await?;
    let presence = Arc::new(redis.node("n1").presence);
    Some(Subject { presence, redis: Some(redis), nats: None })
}

/// The test Redis Cluster (`scripts/redis-cluster.sh start`): every write in steps, one slot each.
pub(crate) async fn open_redis_cluster() -> Option<Subject> {
    let redis = TestRedis::start_cluster("redis cluster presence").await?;
    let presence = Arc::new(redis.node("n1").presence);
    Some(Subject { presence, redis: Some(redis), nats: None })
}

pub(crate) async fn open_nats() -> Option<Subject> {
    let nats = TestNats::start("nats presence", DEAD_AFTER).await?;
    let presence = nats.node("n1").presence;
    Some(Subject { presence, redis: None, nats: Some(nats) })
}

/// One test per check of [`checks`] for the backend that `$open` (an async
/// `fn() -> Option<Subject>`) opens.
macro_rules! presence_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! check {
                ($check:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        let Some(subject) = ($open)().await else { return };
                        checks::$check(&*subject.presence).await;
                        subject.finish().await;
                    }
                };
            }

            check!(a_user_enters_a_room_once);
            check!(joining_twice_with_one_session_counts_once);
            check!(leaving_an_unknown_session_is_not_a_leave);
            check!(rooms_are_independent);
            check!(sessions_are_listed_and_counted);
            check!(disconnecting_an_unknown_session_changes_nothing);
            check!(room_listing_is_sorted_and_limited);
        }
    };
}

presence_suite!(memory, open_memory);
presence_suite!(redis, open_redis);
presence_suite!(redis_cluster, open_redis_cluster);
presence_suite!(nats, open_nats);

/// Two nodes of one cluster: each sees the other's sessions, and a user is in a room once,
/// whichever node's sessions joined it.
async fn two_nodes_share_sessions(a: &dyn Presence, b: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    a.connect(&info("alice", 1, "node-a")).await.unwrap();
    b.connect(&info("alice", 2, "node-b")).await.unwrap();
    for p in [a, b] {
        let nodes: Vec<String> = p.sessions(&alice).await.unwrap().iter().map(|s| s.node.to_string()).collect();
        assert_eq!(nodes, ["node-a", "node-b"]);
        assert_eq!(p.session_counts(std::slice::from_ref(&alice)).await.unwrap(), vec![2]);
    }

    assert!(a.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(!b.join(&lobby, &alice, SessionId(2)).await.unwrap(), "already in via node A");
    assert_eq!(b.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]));
    assert!(!a.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "still in via node B");
    assert_eq!(a.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]));
    assert!(b.leave(&lobby, &alice, SessionId(2)).await.unwrap());
    assert_eq!(a.room(&lobby, 10).await.unwrap(), (0, vec![]));

    a.disconnect(&info("alice", 1, "node-a")).await.unwrap();
    assert_eq!(b.session_counts(std::slice::from_ref(&alice)).await.unwrap(), vec![1]);
}

/// What only presence shared through Redis shows.
mod redis_shared {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_share_sessions_and_count_a_user_once_per_room() {
        let Some(redis) = TestRedis::start("redis presence, two nodes").await else { return };
        let (a, b) = (redis.node("node-a").presence, redis.node("node-b").presence);
        two_nodes_share_sessions(&a, &b).await;
        redis.flush().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_on_a_redis_cluster_share_sessions_and_count_a_user_once_per_room() {
        let Some(redis) = TestRedis::start_cluster("redis cluster presence, two nodes").await else { return };
        let (a, b) = (redis.node("node-a").presence, redis.node("node-b").presence);
        two_nodes_share_sessions(&a, &b).await;
        redis.flush().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_huge_room_answers_its_count_and_a_sorted_sample() {
        let Some(redis) = TestRedis::start("redis presence, huge room").await else { return };
        let mut hset = ::redis::cmd("HSET");
        hset.arg(redis.keys().room_members(&room("huge")));
        for i in 0..10_050 {
            hset.arg(format!("u{i:05}")).arg(1);
        }
        let _: () = hset.query_async(&mut redis.conn.clone()).await.unwrap();
        let (count, sample) = redis.node("n1").presence.room(&room("huge"), 100).await.unwrap();
        assert_eq!((count, sample.len()), (10_050, 100));
        assert!(sample.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        redis.flush().await;
    }

    /// Whether `result` is the answer to a write that Redis ran after its deadline.
    fn unavailable<T>(result: Result<T, PresenceError>) -> bool {
        matches!(result, Err(PresenceError::Unavailable(m)) if m.contains("deadline"))
    }

    /// A write that Redis runs after its deadline (Redis was paused past the node's response
    /// timeout) answers `unavailable` and writes nothing, so the answer is true.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_redis_runs_after_its_deadline_does_nothing() {
        let Some(redis) = TestRedis::start("redis presence, late writes").await else { return };
        let on_time = redis.node("n1");
        let late = redis.node_as(on_time.instance.clone(), Arc::new(RedisClock::late_by(60_000))).presence;
        let on_time = on_time.presence;
        let (lobby, alice) = (room("lobby"), user("alice"));
        assert!(unavailable(late.connect(&info("alice", 1, "n1")).await));
        assert!(unavailable(late.join(&lobby, &alice, SessionId(1)).await));
        assert!(redis.keys_left().await.is_empty(), "late writes wrote {:?}", redis.keys_left().await);

        on_time.connect(&info("alice", 1, "n1")).await.unwrap();
        assert!(on_time.join(&lobby, &alice, SessionId(1)).await.unwrap());
        assert!(unavailable(late.leave(&lobby, &alice, SessionId(1)).await));
        assert!(unavailable(late.disconnect(&info("alice", 1, "n1")).await));
        assert_eq!(on_time.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]), "the late leave did nothing");
        assert_eq!(on_time.session_counts(&[alice]).await.unwrap(), vec![1], "the late disconnect did nothing");
        redis.flush().await;
    }
}

/// What only presence shared through NATS shows.
mod nats_shared {
    use futures_util::StreamExt;

    use super::*;
    use crate::backend::nats::{keys, kv};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_share_sessions_and_count_a_user_once_per_room() {
        let Some(nats) = TestNats::start("nats presence, two nodes", DEAD_AFTER).await else { return };
        let (a, b) = (nats.node("node-a").presence, nats.node("node-b").presence);
        two_nodes_share_sessions(&*a, &*b).await;
        nats.finish().await;
    }

    /// Sessions of one user joining one room on two nodes at once: exactly one join brings the
    /// user in and exactly one leave takes them out, whoever wins each race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_joins_and_leaves_enter_and_leave_once() {
        let Some(nats) = TestNats::start("nats presence, races", DEAD_AFTER).await else { return };
        let (a, b) = (nats.node("node-a").presence, nats.node("node-b").presence);
        let (lobby, alice) = (room("lobby"), user("alice"));
        let nodes = [&a, &b];
        let joins = futures_util::future::join_all((1..=20u64).map(|i| {
            let node = nodes[i as usize % 2];
            let (lobby, alice) = (lobby.clone(), alice.clone());
            async move { node.join(&lobby, &alice, SessionId(i)).await.unwrap() }
        }));
        assert_eq!(joins.await.iter().filter(|entered| **entered).count(), 1, "one join entered");
        assert_eq!(a.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]));
        let leaves = futures_util::future::join_all((1..=20u64).map(|i| {
            let node = nodes[i as usize % 2];
            let (lobby, alice) = (lobby.clone(), alice.clone());
            async move { node.leave(&lobby, &alice, SessionId(i)).await.unwrap() }
        }));
        assert_eq!(leaves.await.iter().filter(|left| **left).count(), 1, "one leave left");
        assert_eq!(b.room(&lobby, 10).await.unwrap(), (0, vec![]));
        nats.finish().await;
    }

    /// Keys that empty are erased, index and data alike: no delete markers pile up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_is_left_and_disconnected_leaves_nothing_behind() {
        let Some(nats) = TestNats::start("nats presence, erasing", DEAD_AFTER).await else { return };
        let p = nats.node("n1").presence;
        let (lobby, alice) = (room("lobby.main"), user("alice"));
        for round in 0..3 {
            p.connect(&info("alice", 1, "n1")).await.unwrap();
            assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap(), "round {round}");
            assert!(!nats.keys_left().await.is_empty());
            assert!(p.leave(&lobby, &alice, SessionId(1)).await.unwrap());
            p.disconnect(&info("alice", 1, "n1")).await.unwrap();
        }
        assert_eq!(nats.keys_left().await, Vec::<String>::new());
        assert_eq!(nats.messages_left().await, 0, "no delete markers");
        nats.finish().await;
    }

    /// A room is listed exactly however large: its count and its first ids in sort order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_room_answers_its_count_and_its_first_ids() {
        let Some(nats) = TestNats::start("nats presence, large room", DEAD_AFTER).await else { return };
        let big = room("big");
        let n = 3_000;
        futures_util::stream::iter(0..n)
            .map(|i| {
                let key = keys::membership(&big, &user(&format!("u{i:05}")));
                let bucket = &nats.buckets.presence;
                async move { kv::put(bucket, &key, "[\"0000000000000001\"]".into()).await.unwrap() }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let p = nats.node("n1").presence;
        let (count, first) = p.room(&big, 100).await.unwrap();
        assert_eq!(count, n);
        let expected: Vec<UserId> = (0..100).map(|i| user(&format!("u{i:05}"))).collect();
        assert_eq!(first, expected);
        assert_eq!(p.room(&room("bi"), 10).await.unwrap(), (0, vec![]), "a room whose name starts another's");
        nats.finish().await;
    }
}
