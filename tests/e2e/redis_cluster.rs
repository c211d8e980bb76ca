//! Switchyard on a Redis Cluster (issue 15, PROTOCOL.md §6): a master SIGKILLed in the middle of
//! a steady stream of direct and room messages while its replica lags, with
//! `--redis-wait-replicas 1` (nothing acknowledged may be lost) and 0 (the loss is printed, not
//! asserted: replication is asynchronous); a node without recipients left out of a chat's
//! routing. (Routing, node death and presence healing on the test Redis Cluster are in
//! `cluster.rs`.)
//!
//! The failover tests run three node processes (`procs.rs`) on a private cluster of 3 masters
//! with a replica each, under the load of `failover_load.rs`; the chat test uses the process's
//! shared 3-master cluster ([`crate::redis_server::shared_cluster`]) under a prefix of its own. Observed timings are
//! printed with a `TIMING` prefix (`-- --nocapture` shows them).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::cluster::ms;
use crate::failover_load::{Kind, ROOM, Shared, device, history, sender, watch_ready};
use crate::procs::{Cluster, http_within};
use crate::redis_server::{RedisCluster, query, shared_cluster};

/// How long the master to kill goes on without its replica before it dies.
const LAG: Duration = Duration::from_millis(300);

/// `count` user names whose streams' slots are served by master `on` (or by any other master,
/// when `on_it` is false), so that the kill hits some of the users' streams and spares others.
fn users_on(redis: &RedisCluster, on: u16, on_it: bool, count: usize, taken: &[String]) -> Vec<String> {
    (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| !taken.contains(u) && (redis.master_of(&format!("{{user:{u}}}")) == on) == on_it)
        .take(count)
        .collect()
}

/// The percentile `p` (0..=100) of `values`, in ms.
fn percentile(values: &mut [Duration], p: usize) -> u128 {
    values.sort_unstable();
    values.get((values.len() * p / 100).min(values.len().saturating_sub(1))).map_or(0, |d| d.as_millis())
}

/// What a failover run found, for the test to assert on.
struct Report {
    /// Acknowledged messages missing from a stream they were acknowledged in.
    lost: Vec<String>,
    /// With `WAIT`: messages acknowledged in a stream of the promoted master while it had no
    /// replica to confirm them.
    unconfirmed: Vec<String>,
    /// Per device and stream, what it received when that was not every seq 1..=n once in
    /// order with the stored bodies.
    device_faults: Vec<String>,
}

/// The scenario of issue 15 item 3: 3 masters with a replica each, three nodes with
/// `--redis-wait-replicas wait`, four users with two devices each on different nodes, a steady
/// stream of direct and room messages from WebSocket senders and the API on every node, every
/// send keyed and retried with its key until acknowledged. The master serving the room (and
/// two of the four users) is SIGKILLed mid-stream, [`LAG`] after its replica stalled and lost
/// its link. Asserts what holds whatever `wait` is:
/// `/readyz` goes 503 on every node and 200 again without a restart, the replica is promoted,
/// the stream goes on, and every stream's history has seqs 1..n with nothing twice.
async fn failover(test: &str, wait: u32) -> Option<Report> {
    let mut redis = RedisCluster::start(3, 1)?;
    let cluster = Cluster::start(test)?.with_redis(redis.url());
    let doomed = redis.master_of(&format!("{{room:{ROOM}}}"));
    let mut users = users_on(&redis, doomed, true, 2, &[]);
    users.extend(users_on(&redis, doomed, false, 2, &users));
    let users = Arc::new(users);
    let wait_flag = wait.to_string();
    let mut nodes = Vec::new();
    for name in ["n0", "n1", "n2"] {
        nodes.push(cluster.node_with(name, &["--redis-wait-replicas", &wait_flag]).await);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();

    // Two devices per user, on different nodes.
    let (targets_tx, targets_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(8);
    let mut devices = Vec::new();
    for (k, user) in users.iter().enumerate() {
        for (d, label) in ["a", "b"].into_iter().enumerate() {
            let addr = addrs[(k + d) % addrs.len()];
            let run = device(user.clone(), label, addr, targets_rx.clone(), ready_tx.clone());
            devices.push(((user.clone(), label), tokio::spawn(run)));
        }
    }
    drop(ready_tx);
    for _ in 0..devices.len() {
        tokio::time::timeout(Duration::from_secs(20), ready_rx.recv()).await.expect("every device joined in time");
    }

    let shared = Arc::new(Shared::default());
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watchers: Vec<_> = addrs.iter().map(|&a| tokio::spawn(watch_ready(a, stop_watch.clone()))).collect();
    let mut senders = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        for kind in [Kind::Direct, Kind::Publish, Kind::Api] {
            senders.push(tokio::spawn(sender(kind, i, addr, users.clone(), shared.clone())));
        }
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let keys = query(doomed, "DBSIZE").and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    assert!(keys > 0, "the master to kill holds none of the test's keys");
    // On one machine a replica is microseconds behind its master, so a plain kill would seldom
    // lose anything even without `WAIT`. A lagging replica is the case `WAIT` is for: the
    // replica stalls (SIGSTOP), its master drops the link and goes on alone for a moment, then
    // dies; the replica goes on (well within the node timeout, so it may still take over).
    let replica = redis.index_of(redis.replica_of(doomed));
    shared.faulted.store(true, Ordering::Relaxed);
    let fault_at = Instant::now();
    redis.pause(replica);
    query(doomed, "CLIENT KILL TYPE replica").expect("the master drops its replica's link");
    tokio::time::sleep(LAG).await;
    let killed = Instant::now();
    redis.kill(redis.index_of(doomed));
    redis.resume(replica);
    let promoted = redis.wait_promoted(doomed).await;
    let promoted_after = killed.elapsed();
    let masters = redis.master_ports();
    assert!(masters.contains(&promoted) && !masters.contains(&doomed), "masters after the failover: {masters:?}");
    // With `WAIT`, the promoted master has no replica to confirm the writes to its slots: they
    // are refused (`unavailable`, and retried) until one is in sync. The killed server comes
    // back, as a crashed machine does, and rejoins as the new master's replica.
    let mut rejoined_after: Option<String> = None;
    let (promoted_at, mut alone_until) = (Instant::now(), None);
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        alone_until = Some(Instant::now());
        redis.restart(redis.index_of(doomed));
        redis.wait_replicated(promoted, wait as usize).await;
        rejoined_after = Some(format!("{} ms", ms(killed.elapsed())));
    }
    // Every node turns ready again without a restart.
    for node in &nodes {
        loop {
            let status = node.readyz(Duration::from_secs(3)).await;
            if status == Some(200) {
                break;
            }
            let (_, answer) = http_within(node.addr, "GET", "/readyz", "", Duration::from_secs(3)).await.unzip();
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "node {} is not ready 60 s after the kill: /readyz {status:?} {answer:?}",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ready_after = killed.elapsed();
    // The stream goes on for a while after the recovery.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.expect("a sender finished"));
    }
    stop_watch.store(true, Ordering::Relaxed);
    let mut readiness = Vec::new();
    for watcher in watchers {
        readiness.push(watcher.await.expect("a readiness watcher finished"));
    }

    // `/readyz`: 503 on every node once the fault began (with `WAIT`, a node may say so as soon
    // as the replica is gone, before the kill), 200 again after that.
    for (node, seen) in nodes.iter().zip(&readiness) {
        let after: Vec<(u128, Option<u16>)> = seen
            .iter()
            .filter(|(at, _)| *at >= fault_at)
            .map(|(at, s)| (ms(at.duration_since(fault_at)), *s))
            .collect();
        let not_ready = after.iter().position(|(_, s)| *s == Some(503));
        assert!(not_ready.is_some(), "node {} never answered /readyz 503 after the fault: {after:?}", node.id);
        let ready_again = after[not_ready.unwrap_or_default()..].iter().any(|(_, s)| *s == Some(200));
        assert!(ready_again, "node {} did not answer 200 again: {after:?}", node.id);
        println!(
            "TIMING {test}: /readyz of {} after the fault began, the kill {} ms later (ms, status): {after:?}",
            node.id,
            LAG.as_millis()
        );
    }
    let after_recovery = acked.iter().filter(|a| !a.before_fault).count();
    assert!(after_recovery > 0, "nothing was acknowledged after the fault");

    // Every stream's history: seqs 1..n, nothing stored twice.
    let mut streams: Vec<String> = users.iter().map(|u| format!("user:{u}")).collect();
    streams.push(format!("room:{ROOM}"));
    streams.extend((0..addrs.len()).map(|i| format!("user:dm{i}")));
    let mut stored: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for stream in &streams {
        let messages = history(&nodes[0], stream).await;
        let entries: Vec<(u64, String)> = messages
            .iter()
            .map(|m| (m["seq"].as_u64().expect("a seq"), m["body"].as_str().unwrap_or_default().to_owned()))
            .collect();
        let seqs: Vec<u64> = entries.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{stream}: seqs 1..n with no gap");
        let mut bodies: Vec<&String> = entries.iter().map(|e| &e.1).collect();
        bodies.sort();
        let count = bodies.len();
        bodies.dedup();
        assert_eq!(bodies.len(), count, "{stream}: a message stored twice");
        stored.insert(stream.clone(), entries);
    }

    // Every acknowledged message where it was acknowledged, with its seq.
    let mut lost = Vec::new();
    for a in &acked {
        let at = |stream: &str| stored[stream].iter().find(|e| e.1 == a.body).map(|e| e.0);
        match at(&a.stream) {
            Some(seq) if seq == a.seq => {}
            found => lost.push(format!("{} acknowledged as {} seq {}, stored at {found:?}", a.body, a.stream, a.seq)),
        }
        if let Some(other) = &a.also_in
            && at(other).is_none()
        {
            lost.push(format!("{} acknowledged, missing from {other}", a.body));
        }
    }

    // While the promoted master had no replica, no write to its streams could be confirmed by
    // `WAIT`, so none may have been acknowledged.
    let alone: Vec<&String> = streams.iter().filter(|s| redis.master_of(&format!("{{{s}}}")) == doomed).collect();
    let unconfirmed: Vec<String> = acked
        .iter()
        .filter(|a| alone_until.is_some_and(|until| promoted_at < a.at && a.at < until))
        .filter(|a| alone.contains(&&a.stream) || a.also_in.as_ref().is_some_and(|s| alone.contains(&s)))
        .map(|a| {
            format!("{} acknowledged as {} seq {} while the master of its slot had no replica", a.body, a.stream, a.seq)
        })
        .collect();

    // Every device: each of its streams once, in seq order, with the stored bodies.
    let targets: HashMap<String, u64> = stored.iter().map(|(s, e)| (s.clone(), e.len() as u64)).collect();
    let _ = targets_tx.send(Some(targets));
    let mut device_faults = Vec::new();
    let mut sessions = 0;
    for ((user, label), run) in devices {
        let received = run.await.expect("a device finished");
        sessions += received.sessions;
        for stream in [format!("user:{user}"), format!("room:{ROOM}")] {
            let got: Vec<(u64, &str)> =
                received.frames.iter().filter(|f| f.0 == stream).map(|f| (f.1, f.2.as_str())).collect();
            let want: Vec<(u64, &str)> = stored[&stream].iter().map(|e| (e.0, e.1.as_str())).collect();
            if got != want {
                let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
                let stored_body = |seq: u64| want.get(seq as usize - 1).map(|w| w.1);
                let other = got.iter().filter(|(seq, body)| *seq > 0 && stored_body(*seq) != Some(*body)).count();
                device_faults.push(format!(
                    "{user}/{label} {stream}: {} frames for {} stored; seqs {}; {other} with another body than the \
                     stored message of that seq",
                    got.len(),
                    want.len(),
                    describe(&seqs)
                ));
            }
        }
    }

    let mut latencies: Vec<Duration> = acked.iter().filter(|a| a.before_fault).map(|a| a.latency).collect();
    println!(
        "TIMING {test}: --redis-wait-replicas {wait}: {} acknowledged ({after_recovery} after the fault began), \
         {} refused or retried; before the fault ack p50 {} ms, p99 {} ms; master {doomed} killed, replica \
         {promoted} promoted after {} ms, the killed one back as its replica after {}, every \
         node ready after {} ms; {} device sessions for {} devices; {} acknowledged messages lost",
        acked.len(),
        shared.refused.load(Ordering::Relaxed),
        percentile(&mut latencies, 50),
        percentile(&mut latencies, 99),
        ms(promoted_after),
        rejoined_after.as_deref().unwrap_or("- (not restarted)"),
        ms(ready_after),
        sessions,
        users.len() * 2,
        lost.len()
    );
    drop(nodes);
    Some(Report { lost, device_faults, unconfirmed })
}

/// Compresses a list of seqs into runs: `1-40,38-90` shows a repeat, `1-40,42-90` a gap.
fn describe(seqs: &[u64]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut start = None;
    for (i, &seq) in seqs.iter().enumerate() {
        let first = *start.get_or_insert(seq);
        if seqs.get(i + 1) != Some(&(seq + 1)) {
            runs.push(if first == seq { seq.to_string() } else { format!("{first}-{seq}") });
            start = None;
        }
    }
    runs.join(",")
}

/// With `--redis-wait-replicas 1` a master's death loses nothing acknowledged: every
/// acknowledged message is stored once with its seq, nothing written to the promoted master's
/// slots is acknowledged while it has no replica, and every device received each of its streams
/// whole, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_stream_loses_nothing_acknowledged_with_wait_replicas() {
    let Some(report) = failover("rcwait", 1).await else { return };
    assert!(report.lost.is_empty(), "acknowledged messages lost:\n{}", report.lost.join("\n"));
    assert!(report.unconfirmed.is_empty(), "acknowledged without a replica:\n{}", report.unconfirmed.join("\n"));
    assert!(report.device_faults.is_empty(), "devices missed messages:\n{}", report.device_faults.join("\n"));
}

/// Without `WAIT` Redis replicates asynchronously, so a master's death may take acknowledged
/// messages with it: the same scenario prints how many (with the lagging replica, dozens; it may
/// be none), and how many device streams differ from the history (a lost seq is given again to
/// another message, which a device that had the first skips), and asserts what still holds
/// (every stream gapless, nothing stored twice, the nodes ready again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_stream_without_wait_reports_what_was_lost() {
    let Some(report) = failover("rcnowait", 0).await else { return };
    println!(
        "a_master_killed_mid_stream_without_wait: {} acknowledged messages lost{}; {} device streams differ from \
         history{}",
        report.lost.len(),
        report.lost.iter().take(10).map(|l| format!("\n  {l}")).collect::<String>(),
        report.device_faults.len(),
        report.device_faults.iter().take(10).map(|l| format!("\n  {l}")).collect::<String>(),
    );
}

/// While a pair on two nodes chats, the third node, which has sessions of other users, receives
/// nothing from the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_recipients_receives_nothing_of_a_chat_on_a_redis_cluster() {
    const BUS: &str = "switchyard_bus_messages_received_total";
    const EACH: usize = 100;
    let Some(redis) = shared_cluster() else { return };
    let Some(cluster) = Cluster::start("rcchat") else { return };
    let cluster = cluster.with_redis(redis.url());
    let (a, b, c) = (cluster.node("a").await, cluster.node("b").await, cluster.node("c").await);
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut bystander = c.connect("bystander").await;
    bystander.ok(json!({"type": "join", "room": "elsewhere"})).await;
    let before = [a.metric(BUS).await, b.metric(BUS).await, c.metric(BUS).await];
    for n in 0..EACH {
        alice.ok(json!({"type": "send", "to": "bob", "body": n})).await;
        assert_eq!(bob.next_message().await["body"], json!(n));
        bob.ok(json!({"type": "send", "to": "alice", "body": n})).await;
        assert_eq!(alice.next_message().await["body"], json!(n));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = [a.metric(BUS).await, b.metric(BUS).await, c.metric(BUS).await];
    let delta: Vec<f64> = after.iter().zip(before).map(|(x, y)| x - y).collect();
    println!("{EACH} direct messages each way between nodes a and b: bus messages received by a, b, c: {delta:?}");
    assert!(delta[0] >= EACH as f64 && delta[1] >= EACH as f64, "the pair's nodes received the chat: {delta:?}");
    assert_eq!(delta[2], 0.0, "the node without recipients received nothing: {delta:?}");
    bystander.expect_silence(100).await;
}
