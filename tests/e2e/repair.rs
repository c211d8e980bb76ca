//! Sessions repair what the bus loses: with a bus that drops, duplicates and delays stream
//! messages on purpose, every session still gets every message of its streams once, in seq order.

use serde_json::json;

use crate::support::{Mode, TestNode};

/// Harsher than the behavioural suite's faults, so that every kind strikes many times.
const HARSH: &str = "drop=0.15,dup=0.2,delay=0.4,max-delay=60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_bus_loses_duplicates_and_reorders_nothing_that_clients_see() {
    if !crate::redis_server::available() {
        return;
    }
    let node = TestNode::start_mode(Mode::Cluster, &["--test-bus-faults", HARSH, "--rate-limit", "0"]).await;
    let mut bob = node.on(1).connect("bob").await;
    let mut member = node.on(2).connect("carol").await;
    member.ok(json!({"type":"join","room":"lobby"})).await;
    let mut alice = node.on(0).connect("alice").await;
    alice.ok(json!({"type":"join","room":"lobby"})).await;
    const N: u64 = 150;
    for i in 1..=N {
        alice.send_json(json!({"type":"send","to":"bob","body":i})).await;
        alice.send_json(json!({"type":"publish","room":"lobby","body":i})).await;
    }
    for (client, stream) in [(&mut bob, "user:bob"), (&mut member, "room:lobby")] {
        for i in 1..=N {
            let m = client.next_message().await;
            assert_eq!((m["stream"].as_str(), m["seq"].as_u64()), (Some(stream), Some(i)), "{m}");
            assert_eq!(m["body"].as_u64(), Some(i));
        }
        client.expect_silence(700).await;
    }
    let repairs = node.metric_total("switchyard_delivery_repairs_total").await;
    assert!(repairs > 0.0, "the faults never opened a gap: the test proved nothing");
    drop((alice, bob, member));
    node.shutdown().await;
}

/// What the bus lost and retention removed before the session could read it back cannot be
/// repaired: the session gets what is still kept, then is closed as a reader that fell behind
/// (4003, announced), never left to skip the rest unawares; resuming with `since` says
/// `truncated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_expired_before_a_repair_close_the_session() {
    let node = TestNode::start(&["--test-bus-faults", "drop=1", "--history-size", "3", "--rate-limit", "0"]).await;
    let mut carol = node.connect("carol").await;
    carol.ok(json!({"type":"join","room":"gone"})).await;
    let mut alice = node.connect("alice").await;
    alice.ok(json!({"type":"join","room":"gone"})).await;
    assert_eq!(carol.next_frame().await["event"], "join");
    for i in 1..=10 {
        alice.ok(json!({"type":"publish","room":"gone","body":i})).await;
    }
    // Every live delivery was dropped; the loss is noticed and the room re-read: 8, 9 and 10
    // are kept, 1 to 7 are not.
    for seq in 8..=10 {
        assert_eq!(carol.next_message().await["seq"], seq);
    }
    assert_eq!(carol.closed().await, (4003, Some(4003)));
    let mut again = node.connect("carol").await;
    let joined = again.ok(json!({"type":"join","room":"gone","since":0})).await;
    assert_eq!((joined["seq"].as_u64(), joined["truncated"].as_bool()), (Some(10), Some(true)));
    drop((alice, again));
    node.shutdown().await;
}
