//! Draining on SIGTERM (`--drain-delay`, `--drain-seconds`), black-box on real processes and real
//! signals: `/readyz` turns 503 at once while the node keeps serving, then the sessions are closed
//! with 1001 spread over the window, and the process exits once the last one is gone.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;

use crate::procs::NodeProc;
use crate::support::{Client, raw_upgrade_status};

async fn single(dir: &tempfile::TempDir, extra: &[&str]) -> NodeProc {
    NodeProc::single(&dir.path().join("data"), dir.path().join("node.log"), extra).await
}

/// Polls `/readyz` until it answers `want`; panics after `wait`.
async fn readyz_becomes(node: &NodeProc, want: u16, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        if node.readyz(Duration::from_secs(1)).await == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never answered {want}:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn after_sigterm_readyz_is_503_at_once_while_sessions_and_new_clients_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = single(&dir, &["--drain-delay", "5", "--drain-seconds", "0"]).await;
    assert_eq!(node.readyz(Duration::from_secs(5)).await, Some(200));
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    node.signal("TERM");
    let signalled = Instant::now();
    readyz_becomes(&node, 503, Duration::from_secs(2)).await;
    let (status, _) = node.http("GET", "/healthz", None).await;
    assert_eq!(status, 200, "/healthz stays 200 while draining");
    // Still serving: a message goes through, the API works, and a late client is let in.
    alice.ok(json!({"type": "send", "to": "bob", "body": "still here"})).await;
    assert_eq!(bob.next_message().await["body"], "still here");
    let answer = node.ok("POST", "/api/v1/users/bob/messages", Some(&json!({"body": "from the API"}))).await;
    assert!(answer["seq"].as_u64().is_some(), "{answer}");
    assert_eq!(bob.next_message().await["body"], "from the API");
    let mut late = node.connect("carol").await;
    late.ok(json!({"type": "ping"})).await;
    assert!(signalled.elapsed() < Duration::from_secs(5), "all of this happened inside the delay");
    // Then every session is closed with 1001, and the process exits cleanly.
    for client in [&mut alice, &mut bob, &mut late] {
        assert_eq!(client.closed_within(Duration::from_secs(10)).await.0, 1001);
    }
    assert!(signalled.elapsed() >= Duration::from_millis(4900), "nothing was closed before the delay ran out");
    assert!(node.exited(Duration::from_secs(15)).await.success());
}

#[tokio::test]
async fn closes_are_spread_over_the_drain_window_and_late_upgrades_are_refused() {
    const SESSIONS: usize = 20;
    const WINDOW: Duration = Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let mut node = single(&dir, &["--drain-delay", "0", "--drain-seconds", "4"]).await;
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        clients.push(node.connect(&format!("u{i}")).await);
    }
    node.signal("TERM");
    let signalled = Instant::now();
    let closes = clients.into_iter().map(|mut client: Client| {
        tokio::spawn(async move {
            let (code, _) = client.closed_within(Duration::from_secs(20)).await;
            (code, Instant::now())
        })
    });
    let closes = futures_util::future::join_all(closes);
    tokio::pin!(closes);
    // While the closes go on, a new session is refused with 503.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = raw_upgrade_status(node.addr, "user=late", "").await;
    assert_eq!(status, 503, "a draining node refuses new sessions once it closes its own");
    let closes: Vec<(u16, Instant)> = closes.await.into_iter().map(|r| r.expect("client task")).collect();
    assert!(closes.iter().all(|(code, _)| *code == 1001), "{closes:?}");
    let mut at: Vec<Duration> = closes.iter().map(|(_, t)| t.duration_since(signalled)).collect();
    at.sort();
    let (first, last) = (at[0], at[SESSIONS - 1]);
    assert!(last - first >= WINDOW / 2, "the closes span most of the {WINDOW:?} window, not one instant: {at:?}");
    // Evenly: no second of the window holds most of them.
    let busiest = (0..4u64).map(|s| at.iter().filter(|t| t.as_secs() == s).count()).max().unwrap();
    assert!(busiest <= SESSIONS / 2, "closes bunched together: {at:?}");
    assert!(node.exited(Duration::from_secs(15)).await.success());
    let log = node.log();
    assert!(log.contains("draining"), "the drain's progress is logged:\n{log}");
}

#[tokio::test]
async fn the_process_exits_as_soon_as_the_last_session_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    // Three sessions over 60 s: batches at 0, 20 and 40 s.
    let mut node = single(&dir, &["--drain-delay", "0", "--drain-seconds", "60"]).await;
    let mut clients = vec![node.connect("a").await, node.connect("b").await, node.connect("c").await];
    node.signal("TERM");
    let signalled = Instant::now();
    // The first batch closes one of them at once; the two others leave on their own, long
    // before their batches are due.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for client in &mut clients {
        let _ = client.ws.close().await;
    }
    let status = node.exited(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < Duration::from_secs(15), "exited once nobody was left, not at the window's end");
}

#[tokio::test]
async fn a_second_signal_skips_the_rest_of_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = single(&dir, &["--drain-delay", "60", "--drain-seconds", "60"]).await;
    let mut alice = node.connect("alice").await;
    node.signal("TERM");
    readyz_becomes(&node, 503, Duration::from_secs(5)).await;
    alice.ok(json!({"type": "ping"})).await;
    let second = Instant::now();
    node.signal("INT");
    assert_eq!(alice.closed_within(Duration::from_secs(10)).await.0, 1001);
    assert!(node.exited(Duration::from_secs(15)).await.success());
    assert!(second.elapsed() < Duration::from_secs(15), "did not wait out the 60 s delay");
}

#[tokio::test]
async fn ctrl_c_without_drain_flags_closes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = single(&dir, &[]).await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    node.signal("INT");
    let signalled = Instant::now();
    assert_eq!(alice.closed_within(Duration::from_secs(10)).await.0, 1001);
    assert_eq!(bob.closed_within(Duration::from_secs(10)).await.0, 1001);
    assert!(node.exited(Duration::from_secs(15)).await.success());
    // SIGTERM's default would keep it up, unready, for 5 s first.
    assert!(signalled.elapsed() < Duration::from_secs(4), "a dev node's Ctrl-C is quick");
}
