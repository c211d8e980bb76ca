//! A worker: holds a share of the client connections and runs the flows whose publisher it
//! holds, in phases driven by the coordinator.
//!
//! 1. Setup: every client connects (paced, bounded concurrency), handshakes and joins its
//!    room; then `Ready`.
//! 2. `Go { start_us }`: publishers publish from `start_us` for `warmup + duration`; the last
//!    `duration` is the measured window.
//! 3. Drain: publishing has stopped; wait until nothing arrived for `quiet` (or `drain_max`),
//!    then close every connection and report what was sent (`Published`).
//! 4. `Tally`: with every flow's sent/refused numbers, count each client's losses; `Result`.
//!
//! The worker runs in the coordinator's process or in a child process (`worker` subcommand);
//! the messages are the same either way.

mod client;
mod handle;
mod http_flow;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

pub use handle::{Handle, child_main};

use crate::clock::{now_us, until_us};
use crate::http::HttpBase;
use crate::latency::Latency;
use crate::ledger::{Check, Ranges};
use crate::plan::{
    Audience, FlowSent, FromWorker, PublishReport, SetupReport, ToWorker, Via, WorkerResult, WorkerSpec, bump,
    merge_counts,
};
use crate::procfs;

/// The id of the join command (publish ids are message numbers, far below it).
const JOIN_ID: u64 = 1 << 62;
/// The id of the `sync` command of idle `--sync`.
const SYNC_ID: u64 = JOIN_ID + 1;

/// The measured run, in µs since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// Publishing starts.
    pub start_us: u64,
    /// The warm-up ends and measuring starts.
    pub measure_from_us: u64,
    /// Publishing and measuring end.
    pub end_us: u64,
}

impl Window {
    pub fn measures(&self, at_us: u64) -> bool {
        at_us >= self.measure_from_us && at_us < self.end_us
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Setup,
    Run(Window),
    Drain,
    Close,
}

/// New messages of a flat-out flow seen by its sentinel.
#[derive(Default)]
pub(crate) struct Progress {
    pub received: AtomicU64,
    pub notify: Notify,
}

pub(crate) struct Shared {
    pub spec: WorkerSpec,
    pub addrs: Vec<SocketAddr>,
    pub http: Vec<HttpBase>,
    pub phase: watch::Receiver<Phase>,
    pub latency: Mutex<Latency>,
    pub api_latency: Mutex<Latency>,
    /// When the last frame or HTTP answer arrived (µs since the epoch).
    pub last_rx_us: AtomicU64,
    /// By flow id: the progress of flat-out WebSocket flows run here.
    pub progress: Vec<Option<Arc<Progress>>>,
    gate: Semaphore,
    next_connect_us: Mutex<u64>,
    pub pad: String,
}

impl Shared {
    /// Waits for this client's turn to connect (the `connect.rate` pacing).
    async fn pace(&self) {
        let rate = self.spec.connect.rate;
        if rate <= 0.0 {
            return;
        }
        let slot = {
            let mut next = self.next_connect_us.lock().unwrap();
            let slot = (*next).max(now_us());
            *next = slot + (1e6 / rate) as u64;
            slot
        };
        tokio::time::sleep(until_us(slot)).await;
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.spec.connect.timeout_ms)
    }

    pub fn saw_traffic(&self, at_us: u64) {
        self.last_rx_us.fetch_max(at_us, Ordering::Relaxed);
    }
}

/// A client's setup result: its target and the handshake time or why it failed.
pub(crate) struct SetupMsg {
    pub target: usize,
    pub result: Result<u64, String>,
}

/// Runs a worker to the end; failures are reported as `Failed`.
pub async fn run(spec: WorkerSpec, rx: mpsc::UnboundedReceiver<ToWorker>, tx: mpsc::UnboundedSender<FromWorker>) {
    if let Err(e) = run_phases(spec, rx, &tx).await {
        let _ = tx.send(FromWorker::Failed(format!("{e:#}")));
    }
}

async fn run_phases(
    spec: WorkerSpec,
    mut rx: mpsc::UnboundedReceiver<ToWorker>,
    tx: &mpsc::UnboundedSender<FromWorker>,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let addrs = spec.targets.iter().map(|t| crate::net::resolve(t)).collect::<Result<Vec<_>, _>>()?;
    let http = spec.api.iter().map(|a| HttpBase::parse(a)).collect::<Result<Vec<_>, _>>()?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let progress = spec
        .flows
        .iter()
        .map(|f| {
            (f.runner == spec.index && f.rate <= 0.0 && matches!(f.via, Via::Ws)).then(|| Arc::new(Progress::default()))
        })
        .collect();
    let shared = Arc::new(Shared {
        addrs,
        http,
        phase: phase_rx,
        latency: Mutex::new(Latency::new()),
        api_latency: Mutex::new(Latency::new()),
        last_rx_us: AtomicU64::new(0),
        progress,
        gate: Semaphore::new(spec.connect.concurrency.max(1)),
        next_connect_us: Mutex::new(0),
        pad: "x".repeat(spec.pad),
        spec,
    });
    let spec = &shared.spec;

    let (setup_tx, mut setup_rx) = mpsc::unbounded_channel();
    let clients: Vec<_> =
        (0..spec.clients.len()).map(|i| tokio::spawn(client::run(i, shared.clone(), setup_tx.clone()))).collect();
    drop(setup_tx);
    let http_flows: Vec<_> = spec
        .flows
        .iter()
        .enumerate()
        .filter(|(_, f)| f.runner == spec.index && matches!(f.via, Via::Http { .. }))
        .map(|(i, _)| tokio::spawn(http_flow::run(i as u32, shared.clone())))
        .collect();

    let mut setup = SetupReport { established_per_target: vec![0; spec.targets.len()], ..SetupReport::default() };
    let mut handshake = Latency::new();
    for _ in 0..spec.clients.len() {
        let Some(msg) = setup_rx.recv().await else {
            break;
        };
        setup.attempted += 1;
        match msg.result {
            Ok(us) => {
                setup.established += 1;
                setup.established_per_target[msg.target] += 1;
                handshake.record(us);
            }
            Err(reason) => bump(&mut setup.failures, reason),
        }
    }
    setup.handshake = handshake.to_buckets();
    setup.setup_us = began.elapsed().as_micros() as u64;
    setup.cpu_ticks = procfs::self_ticks();
    tx.send(FromWorker::Ready(setup))?;

    let Some(ToWorker::Go { start_us }) = rx.recv().await else {
        bail!("expected Go from the coordinator");
    };
    let t = spec.timing;
    let window =
        Window { start_us, measure_from_us: start_us + t.warmup_us, end_us: start_us + t.warmup_us + t.duration_us };
    phase_tx.send(Phase::Run(window))?;
    tokio::time::sleep(until_us(window.end_us)).await;
    phase_tx.send(Phase::Drain)?;
    let drain_deadline = window.end_us + t.drain_max_us;
    loop {
        let now = now_us();
        let last = shared.last_rx_us.load(Ordering::Relaxed).max(window.end_us);
        if now >= drain_deadline || now.saturating_sub(last) >= t.quiet_us {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    phase_tx.send(Phase::Close)?;

    let mut outcomes = Vec::with_capacity(clients.len());
    for c in clients {
        outcomes.push(c.await.context("client task")?);
    }
    let mut publishers = Vec::new();
    for o in &mut outcomes {
        publishers.extend(o.publisher.take());
    }
    for h in http_flows {
        publishers.push(h.await.context("http flow task")?);
    }
    let mut published = PublishReport::default();
    for p in &publishers {
        published.flows.push(FlowSent { flow: p.flow, sent: p.sent, rejected: p.rejected.clone() });
        published.sent_in_window += p.sent_in_window;
        published.unanswered += p.unanswered();
        merge_counts(&mut published.errors, &p.errors);
        published.window_stalls += p.stalls;
        published.max_lag_us = published.max_lag_us.max(p.max_lag_us);
    }
    published.api_latency = shared.api_latency.lock().unwrap().to_buckets();
    published.cpu_ticks = procfs::self_ticks();
    tx.send(FromWorker::Published(published))?;

    let Some(ToWorker::Tally { flows }) = rx.recv().await else {
        bail!("expected Tally from the coordinator");
    };
    let mut result = account(spec, &outcomes, &flows);
    result.latency = shared.latency.lock().unwrap().to_buckets();
    result.cpu_ticks = procfs::self_ticks();
    tx.send(FromWorker::Result(result))?;
    Ok(())
}

/// Counts every client's deliveries against what the flows addressed to it had accepted.
fn account(spec: &WorkerSpec, outcomes: &[client::ClientOutcome], sent: &[FlowSent]) -> WorkerResult {
    let mut accepted = vec![Ranges::new(); spec.flows.len()];
    for f in sent {
        if let Some(slot) = accepted.get_mut(f.flow as usize) {
            *slot = f.rejected.complement_below(f.sent);
        }
    }
    let mut room_flows: Vec<Vec<u32>> = vec![Vec::new(); spec.rooms.len()];
    let mut user_flows: HashMap<&str, Vec<u32>> = HashMap::new();
    for (i, f) in spec.flows.iter().enumerate() {
        match &f.audience {
            Audience::Room(r) => room_flows[*r as usize].push(i as u32),
            Audience::User(u) => user_flows.entry(u.as_str()).or_default().push(i as u32),
        }
    }
    let mut result = WorkerResult::default();
    for (c, o) in spec.clients.iter().zip(outcomes) {
        if let Some(end) = &o.end {
            bump(&mut result.closes, end.clone());
        }
        merge_counts(&mut result.server_errors, &o.server_errors);
        result.delivered_in_window += o.delivered_in_window;
        result.foreign += o.foreign;
        result.self_echo += o.self_echo;
        if !o.established {
            continue;
        }
        let mut expected: Vec<u32> = Vec::new();
        if let Some(r) = c.room {
            expected.extend(room_flows[r as usize].iter().filter(|&&f| Some(f) != c.publishes));
        }
        if let Some(fs) = user_flows.get(c.user.as_str()) {
            expected.extend(fs.iter().filter(|&&f| Some(f) != c.publishes));
        }
        for &f in &expected {
            result.check.add(&Check::expected_flow(o.tally(f), &accepted[f as usize]));
        }
        for (f, t) in &o.flows {
            if !expected.contains(f) {
                result.check.add(&Check::stray_flow(t));
            }
        }
    }
    result
}
