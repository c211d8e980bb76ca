//! The resume scenario (Switchyard): K clients receive a steady stream through one node; that
//! node is SIGKILLed; each client reconnects to another node and resumes with `join` + `since`
//! (room) or `sync` + `since` (direct) from the last seq it saw.
//!
//! Catch-up of one client that lost its connection: it has caught up at the first moment it
//! is connected again and holds every accepted message sent before its catch-up request was
//! answered; the figure is that moment minus the kill time.

mod client;
mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::ensure;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_websockets::Message;

use client::{ClientLog, client};
use report::{Kill, Recovery, ResumeDelivery, ResumePublish, ResumeServer};
pub use report::{ResumeReport, human};

use crate::cli::{KillSignal, ResumeArgs, StreamKind};
use crate::clock::{now_us, secs_us, until_us};
use crate::latency::Latency;
use crate::ledger::{Check, Ranges};
use crate::net::{Conn, ws_error_kind};
use crate::plan::{bump, merge_counts};
use crate::procfs::{self, Sample, ticks_to_secs};
use crate::schedule::Schedule;
use crate::wire::{Frame, Probe, Protocol};

const CATCH_UP_ID: u64 = 1 << 62;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Run,
    Close,
}

/// One client's record.
struct Ctx {
    proto: Protocol,
    targets: Vec<String>,
    addrs: Vec<std::net::SocketAddr>,
    stream: StreamKind,
    id: String,
    room: String,
    timeout: Duration,
    latency: std::sync::Mutex<Latency>,
    gate: Semaphore,
}

pub async fn run(a: &ResumeArgs) -> anyhow::Result<ResumeReport> {
    let c = &a.common;
    crate::scenarios::validate(c, None)?;
    ensure!(c.protocol == Protocol::Switchyard, "resume needs Switchyard's sync / join since");
    ensure!(c.target.len() >= 2, "resume needs at least two --target nodes");
    ensure!(a.kill_target < c.target.len(), "--kill-target is an index into --target");
    ensure!(a.rate > 0.0 && a.clients > 0 && a.duration > 0.0, "--rate, --clients, --duration must be positive");
    let id = crate::scenarios::id_prefix(c);
    let ctx = Arc::new(Ctx {
        proto: c.protocol,
        targets: c.target.clone(),
        addrs: c.target.iter().map(|t| crate::net::resolve(t)).collect::<Result<_, _>>()?,
        stream: a.stream,
        room: format!("{}{id}-room", c.room_prefix),
        id: id.clone(),
        timeout: Duration::from_secs_f64(c.connect_timeout),
        latency: std::sync::Mutex::new(Latency::new()),
        gate: Semaphore::new(c.connect_concurrency.max(1)),
    });
    let pids: Vec<u32> = c.pid.iter().chain(&c.also_pid).copied().collect();
    let before: Vec<Sample> = pids.iter().map(|&p| procfs::sample(p)).collect();
    let self0 = procfs::self_ticks();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);

    // Receivers: each has one flow (room: flow 0 for everyone; direct: flow i).
    let received: Vec<Arc<AtomicU64>> = (0..a.clients).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(a.clients);
    for (i, count) in received.iter().enumerate() {
        let user = client_user(&id, i);
        let flow = if a.stream == StreamKind::Room { 0 } else { i as u32 };
        tasks.push(tokio::spawn(client(
            ctx.clone(),
            user,
            flow,
            a.kill_target,
            i,
            phase_rx.clone(),
            count.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut failures = BTreeMap::new();
    let mut established = 0;
    for _ in 0..a.clients {
        match ready_rx.recv().await {
            Some(Ok(())) => established += 1,
            Some(Err(e)) => bump(&mut failures, e),
            None => break,
        }
    }
    ensure!(established > 0, "no client connected: {failures:?}");

    // Publisher on the node after the one to be killed.
    let pub_target = (a.kill_target + 1) % c.target.len();
    let mut publisher =
        Conn::open(ctx.proto, &ctx.targets[pub_target], ctx.addrs[pub_target], &format!("{id}-pub"), None, ctx.timeout)
            .await
            .map_err(|e| anyhow::anyhow!("publisher: {e}"))?;
    if a.stream == StreamKind::Room {
        publisher
            .join(&ctx.room, None, CATCH_UP_ID, |_, _| {})
            .await
            .map_err(|e| anyhow::anyhow!("publisher join: {e}"))?;
    }
    let flows = if a.stream == StreamKind::Room { 1 } else { a.clients };

    let start_us = now_us() + 200_000;
    let end_us = start_us + secs_us(a.duration);
    phase_tx.send(Phase::Run)?;
    let signal = match a.kill_signal {
        KillSignal::Kill => libc::SIGKILL,
        KillSignal::Term => libc::SIGTERM,
    };
    let kill = a.kill_pid.map(|pid| {
        let at = start_us + secs_us(a.kill_after);
        tokio::spawn(async move {
            tokio::time::sleep(until_us(at)).await;
            let sent_at = now_us();
            // SAFETY: kill(2) with a pid the user named for exactly this.
            let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
            let error = (rc != 0).then(|| std::io::Error::last_os_error().to_string());
            (pid, sent_at, error)
        })
    });

    let pubs = publish(&mut publisher, &ctx, a, flows, start_us, end_us).await;
    let accepted: Vec<Ranges> =
        pubs.rejected.iter().zip(&pubs.sent_us).map(|(r, s)| r.complement_below(s.len() as u64)).collect();

    // Drain: until every client holds as many distinct messages as its flow had accepted.
    let drain_deadline = now_us() + secs_us(a.drain);
    loop {
        let done = (0..a.clients).all(|i| {
            let f = if a.stream == StreamKind::Room { 0 } else { i };
            received[i].load(Ordering::Relaxed) >= accepted[f].len()
        });
        if done || now_us() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    phase_tx.send(Phase::Close)?;
    publisher.close().await;
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        logs.push(t.await?);
    }
    let kill = match kill {
        Some(k) => {
            let (pid, at, error) = k.await?;
            Some((pid, at, error))
        }
        None => None,
    };
    let kill_us = kill.as_ref().filter(|k| k.2.is_none()).map(|k| k.1);

    // Accounting.
    let mut check = Check::default();
    let mut disconnects = BTreeMap::new();
    let mut reconnect_failures = BTreeMap::new();
    let (mut affected, mut reconnected, mut caught_up) = (0, 0, 0);
    let mut reconnect_lat = Latency::new();
    let mut catch_up = Latency::new();
    let mut slowest: Option<u64> = Some(0);
    for (i, log) in logs.iter().enumerate() {
        merge_counts(&mut reconnect_failures, &log.reconnect_failures);
        for (_, why) in &log.ends {
            bump(&mut disconnects, why.clone());
        }
        if !log.established {
            continue;
        }
        let f = if a.stream == StreamKind::Room { 0 } else { i };
        check.add(&Check::expected_flow(Some(&log.tally), &accepted[f]));
        check.unexpected += log.stray;
        if log.ends.is_empty() {
            continue;
        }
        affected += 1;
        let Some(&resumed) = log.resumed_at.last() else {
            slowest = None;
            continue;
        };
        reconnected += 1;
        let base = kill_us.unwrap_or(log.ends[0].0);
        reconnect_lat.record_between(base, resumed);
        match caught_up_at(log, &accepted[f], &pubs.sent_us[f], resumed) {
            Some(at) => {
                caught_up += 1;
                let d = at.saturating_sub(base);
                catch_up.record(d);
                slowest = slowest.map(|s| s.max(d));
            }
            None => slowest = None,
        }
    }
    let servers = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let end = procfs::sample(pid);
            ResumeServer {
                pid,
                rss_before_kib: before[i].rss_kib,
                rss_end_kib: end.rss_kib,
                cpu_s: end.cpu_ticks.zip(before[i].cpu_ticks).map(|(e, b)| ticks_to_secs(e.saturating_sub(b))),
            }
        })
        .collect();
    let sent: u64 = pubs.sent_us.iter().map(|s| s.len() as u64).sum();
    Ok(ResumeReport {
        scenario: "resume",
        protocol: c.protocol.name(),
        targets: c.target.clone(),
        params: json!({
            "clients": a.clients, "stream": format!("{:?}", a.stream).to_lowercase(), "rate": a.rate,
            "duration_s": a.duration, "kill_after_s": a.kill_after, "kill_target": a.kill_target,
            "publisher_target": pub_target, "id_prefix": id,
        }),
        clients: a.clients,
        established,
        connect_failures: failures,
        kill: kill.map(|(pid, at, error)| Kill {
            pid,
            at_s: at.saturating_sub(start_us) as f64 / 1e6,
            sent: error.is_none(),
            error,
        }),
        publish: ResumePublish {
            sent,
            rejected: pubs.rejected.iter().map(Ranges::len).sum(),
            unanswered: pubs.unanswered,
            errors: pubs.errors,
            per_s: sent as f64 / a.duration,
        },
        delivery: ResumeDelivery {
            expected: check.expected,
            received: check.received,
            lost: check.lost,
            delivered_pct: if check.expected > 0 { 100.0 * check.received as f64 / check.expected as f64 } else { 0.0 },
            duplicates: check.duplicates,
            reordered: check.reordered,
            unexpected: check.unexpected,
        },
        recovery: Recovery {
            affected,
            reconnected,
            reconnect_us: reconnect_lat.summary(),
            caught_up,
            catch_up_us: catch_up.summary(),
            all_caught_up_s: slowest.filter(|_| affected > 0).map(|s| s as f64 / 1e6),
        },
        latency_us: ctx.latency.lock().unwrap().summary(),
        disconnects,
        reconnect_failures,
        servers,
        loadgen_cpu_s: ticks_to_secs(procfs::self_ticks() - self0),
    })
}

/// When the client held every accepted message sent before `resumed` (and was connected).
fn caught_up_at(log: &ClientLog, accepted: &Ranges, sent_us: &[u64], resumed: u64) -> Option<u64> {
    let before = sent_us.partition_point(|&t| t <= resumed) as u64;
    let mut at = resumed;
    for n in 0..before {
        if !accepted.contains(n) {
            continue;
        }
        let r = *log.first_receipt.get(n as usize)?;
        if r == 0 {
            return None;
        }
        at = at.max(r);
    }
    Some(at)
}

struct Published {
    /// By flow: send time of each message number.
    sent_us: Vec<Vec<u64>>,
    rejected: Vec<Ranges>,
    unanswered: u64,
    errors: BTreeMap<String, u64>,
}

/// Publishes at the rate from `start_us` to `end_us`, then waits (≤ 5 s) for the answers.
async fn publish(conn: &mut Conn, ctx: &Ctx, a: &ResumeArgs, flows: usize, start_us: u64, end_us: u64) -> Published {
    let pad = "x".repeat(a.pad);
    let mut out = Published {
        sent_us: vec![Vec::new(); flows],
        rejected: vec![Ranges::new(); flows],
        unanswered: 0,
        errors: BTreeMap::new(),
    };
    // By command id (= overall message index): its flow and number.
    let mut ids: Vec<(u32, u64)> = Vec::new();
    let mut answered = Ranges::new();
    let schedule = Schedule { start_us, offset_us: 0, rate: a.rate, end_us };
    let total = schedule.total();
    let answer_deadline = end_us + 5_000_000;
    loop {
        let sent = ids.len() as u64;
        if sent >= total && answered.len() >= sent {
            break;
        }
        let wake = (sent < total).then(|| schedule.due_at(sent));
        tokio::select! {
            msg = conn.ws.next() => match msg {
                Some(Ok(m)) => {
                    let Some(text) = m.as_text() else { continue };
                    match ctx.proto.parse(text) {
                        Frame::Reply { id: Some(id), .. } if (id as usize) < ids.len() => {
                            answered.insert(id);
                        }
                        Frame::Error { id: Some(id), code } if (id as usize) < ids.len() => {
                            if answered.insert(id) {
                                let (f, n) = ids[id as usize];
                                out.rejected[f as usize].insert(n);
                            }
                            bump(&mut out.errors, code);
                        }
                        Frame::Error { code, .. } => bump(&mut out.errors, code),
                        _ => {}
                    }
                }
                Some(Err(e)) => { bump(&mut out.errors, format!("publisher: {}", ws_error_kind(&e))); break; }
                None => { bump(&mut out.errors, "publisher: eof"); break; }
            },
            _ = tokio::time::sleep(until_us(wake.unwrap_or(answer_deadline))) => {
                if wake.is_none() {
                    break;
                }
                let now = now_us();
                let due = schedule.due_by(now);
                for j in sent..due {
                    let f = (j % flows as u64) as usize;
                    let n = out.sent_us[f].len() as u64;
                    let t = now_us();
                    let body = Probe { t, n, p: f as u32 }.encode(&pad);
                    let frame = match ctx.stream {
                        StreamKind::Room => ctx.proto.publish(j, &ctx.room, &body),
                        StreamKind::Direct => ctx.proto.send(j, &client_user(&ctx.id, f), &body),
                    };
                    if let Err(e) = conn.ws.feed(Message::text(frame)).await {
                        bump(&mut out.errors, format!("publisher: {}", ws_error_kind(&e)));
                    }
                    ids.push((f as u32, n));
                    out.sent_us[f].push(t);
                }
                let _ = conn.ws.flush().await;
            }
        }
    }
    out.unanswered = ids.len() as u64 - answered.len().min(ids.len() as u64);
    out
}

fn client_user(id: &str, i: usize) -> String {
    format!("{id}-c{i}")
}

#[allow(clippy::too_many_arguments)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_needs_everything_sent_before_the_resume() {
        let mut log = ClientLog::default();
        // Messages 0..5 sent at 10, 20, …, 50; 2 was refused; the client got 0, 1, 3 early and
        // 4 late (at 90); resumed at 45.
        let sent = [10, 20, 30, 40, 50];
        let accepted = {
            let mut r = Ranges::new();
            r.insert(2);
            r.complement_below(5)
        };
        log.first_receipt = vec![11, 21, 0, 41, 90];
        assert_eq!(caught_up_at(&log, &accepted, &sent, 45), Some(45));
        assert_eq!(caught_up_at(&log, &accepted, &sent, 55), Some(90));
        log.first_receipt[4] = 0;
        assert_eq!(caught_up_at(&log, &accepted, &sent, 55), None);
    }

    #[test]
    fn frames_update_seq_and_tally() {
        let latency = std::sync::Mutex::new(Latency::new());
        let mut log = ClientLog::default();
        let p = Protocol::Switchyard;
        for text in [
            r#"{"type":"message","stream":"room:r","seq":5,"room":"r","body":{"t":1,"n":0,"p":0}}"#,
            r#"{"type":"message","stream":"room:r","seq":6,"room":"r","body":{"t":1,"n":1,"p":0}}"#,
            r#"{"type":"message","stream":"room:r","seq":6,"room":"r","body":{"t":1,"n":1,"p":0}}"#,
            r#"{"type":"message","stream":"room:x","seq":99,"room":"x","body":{"t":1,"n":0,"p":7}}"#,
        ] {
            log.on_frame(&p.parse(text), 10, 0, "room:r", &latency);
        }
        assert_eq!(log.last_seq, 6);
        assert_eq!(log.tally.unique(), 2);
        assert_eq!(log.tally.duplicates, 1);
        assert_eq!(log.stray, 1);
        assert_eq!(log.first_receipt, vec![10, 10]);
    }
}
