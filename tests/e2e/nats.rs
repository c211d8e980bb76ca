//! Failure tests of the NATS bus (`--bus nats://…`): node processes whose NATS connections go
//! through a `FaultProxy` to a private `nats-server`, with store and presence on a private Redis.
//!
//! Core NATS loses what is published while a node reconnects, and async-nats drops what finds a
//! subscription's buffer full. These tests show that clients still end with every acknowledged
//! message, once and in order, that `/readyz` says 503 while the bus cannot route and 200 again
//! without a restart, that routing goes only where recipients are, and that a `max_payload` too
//! small for `--max-message-size` is refused at start. Observed timings are printed with a
//! `TIMING` prefix (`cargo test --test e2e nats:: -- --nocapture`).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::cluster::{frame_within, ms, seq, until};
use crate::fault_proxy::FaultProxy;
use crate::nats_server::NatsServer;
use crate::procs::{Cluster, NodeProc};
use crate::support::Client;

const BUS: &str = "switchyard_bus_messages_received_total";
const RESYNCS: &str = "switchyard_bus_resyncs_total";
const REPAIRS: &str = "switchyard_delivery_repairs_total";

/// A private Redis (store, presence) and a private NATS (bus) behind a fault proxy.
struct NatsCluster {
    cluster: Cluster,
    proxy: FaultProxy,
    /// Declared last: killed after the proxy in front of it.
    _nats: NatsServer,
}

impl NatsCluster {
    /// `None` (after printing why) when `nats-server` or `redis-server` is missing outside CI.
    fn start(test: &str) -> Option<Self> {
        let nats = NatsServer::start()?;
        let cluster = Cluster::start(test)?;
        let proxy = FaultProxy::start(nats.addr());
        Some(Self { cluster, proxy, _nats: nats })
    }

    /// Node `name` with `--bus` on the proxy and `extra` flags.
    async fn node(&self, name: &str, extra: &[&str]) -> NodeProc {
        let bus = format!("nats://{}", self.proxy.addr());
        let args: Vec<&str> = ["--bus", bus.as_str()].into_iter().chain(extra.iter().copied()).collect();
        self.cluster.node_with(name, &args).await
    }
}

/// What a receiver must end with: per stream, the bodies acknowledged to their senders, which
/// the stream numbers 1, 2, … in the order the store took them.
type Want = BTreeMap<String, Vec<Value>>;

/// Sends `commands` one at a time, `pace` apart; answers the client and each command with its
/// answer (a reply, or an error when refused). `progress` counts the answers.
async fn send_paced(
    mut client: Client,
    commands: Vec<Value>,
    pace: Duration,
    progress: Arc<AtomicUsize>,
) -> (Client, Vec<(Value, Value)>) {
    let mut answered = Vec::new();
    for command in commands {
        let answer = client.request(command.clone()).await;
        answered.push((command, answer));
        progress.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pace).await;
    }
    (client, answered)
}

/// Reads `client`'s messages until it has as many of every stream as `want` (once known) says,
/// or 30 s after `want` became known.
async fn receive(mut client: Client, mut want: watch::Receiver<Option<Want>>) -> (Client, Vec<Value>) {
    let mut got: Vec<Value> = Vec::new();
    let mut known_at: Option<Instant> = None;
    loop {
        if let Some(frame) = frame_within(&mut client, Duration::from_millis(200)).await
            && frame["type"] == "message"
        {
            got.push(frame);
        }
        let Some(wanted) = want.borrow_and_update().clone() else { continue };
        let known = *known_at.get_or_insert_with(Instant::now);
        let have = |stream: &str| got.iter().filter(|m| m["stream"] == stream).count();
        if wanted.iter().all(|(stream, bodies)| have(stream) >= bodies.len())
            || known.elapsed() > Duration::from_secs(30)
        {
            // Anything more (a duplicate) would arrive right behind.
            while let Some(frame) = frame_within(&mut client, Duration::from_millis(300)).await {
                if frame["type"] == "message" {
                    got.push(frame);
                }
            }
            return (client, got);
        }
    }
}

/// Asserts that `got` holds, per stream of `want`, its bodies once each, with seqs 1, 2, … in
/// that order, and nothing of any other stream.
fn assert_complete(who: &str, got: &[Value], want: &Want) {
    for (stream, bodies) in want {
        let of_stream: Vec<&Value> = got.iter().filter(|m| m["stream"] == stream.as_str()).collect();
        let seqs: Vec<u64> = of_stream.iter().map(|m| seq(m)).collect();
        let expected: Vec<u64> = (1..=bodies.len() as u64).collect();
        if seqs != expected {
            let missing: Vec<u64> = expected.iter().filter(|s| !seqs.contains(s)).copied().collect();
            panic!(
                "{who}, {stream}: {} of {} messages, missing seqs {missing:?}; seqs in arrival order {seqs:?}",
                seqs.len(),
                expected.len()
            );
        }
        let mut received: Vec<&Value> = of_stream.iter().map(|m| &m["body"]).collect();
        let mut acknowledged: Vec<&Value> = bodies.iter().collect();
        received.sort_by_key(|b| b.to_string());
        acknowledged.sort_by_key(|b| b.to_string());
        assert_eq!(received, acknowledged, "{who}, {stream}: the acknowledged bodies");
    }
    let other: Vec<&Value> = got.iter().filter(|m| !want.contains_key(m["stream"].as_str().unwrap_or(""))).collect();
    assert!(other.is_empty(), "{who}: messages of streams it does not follow: {other:?}");
}

/// Two nodes, each with a sender and a receiver in one room; each sender alternates direct
/// messages to the receiver on the other node with messages to the room. `fault` runs while
/// they send (after `FAULT_AFTER` answers of the first sender) and answers a description for
/// the TIMING line. Every receiver must end with every acknowledged message once, in order.
async fn stream_through(test: &str, fault: impl AsyncFnOnce(&NatsCluster, [&NodeProc; 2]) -> String) {
    const EACH: usize = 300;
    const FAULT_AFTER: usize = 60;
    const PACE: Duration = Duration::from_millis(10);
    let Some(nc) = NatsCluster::start(test) else { return };
    let n1 = nc.node("n1", &[]).await;
    let n2 = nc.node("n2", &[]).await;
    assert!(nc.proxy.connections() >= 2, "both nodes reach NATS through the proxy");
    let room = "stream";
    let mut clients = Vec::new();
    for (node, name) in [(&n1, "r1"), (&n2, "r2"), (&n1, "s1"), (&n2, "s2")] {
        let mut client = node.connect(name).await;
        client.ok(json!({"type":"join","room":room})).await;
        clients.push(client);
    }
    let (s2, s1, r2, r1) =
        (clients.pop().unwrap(), clients.pop().unwrap(), clients.pop().unwrap(), clients.pop().unwrap());

    let (want_r1_tx, want_r1) = watch::channel(None);
    let (want_r2_tx, want_r2) = watch::channel(None);
    let receivers = [tokio::spawn(receive(r1, want_r1)), tokio::spawn(receive(r2, want_r2))];
    let progress = Arc::new(AtomicUsize::new(0));
    let commands = |from: &str, to: &str| -> Vec<Value> {
        (0..EACH)
            .map(|i| match i % 2 {
                0 => json!({"type":"send","to":to,"body":format!("{from}-direct-{i}")}),
                _ => json!({"type":"publish","room":room,"body":format!("{from}-room-{i}")}),
            })
            .collect()
    };
    let senders = [
        tokio::spawn(send_paced(s1, commands("s1", "r2"), PACE, progress.clone())),
        tokio::spawn(send_paced(s2, commands("s2", "r1"), PACE, Arc::new(AtomicUsize::new(0)))),
    ];
    let started = Instant::now();
    while progress.load(Ordering::Relaxed) < FAULT_AFTER {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let timing = fault(&nc, [&n1, &n2]).await;

    let mut want: Want = BTreeMap::new();
    let mut refused = 0;
    for sender in senders {
        let (_client, answered) = sender.await.expect("sender task");
        for (command, answer) in answered {
            if answer["type"] != "reply" {
                assert_eq!(answer["code"], "unavailable", "{command} answered {answer}");
                refused += 1;
                continue;
            }
            let stream = match command["type"].as_str() {
                Some("send") => format!("user:{}", command["to"].as_str().unwrap()),
                _ => format!("room:{room}"),
            };
            want.entry(stream).or_default().push(command["body"].clone());
        }
    }
    let room_stream = format!("room:{room}");
    let want_of = |me: &str| -> Want {
        want.iter()
            .filter(|(s, _)| **s == room_stream || **s == format!("user:{me}"))
            .map(|(s, b)| (s.clone(), b.clone()))
            .collect()
    };
    let (want_r1, want_r2) = (want_of("r1"), want_of("r2"));
    want_r1_tx.send_replace(Some(want_r1.clone()));
    want_r2_tx.send_replace(Some(want_r2.clone()));
    let [r1, r2] = receivers;
    let (_r1, got_r1) = r1.await.expect("receiver task");
    let (_r2, got_r2) = r2.await.expect("receiver task");
    let delivered = started.elapsed();
    assert_complete("r1 on n1", &got_r1, &want_r1);
    assert_complete("r2 on n2", &got_r2, &want_r2);
    let resyncs = [n1.metric(RESYNCS).await, n2.metric(RESYNCS).await];
    assert!(resyncs.iter().all(|r| *r >= 1.0), "every node caught its sessions up after the fault: {resyncs:?}");
    let repairs = [n1.metric(REPAIRS).await, n2.metric(REPAIRS).await];
    println!(
        "TIMING {test}: {timing}; {} messages acknowledged, {refused} refused; every one delivered {} ms after the \
         first send; resyncs {resyncs:?}, gap repairs {repairs:?}",
        want.values().map(Vec::len).sum::<usize>(),
        ms(delivered)
    );
}

/// Waits until `/readyz` of every node in `nodes` answers `status`; answers how long it took.
async fn readyz_of_all(what: &str, nodes: [&NodeProc; 2], status: u16, since: Instant, limit: Duration) -> Duration {
    until(what, since, limit, || async {
        for node in nodes {
            if node.readyz(Duration::from_secs(3)).await != Some(status) {
                return false;
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_loses_no_acknowledged_message() {
    stream_through("natscut", async |nc, nodes| {
        nc.proxy.refuse(true);
        nc.proxy.cut();
        let cut = Instant::now();
        let down = readyz_of_all("/readyz 503 after the cut", nodes, 503, cut, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(cut.elapsed())).await;
        nc.proxy.refuse(false);
        let healed = Instant::now();
        let up = readyz_of_all("/readyz 200 after the cut healed", nodes, 200, healed, Duration::from_secs(15)).await;
        format!("cut -> /readyz 503 on both nodes {} ms; refused for 1500 ms; healed -> 200 {} ms", ms(down), ms(up))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_connection_is_not_ready_and_loses_no_acknowledged_message() {
    // Longer than async-nats takes to give up on a connection whose pings go unanswered, so the
    // node also reconnects (through the paused proxy, which only succeeds once it resumes).
    const PAUSE: Duration = Duration::from_secs(8);
    stream_through("natspause", async |nc, nodes| {
        nc.proxy.pause();
        let paused = Instant::now();
        let down = readyz_of_all("/readyz 503 after the pause", nodes, 503, paused, Duration::from_secs(4)).await;
        while paused.elapsed() < PAUSE {
            for node in nodes {
                assert_eq!(node.readyz(Duration::from_secs(3)).await, Some(503), "{} is ready while paused", node.id);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        nc.proxy.resume();
        let resumed = Instant::now();
        let up = readyz_of_all("/readyz 200 after the resume", nodes, 200, resumed, Duration::from_secs(15)).await;
        format!(
            "pause -> /readyz 503 on both nodes {} ms, 503 throughout {} ms; resume -> 200 {} ms",
            ms(down),
            ms(PAUSE),
            ms(up)
        )
    })
    .await;
}

/// Waits for what is on its way, then reads the bus metric of each node.
async fn bus_received(nodes: [&NodeProc; 2]) -> [f64; 2] {
    tokio::time::sleep(Duration::from_millis(300)).await;
    [nodes[0].metric(BUS).await, nodes[1].metric(BUS).await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_member_of_a_room_receives_none_of_its_messages() {
    let Some(nc) = NatsCluster::start("natsroute") else { return };
    let (a, b) = (nc.node("a", &[]).await, nc.node("b", &[]).await);
    let nodes = [&a, &b];
    let mut member_a = a.connect("member-a").await;
    member_a.ok(json!({"type":"join","room":"routed.room"})).await;
    // A room whose name is the other's with its dot as a token boundary: it must not match.
    let mut other = b.connect("other").await;
    other.ok(json!({"type":"join","room":"routed"})).await;

    let before = bus_received(nodes).await;
    for i in 0..20 {
        b.ok("POST", "/api/v1/rooms/routed.room/messages", Some(&json!({"body":i}))).await;
    }
    for i in 0..20 {
        assert_eq!(member_a.next_message().await["body"], json!(i));
    }
    let after = bus_received(nodes).await;
    assert_eq!([after[0] - before[0], after[1] - before[1]], [20.0, 0.0], "only node a has a member (a, b)");
    other.expect_silence(200).await;

    let mut member_b = b.connect("member-b").await;
    member_b.ok(json!({"type":"join","room":"routed.room"})).await;
    assert_eq!(member_a.next_frame().await["event"], "join");
    let before = bus_received(nodes).await;
    a.ok("POST", "/api/v1/rooms/routed.room/messages", Some(&json!({"body":"both"}))).await;
    assert_eq!(member_a.next_message().await["body"], "both");
    assert_eq!(member_b.next_message().await["body"], "both");
    let after = bus_received(nodes).await;
    assert_eq!([after[0] - before[0], after[1] - before[1]], [1.0, 1.0], "both nodes have a member (a, b)");

    member_b.ok(json!({"type":"leave","room":"routed.room"})).await;
    assert_eq!(member_a.next_frame().await["event"], "leave");
    let before = bus_received(nodes).await;
    for i in 0..5 {
        a.ok("POST", "/api/v1/rooms/routed.room/messages", Some(&json!({"body":format!("after-{i}")}))).await;
        assert_eq!(member_a.next_message().await["body"], json!(format!("after-{i}")));
    }
    let after = bus_received(nodes).await;
    assert_eq!([after[0] - before[0], after[1] - before[1]], [5.0, 0.0], "node b's last member left (a, b)");
    other.expect_silence(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_full_subscription_buffer_dropped_are_repaired() {
    const TOTAL: usize = 3000;
    const WINDOW: usize = 200;
    let Some(nc) = NatsCluster::start("natsslow") else { return };
    // Two messages per subscription: async-nats drops what a burst brings beyond that.
    let slow = nc.node("slow", &["--test-nats-subscription-capacity", "2"]).await;
    let fast = nc.node("fast", &[]).await;
    let room = "flood";
    let (want_tx, want) = watch::channel(None);
    let mut receivers = Vec::new();
    for i in 0..3 {
        let mut client = slow.connect(&format!("r{i}")).await;
        client.ok(json!({"type":"join","room":room})).await;
        receivers.push(tokio::spawn(receive(client, want.clone())));
    }
    let mut publisher = fast.connect("publisher").await;
    publisher.ok(json!({"type":"join","room":room})).await;
    let before = slow.metric(BUS).await;
    let started = Instant::now();

    let mut bodies = Vec::new();
    for batch in 0..TOTAL / WINDOW {
        let commands: Vec<Value> = (0..WINDOW)
            .map(|i| {
                let n = batch * WINDOW + i;
                json!({"type":"publish","room":room,"body":n,"id":format!("p{n}")})
            })
            .collect();
        publisher.send_together(&commands).await;
        let mut answered = 0;
        while answered < WINDOW {
            let frame = publisher.next_frame().await;
            if frame["id"].as_str().is_some_and(|id| id.starts_with('p')) {
                assert_eq!(frame["type"], "reply", "{frame}");
                answered += 1;
            }
        }
        bodies.extend((0..WINDOW).map(|i| json!(batch * WINDOW + i)));
    }
    let want: Want = BTreeMap::from([(format!("room:{room}"), bodies)]);
    want_tx.send_replace(Some(want.clone()));
    for (i, receiver) in receivers.into_iter().enumerate() {
        let (_client, got) = receiver.await.expect("receiver task");
        assert_complete(&format!("r{i} on the slow node"), &got, &want);
    }
    let delivered = started.elapsed();
    let received = slow.metric(BUS).await - before;
    assert!(
        received < TOTAL as f64,
        "the slow node received all {TOTAL} messages ({received}): nothing was dropped, so this test proved nothing"
    );
    let resyncs = slow.metric(RESYNCS).await;
    assert!(resyncs >= 1.0, "the drops were reported and repaired by a resync: {resyncs}");
    println!(
        "TIMING messages_a_full_subscription_buffer_dropped_are_repaired: {TOTAL} published, the slow node received \
         {received} from NATS; every receiver had all {TOTAL} after {} ms; resyncs {resyncs}, gap repairs {}",
        ms(delivered),
        slow.metric(REPAIRS).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_message_size_beyond_max_payload_is_refused_at_start() {
    let Some(nats) = NatsServer::start_with("max_payload: 8192\n") else { return };
    let Some(cluster) = Cluster::start("natspayload") else { return };
    let bus = nats.url();
    let start = |max_message_size: usize| {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SWITCHYARD_") {
                command.env_remove(name);
            }
        }
        let size = max_message_size.to_string();
        let args = ["serve", "--listen", "127.0.0.1:0", "--prefix", &cluster.prefix, "--bus", &bus];
        command.args(args).args(["--redis", &cluster.redis.url(), "--max-message-size", &size, "--data-dir"]);
        let mut child = command.arg(dir.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut stderr = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
                return Some((status, stderr));
            }
            if Instant::now() > deadline {
                // Still running: it started.
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (status, stderr) = start(65_536).expect("a node whose messages do not fit exits");
    assert!(!status.success(), "{stderr}");
    for words in ["--bus nats://127.0.0.1", "max_payload", "8192", "--max-message-size 65536", "raise max_payload"] {
        assert!(stderr.contains(words), "the refusal says {words:?}: {stderr}");
    }
    let fits: usize = stderr
        .split("lower --max-message-size to at most ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the refusal names the largest size that fits: {stderr}"));
    assert!(start(fits + 1).is_some_and(|(status, _)| !status.success()), "one byte more than the size it named");
    let node = cluster.node_with("fits", &["--bus", &bus, "--max-message-size", &fits.to_string()]).await;
    let mut alice = node.connect("alice").await;
    let mut other = node.connect("alice").await;
    let body = "x".repeat(fits - 64);
    alice.ok(json!({"type":"send","to":"alice","body":body})).await;
    assert_eq!(other.next_message().await["body"], json!(body), "the largest message travels over the bus");
}
