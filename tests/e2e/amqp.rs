//! Clusters whose bus is RabbitMQ (`--bus amqp://…`), with store and presence on a private Redis:
//! node processes that reach the machine's RabbitMQ through a `FaultProxy`, whose connection is
//! cut or frozen under a steady stream of messages; routing only to the nodes with recipients; and
//! the refusal at start-up of a message size RabbitMQ cannot carry. Observed timings are printed
//! with a `TIMING` prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::amqp_server::{amqp_addr, amqp_url, amqp_url_via};
use crate::cluster::{frame_within, ms, seq, until};
use crate::fault_proxy::FaultProxy;
use crate::procs::{Cluster, NodeProc, http_within};
use crate::support::Client;
use crate::tls::{Certificates, TlsProxy};

/// A cluster whose nodes reach RabbitMQ through the returned proxy; `None` (SKIP) without
/// RabbitMQ or `redis-server` outside CI.
fn behind_proxy(test: &str) -> Option<(Cluster, FaultProxy)> {
    if !crate::amqp_server::available() {
        return None;
    }
    let cluster = Cluster::start(test)?;
    let proxy = FaultProxy::start(amqp_addr());
    let bus = amqp_url_via(proxy.addr());
    Some((cluster.with_bus(bus), proxy))
}

/// Alice on node 1 and a room `steady` with bob (node 2, also the recipient of alice's direct
/// messages) and carol (node 1) in it.
struct Parties {
    alice: Client,
    bob: Client,
    carol: Client,
}

impl Parties {
    async fn join(n1: &NodeProc, n2: &NodeProc) -> Self {
        let mut bob = n2.connect("bob").await;
        bob.ok(json!({"type":"join","room":"steady"})).await;
        let mut carol = n1.connect("carol").await;
        carol.ok(json!({"type":"join","room":"steady"})).await;
        let mut alice = n1.connect("alice").await;
        alice.ok(json!({"type":"join","room":"steady"})).await;
        Self { alice, bob, carol }
    }
}

/// What alice had acknowledged, per stream, in order: bob's direct messages by body, the room's
/// by (seq, body); and how many of each every client was seen to have.
#[derive(Default)]
struct Acked {
    direct: Vec<Value>,
    room: Vec<(u64, Value)>,
    had: (usize, usize),
}

impl Acked {
    /// Sends `count` messages, alternately to bob and to the room, one at a time; every one must
    /// be acknowledged.
    async fn send(&mut self, alice: &mut Client, count: usize) {
        for _ in 0..count {
            self.send_one(alice).await;
        }
    }

    /// Sends one message every `gap` until `stop` is set; answers how many.
    async fn send_until(&mut self, alice: &mut Client, gap: Duration, stop: &AtomicBool) -> usize {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            self.send_one(alice).await;
            sent += 1;
            tokio::time::sleep(gap).await;
        }
        sent
    }

    async fn send_one(&mut self, alice: &mut Client) {
        let i = self.direct.len() + self.room.len();
        let body = json!(i);
        let command = match i % 2 {
            0 => json!({"type":"send","to":"bob","body":body}),
            _ => json!({"type":"publish","room":"steady","body":body}),
        };
        let reply = alice.request(command).await;
        assert_eq!(reply["type"], "reply", "message {i}: {reply}");
        match i % 2 {
            0 => self.direct.push(body),
            _ => self.room.push((seq(&reply), body)),
        }
    }

    /// Every client gets every acknowledged message of its streams that it was not seen to have,
    /// once and in seq order, and nothing more.
    async fn all_received(&mut self, parties: &mut Parties) {
        let (direct_had, room_had) = self.had;
        let expected_direct: Vec<(u64, Value)> =
            self.direct.iter().enumerate().skip(direct_had).map(|(i, body)| (i as u64 + 1, body.clone())).collect();
        let expected_room = self.room[room_had..].to_vec();
        // Each stream is in order, not the two together: bob's frames are sorted by stream.
        let (mut direct, mut room) = (Vec::new(), Vec::new());
        while direct.len() < expected_direct.len() || room.len() < expected_room.len() {
            let Some(frame) = frame_within(&mut parties.bob, Duration::from_secs(10)).await else {
                panic!(
                    "bob got {} of {} direct and {} of {} room messages, then nothing for 10 s",
                    direct.len(),
                    expected_direct.len(),
                    room.len(),
                    expected_room.len()
                );
            };
            match (frame["type"].as_str(), frame["stream"].as_str()) {
                (Some("message"), Some("user:bob")) => direct.push((seq(&frame), frame["body"].clone())),
                (Some("message"), Some("room:steady")) => room.push((seq(&frame), frame["body"].clone())),
                _ => assert_eq!(frame["type"], "presence", "bob: unexpected frame {frame}"),
            }
        }
        assert_eq!(direct, expected_direct, "bob's stream: every acknowledged message once, in order");
        assert_eq!(room, expected_room, "the room at bob: every acknowledged message once, in order");
        let mut carol = Vec::new();
        while carol.len() < expected_room.len() {
            let Some(frame) = frame_within(&mut parties.carol, Duration::from_secs(10)).await else {
                panic!("carol got {} of {} room messages, then nothing for 10 s", carol.len(), expected_room.len());
            };
            match frame["type"].as_str() {
                Some("message") => carol.push((seq(&frame), frame["body"].clone())),
                _ => assert_eq!(frame["type"], "presence", "carol: unexpected frame {frame}"),
            }
        }
        assert_eq!(carol, expected_room, "the room at carol: every acknowledged message once, in order");
        for client in [&mut parties.bob, &mut parties.carol] {
            client.expect_silence(300).await;
        }
        self.had = (self.direct.len(), self.room.len());
    }
}

/// Polls `/readyz` of every node until each answers `status`; answers how long that took.
async fn all_answer(nodes: [&NodeProc; 2], status: u16, what: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    until(what, start, limit, || async {
        for node in nodes {
            if node.readyz(Duration::from_secs(2)).await != Some(status) {
                return false;
            }
        }
        true
    })
    .await
}

/// The connection to RabbitMQ is cut under a steady stream of direct and room messages, and new
/// connections are refused for a while, as when the broker goes down: both nodes turn not ready,
/// then ready again by themselves once it is back. Messages are acknowledged throughout (the
/// store has them) and the stream ends during the outage, so what the bus never carried reaches
/// the clients only through the catch-up after the reconnect: every client ends with every
/// acknowledged message once and in order. Then live delivery works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_bus_turns_nodes_unready_and_sessions_repair() {
    let Some((cluster, proxy)) = behind_proxy("amqpcut") else { return };
    let mut n1 = cluster.node("n1").await;
    let mut n2 = cluster.node("n2").await;
    assert!(proxy.connections() >= 2, "both nodes reach RabbitMQ through the proxy");
    let mut parties = Parties::join(&n1, &n2).await;
    let mut acked = Acked::default();
    acked.send(&mut parties.alice, 40).await;
    acked.all_received(&mut parties).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut alice = parties.alice;
    let sending = tokio::spawn({
        let stop = stop.clone();
        async move {
            let sent = acked.send_until(&mut alice, Duration::from_millis(5), &stop).await;
            (alice, acked, sent)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.refuse(true);
    tokio::task::block_in_place(|| proxy.cut());
    let not_ready = all_answer([&n1, &n2], 503, "/readyz 503 after the cut", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (alice, mut acked, sent) = sending.await.expect("sender");
    parties.alice = alice;
    proxy.refuse(false);
    let ready = all_answer([&n1, &n2], 200, "/readyz 200 once RabbitMQ is back", Duration::from_secs(10)).await;
    assert!(n1.alive() && n2.alive(), "the nodes kept running");
    println!(
        "TIMING a_cut_bus_turns_nodes_unready_and_sessions_repair: cut -> /readyz 503 on both {} ms; \
         back -> /readyz 200 on both {} ms; {sent} messages acknowledged across the cut",
        ms(not_ready),
        ms(ready)
    );
    acked.all_received(&mut parties).await;
    acked.send(&mut parties.alice, 10).await;
    acked.all_received(&mut parties).await;
}

/// The connection to RabbitMQ freezes (nothing answered, nothing closed): both nodes turn not
/// ready within a few seconds and refuse a broadcast, which needs the bus alone; stream messages
/// sent meanwhile are still acknowledged, since the store has them. Once it thaws the nodes are
/// ready again and, with nothing sent after, every client has every acknowledged message once,
/// in order; then live delivery works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_bus_is_not_ready_and_loses_nothing_acknowledged() {
    let Some((cluster, proxy)) = behind_proxy("amqppause") else { return };
    let n1 = cluster.node("n1").await;
    let n2 = cluster.node("n2").await;
    let mut parties = Parties::join(&n1, &n2).await;
    let mut acked = Acked::default();
    acked.send(&mut parties.alice, 20).await;
    acked.all_received(&mut parties).await;

    proxy.pause();
    let not_ready = all_answer([&n1, &n2], 503, "/readyz 503 during the pause", Duration::from_secs(10)).await;
    let sent = Instant::now();
    acked.send(&mut parties.alice, 10).await;
    let send_took = sent.elapsed();
    let wait = Duration::from_secs(10);
    let broadcast =
        http_within(n1.addr, "POST", "/api/v1/broadcast", &json!({"body":"frozen"}).to_string(), wait).await;
    let (status, body) = broadcast.expect("the API answers during the pause");
    assert_eq!((status, &body["error"]["code"]), (503, &json!("unavailable")), "{body}");

    proxy.resume();
    let ready = all_answer([&n1, &n2], 200, "/readyz 200 after the pause", Duration::from_secs(10)).await;
    println!(
        "TIMING a_frozen_bus_is_not_ready_and_loses_nothing_acknowledged: pause -> /readyz 503 on both {} ms; \
         10 messages acknowledged during it in {} ms; resume -> /readyz 200 on both {} ms",
        ms(not_ready),
        ms(send_took),
        ms(ready)
    );
    acked.all_received(&mut parties).await;
    acked.send(&mut parties.alice, 10).await;
    acked.all_received(&mut parties).await;
}

/// As over Redis: a message reaches only the nodes with recipients (the bus receive counter of
/// a node with none stays put).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_over_rabbitmq_goes_only_where_needed() {
    if !crate::amqp_server::available() {
        return;
    }
    let Some(cluster) = Cluster::start("amqproute") else { return };
    crate::cluster::routes_only_where_needed(cluster.with_bus(amqp_url())).await;
}

/// History in PostgreSQL, presence in Redis, routing through RabbitMQ: what alice sends on one
/// node reaches the clients on both, once and in order, and the history of either node has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_with_a_rabbitmq_bus() {
    if !crate::amqp_server::available() || !crate::sql_server::postgres_available() {
        return;
    }
    let Some(cluster) = Cluster::start("amqppg") else { return };
    let cluster = cluster.with_sql_prefix().with_bus(amqp_url());
    let store = crate::sql_server::postgres_url();
    let n1 = cluster.node_with("n1", &["--store", &store]).await;
    let n2 = cluster.node_with("n2", &["--store", &store]).await;
    let mut parties = Parties::join(&n1, &n2).await;
    let mut acked = Acked::default();
    acked.send(&mut parties.alice, 20).await;
    acked.all_received(&mut parties).await;
    let history = n2.ok("GET", "/api/v1/rooms/steady/history", None).await;
    let kept: Vec<(u64, Value)> =
        history["messages"].as_array().expect("messages").iter().map(|m| (seq(m), m["body"].clone())).collect();
    assert_eq!(kept, acked.room, "the room's history in PostgreSQL");
}

/// A `--max-message-size` whose messages RabbitMQ would refuse is refused at start-up, with the
/// limit to change and without the URL's password.
#[test]
fn a_message_size_rabbitmq_cannot_carry_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::cli::binary()
        .args(["serve", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:6379/0"])
        .args(["--bus", "amqp://guest:secret-pw@127.0.0.1:5672/%2f", "--max-message-size", "200000000"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-message-size 200000000"), "{stderr}");
    assert!(stderr.contains("RabbitMQ takes messages of up to 128 MiB by default"), "{stderr}");
    assert!(stderr.contains("lower --max-message-size to at most 134209536"), "{stderr}");
    assert!(!stderr.contains("secret-pw"), "credentials printed: {stderr}");
}

/// `amqps://`: the nodes reach RabbitMQ over TLS (a proxy terminating it with a certificate of
/// the test's own CA, which the URL trusts through `cacertfile`), and messages cross nodes as
/// over plain AMQP; a node whose URL does not trust that CA refuses the broker at start-up,
/// saying why, without its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_over_amqps_verifies_the_broker_and_carries_messages() {
    if !crate::amqp_server::available() {
        return;
    }
    let Some(cluster) = Cluster::start("amqptls") else { return };
    let certs = Certificates::localhost();
    let proxy = TlsProxy::start(&certs.cert, &certs.key, amqp_addr()).await;
    let (user, _, path) = crate::sql_server::parts(&amqp_url());
    let untrusted = format!("amqps://{user}localhost:{}{path}", proxy.port());
    let trusted = format!("{untrusted}?cacertfile={}", certs.ca.display());
    let redis = cluster.redis.url();
    let cluster = cluster.with_bus(trusted);
    let n1 = cluster.node("n1").await;
    let n2 = cluster.node("n2").await;
    assert!(proxy.handshakes() >= 2, "each node's bus went through TLS: {}", proxy.handshakes());
    let mut parties = Parties::join(&n1, &n2).await;
    let mut acked = Acked::default();
    acked.send(&mut parties.alice, 20).await;
    acked.all_received(&mut parties).await;

    let dir = tempfile::tempdir().unwrap();
    let out = crate::cli::binary()
        .args(["serve", "--listen", "127.0.0.1:0", "--redis", &redis, "--bus", &untrusted])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a broker with an unknown CA is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    let password = user.trim_end_matches('@').split_once(':').map_or("", |(_, pw)| pw);
    assert!(password.is_empty() || !stderr.contains(&format!(":{password}@")), "credentials printed: {stderr}");
}
