//! Persistence across restarts, health, readiness, metrics, shutdown, single-session policy.
//! The failed-store test is about the embedded store of a single node.

use serde_json::json;

use crate::procs::NodeProc;
use crate::support::{TestNode, both_modes, metric};

both_modes! {
    async fn messages_for_offline_users_survive_a_restart_and_seqs_continue(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        alice.ok(json!({"type":"join","room":"keep"})).await;
        for i in 1..=3 {
            alice.ok(json!({"type":"send","to":"offline","body":i})).await;
            alice.ok(json!({"type":"publish","room":"keep","body":i})).await;
        }
        drop(alice);
        let node = node.restart().await;

        let mut offline = node.connect("offline").await;
        let sync = offline.ok(json!({"type":"sync"})).await;
        assert_eq!(sync["seq"], 3);
        for i in 1..=3 {
            assert_eq!(offline.next_message().await["body"], i);
        }
        let mut alice = node.connect("alice").await;
        let next = alice.ok(json!({"type":"send","to":"offline","body":4})).await;
        assert_eq!(next["seq"], 4, "alice's stream continues after the restart");
        assert_eq!(offline.next_message().await["seq"], 4);
        alice.ok(json!({"type":"join","room":"keep"})).await;
        let p = alice.ok(json!({"type":"publish","room":"keep","body":4})).await;
        assert_eq!(p["seq"], 4, "room seqs are never reused");
        let join = offline.ok(json!({"type":"join","room":"keep","since":0})).await;
        assert_eq!(join["seq"], 4);
        for i in 1..=4 {
            assert_eq!(offline.next_message().await["seq"], i);
        }
        // The read cursor survives too.
        offline.ok(json!({"type":"ack","seq":4})).await;
        drop((offline, alice));
        let node = node.restart().await;
        let mut offline = node.connect("offline").await;
        offline.ok(json!({"type":"sync"})).await;
        offline.expect_silence(200).await;
    }
}

/// `--data-sync periodic` and a SIGKILL: what was acknowledged well before the kill (more than
/// the 200 ms between fsyncs) is still there, and the streams go on after a gap, so that no seq
/// a client may already hold (the last ones may be lost) is given to another message.
#[tokio::test]
async fn a_node_killed_under_periodic_sync_keeps_older_messages_and_never_reuses_a_seq() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let start = |name: &str| NodeProc::single(&data, dir.path().join(name), &["--data-sync", "periodic"]);
    let mut node = start("first.log").await;
    let mut alice = node.connect("alice").await;
    for i in 1..=20 {
        assert_eq!(alice.ok(json!({"type":"send","to":"bob","body":i})).await["seq"], i);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let mut last = 0;
    for i in 21..=40 {
        last = alice.ok(json!({"type":"send","to":"bob","body":i})).await["seq"].as_u64().unwrap();
    }
    assert_eq!(last, 40);
    node.kill();
    drop(alice);

    let mut node = start("second.log").await;
    let mut bob = node.connect("bob").await;
    let synced = bob.ok(json!({"type":"sync","since":0})).await;
    let kept = synced["seq"].as_u64().unwrap();
    // Whatever the kill lost, the stream goes on after a gap (of 10,000 seqs).
    assert!(kept > 10_000 + 20, "bob's stream ends at {kept}: its seqs should have moved past a gap");
    for seq in 1..=20 {
        let message = bob.next_message().await;
        assert_eq!((message["seq"].as_u64(), message["body"].as_u64()), (Some(seq), Some(seq)));
    }
    let mut alice = node.connect("alice").await;
    let next = alice.ok(json!({"type":"send","to":"bob","body":"after"})).await["seq"].as_u64().unwrap();
    assert!(next > last, "seq {next} after the crash must not reuse one up to {last}");
    drop((alice, bob));
    node.kill();

    // A clean shutdown leaves nothing to skip: the next start goes on without a gap.
    let mut node = start("third.log").await;
    let mut alice = node.connect("alice").await;
    let before = alice.ok(json!({"type":"send","to":"bob","body":"before"})).await["seq"].as_u64().unwrap();
    drop(alice);
    node.terminate(std::time::Duration::from_secs(10)).await;
    let node = start("fourth.log").await;
    let mut alice = node.connect("alice").await;
    let after = alice.ok(json!({"type":"send","to":"bob","body":"after"})).await["seq"].as_u64().unwrap();
    assert_eq!(after, before + 1, "after a clean shutdown seqs go on with no gap");
}

both_modes! {
    async fn graceful_shutdown_closes_sessions_with_1001(mode) {
        let mut node = TestNode::start_mode(mode, &[]).await;
        let mut a = node.on(0).connect("a").await;
        // In a cluster, the other nodes serve on.
        let mut others = Vec::new();
        for member in node.members().into_iter().skip(1) {
            others.push(member.connect("b").await);
        }
        let stopping = tokio::spawn(node.take_server(0).shutdown());
        assert_eq!(a.closed().await, (1001, Some(1001)));
        tokio::time::timeout(std::time::Duration::from_secs(5), stopping).await.expect("shutdown completes").unwrap();
        for b in &mut others {
            b.ok(json!({"type":"ping"})).await;
        }
    }
}

both_modes! {
    async fn single_session_policy_closes_older_sessions_with_4002(mode) {
        let node = TestNode::start_mode(mode, &["--single-session"]).await;
        let mut old = node.connect("solo").await;
        let mut other_user = node.connect("someone").await;
        let mut new = node.connect("solo").await;
        assert_eq!(old.closed().await, (4002, Some(4002)));
        new.ok(json!({"type":"ping"})).await;
        other_user.ok(json!({"type":"ping"})).await;
    }
}

both_modes! {
    async fn health_readiness_and_metrics(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        for member in node.members() {
            assert_eq!(member.http("GET", "/healthz", None, None).await.0, 200);
            let (status, ready) = member.http("GET", "/readyz", None, None).await;
            assert_eq!((status, ready["ready"].as_bool()), (200, Some(true)));
        }

        // In a cluster, a and b are on different nodes: each node counts its own sessions and
        // traffic, so the counters are summed over the nodes.
        let mut a = node.connect("a").await;
        let mut b = node.connect("b").await;
        a.ok(json!({"type":"join","room":"m"})).await;
        b.ok(json!({"type":"join","room":"m"})).await;
        a.ok(json!({"type":"send","to":"b","body":1})).await;
        b.next_message().await;
        a.ok(json!({"type":"publish","room":"m","body":1})).await;
        b.next_message().await;
        let (status, _) = node.refused_upgrade("/ws?user=bad%20name", "").await;
        assert_eq!(status, 400);

        let total = |name: &'static str| node.metric_total(name);
        assert_eq!(total("switchyard_sessions").await, 2.0, "{}", node.metrics().await);
        assert_eq!(total("switchyard_users").await, 2.0);
        // A room counts on every node where it has a member: a's and b's.
        let rooms = if !mode.clustered() { 1.0 } else { 2.0 };
        assert_eq!(total("switchyard_rooms").await, rooms);
        assert_eq!(total("switchyard_messages_in_total{kind=\"direct\"}").await, 1.0);
        assert_eq!(total("switchyard_messages_in_total{kind=\"room\"}").await, 1.0);
        assert_eq!(total("switchyard_messages_out_total{kind=\"direct\"}").await, 1.0);
        assert_eq!(total("switchyard_messages_out_total{kind=\"room\"}").await, 1.0);
        assert_eq!(total("switchyard_rejected_connections_total{reason=\"bad_request\"}").await, 1.0);
        assert!(total("switchyard_delivery_latency_seconds_count").await >= 2.0);
        // b's node delivered both messages.
        let b_node = node.on(b.node).metrics().await;
        assert_eq!(metric(&b_node, "switchyard_messages_out_total{kind=\"direct\"}"), 1.0, "{b_node}");
        assert_eq!(metric(&b_node, "switchyard_messages_out_total{kind=\"room\"}"), 1.0, "{b_node}");
    }
}

/// When the store stops answering, nothing is acknowledged: commands answer `unavailable`, the
/// API answers 503, `/readyz` turns 503 and no message is delivered.
#[tokio::test]
async fn a_failed_store_makes_the_node_unready_and_refuses_writes() {
    let node = TestNode::start(&[]).await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.ok(json!({"type":"join","room":"r"})).await;
    node.server(0).node.close_store().await;

    let (status, ready) = node.http("GET", "/readyz", None, None).await;
    assert_eq!((status, ready["ready"].as_bool()), (503, Some(false)));
    let send = alice.request(json!({"type":"send","to":"bob","body":1})).await;
    assert_eq!(send["code"], "unavailable", "{send}");
    let publish = alice.request(json!({"type":"publish","room":"r","body":1})).await;
    assert_eq!(publish["code"], "unavailable");
    let history = alice.request(json!({"type":"history","stream":"room:r"})).await;
    assert_eq!(history["code"], "unavailable");
    let (status, body) = node.http("POST", "/api/v1/users/bob/messages", Some(r#"{"body":1}"#), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")));
    bob.expect_silence(200).await;
    // The process itself lives on.
    assert_eq!(node.http("GET", "/healthz", None, None).await.0, 200);
}
