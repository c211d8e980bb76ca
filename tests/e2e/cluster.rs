//! Cluster tests with real node processes over one private Redis: seqs assigned once across
//! nodes, routing only to nodes with recipients, healing after a node is killed, no loss when a
//! client moves to another node, and honest answers while Redis is unreachable or restarted.
//!
//! Each test starts its own `redis-server` and node processes (see `procs.rs`); the nodes are
//! killed when the test ends, however it ends. Network faults go through a `FaultProxy` between
//! the nodes and Redis, not signals to the server. Observed timings are printed with a `TIMING`
//! prefix (`cargo test --test e2e cluster -- --nocapture` shows them).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::nats_server::NatsServer;
use crate::procs::{Cluster, NodeProc, http_within};
use crate::support::{Client, WAIT};

use crate::fault_proxy::FaultProxy;

const BUS: &str = "switchyard_bus_messages_received_total";

/// The next text frame read from the socket itself, or `None` when nothing came within `wait`
/// or the connection ended (its node died). For clients with nothing buffered by `request`.
pub(crate) async fn frame_within(client: &mut Client, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, client.ws.next()).await.ok()??.ok()?;
        if let Some(text) = message.as_text() {
            return Some(serde_json::from_str(text).expect("server frames are JSON"));
        }
        if message.is_close() {
            return None;
        }
    }
}

/// The `message` frames that arrive within `wait` of each other, presence events skipped.
pub(crate) async fn messages_within(client: &mut Client, wait: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(frame) = frame_within(client, wait).await {
        if frame["type"] == "message" {
            out.push(frame);
        } else {
            assert_eq!(frame["type"], "presence", "unexpected frame {frame}");
        }
    }
    out
}

/// Sends `commands` with at most `window` unanswered; answers the replies (or errors) in command
/// order and every other frame that arrived meanwhile, in arrival order.
pub(crate) async fn pipeline(
    client: &mut Client,
    commands: Vec<Value>,
    window: usize,
    progress: Option<&AtomicUsize>,
) -> (Vec<Value>, Vec<Value>) {
    let total = commands.len();
    let mut answers: Vec<Option<Value>> = vec![None; total];
    let mut others = Vec::new();
    let (mut sent, mut answered) = (0, 0);
    let mut commands = commands.into_iter();
    while answered < total {
        while sent < total && sent - answered < window {
            let mut command = commands.next().expect("a command per slot");
            command["id"] = json!(format!("c{sent}"));
            client.send_json(command).await;
            sent += 1;
        }
        let frame = client.next_frame().await;
        let slot = frame["id"].as_str().and_then(|id| id.strip_prefix('c')).and_then(|n| n.parse::<usize>().ok());
        match slot {
            Some(i) if frame["type"] == "reply" || frame["type"] == "error" => {
                assert!(answers[i].replace(frame).is_none(), "two answers for command {i}");
                answered += 1;
                if let Some(progress) = progress {
                    progress.store(answered, Ordering::Relaxed);
                }
            }
            _ => others.push(frame),
        }
    }
    (answers.into_iter().map(|a| a.expect("answered")).collect(), others)
}

pub(crate) fn seq(frame: &Value) -> u64 {
    frame["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {frame}"))
}

pub(crate) fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The shared test Redis Cluster (`SWITCHYARD_TEST_REDIS_CLUSTER`, else the one
/// `scripts/redis-cluster.sh start` runs, which `.ci/run` starts), or `None` after printing why
/// it is absent (outside CI; under `CI=true` its absence fails the test).
pub(crate) fn redis_cluster_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_TEST_REDIS_CLUSTER")
        .unwrap_or_else(|_| "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".into());
    let first = url.split_once("://").map(|(_, hosts)| hosts.split([',', '/']).next().unwrap_or_default().to_owned());
    let reachable = first.as_deref().is_some_and(|host| std::net::TcpStream::connect(host).is_ok());
    if reachable {
        return Some(url);
    }
    let why = format!("no Redis Cluster at {url} (scripts/redis-cluster.sh start runs one)");
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{why}");
    eprintln!("SKIP: {why}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_assigned_once_cluster_wide() {
    let Some(cluster) = Cluster::start("seqs") else { return };
    seqs_once(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_assigned_once_cluster_wide_on_redis_cluster() {
    let Some(url) = redis_cluster_url() else { return };
    let Some(cluster) = Cluster::start("seqsrc") else { return };
    seqs_once(cluster.on(&url)).await;
}

/// Three nodes' publishers race into one room: every listener gets every seq once, in order.
async fn seqs_once(cluster: Cluster) {
    const EACH: u64 = 200;
    const TOTAL: u64 = 3 * EACH;
    let nodes = [cluster.node("a").await, cluster.node("b").await, cluster.node("c").await];
    let mut listeners = Vec::new();
    let mut publishers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut listener = node.connect(&format!("listener{i}")).await;
        listener.ok(json!({"type":"join","room":"seqs"})).await;
        listeners.push(listener);
        let mut publisher = node.connect(&format!("publisher{i}")).await;
        publisher.ok(json!({"type":"join","room":"seqs"})).await;
        publishers.push(publisher);
    }

    let listening: Vec<_> = listeners
        .into_iter()
        .map(|mut listener| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < TOTAL as usize {
                    got.push(listener.next_message().await);
                }
                (listener, got)
            })
        })
        .collect();
    let publishing: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, mut publisher)| {
            tokio::spawn(async move {
                let commands =
                    (1..=EACH).map(|i| json!({"type":"publish","room":"seqs","body":{"p":p,"i":i}})).collect();
                let (replies, others) = pipeline(&mut publisher, commands, 16, None).await;
                let mut received: Vec<Value> = others.into_iter().filter(|f| f["type"] == "message").collect();
                while received.len() < (TOTAL - EACH) as usize {
                    received.push(publisher.next_message().await);
                }
                (publisher, replies, received)
            })
        })
        .collect();

    let mut by_seq: BTreeMap<u64, (String, Value)> = BTreeMap::new();
    let mut clients = Vec::new();
    for (p, task) in publishing.into_iter().enumerate() {
        let (publisher, replies, received) = task.await.expect("publisher task");
        clients.push(publisher);
        let own: Vec<u64> = replies
            .iter()
            .map(|r| {
                assert_eq!(r["type"], "reply", "publisher{p}: {r}");
                seq(r)
            })
            .collect();
        assert!(own.windows(2).all(|w| w[0] < w[1]), "publisher{p}'s own seqs rise: {own:?}");
        for (i, reply) in replies.iter().enumerate() {
            let mid = reply["mid"].as_str().expect("mid").to_owned();
            let body = json!({"p": p, "i": i as u64 + 1});
            assert!(by_seq.insert(seq(reply), (mid, body)).is_none(), "seq {} assigned twice", seq(reply));
        }
        let others: Vec<u64> = received.iter().map(seq).collect();
        assert!(others.windows(2).all(|w| w[0] < w[1]), "publisher{p} got the others' messages in seq order");
        let mut all: Vec<u64> = own.iter().chain(&others).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (1..=TOTAL).collect::<Vec<_>>(), "publisher{p}: own replies + received = every seq once");
    }
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>(),
        "replies cover 1..={TOTAL}"
    );

    let mut first: Option<Vec<String>> = None;
    for (l, task) in listening.into_iter().enumerate() {
        let (listener, got) = task.await.expect("listener task");
        clients.push(listener);
        let seqs: Vec<u64> = got.iter().map(seq).collect();
        assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>(), "listener{l} gets every seq once, in order");
        for m in &got {
            let (mid, body) = &by_seq[&seq(m)];
            assert_eq!(m["mid"], json!(mid), "listener{l} seq {}", seq(m));
            assert_eq!(&m["body"], body, "listener{l} seq {}", seq(m));
        }
        let mids: Vec<String> = got.iter().map(|m| m["mid"].as_str().unwrap_or_default().to_owned()).collect();
        match &first {
            None => first = Some(mids),
            Some(expected) => assert_eq!(&mids, expected, "listener{l} saw the same messages as listener0"),
        }
    }

    for client in &mut clients {
        client.expect_silence(300).await;
    }

    for node in &nodes {
        let history = node.ok("GET", "/api/v1/rooms/seqs/history?since=0&limit=1000", None).await;
        assert_eq!(history["last_seq"], TOTAL, "{}", node.id);
        let messages = history["messages"].as_array().expect("messages");
        let seqs: Vec<u64> = messages.iter().map(seq).collect();
        assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>(), "history on {}", node.id);
        for m in messages {
            assert_eq!(m["mid"], json!(by_seq[&seq(m)].0), "history on {} seq {}", node.id, seq(m));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_goes_only_where_needed() {
    let Some(cluster) = Cluster::start("route") else { return };
    routes_only_where_needed(cluster).await;
}

/// A direct message reaches only the node of its recipient, a room message only the nodes of its
/// members, a broadcast every node, as the bus's receive counter of each node shows.
pub(crate) async fn routes_only_where_needed(cluster: Cluster) {
    let (a, b, c) = (cluster.node("a").await, cluster.node("b").await, cluster.node("c").await);
    let mut target = a.connect("target").await;
    let mut member_a = a.connect("member-a").await;
    member_a.ok(json!({"type":"join","room":"route"})).await;
    let mut member_b = b.connect("member-b").await;
    member_b.ok(json!({"type":"join","room":"route"})).await;
    let joined = member_a.next_frame().await;
    assert_eq!((joined["type"].as_str(), joined["user"].as_str()), (Some("presence"), Some("member-b")), "{joined}");

    async fn bus(nodes: [&NodeProc; 3]) -> [f64; 3] {
        // Let anything still on its way land before reading.
        tokio::time::sleep(Duration::from_millis(300)).await;
        [nodes[0].metric(BUS).await, nodes[1].metric(BUS).await, nodes[2].metric(BUS).await]
    }
    let delta = |before: [f64; 3], after: [f64; 3]| [after[0] - before[0], after[1] - before[1], after[2] - before[2]];
    let nodes = [&a, &b, &c];

    let before = bus(nodes).await;
    c.ok("POST", "/api/v1/users/target/messages", Some(&json!({"body":"direct"}))).await;
    assert_eq!(target.next_message().await["body"], "direct");
    let after_direct = bus(nodes).await;
    assert_eq!(
        delta(before, after_direct),
        [1.0, 0.0, 0.0],
        "a direct message reaches only the node of its recipient (a, b, c)"
    );

    c.ok("POST", "/api/v1/rooms/route/messages", Some(&json!({"body":"room"}))).await;
    assert_eq!(member_a.next_message().await["body"], "room");
    assert_eq!(member_b.next_message().await["body"], "room");
    let after_room = bus(nodes).await;
    assert_eq!(
        delta(after_direct, after_room),
        [1.0, 1.0, 0.0],
        "a room message reaches only the nodes of its members (a, b, c)"
    );

    c.ok("POST", "/api/v1/broadcast", Some(&json!({"body":"all"}))).await;
    for client in [&mut target, &mut member_a, &mut member_b] {
        let m = client.next_message().await;
        assert_eq!((m["stream"].as_str(), &m["body"]), (Some("broadcast"), &json!("all")));
    }
    let after_broadcast = bus(nodes).await;
    assert_eq!(delta(after_room, after_broadcast), [1.0, 1.0, 1.0], "a broadcast reaches every node (a, b, c)");
    for client in [&mut target, &mut member_a, &mut member_b] {
        client.expect_silence(200).await;
    }
}

/// Polls `check` every 100 ms until it holds; answers how long that took, or panics after `limit`.
pub(crate) async fn until<F, Fut>(what: &str, start: Instant, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_heals_after_sigkill() {
    let Some(cluster) = Cluster::start("heal") else { return };
    registry_heals(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_heals_after_sigkill_on_redis_cluster() {
    let Some(url) = redis_cluster_url() else { return };
    let Some(cluster) = Cluster::start("healrc") else { return };
    registry_heals(cluster.on(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_goes_only_where_needed_on_redis_cluster() {
    let Some(url) = redis_cluster_url() else { return };
    let Some(cluster) = Cluster::start("routerc") else { return };
    routes_only_where_needed(cluster.on(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_heals_after_sigkill_on_nats() {
    let Some(nats) = NatsServer::start() else { return };
    let Some(cluster) = Cluster::start("healnats") else { return };
    registry_heals(cluster.on(&nats.url())).await;
}

/// A SIGKILLed node leaves the node list and presence, and its users leave their rooms, with the
/// events; a SIGTERMed one leaves at once.
async fn registry_heals(cluster: Cluster) {
    let n1 = cluster.node("n1").await;
    let mut n2 = cluster.node("n2").await;
    let mut n3 = cluster.node("n3").await;
    let mut watcher = n1.connect("watcher").await;
    watcher.ok(json!({"type":"join","room":"heal"})).await;
    let mut doomed = n2.connect("doomed").await;
    doomed.ok(json!({"type":"join","room":"heal"})).await;
    let joined = watcher.next_frame().await;
    assert_eq!((joined["event"].as_str(), joined["user"].as_str()), (Some("join"), Some("doomed")), "{joined}");
    watcher.expect_silence(100).await;
    let mut ids = n1.node_ids().await;
    ids.sort();
    assert_eq!(ids, [n1.id.clone(), n2.id.clone(), n3.id.clone()]);
    let presence = n1.ok("GET", "/api/v1/users/doomed/presence", None).await;
    assert_eq!(presence["sessions"].as_array().map(Vec::len), Some(1), "{presence}");
    assert_eq!(presence["sessions"][0]["node"], json!(n2.id), "{presence}");

    n2.kill();
    let killed = Instant::now();
    drop(doomed);
    let limit = Duration::from_secs(15);
    let gone_from_nodes =
        until("node list drops the killed node", killed, limit, || async { !n1.node_ids().await.contains(&n2.id) });
    let gone_from_presence = until("presence drops the killed node's session", killed, limit, || async {
        let p = n1.ok("GET", "/api/v1/users/doomed/presence", None).await;
        p["online"] == false && p["sessions"].as_array().is_some_and(Vec::is_empty)
    });
    let left = async {
        let frame = frame_within(&mut watcher, limit).await.expect("a leave event within 15 s");
        assert_eq!(
            (frame["type"].as_str(), frame["event"].as_str(), frame["user"].as_str(), frame["room"].as_str()),
            (Some("presence"), Some("leave"), Some("doomed"), Some("heal")),
            "{frame}"
        );
        killed.elapsed()
    };
    let (nodes_after, presence_after, leave_after) = tokio::join!(gone_from_nodes, gone_from_presence, left);
    println!(
        "TIMING registry_heals_after_sigkill: SIGKILL -> gone from /api/v1/nodes {} ms, presence empty {} ms, watcher got `leave` {} ms",
        ms(nodes_after),
        ms(presence_after),
        ms(leave_after)
    );
    assert!(!n3.node_ids().await.contains(&n2.id), "every node agrees");
    watcher.expect_silence(300).await;

    // A clean shutdown leaves the registry at once, after closing its sessions with 1001.
    let mut leaving = n3.connect("leaving").await;
    assert!(n1.node_ids().await.contains(&n3.id));
    let terminated = Instant::now();
    let (status, (code, announced)) = tokio::join!(n3.terminate(Duration::from_secs(15)), leaving.closed());
    let exited = terminated.elapsed();
    assert!(status.success(), "a SIGTERM shutdown exits 0: {status}");
    assert_eq!((code, announced), (1001, Some(1001)), "sessions are closed with 1001");
    let gone = until("node list drops the terminated node", terminated, Duration::from_secs(3), || async {
        !n1.node_ids().await.contains(&n3.id)
    })
    .await;
    println!(
        "TIMING registry_heals_after_sigkill: SIGTERM -> process exited {} ms, gone from /api/v1/nodes {} ms",
        ms(exited),
        ms(gone)
    );
    assert_eq!(n1.node_ids().await, std::slice::from_ref(&n1.id), "only node 1 is left");
    let presence = n1.ok("GET", "/api/v1/users/leaving/presence", None).await;
    assert_eq!(presence["online"], false, "{presence}");
}

/// A client on node 2 receives a stream of `TOTAL` messages sent through node 1; node 2 is
/// SIGKILLed after `KILL_AT` of them; the client reconnects to node 3 with `since` and must end
/// with every message exactly once. On the private Redis, on the test Redis Cluster, on a private
/// NATS alone, or with the bus on the machine's RabbitMQ.
async fn no_loss_when_a_node_dies(room: bool, backend: Backend) {
    const TOTAL: usize = 3000;
    const KILL_AT: usize = 1000;
    let name = if room { "lossroom" } else { "lossdirect" };
    let nats = match backend {
        Backend::Nats => {
            let Some(nats) = NatsServer::start() else { return };
            Some(nats)
        }
        Backend::Amqp if !crate::amqp_server::available() => return,
        _ => None,
    };
    let redis_cluster = match backend {
        Backend::RedisCluster => {
            let Some(url) = redis_cluster_url() else { return };
            Some(url)
        }
        _ => None,
    };
    let Some(cluster) = Cluster::start(name) else { return };
    let cluster = match (&nats, backend) {
        (Some(nats), _) => cluster.on(&nats.url()),
        (None, Backend::Amqp) => cluster.with_bus(crate::amqp_server::amqp_url()),
        (None, Backend::RedisCluster) => cluster.on(redis_cluster.as_deref().expect("checked above")),
        _ => cluster,
    };
    let n1 = cluster.node("n1").await;
    let mut n2 = cluster.node("n2").await;
    let n3 = cluster.node("n3").await;
    let mut alice = n1.connect("alice").await;
    let mut bob = n2.connect("bob").await;
    if room {
        alice.ok(json!({"type":"join","room":"loss"})).await;
        let joined = bob.ok(json!({"type":"join","room":"loss"})).await;
        assert_eq!(joined["seq"], 0);
    }
    bob.expect_silence(100).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let sending = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let commands = (1..=TOTAL)
                .map(|i| match room {
                    true => json!({"type":"publish","room":"loss","body":i}),
                    false => json!({"type":"send","to":"bob","body":i}),
                })
                .collect();
            let (replies, _) = pipeline(&mut alice, commands, 8, Some(&progress)).await;
            for (i, reply) in replies.iter().enumerate() {
                assert_eq!(reply["type"], "reply", "{reply}");
                // One sender, commands in order: the i-th body gets seq i (alice's own stream
                // for a direct message, the room's for a publish; both were empty).
                assert_eq!(seq(reply), i as u64 + 1, "{reply}");
            }
            alice
        })
    };

    let started = Instant::now();
    let mut before: Vec<Value> = Vec::new();
    let mut killed: Option<(Instant, usize)> = None;
    while let Some(frame) = frame_within(&mut bob, WAIT).await {
        if frame["type"] != "message" {
            assert_eq!(frame["type"], "presence", "{frame}");
            continue;
        }
        before.push(frame);
        if before.len() == KILL_AT {
            n2.kill();
            killed = Some((Instant::now(), progress.load(Ordering::Relaxed)));
        }
    }
    let (killed_at, sent_at_kill) =
        killed.unwrap_or_else(|| panic!("the stream stalled after {} messages on node 2", before.len()));
    let seqs: Vec<u64> = before.iter().map(seq).collect();
    assert_eq!(seqs, (1..=before.len() as u64).collect::<Vec<_>>(), "node 2 delivered in order, without gaps");
    let last = before.len() as u64;

    // A client backs off before it reconnects; the stream goes on meanwhile, so the catch-up
    // has hundreds of messages to deliver while live ones keep coming.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut bob = n3.connect("bob").await;
    let reconnected = killed_at.elapsed();
    let reply = match room {
        true => bob.ok(json!({"type":"join","room":"loss","since":last})).await,
        false => bob.ok(json!({"type":"sync","since":last})).await,
    };
    assert_eq!(reply["truncated"], false, "{reply}");
    let mut have: HashSet<u64> = seqs.iter().copied().collect();
    let mut after = Vec::new();
    while have.len() < TOTAL {
        let m = bob.next_message().await;
        let s = seq(&m);
        assert!(have.insert(s), "seq {s} delivered twice (since {last}); {} after the reconnect so far", after.len());
        after.push(m);
    }
    bob.expect_silence(500).await;
    assert_eq!(have, (1..=TOTAL as u64).collect::<HashSet<_>>());
    let stream = if room { "room:loss".to_owned() } else { "user:bob".to_owned() };
    for m in before.iter().chain(&after) {
        assert_eq!(m["body"], json!(seq(m)), "body of seq {}", seq(m));
        assert_eq!(m["stream"], json!(stream), "{m}");
        assert_eq!(m["from"], "alice", "{m}");
    }
    let out_of_order = after.windows(2).filter(|w| seq(&w[1]) < seq(&w[0])).count();
    let alice = sending.await.expect("sender task");
    println!(
        "TIMING no_loss_when_a_node_dies_{}: {TOTAL} messages; node 2 killed after delivering {KILL_AT} ({} ms in, {sent_at_kill} sent); \
         reconnected to node 3 in {} ms with since={last} (reply seq {}); {} more delivered there, {} of them out of seq order; total {} ms",
        if room { "room" } else { "direct" },
        ms(killed_at - started),
        ms(reconnected),
        reply["seq"],
        after.len(),
        out_of_order,
        ms(started.elapsed())
    );
    drop(alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_direct() {
    no_loss_when_a_node_dies(false, Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_room() {
    no_loss_when_a_node_dies(true, Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_direct_on_nats() {
    no_loss_when_a_node_dies(false, Backend::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_room_on_nats() {
    no_loss_when_a_node_dies(true, Backend::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_direct_on_redis_cluster() {
    no_loss_when_a_node_dies(false, Backend::RedisCluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_room_on_redis_cluster() {
    no_loss_when_a_node_dies(true, Backend::RedisCluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_direct_on_amqp() {
    no_loss_when_a_node_dies(false, Backend::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_when_a_node_dies_room_on_amqp() {
    no_loss_when_a_node_dies(true, Backend::Amqp).await;
}

/// Where a node-death test's cluster runs.
#[derive(Clone, Copy)]
enum Backend {
    Redis,
    /// The shared test Redis Cluster, in every role.
    RedisCluster,
    Nats,
    Amqp,
}

/// Sends `command` with an id and waits up to `wait` for its answer; answers it and how long it
/// took. Other frames that arrive meanwhile fail the test.
pub(crate) async fn answer_within(client: &mut Client, mut command: Value, wait: Duration) -> (Value, Duration) {
    let id = format!("w{}", fastrand::u32(..));
    command["id"] = json!(id);
    let sent = Instant::now();
    client.send_json(command.clone()).await;
    let frame = frame_within(client, wait).await.unwrap_or_else(|| panic!("no answer to {command} within {wait:?}"));
    assert_eq!(frame["id"], json!(id), "{command}: unexpected frame {frame}");
    (frame, sent.elapsed())
}

/// The backend a pause test freezes, through a [`FaultProxy`] in front of it.
#[derive(Clone, Copy, Debug)]
enum Frozen {
    /// The cluster's one Redis: store, bus and presence.
    Redis,
    /// The PostgreSQL store of a cluster whose bus and presence stay on Redis.
    Postgres,
    /// The MySQL (MariaDB) store, likewise.
    Mysql,
    /// The NATS JetStream store, likewise.
    Nats,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pause_is_never_silent() {
    let Some((cluster, proxy)) = Cluster::start_behind_proxy("pause") else { return };
    pause_is_never_silent(Frozen::Redis, cluster, proxy, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_pause_is_never_silent() {
    if !crate::sql_server::postgres_available() {
        return;
    }
    let Some(cluster) = Cluster::start("pgpause") else { return };
    let cluster = cluster.with_sql_prefix();
    let proxy = FaultProxy::start(crate::sql_server::postgres_addr());
    let store = crate::sql_server::postgres_url_via(proxy.addr());
    pause_is_never_silent(Frozen::Postgres, cluster, proxy, Some(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_store_pause_is_never_silent() {
    if !crate::sql_server::mysql_available() {
        return;
    }
    let Some(cluster) = Cluster::start("mypause") else { return };
    let cluster = cluster.with_sql_prefix();
    let proxy = FaultProxy::start(crate::sql_server::mysql_addr());
    let store = crate::sql_server::mysql_url_via(proxy.addr());
    pause_is_never_silent(Frozen::Mysql, cluster, proxy, Some(store)).await;
}

/// Presence and the registry on a server of their own (`--presence`), which freezes while the
/// store and the bus answer: `/readyz` says so (the heartbeat no longer reaches the registry),
/// and answers 200 again once presence answers, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_presence_backend_makes_the_node_not_ready() {
    let Some(cluster) = Cluster::start("presfreeze") else { return };
    let proxy = FaultProxy::start(([127, 0, 0, 1], cluster.redis.port).into());
    let presence = format!("redis://{}/0", proxy.addr());
    let n1 = cluster.node_with("n1", &["--presence", &presence]).await;
    assert_eq!(n1.readyz(Duration::from_secs(3)).await, Some(200));
    proxy.pause();
    let paused = Instant::now();
    let not_ready = until("/readyz 503 while presence is frozen", paused, Duration::from_secs(15), || async {
        n1.readyz(Duration::from_secs(3)).await == Some(503)
    })
    .await;
    proxy.resume();
    let resumed = Instant::now();
    let ready = until("/readyz 200 once presence answers", resumed, Duration::from_secs(15), || async {
        n1.readyz(Duration::from_secs(3)).await == Some(200)
    })
    .await;
    println!(
        "TIMING a_frozen_presence_backend_makes_the_node_not_ready: pause -> 503 {} ms, resume -> 200 {} ms",
        ms(not_ready),
        ms(ready)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_pause_is_never_silent() {
    let Some(nats) = machine_nats() else { return };
    let Some(cluster) = Cluster::start("natspause") else { return };
    let proxy = FaultProxy::start(nats);
    let store = format!("nats://{}", proxy.addr());
    let prefix = cluster.prefix.clone();
    pause_is_never_silent(Frozen::Nats, cluster, proxy, Some(store)).await;
    // The machine's NATS outlives the test: its stream and bucket go.
    let client = async_nats::connect(nats.to_string()).await.expect("NATS answers");
    let js = async_nats::jetstream::new(client);
    for stream in [format!("{prefix}_messages"), format!("KV_{prefix}_cursors")] {
        js.delete_stream(&stream).await.unwrap_or_else(|e| panic!("deleting {stream}: {e}"));
    }
}

/// The machine's NATS with JetStream (`SWITCHYARD_TEST_NATS_ADDR`, default 127.0.0.1:4222), or
/// `None` after printing why (a failure under `CI=true`).
fn machine_nats() -> Option<std::net::SocketAddr> {
    let addr = std::env::var("SWITCHYARD_TEST_NATS_ADDR").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let addr: std::net::SocketAddr = addr.parse().expect("SWITCHYARD_TEST_NATS_ADDR is host:port");
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return Some(addr);
    }
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "no NATS at {addr}: CI must start nats-server -js");
    eprintln!("SKIP: no NATS at {addr}, so this NATS test cannot run");
    None
}

/// While a backend the cluster needs is frozen (connections open, nothing answered), every node
/// says so: `/readyz` 503 within a few seconds, commands that need it `unavailable`, API calls
/// 503; nothing refused then is stored later, and the nodes recover by themselves.
async fn pause_is_never_silent(frozen: Frozen, cluster: Cluster, proxy: FaultProxy, store: Option<String>) {
    let extra: Vec<&str> = store.as_deref().map(|url| vec!["--store", url]).unwrap_or_default();
    let n1 = cluster.node_with("n1", &extra).await;
    let n2 = cluster.node_with("n2", &extra).await;
    assert!(proxy.connections() >= 2, "both nodes reach the {frozen:?} server through the proxy");
    let mut bob = n2.connect("bob").await;
    bob.ok(json!({"type":"join","room":"pause"})).await;
    let mut alice = n1.connect("alice").await;
    alice.ok(json!({"type":"join","room":"pause"})).await;
    assert_eq!(bob.next_frame().await["event"], "join");
    alice.ok(json!({"type":"send","to":"bob","body":"before"})).await;
    assert_eq!(bob.next_message().await["body"], "before");
    alice.ok(json!({"type":"publish","room":"pause","body":"before-room"})).await;
    assert_eq!(bob.next_message().await["body"], "before-room");

    // Frozen, not down: connections stay open and nothing answers.
    proxy.pause();
    let paused = Instant::now();
    let not_ready = until("/readyz answers 503 after the pause", paused, Duration::from_secs(10), || async {
        n1.readyz(Duration::from_secs(3)).await == Some(503)
    })
    .await;
    let readyz_n2 = n2.readyz(Duration::from_secs(3)).await;
    assert_eq!(readyz_n2, Some(503), "every node of the paused {frozen:?} is not ready");

    let wait = Duration::from_secs(15);
    let (sent, send_took) =
        answer_within(&mut alice, json!({"type":"send","to":"bob","body":"during-send"}), wait).await;
    assert_eq!((sent["type"].as_str(), sent["code"].as_str()), (Some("error"), Some("unavailable")), "{sent}");
    let (published, publish_took) =
        answer_within(&mut alice, json!({"type":"publish","room":"pause","body":"during-publish"}), wait).await;
    assert_eq!(
        (published["type"].as_str(), published["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{published}"
    );
    let posted = Instant::now();
    let api =
        http_within(n2.addr, "POST", "/api/v1/users/bob/messages", &json!({"body":"during-api"}).to_string(), wait)
            .await;
    let api_took = posted.elapsed();
    let (status, body) = api.expect("the API answers while the backend is paused");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    // A broadcast needs only the bus: refused while that is the frozen Redis, sent while only
    // the store is frozen.
    let broadcast =
        http_within(n1.addr, "POST", "/api/v1/broadcast", &json!({"body":"during-broadcast"}).to_string(), wait).await;
    let (status, body) = broadcast.expect("the API answers while the backend is paused");
    match frozen {
        Frozen::Redis => assert_eq!((status, &body["error"]["code"]), (503, &json!("unavailable")), "{body}"),
        Frozen::Postgres | Frozen::Mysql | Frozen::Nats => {
            assert_eq!(status, 200, "{body}");
            let got = bob.next_message().await;
            assert_eq!((got["stream"].as_str(), &got["body"]), (Some("broadcast"), &json!("during-broadcast")));
        }
    }

    proxy.resume();
    let resumed = Instant::now();
    let ready_again = until("/readyz answers 200 after the resume", resumed, Duration::from_secs(10), || async {
        n1.readyz(Duration::from_secs(3)).await == Some(200) && n2.readyz(Duration::from_secs(3)).await == Some(200)
    })
    .await;
    println!(
        "TIMING pause_is_never_silent({frozen:?}): pause -> /readyz 503 {} ms; `send` error after {} ms, `publish` \
         error after {} ms, API POST 503 after {} ms; resume -> /readyz 200 on both nodes {} ms",
        ms(not_ready),
        ms(send_took),
        ms(publish_took),
        ms(api_took),
        ms(ready_again)
    );

    let sent = alice.ok(json!({"type":"send","to":"bob","body":"after"})).await;
    let published = alice.ok(json!({"type":"publish","room":"pause","body":"after-room"})).await;
    let got = messages_within(&mut bob, Duration::from_millis(1500)).await;
    let bodies: Vec<&Value> = got.iter().map(|m| &m["body"]).collect();
    assert_eq!(
        bodies,
        [&json!("after"), &json!("after-room")],
        "only what was accepted after the pause is delivered: {got:?}"
    );
    assert_eq!(seq(&sent), 2, "alice's stream: `before`, then `after`");
    assert_eq!(seq(&published), 2, "room: `before-room`, then `after-room`");

    let history = |path: &'static str| {
        let n1 = &n1;
        async move {
            let h = n1.ok("GET", path, None).await;
            h["messages"].as_array().expect("messages").iter().map(|m| m["body"].clone()).collect::<Vec<_>>()
        }
    };
    assert_eq!(history("/api/v1/users/bob/history").await, [json!("before"), json!("after")], "bob's stream");
    assert_eq!(history("/api/v1/users/alice/history").await, [json!("before"), json!("after")], "alice's stream");
    assert_eq!(history("/api/v1/rooms/pause/history").await, [json!("before-room"), json!("after-room")], "the room");
}

/// Frames until `messages` messages or a `disconnect` frame arrived, or `wait` passed between two.
async fn frames_until(client: &mut Client, messages: usize, wait: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while out.iter().filter(|f: &&Value| f["type"] == "message").count() < messages {
        let Some(frame) = frame_within(client, wait).await else { break };
        let last = frame["type"] == "disconnect";
        out.push(frame);
        if last {
            break;
        }
    }
    out
}

fn describe(frames: &[Value]) -> String {
    let one = |f: &Value| match f["type"].as_str() {
        Some("message") => format!("{}={}", f["seq"], f["body"]),
        _ => f.to_string(),
    };
    frames.iter().map(one).collect::<Vec<_>>().join(" ")
}

/// The `last_seen` of node `id` in the registry, as node `via` lists it.
async fn last_seen(via: &NodeProc, id: &str) -> Option<u64> {
    let answer = via.ok("GET", "/api/v1/nodes", None).await;
    answer["nodes"].as_array()?.iter().find(|n| n["id"] == id)?["last_seen"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_reconnects_and_resubscribes() {
    let Some(mut cluster) = Cluster::start("restart") else { return };
    let mut n1 = cluster.node("n1").await;
    let mut n2 = cluster.node("n2").await;
    let mut n3 = cluster.node("n3").await;
    let mut member = n1.connect("member").await;
    member.ok(json!({"type":"join","room":"restart"})).await;
    let mut user = n1.connect("user").await;
    for i in 1..=3 {
        n2.ok("POST", "/api/v1/rooms/restart/messages", Some(&json!({"body":format!("pre-{i}")}))).await;
        n2.ok("POST", "/api/v1/users/user/messages", Some(&json!({"body":format!("pre-{i}")}))).await;
    }
    for client in [&mut member, &mut user] {
        let got = messages_within(client, Duration::from_millis(500)).await;
        assert_eq!(got.iter().map(seq).collect::<Vec<_>>(), [1, 2, 3], "{got:?}");
    }

    // Restart right after a heartbeat of node 1, so that what follows happens before its next
    // heartbeat finds that the restarted Redis forgot it.
    let seen_before = last_seen(&n2, &n1.id).await;
    let heartbeat_wait = Instant::now();
    while last_seen(&n2, &n1.id).await == seen_before {
        assert!(heartbeat_wait.elapsed() < Duration::from_secs(5), "node 1 heartbeats every 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addrs = [n1.addr, n2.addr, n3.addr];
    let start = Instant::now();
    let watching = tokio::spawn(async move {
        // Per node: when it was first seen not ready, and when ready again after that.
        let mut seen: [(Option<Duration>, Option<Duration>); 3] = Default::default();
        // Until node 1 was down and every node answers 200 again, after a bound.
        while start.elapsed() < Duration::from_secs(15) {
            let mut all_ready = true;
            for (i, addr) in addrs.iter().enumerate() {
                let status = http_within(*addr, "GET", "/readyz", "", Duration::from_secs(2)).await.map(|r| r.0);
                all_ready &= status == Some(200);
                match (status, seen[i]) {
                    (Some(200), (Some(_), None)) => seen[i].1 = Some(start.elapsed()),
                    (Some(200), _) => {}
                    (_, (None, _)) => seen[i].0 = Some(start.elapsed()),
                    _ => {}
                }
            }
            if all_ready && seen[0].1.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    });
    tokio::task::block_in_place(|| cluster.redis.restart());
    let restart_took = start.elapsed();
    let seen = watching.await.expect("readiness watcher");
    // Node 1 checks Redis right after its heartbeat, so it is not ready for most of a second;
    // the others may be not ready for a few ms only, too short to be seen every time.
    assert!(seen[0].0.is_some(), "node 1 answered /readyz 503 after the restart");
    let mut timings = Vec::new();
    for (i, (down, up)) in seen.iter().enumerate() {
        let up = up
            .or(down.is_none().then_some(Duration::ZERO))
            .unwrap_or_else(|| panic!("node {} did not answer /readyz 200 again", i + 1));
        let down = down.map_or_else(|| "never seen".to_owned(), |d| format!("{} ms", ms(d)));
        timings.push(format!("node {}: 503 at {down}, 200 again at {} ms", i + 1, ms(up)));
    }
    assert!(n1.alive() && n2.alive() && n3.alive(), "the nodes kept running through the restart");
    println!(
        "TIMING redis_restart_reconnects_and_resubscribes: restart took {} ms; {}",
        ms(restart_took),
        timings.join("; ")
    );

    // Published through node 2 after the restart: the store is empty, so seqs start again at 1.
    // The sessions on node 1 stayed connected and must get them, not drop them as duplicates of
    // the seqs 1-2 they had before the restart.
    for i in 1..=2 {
        let r = n2.ok("POST", "/api/v1/rooms/restart/messages", Some(&json!({"body":format!("post-{i}")}))).await;
        assert_eq!(seq(&r), i, "the emptied store numbers the room from 1 again");
        let u = n2.ok("POST", "/api/v1/users/user/messages", Some(&json!({"body":format!("post-{i}")}))).await;
        assert_eq!(seq(&u), i, "the emptied store numbers the user's stream from 1 again");
    }
    let member_got = frames_until(&mut member, 2, Duration::from_millis(1000)).await;
    let user_got = frames_until(&mut user, 2, Duration::from_millis(1000)).await;
    let received = start.elapsed();
    println!(
        "TIMING redis_restart_reconnects_and_resubscribes: after the restart ({} ms in) the room member got [{}], the user got [{}]",
        ms(received),
        describe(&member_got),
        describe(&user_got)
    );
    for (who, got) in [("room member", &member_got), ("user", &user_got)] {
        let messages: Vec<(u64, Value)> =
            got.iter().filter(|f| f["type"] == "message").map(|m| (seq(m), m["body"].clone())).collect();
        assert_eq!(messages, [(1, json!("post-1")), (2, json!("post-2"))], "{who} on node 1: [{}]", describe(got));
    }

    // At its next heartbeat node 1 finds that the cluster forgot it and registers its sessions
    // and memberships again; they stay connected throughout.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let presence = n2.ok("GET", "/api/v1/users/user/presence", None).await;
        let room = n2.ok("GET", "/api/v1/rooms/restart/presence", None).await;
        if presence["sessions"].as_array().map(Vec::len) == Some(1) && room["users"] == json!(["member"]) {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 registered its sessions again: {presence} {room}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registered = start.elapsed();
    // Each node registers again at its own next heartbeat (every 2 s), not when node 1 does.
    let expected = [n1.id.clone(), n2.id.clone(), n3.id.clone()];
    loop {
        let mut ids = n2.node_ids().await;
        ids.sort();
        if ids == expected {
            break;
        }
        assert!(Instant::now() < deadline, "every node registered again: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n2.ok("POST", "/api/v1/rooms/restart/messages", Some(&json!({"body":"post-3"}))).await;
    n2.ok("POST", "/api/v1/users/user/messages", Some(&json!({"body":"post-3"}))).await;
    // Node 1 subscribed to broadcasts once, at its start: getting one proves the subscription
    // was renewed after the restart.
    n2.ok("POST", "/api/v1/broadcast", Some(&json!({"body":"post-broadcast"}))).await;
    for client in [&mut member, &mut user] {
        let m = client.next_message().await;
        assert_eq!((seq(&m), &m["body"]), (3, &json!("post-3")));
        let b = client.next_message().await;
        assert_eq!((b["stream"].as_str(), &b["body"]), (Some("broadcast"), &json!("post-broadcast")));
        client.expect_silence(300).await;
    }
    println!(
        "TIMING redis_restart_reconnects_and_resubscribes: node 1's sessions were in presence again {} ms after the restart",
        ms(registered)
    );
}
