//! The presence conformance suite: the same checks against every backend, then what only a
//! cluster can show (two nodes on one Redis, a dead node reaped by another).
//!
//! Redis tests use `SWITCHYARD_TEST_REDIS` (default `redis://127.0.0.1:6379`) and a unique key
//! prefix each. Without a reachable Redis they are skipped with a message, unless `CI=true`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{NodeInfo, Presence, SessionInfo};
use crate::backend::memory::MemoryPresence;
use crate::backend::redis::RedisPresence;
use crate::bus::SessionId;
use crate::protocol::{RoomName, UserId};

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn info(user_id: &str, session: u64, node: &str) -> SessionInfo {
    SessionInfo {
        session: SessionId(session),
        user: user(user_id),
        node: Arc::from(node),
        device: Some(format!("dev-{session}")),
        connected_at: 1_000 + session,
    }
}

fn node_info(id: &str) -> NodeInfo {
    NodeInfo {
        id: Arc::from(id),
        address: format!("{id}.local:8080"),
        started_at: 42,
        last_seen: 43,
        sessions: 1,
        users: 1,
    }
}

/// A Redis for one test: a connection and a prefix no other test uses.
struct TestRedis {
    conn: ConnectionManager,
    prefix: String,
}

impl TestRedis {
    /// Connects, or answers `None` (after saying why) when Redis is unreachable outside CI.
    async fn start() -> Option<Self> {
        let url = std::env::var("SWITCHYARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let connect = async {
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            // A plain connection first: it fails at once with the cause, where the manager retries.
            match tokio::time::timeout(Duration::from_secs(3), client.get_multiplexed_async_connection()).await {
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out after 3 s".to_owned()),
                Ok(Ok(_)) => {}
            }
            match tokio::time::timeout(Duration::from_secs(3), ConnectionManager::new(client)).await {
                Ok(conn) => conn.map_err(|e| e.to_string()),
                Err(_) => Err("timed out after 3 s".to_owned()),
            }
        };
        match connect.await {
            Ok(conn) => Some(Self { conn, prefix: format!("sy-test-{:016x}", fastrand::u64(..)) }),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true and Redis at {url} is unreachable: {e}")
            }
            Err(e) => {
                eprintln!("skipping Redis presence test: Redis at {url} is unreachable ({e})");
                eprintln!("(set SWITCHYARD_TEST_REDIS to a reachable Redis; with CI=true this fails)");
                None
            }
        }
    }

    fn presence(&self, node: &str) -> RedisPresence {
        RedisPresence::new(self.conn.clone(), &self.prefix, Arc::from(node))
    }

    /// Makes every instance of `node` look as if its last heartbeat was long ago.
    async fn kill(&self, node: &str) {
        let mut conn = self.conn.clone();
        let registry = format!("{}:nodes", self.prefix);
        let members: Vec<String> =
            redis::cmd("ZRANGE").arg(&registry).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
        let dead: Vec<&String> = members.iter().filter(|m| m.starts_with(&format!("{node}@"))).collect();
        assert!(!dead.is_empty(), "{node} never heart-beat");
        for member in dead {
            let _: () = redis::cmd("ZADD").arg(&registry).arg(1).arg(member).query_async(&mut conn).await.unwrap();
        }
    }

    /// Every key of this test (a SCAN is fine here: tests only).
    async fn keys(&self) -> Vec<String> {
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
                return keys;
            }
            cursor = next;
        }
    }

    async fn cleanup(self) {
        let keys = self.keys().await;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut self.conn.clone()).await.unwrap();
        }
    }
}

/// Runs every listed check against both backends, as `memory_backend::<check>` and `redis_backend::<check>`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod memory_backend {
            $(#[tokio::test]
            async fn $check() {
                super::$check(&super::MemoryPresence::new()).await;
            })*
        }
        mod redis_backend {
            $(#[tokio::test]
            async fn $check() {
                let Some(redis) = super::TestRedis::start().await else { return };
                super::$check(&redis.presence("n1")).await;
                redis.cleanup().await;
            })*
        }
    };
}

conformance!(
    a_user_enters_a_room_once,
    joining_twice_with_one_session_counts_once,
    leaving_an_unknown_session_is_not_a_leave,
    rooms_are_independent,
    sessions_are_listed_and_counted,
    room_listing_is_sorted_and_limited,
    a_node_lists_itself_until_it_deregisters,
);

async fn a_user_enters_a_room_once(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap(), "first session brings the user in");
    assert!(!p.join(&lobby, &alice, SessionId(2)).await.unwrap(), "second session does not");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]));
    assert!(!p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "one session is still in");
    assert!(p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "the last session takes the user out");
    assert!(!p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "leaving twice is not a second leave");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (0, vec![]));
    assert!(p.join(&lobby, &alice, SessionId(3)).await.unwrap(), "a user can come back");
}

async fn joining_twice_with_one_session_counts_once(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(!p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "one leave undoes both joins");
    assert_eq!(p.room(&lobby, 10).await.unwrap().0, 0);
}

async fn leaving_an_unknown_session_is_not_a_leave(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(!p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "never joined");
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(!p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "another session of the user");
    assert!(!p.leave(&lobby, &user("bob"), SessionId(1)).await.unwrap(), "the same session id, another user");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (1, vec![alice]));
}

async fn rooms_are_independent(p: &dyn Presence) {
    let (lobby, chat, alice) = (room("lobby"), room("chat"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(p.join(&chat, &alice, SessionId(1)).await.unwrap(), "another room is entered separately");
    assert!(p.leave(&lobby, &alice, SessionId(1)).await.unwrap());
    assert_eq!(p.room(&chat, 10).await.unwrap(), (1, vec![alice]));
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (0, vec![]));
}

async fn sessions_are_listed_and_counted(p: &dyn Presence) {
    let users = [user("alice"), user("bob"), user("carol")];
    assert_eq!(p.session_counts(&[]).await.unwrap(), Vec::<usize>::new());
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![0, 0, 0]);
    p.connect(&info("alice", 1, "n1")).await.unwrap();
    p.connect(&info("alice", 2, "n1")).await.unwrap();
    p.connect(&info("bob", 3, "n1")).await.unwrap();
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![2, 1, 0]);

    let mut listed = p.sessions(&users[0]).await.unwrap();
    listed.sort_by_key(|s| s.session);
    assert_eq!(listed.len(), 2);
    let first = &listed[0];
    assert_eq!((first.session, first.user.as_str(), &*first.node), (SessionId(1), "alice", "n1"));
    assert_eq!((first.device.as_deref(), first.connected_at), (Some("dev-1"), 1_001));
    assert_eq!(listed[1].session, SessionId(2));

    p.disconnect(&info("alice", 1, "n1")).await.unwrap();
    p.disconnect(&info("carol", 9, "n1")).await.unwrap();
    let left: Vec<SessionId> = p.sessions(&users[0]).await.unwrap().iter().map(|s| s.session).collect();
    assert_eq!(left, vec![SessionId(2)]);
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![1, 1, 0]);
    assert!(p.sessions(&users[2]).await.unwrap().is_empty());
}

async fn room_listing_is_sorted_and_limited(p: &dyn Presence) {
    let lobby = room("lobby");
    for (i, name) in ["dave", "alice", "carol", "bob"].into_iter().enumerate() {
        assert!(p.join(&lobby, &user(name), SessionId(i as u64 + 1)).await.unwrap());
    }
    let all = vec![user("alice"), user("bob"), user("carol"), user("dave")];
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (4, all.clone()));
    assert_eq!(p.room(&lobby, 2).await.unwrap(), (4, all[..2].to_vec()));
    assert_eq!(p.room(&lobby, 0).await.unwrap(), (4, vec![]));
    assert_eq!(p.room(&room("empty"), 10).await.unwrap(), (0, vec![]));
}

async fn a_node_lists_itself_until_it_deregisters(p: &dyn Presence) {
    p.heartbeat(&node_info("n1")).await.unwrap();
    p.heartbeat(&node_info("n1")).await.unwrap();
    let nodes = p.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!((&*nodes[0].id, nodes[0].address.as_str(), nodes[0].started_at), ("n1", "n1.local:8080", 42));
    assert!(p.reap().await.unwrap().is_empty(), "a live node is not reaped");
    p.deregister("n1").await.unwrap();
    assert!(p.nodes().await.unwrap().is_empty());
}

/// The checks only a shared Redis can show.
mod cluster {
    use super::*;

    #[tokio::test]
    async fn two_nodes_share_sessions_and_count_a_user_once_per_room() {
        let Some(redis) = TestRedis::start().await else { return };
        let (a, b) = (redis.presence("node-a"), redis.presence("node-b"));
        let (lobby, alice) = (room("lobby"), user("alice"));
        a.connect(&info("alice", 1, "node-a")).await.unwrap();
        b.connect(&info("alice", 2, "node-b")).await.unwrap();
        for p in [&a, &b] {
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
        redis.cleanup().await;
    }

    #[tokio::test]
    async fn nodes_lists_every_live_node_sorted() {
        let Some(redis) = TestRedis::start().await else { return };
        let (a, b) = (redis.presence("node-a"), redis.presence("node-b"));
        b.heartbeat(&node_info("node-b")).await.unwrap();
        a.heartbeat(&node_info("node-a")).await.unwrap();
        let ids: Vec<String> = b.nodes().await.unwrap().iter().map(|n| n.id.to_string()).collect();
        assert_eq!(ids, ["node-a", "node-b"]);

        // A clean shutdown also drops what a failed disconnect left behind.
        a.connect(&info("alice", 1, "node-a")).await.unwrap();
        assert!(a.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
        a.deregister("node-a").await.unwrap();
        let ids: Vec<String> = b.nodes().await.unwrap().iter().map(|n| n.id.to_string()).collect();
        assert_eq!(ids, ["node-b"]);
        assert_eq!(b.session_counts(&[user("alice")]).await.unwrap(), vec![0]);
        assert_eq!(b.room(&room("lobby"), 10).await.unwrap().0, 0);
        b.deregister("node-b").await.unwrap();
        assert!(redis.keys().await.is_empty(), "deregistered nodes leave no keys: {:?}", redis.keys().await);
    }

    #[tokio::test]
    async fn a_dead_node_is_reaped_once_by_another() {
        let Some(redis) = TestRedis::start().await else { return };
        let (a, b, c) = (redis.presence("node-a"), redis.presence("node-b"), redis.presence("node-c"));
        let (lobby, chat, alice, bob) = (room("lobby"), room("chat"), user("alice"), user("bob"));
        for (p, id) in [(&a, "node-a"), (&b, "node-b"), (&c, "node-c")] {
            p.heartbeat(&node_info(id)).await.unwrap();
        }
        a.connect(&info("alice", 1, "node-a")).await.unwrap();
        a.connect(&info("bob", 2, "node-a")).await.unwrap();
        b.connect(&info("alice", 3, "node-b")).await.unwrap();
        assert!(a.join(&lobby, &alice, SessionId(1)).await.unwrap());
        assert!(a.join(&chat, &alice, SessionId(1)).await.unwrap());
        assert!(a.join(&lobby, &bob, SessionId(2)).await.unwrap());
        assert!(!b.join(&lobby, &alice, SessionId(3)).await.unwrap());

        redis.kill("node-a").await;
        // Dead but not reaped yet: its sessions already stop counting.
        assert_eq!(b.session_counts(&[alice.clone(), bob.clone()]).await.unwrap(), vec![1, 0]);
        let nodes: Vec<String> = b.sessions(&alice).await.unwrap().iter().map(|s| s.node.to_string()).collect();
        assert_eq!(nodes, ["node-b"]);
        let ids: Vec<String> = b.nodes().await.unwrap().iter().map(|n| n.id.to_string()).collect();
        assert_eq!(ids, ["node-b", "node-c"]);

        let (from_b, from_c) = tokio::join!(b.reap(), c.reap());
        let (from_b, from_c) = (from_b.unwrap(), from_c.unwrap());
        assert!(from_b.is_empty() || from_c.is_empty(), "reaped twice: {from_b:?} and {from_c:?}");
        let mut left = [from_b, from_c].concat();
        left.sort();
        assert_eq!(left, vec![(chat.clone(), alice.clone()), (lobby.clone(), bob.clone())]);
        assert!(b.reap().await.unwrap().is_empty(), "a second reap finds nothing");

        assert_eq!(c.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]), "alice stays in via node B");
        assert_eq!(c.room(&chat, 10).await.unwrap(), (0, vec![]));
        assert_eq!(c.session_counts(&[alice.clone(), bob.clone()]).await.unwrap(), vec![1, 0]);
        let keys = redis.keys().await;
        assert!(!keys.iter().any(|k| k.contains("node-a@") && !k.contains(":reap:")), "left behind: {keys:?}");
        assert!(b.leave(&lobby, &alice, SessionId(3)).await.unwrap(), "counts stayed consistent");

        // Node A was only unreachable: its next heartbeat tells it that it lost its presence.
        assert!(matches!(a.heartbeat(&node_info("node-a")).await, Err(crate::presence::PresenceError::Reaped(_))));
        a.heartbeat(&node_info("node-a")).await.unwrap();
        redis.cleanup().await;
    }

    #[tokio::test]
    async fn a_node_restarted_under_the_same_id_does_not_adopt_its_predecessor() {
        let Some(redis) = TestRedis::start().await else { return };
        let (old, lobby, alice) = (redis.presence("node-a"), room("lobby"), user("alice"));
        old.heartbeat(&node_info("node-a")).await.unwrap();
        old.connect(&info("alice", 1, "node-a")).await.unwrap();
        assert!(old.join(&lobby, &alice, SessionId(1)).await.unwrap());

        let new = redis.presence("node-a");
        new.heartbeat(&node_info("node-a")).await.unwrap();
        assert_eq!(new.nodes().await.unwrap().len(), 1, "one node, however many instances");
        redis.kill("node-a").await;
        new.heartbeat(&node_info("node-a")).await.unwrap();

        assert_eq!(new.reap().await.unwrap(), vec![(lobby.clone(), alice.clone())]);
        assert_eq!(new.session_counts(&[alice]).await.unwrap(), vec![0]);
        assert_eq!(new.nodes().await.unwrap().len(), 1);
        redis.cleanup().await;
    }
}

/// Sizes past the batch and listing thresholds.
mod large {
    use super::*;

    #[tokio::test]
    async fn a_huge_room_answers_its_count_and_a_sorted_sample() {
        let Some(redis) = TestRedis::start().await else { return };
        let mut hset = redis::cmd("HSET");
        hset.arg(format!("{}:rm:huge", redis.prefix));
        for i in 0..10_050 {
            hset.arg(format!("u{i:05}")).arg(1);
        }
        let _: () = hset.query_async(&mut redis.conn.clone()).await.unwrap();
        let (count, sample) = redis.presence("n1").room(&room("huge"), 100).await.unwrap();
        assert_eq!((count, sample.len()), (10_050, 100));
        assert!(sample.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        redis.cleanup().await;
    }

    #[tokio::test]
    async fn a_big_dead_node_is_reaped_in_batches() {
        let Some(redis) = TestRedis::start().await else { return };
        let (a, b, big) = (redis.presence("node-a"), redis.presence("node-b"), room("big"));
        a.heartbeat(&node_info("node-a")).await.unwrap();
        let n = 1_234;
        for i in 0..n {
            let name = format!("u{i}");
            a.connect(&info(&name, i + 1, "node-a")).await.unwrap();
            assert!(a.join(&big, &user(&name), SessionId(i + 1)).await.unwrap());
        }
        redis.kill("node-a").await;
        assert_eq!(b.reap().await.unwrap().len(), n as usize);
        assert_eq!(b.room(&big, 10).await.unwrap(), (0, vec![]));
        assert_eq!(b.session_counts(&[user("u0"), user("u1233")]).await.unwrap(), vec![0, 0]);
        let keys = redis.keys().await;
        assert!(keys.iter().all(|k| k.contains(":reap:")), "left behind: {keys:?}");
        redis.cleanup().await;
    }
}
