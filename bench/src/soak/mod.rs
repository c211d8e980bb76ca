//! The soak scenario (Switchyard): a long mixed load on a cluster — direct messages, room
//! publishes, lounge joins and leaves, and devices that drop their connection (cleanly or
//! abruptly) and resume on another node — while the nodes' RSS, open file descriptors and CPU
//! are sampled. At the end every device must hold every accepted direct message to its user and
//! every accepted publish of its home room exactly once.
//!
//! Users have `--devices` devices each; user `u` lives in home room `u % rooms` for the whole run.
//! Lounges are joined and left at random and only counted (no loss accounting: membership
//! changes under them by design).

mod client;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use client::{Device, DeviceLog};

use crate::cli::SoakArgs;
use crate::clock::{now_us, secs_us};
use crate::ledger::{Check, Ranges};
use crate::plan::merge_counts;
use crate::procfs::{self, ticks_to_secs};
use crate::wire::Protocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Setup,
    Run,
    /// Nothing new is sent; unanswered commands are still retried and streams caught up.
    Drain,
    Over,
}

/// What every device shares.
pub(crate) struct Shared {
    targets: Vec<String>,
    addrs: Vec<std::net::SocketAddr>,
    timeout: Duration,
    gate: Semaphore,
    prefix: String,
    room_prefix: String,
    users: usize,
    devices: usize,
    rooms: usize,
    lounges: usize,
    seed: u64,
    direct_share: f64,
    act_mean_us: u64,
    reconnect_mean_us: u64,
    lounge_mean_us: u64,
    /// The next message number of each user's direct flow and each home room's flow.
    direct_next: Vec<AtomicU64>,
    room_next: Vec<AtomicU64>,
    /// The numbers the server accepted (answered with a reply).
    direct_accepted: std::sync::Mutex<Vec<Ranges>>,
    room_accepted: std::sync::Mutex<Vec<Ranges>>,
    /// Distinct expected messages received, over all devices.
    received: AtomicU64,
    /// Sends and publishes not answered yet, over all devices.
    outstanding: AtomicI64,
}

impl Shared {
    fn user_name(&self, u: usize) -> String {
        format!("{}-u{u}", self.prefix)
    }

    fn room_name(&self, r: usize) -> String {
        format!("{}{}-home{r}", self.room_prefix, self.prefix)
    }

    fn lounge_name(&self, l: usize) -> String {
        format!("{}{}-lounge{l}", self.room_prefix, self.prefix)
    }

    fn lounge_index(&self, room: &str) -> Option<usize> {
        let rest = room.strip_prefix(&self.room_prefix)?.strip_prefix(&self.prefix)?;
        rest.strip_prefix("-lounge")?.parse().ok()
    }

    /// The user a device belongs to, and that user's home room.
    fn user_and_home(&self, device: usize) -> (usize, usize) {
        let user = device / self.devices;
        (user, user % self.rooms)
    }

    fn members(&self, r: usize) -> usize {
        members(self.users, self.rooms, r)
    }

    /// Deliveries owed so far: every accepted message times the devices that must hold it.
    fn expected(&self) -> u64 {
        let d = self.devices as u64;
        let direct: u64 = self.direct_accepted.lock().unwrap().iter().map(Ranges::len).sum::<u64>() * d;
        let rooms = self.room_accepted.lock().unwrap();
        let room: u64 = rooms.iter().enumerate().map(|(r, a)| a.len() * self.members(r) as u64 * d).sum();
        direct + room
    }
}

/// Of `users` users, those whose home is room `r` (user u lives in room u % rooms).
fn members(users: usize, rooms: usize, r: usize) -> usize {
    users / rooms + usize::from(r < users % rooms)
}

/// One reading of the servers and of the run.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    pub at_s: f64,
    /// By process, in the order of --pid then --also-pid.
    pub rss_kib: Vec<Option<u64>>,
    pub fds: Vec<Option<u64>>,
    pub cpu_s: Vec<Option<f64>>,
    pub received: u64,
    pub outstanding: i64,
}

#[derive(Debug, Serialize)]
pub struct ProcessTrend {
    pub pid: u32,
    pub role: &'static str,
    /// The first sample after --settle, the largest and the last.
    pub rss_kib_first: Option<u64>,
    pub rss_kib_max: Option<u64>,
    pub rss_kib_last: Option<u64>,
    /// Least-squares slope of RSS over the second half of the run, KiB per hour.
    pub rss_kib_per_hour_late: Option<f64>,
    pub fds_first: Option<u64>,
    pub fds_max: Option<u64>,
    pub fds_last: Option<u64>,
    pub cpu_s: Option<f64>,
    pub alive_at_end: bool,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub scenario: &'static str,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub devices: usize,
    pub established: usize,
    pub duration_s: f64,
    pub sent: SoakSent,
    pub delivery: Check,
    pub truncated: u64,
    pub after_leave: u64,
    pub stray: u64,
    pub lounge_deliveries: u64,
    pub reconnects_clean: u64,
    pub reconnects_abrupt: u64,
    /// Connections the server or the network ended, by close code or error.
    pub dropped: BTreeMap<String, u64>,
    pub reconnect_failures: BTreeMap<String, u64>,
    /// Error answers, by code.
    pub refused: BTreeMap<String, u64>,
    pub joins: u64,
    pub leaves: u64,
    pub processes: Vec<ProcessTrend>,
    pub samples: usize,
    pub loadgen_cpu_s: f64,
}

#[derive(Debug, Serialize)]
pub struct SoakSent {
    pub direct_accepted: u64,
    pub publish_accepted: u64,
    /// Commands sent again after a reconnect (with their idempotency key).
    pub retried: u64,
    pub unanswered_at_end: i64,
}

pub async fn run(a: &SoakArgs) -> anyhow::Result<SoakReport> {
    let c = &a.common;
    crate::scenarios::validate(c, None)?;
    ensure!(c.protocol == Protocol::Switchyard, "soak needs Switchyard's sync / join since and idempotency keys");
    ensure!(c.target.len() >= 2, "soak needs at least two --target nodes to reconnect between");
    ensure!(a.users >= 2 && a.devices >= 1 && a.rooms >= 1, "--users ≥ 2, --devices ≥ 1, --rooms ≥ 1");
    ensure!(a.rate > 0.0 && a.duration > 0.0, "--rate and --duration must be positive");
    ensure!((0.0..=1.0).contains(&a.direct_share), "--direct-share is a fraction");
    let prefix = crate::scenarios::id_prefix(c);
    let devices = a.users * a.devices;
    let mean_us = |secs: f64| if secs > 0.0 { secs_us(secs) } else { u64::MAX };
    let shared = Arc::new(Shared {
        targets: c.target.clone(),
        addrs: c.target.iter().map(|t| crate::net::resolve(t)).collect::<Result<_, _>>()?,
        timeout: Duration::from_secs_f64(c.connect_timeout),
        gate: Semaphore::new(c.connect_concurrency.max(1)),
        prefix: prefix.clone(),
        room_prefix: c.room_prefix.clone(),
        users: a.users,
        devices: a.devices,
        rooms: a.rooms,
        lounges: a.lounges,
        seed: a.seed,
        direct_share: a.direct_share,
        act_mean_us: secs_us(devices as f64 / a.rate),
        reconnect_mean_us: mean_us(a.reconnect_every),
        lounge_mean_us: mean_us(a.lounge_every),
        direct_next: (0..a.users).map(|_| AtomicU64::new(0)).collect(),
        room_next: (0..a.rooms).map(|_| AtomicU64::new(0)).collect(),
        direct_accepted: std::sync::Mutex::new(vec![Ranges::new(); a.users]),
        room_accepted: std::sync::Mutex::new(vec![Ranges::new(); a.rooms]),
        received: AtomicU64::new(0),
        outstanding: AtomicI64::new(0),
    });
    let pids: Vec<u32> = c.pid.iter().chain(&c.also_pid).copied().collect();
    let self0 = procfs::self_ticks();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..devices)
        .map(|i| tokio::spawn(Device::new(shared.clone(), i).run(phase_rx.clone(), ready_tx.clone())))
        .collect();
    drop(ready_tx);
    let mut established = 0;
    for _ in 0..devices {
        match ready_rx.recv().await {
            Some(true) => established += 1,
            Some(false) => {}
            None => break,
        }
    }
    ensure!(established > 0, "no device connected");

    let mut csv = match &a.samples {
        Some(path) => {
            let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", csv_header(c.pid.len(), pids.len()))?;
            Some(f)
        }
        None => None,
    };
    let start_us = now_us();
    let end_us = start_us + secs_us(a.duration);
    phase_tx.send(Phase::Run)?;
    let mut samples = Vec::new();
    let every = secs_us(a.sample_every.max(0.1));
    let mut next_sample = start_us;
    while now_us() < end_us {
        if now_us() >= next_sample {
            let s = take_sample(&pids, &shared, start_us);
            if let Some(f) = csv.as_mut() {
                writeln!(f, "{}", csv_row(&s))?;
                f.flush()?;
            }
            if !a.common.json && a.progress {
                eprintln!(
                    "soak: {:.0} s, received {}, outstanding {}, rss {:?}",
                    s.at_s, s.received, s.outstanding, s.rss_kib
                );
            }
            samples.push(s);
            next_sample += every;
        }
        let wake = next_sample.min(end_us);
        tokio::time::sleep(crate::clock::until_us(wake)).await;
    }
    phase_tx.send(Phase::Drain)?;
    let drain_end = now_us() + secs_us(a.drain);
    while now_us() < drain_end {
        if shared.outstanding.load(Ordering::Relaxed) <= 0
            && shared.received.load(Ordering::Relaxed) >= shared.expected()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = take_sample(&pids, &shared, start_us);
    if let Some(f) = csv.as_mut() {
        writeln!(f, "{}", csv_row(&last))?;
    }
    samples.push(last);
    phase_tx.send(Phase::Over)?;
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        logs.push(t.await?);
    }
    Ok(report(a, &shared, &logs, &samples, &pids, established, start_us, procfs::self_ticks() - self0))
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &SoakArgs,
    shared: &Shared,
    logs: &[DeviceLog],
    samples: &[SoakSample],
    pids: &[u32],
    established: usize,
    start_us: u64,
    self_ticks: u64,
) -> SoakReport {
    let c = &a.common;
    let direct_accepted = shared.direct_accepted.lock().unwrap();
    let room_accepted = shared.room_accepted.lock().unwrap();
    let mut check = Check::default();
    let mut r = SoakReport {
        scenario: "soak",
        targets: c.target.clone(),
        params: json!({
            "users": a.users, "devices": a.devices, "rooms": a.rooms, "lounges": a.lounges,
            "rate": a.rate, "direct_share": a.direct_share, "reconnect_every_s": a.reconnect_every,
            "lounge_every_s": a.lounge_every, "duration_s": a.duration, "seed": a.seed, "id_prefix": shared.prefix,
        }),
        devices: logs.len(),
        established,
        duration_s: now_us().saturating_sub(start_us) as f64 / 1e6,
        sent: SoakSent {
            direct_accepted: direct_accepted.iter().map(Ranges::len).sum(),
            publish_accepted: room_accepted.iter().map(Ranges::len).sum(),
            retried: 0,
            unanswered_at_end: shared.outstanding.load(Ordering::Relaxed),
        },
        delivery: Check::default(),
        truncated: 0,
        after_leave: 0,
        stray: 0,
        lounge_deliveries: 0,
        reconnects_clean: 0,
        reconnects_abrupt: 0,
        dropped: BTreeMap::new(),
        reconnect_failures: BTreeMap::new(),
        refused: BTreeMap::new(),
        joins: 0,
        leaves: 0,
        processes: Vec::new(),
        samples: samples.len(),
        loadgen_cpu_s: ticks_to_secs(self_ticks),
    };
    for (i, log) in logs.iter().enumerate() {
        let (user, home) = shared.user_and_home(i);
        let tallies = if log.established { (Some(&log.direct), Some(&log.home)) } else { (None, None) };
        check.add(&Check::expected_flow(tallies.0, &direct_accepted[user]));
        check.add(&Check::expected_flow(tallies.1, &room_accepted[home]));
        check.unexpected += log.stray;
        r.truncated += log.truncated;
        r.after_leave += log.after_leave;
        r.stray += log.stray;
        r.lounge_deliveries += log.lounge_deliveries;
        r.reconnects_clean += log.reconnects_clean;
        r.reconnects_abrupt += log.reconnects_abrupt;
        r.sent.retried += log.retried;
        r.joins += log.joins;
        r.leaves += log.leaves;
        merge_counts(&mut r.dropped, &log.dropped);
        merge_counts(&mut r.reconnect_failures, &log.reconnect_failures);
        merge_counts(&mut r.refused, &log.refused);
    }
    r.delivery = check;
    let settle_s = a.settle.min(a.duration / 2.0);
    for (k, &pid) in pids.iter().enumerate() {
        let role = if k < c.pid.len() { "node" } else { "other" };
        let rss: Vec<(f64, u64)> = samples.iter().filter_map(|s| Some((s.at_s, s.rss_kib[k]?))).collect();
        let fds: Vec<(f64, u64)> = samples.iter().filter_map(|s| Some((s.at_s, s.fds[k]?))).collect();
        let settled = |v: &[(f64, u64)]| v.iter().find(|(t, _)| *t >= settle_s).map(|p| p.1);
        let half = samples.last().map_or(0.0, |s| s.at_s / 2.0);
        let late: Vec<(f64, f64)> = rss.iter().filter(|(t, _)| *t >= half).map(|&(t, v)| (t, v as f64)).collect();
        let cpu = samples.first().and_then(|s| s.cpu_s[k]).zip(samples.last().and_then(|s| s.cpu_s[k]));
        r.processes.push(ProcessTrend {
            pid,
            role,
            rss_kib_first: settled(&rss),
            rss_kib_max: rss.iter().map(|p| p.1).max(),
            rss_kib_last: rss.last().map(|p| p.1),
            rss_kib_per_hour_late: slope(&late).map(|per_s| per_s * 3600.0),
            fds_first: settled(&fds),
            fds_max: fds.iter().map(|p| p.1).max(),
            fds_last: fds.last().map(|p| p.1),
            cpu_s: cpu.map(|(first, last)| last - first),
            alive_at_end: std::path::Path::new(&format!("/proc/{pid}")).exists(),
        });
    }
    r
}

fn take_sample(pids: &[u32], shared: &Shared, start_us: u64) -> SoakSample {
    let mut s = SoakSample {
        at_s: now_us().saturating_sub(start_us) as f64 / 1e6,
        rss_kib: Vec::with_capacity(pids.len()),
        fds: Vec::with_capacity(pids.len()),
        cpu_s: Vec::with_capacity(pids.len()),
        received: shared.received.load(Ordering::Relaxed),
        outstanding: shared.outstanding.load(Ordering::Relaxed),
    };
    for &pid in pids {
        let p = procfs::sample(pid);
        s.rss_kib.push(p.rss_kib);
        s.fds.push(procfs::open_fds(pid));
        s.cpu_s.push(p.cpu_ticks.map(ticks_to_secs));
    }
    s
}

/// Columns: time, run counters, then RSS, fds and CPU of each process (`node1…` for --pid,
/// `other1…` for --also-pid).
fn csv_header(nodes: usize, processes: usize) -> String {
    let mut h = String::from("at_s,received,outstanding");
    for k in 0..processes {
        let name = if k < nodes { format!("node{}", k + 1) } else { format!("other{}", k - nodes + 1) };
        h.push_str(&format!(",{name}_rss_kib,{name}_fds,{name}_cpu_s"));
    }
    h
}

fn csv_row(s: &SoakSample) -> String {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut row = format!("{:.1},{},{}", s.at_s, s.received, s.outstanding);
    for k in 0..s.rss_kib.len() {
        let cpu = s.cpu_s[k].map(|v| format!("{v:.2}")).unwrap_or_default();
        row.push_str(&format!(",{},{},{cpu}", opt(s.rss_kib[k]), opt(s.fds[k])));
    }
    row
}

/// Least-squares slope of y over x (per unit of x); `None` with fewer than 3 points.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

pub fn human(r: &SoakReport) -> String {
    let mut out = String::new();
    let d = &r.delivery;
    out.push_str(&format!(
        "soak: {} devices ({} connected) on {} nodes for {:.0} s\n",
        r.devices,
        r.established,
        r.targets.len(),
        r.duration_s
    ));
    out.push_str(&format!(
        "accepted: {} direct, {} publishes; {} retried after a reconnect; {} unanswered at the end\n",
        r.sent.direct_accepted, r.sent.publish_accepted, r.sent.retried, r.sent.unanswered_at_end
    ));
    out.push_str(&format!(
        "delivery: expected {}, received {}, lost {}, duplicates {}, reordered {}, unexpected {}\n",
        d.expected, d.received, d.lost, d.duplicates, d.reordered, d.unexpected
    ));
    out.push_str(&format!(
        "truncated catch-ups {}, lounge deliveries {} ({} after leave), stray {}\n",
        r.truncated, r.lounge_deliveries, r.after_leave, r.stray
    ));
    out.push_str(&format!(
        "reconnects: {} clean, {} abrupt; dropped by server/network {:?}; reconnect failures {:?}\n",
        r.reconnects_clean, r.reconnects_abrupt, r.dropped, r.reconnect_failures
    ));
    out.push_str(&format!("joins {}, leaves {}; refused {:?}\n", r.joins, r.leaves, r.refused));
    let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
    let num = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for p in &r.processes {
        out.push_str(&format!(
            "{} {}: rss {} → max {} → last {} (late slope {}); fds {} → max {} → last {}; cpu {}; {}\n",
            p.role,
            p.pid,
            kib(p.rss_kib_first),
            kib(p.rss_kib_max),
            kib(p.rss_kib_last),
            p.rss_kib_per_hour_late.map_or("-".to_string(), |s| format!("{:+.0} KiB/h", s)),
            num(p.fds_first),
            num(p.fds_max),
            num(p.fds_last),
            p.cpu_s.map_or("-".to_string(), |s| format!("{s:.1} s")),
            if p.alive_at_end { "alive" } else { "GONE" },
        ));
    }
    out.push_str(&format!("{} samples; load generator cpu {:.1} s\n", r.samples, r.loadgen_cpu_s));
    out
}

/// Whether the run passed: nothing lost or duplicated, nothing unexpected, every process alive.
pub fn failures(r: &SoakReport) -> Vec<String> {
    let mut f = Vec::new();
    if r.established < r.devices {
        f.push(format!("{} of {} devices never connected", r.devices - r.established, r.devices));
    }
    if r.delivery.lost > 0 {
        f.push(format!("{} messages lost", r.delivery.lost));
    }
    if r.delivery.duplicates > 0 {
        f.push(format!("{} duplicates", r.delivery.duplicates));
    }
    if r.delivery.unexpected > 0 {
        f.push(format!("{} unexpected messages", r.delivery.unexpected));
    }
    if r.sent.unanswered_at_end > 0 {
        f.push(format!("{} commands never answered", r.sent.unanswered_at_end));
    }
    for p in r.processes.iter().filter(|p| !p.alive_at_end) {
        f.push(format!("process {} is gone", p.pid));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0)];
        assert!(slope(&flat).unwrap().abs() < 0.5);
        assert_eq!(slope(&flat[..2]), None);
    }

    #[test]
    fn members_counts_the_users_whose_home_a_room_is() {
        for (users, rooms) in [(500, 25), (7, 3), (2, 5)] {
            for r in 0..rooms {
                assert_eq!(members(users, rooms, r), (0..users).filter(|u| u % rooms == r).count(), "{users}, {r}");
            }
        }
    }

    #[test]
    fn csv_rows_match_the_header() {
        let s = SoakSample {
            at_s: 1.0,
            rss_kib: vec![Some(10), None],
            fds: vec![Some(3), None],
            cpu_s: vec![Some(0.5), None],
            received: 4,
            outstanding: 0,
        };
        let header = csv_header(1, 2);
        assert_eq!(header.split(',').count(), csv_row(&s).split(',').count());
        assert!(header.contains("node1_rss_kib") && header.contains("other1_fds"));
    }
}
