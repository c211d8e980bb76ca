//! What only a registry shared by several nodes shows, on one Redis with a unique prefix per
//! test: dead nodes reaped once by another, nodes the cluster forgot, late writes. Skipped with a
//! printed reason when Redis is absent, except under `CI=true`.

use super::*;
use crate::backend::redis::RedisClock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_lists_every_live_node_sorted_and_deregistered_nodes_leave_no_keys() {
    let Some(redis) = TestRedis::start("redis registry, live nodes").await else { return };
    let (a, b) = (redis.node("node-a"), redis.node("node-b"));
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
    assert!(redis.keys_left().await.is_empty(), "deregistered nodes leave no keys: {:?}", redis.keys_left().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_reaped_once_by_another() {
    let Some(redis) = TestRedis::start("redis registry, reaping").await else { return };
    let (a, b, c) = (redis.node("node-a"), redis.node("node-b"), redis.node("node-c"));
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

    redis.kill("node-a").await;
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
    let keys = redis.keys_left().await;
    assert!(!keys.iter().any(|k| k.contains("node-a@") && !k.contains(":reap:")), "left behind: {keys:?}");
    assert!(b.presence.leave(&lobby, &alice, SessionId(3)).await.unwrap(), "counts stayed consistent");
    redis.flush().await;
}

/// Node A was only cut off: its next heartbeat finds that the cluster forgot it, and it is known
/// again after that one; what it records again counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_node_is_forgotten_once_then_known() {
    let Some(redis) = TestRedis::start("redis registry, reaped node").await else { return };
    let (a, b) = (redis.node("node-a"), redis.node("node-b"));
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
    redis.kill("node-a").await;
    assert_eq!(b.registry.reap().await.unwrap(), vec![(room("lobby"), user("alice"))]);

    assert_eq!(a.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Forgotten);
    assert_eq!(a.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Known);
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(a.presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap(), "registered again");
    assert_eq!(b.presence.session_counts(&[user("alice")]).await.unwrap(), vec![1]);
    assert_eq!(ids(&b.registry.nodes().await.unwrap()), ["node-a"]);
    redis.flush().await;
}

/// A Redis that restarted empty forgot every node: each one's next heartbeat says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_redis_lost_its_state_is_forgotten() {
    let Some(redis) = TestRedis::start("redis registry, lost state").await else { return };
    let (a, b) = (redis.node("node-a"), redis.node("node-b"));
    for (node, id) in [(&a, "node-a"), (&b, "node-b")] {
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Known);
    }
    a.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    redis.flush().await;
    for (node, id) in [(&a, "node-a"), (&b, "node-b")] {
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Forgotten, "{id}");
        assert_eq!(node.registry.heartbeat(&node_info(id)).await.unwrap(), Standing::Known, "{id}");
    }
    redis.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_the_same_id_does_not_adopt_its_predecessor() {
    let Some(redis) = TestRedis::start("redis registry, restarted node").await else { return };
    let (old, lobby, alice) = (redis.node("node-a"), room("lobby"), user("alice"));
    old.registry.heartbeat(&node_info("node-a")).await.unwrap();
    old.presence.connect(&info("alice", 1, "node-a")).await.unwrap();
    assert!(old.presence.join(&lobby, &alice, SessionId(1)).await.unwrap());

    let new = redis.node("node-a");
    assert_eq!(new.registry.heartbeat(&node_info("node-a")).await.unwrap(), Standing::Known);
    assert_eq!(new.registry.nodes().await.unwrap().len(), 1, "one node, however many instances");
    redis.kill("node-a").await;
    new.registry.heartbeat(&node_info("node-a")).await.unwrap();

    assert_eq!(new.registry.reap().await.unwrap(), vec![(lobby.clone(), alice.clone())]);
    assert_eq!(new.presence.session_counts(&[alice]).await.unwrap(), vec![0]);
    assert_eq!(new.registry.nodes().await.unwrap().len(), 1);
    redis.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_dead_node_is_reaped_in_batches() {
    let Some(redis) = TestRedis::start("redis registry, big dead node").await else { return };
    let (a, b, big) = (redis.node("node-a"), redis.node("node-b"), room("big"));
    a.registry.heartbeat(&node_info("node-a")).await.unwrap();
    let n = 1_234;
    for i in 0..n {
        let name = format!("u{i}");
        a.presence.connect(&info(&name, i + 1, "node-a")).await.unwrap();
        assert!(a.presence.join(&big, &user(&name), SessionId(i + 1)).await.unwrap());
    }
    redis.kill("node-a").await;
    assert_eq!(b.registry.reap().await.unwrap().len(), n as usize);
    assert_eq!(b.presence.room(&big, 10).await.unwrap(), (0, vec![]));
    assert_eq!(b.presence.session_counts(&[user("u0"), user("u1233")]).await.unwrap(), vec![0, 0]);
    let keys = redis.keys_left().await;
    assert!(keys.iter().all(|k| k.contains(":reap:")), "left behind: {keys:?}");
    redis.flush().await;
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
