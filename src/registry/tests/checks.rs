//! The checks every registry passes with its presence, one per test (see `registry_suite!`). The
//! node under test is `n1`.

use super::*;

/// A node heart-beating as it should is known, at its first heartbeat and every later one.
pub(crate) async fn heartbeats_of_a_known_node_answer_known(registry: &dyn Registry, _: &dyn Presence) {
    for _ in 0..3 {
        assert_eq!(registry.heartbeat(&node_info("n1")).await.unwrap(), Standing::Known);
    }
}

/// A node is listed with its details and counts once it heart-beat, and no more once it
/// deregistered.
pub(crate) async fn a_node_lists_itself_until_it_deregisters(registry: &dyn Registry, presence: &dyn Presence) {
    assert!(registry.nodes().await.unwrap().is_empty(), "listed before its first heartbeat");
    presence.connect(&info("alice", 1, "n1")).await.unwrap();
    let before = now_ms();
    registry.heartbeat(&node_info("n1")).await.unwrap();
    registry.heartbeat(&node_info("n1")).await.unwrap();
    let nodes = registry.nodes().await.unwrap();
    assert_eq!(ids(&nodes), ["n1"], "listed once");
    let n1 = &nodes[0];
    assert_eq!((n1.address.as_str(), n1.started_at, n1.sessions, n1.users), ("n1.local:8080", 42, 1, 1));
    assert!(n1.last_seen + 5_000 >= before && n1.last_seen <= now_ms() + 5_000, "last seen {} ms", n1.last_seen);
    registry.deregister("n1").await.unwrap();
    assert!(registry.nodes().await.unwrap().is_empty());
}

/// Reaping finds nothing to do while the node heart-beats: its sessions and memberships stay.
pub(crate) async fn a_live_node_is_not_reaped(registry: &dyn Registry, presence: &dyn Presence) {
    registry.heartbeat(&node_info("n1")).await.unwrap();
    presence.connect(&info("alice", 1, "n1")).await.unwrap();
    assert!(presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
    assert!(registry.reap().await.unwrap().is_empty(), "a live node is not reaped");
    assert_eq!(presence.session_counts(&[user("alice")]).await.unwrap(), vec![1]);
    assert_eq!(presence.room(&room("lobby"), 10).await.unwrap(), (1, vec![user("alice")]));
    assert_eq!(ids(&registry.nodes().await.unwrap()), ["n1"]);
}

/// A clean shutdown also drops the sessions and memberships a failed disconnect left behind.
pub(crate) async fn deregistering_removes_what_the_node_still_had(registry: &dyn Registry, presence: &dyn Presence) {
    registry.heartbeat(&node_info("n1")).await.unwrap();
    presence.connect(&info("alice", 1, "n1")).await.unwrap();
    assert!(presence.join(&room("lobby"), &user("alice"), SessionId(1)).await.unwrap());
    registry.deregister("n1").await.unwrap();
    assert_eq!(presence.session_counts(&[user("alice")]).await.unwrap(), vec![0]);
    assert!(presence.sessions(&user("alice")).await.unwrap().is_empty());
    assert_eq!(presence.room(&room("lobby"), 10).await.unwrap(), (0, vec![]));
}

/// Registering again after a deregistration is a fresh start, not a node the cluster forgot.
pub(crate) async fn a_node_that_deregistered_registers_again_as_known(registry: &dyn Registry, _: &dyn Presence) {
    assert_eq!(registry.heartbeat(&node_info("n1")).await.unwrap(), Standing::Known);
    registry.deregister("n1").await.unwrap();
    assert_eq!(registry.heartbeat(&node_info("n1")).await.unwrap(), Standing::Known);
    assert_eq!(ids(&registry.nodes().await.unwrap()), ["n1"]);
}

/// Deregistering another node's id changes nothing.
pub(crate) async fn a_node_cannot_deregister_another(registry: &dyn Registry, presence: &dyn Presence) {
    registry.heartbeat(&node_info("n1")).await.unwrap();
    presence.connect(&info("alice", 1, "n1")).await.unwrap();
    registry.deregister("n2").await.unwrap();
    assert_eq!(ids(&registry.nodes().await.unwrap()), ["n1"]);
    assert_eq!(presence.session_counts(&[user("alice")]).await.unwrap(), vec![1]);
}
