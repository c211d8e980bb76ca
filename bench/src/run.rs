//! The coordinator: starts the workers, walks them through the phases together, samples the
//! server processes between phases, and adds up what the workers report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::clock::now_us;
use crate::latency::Latency;
use crate::ledger::Check;
use crate::plan::{FlowSent, FromWorker, ToWorker, merge_counts};
use crate::procfs::{self, Sample};
use crate::scenarios::Plan;
use crate::worker::Handle;

/// Readings of one server process along the run.
#[derive(Clone, Debug)]
pub struct ServerSamples {
    pub pid: u32,
    pub before: Sample,
    /// Every client set up.
    pub after_setup: Sample,
    /// After the settle time, just before publishing starts.
    pub at_go: Sample,
    /// Publishing and draining done, connections closed.
    pub after_run: Sample,
    pub after_close: Option<Sample>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub attempted: u64,
    pub established: u64,
    pub established_per_target: Vec<u64>,
    pub failures: BTreeMap<String, u64>,
    pub handshake: Latency,
    /// The slowest worker's set-up time.
    pub setup_s: f64,
    pub flows: Vec<FlowSent>,
    pub sent_in_window: u64,
    pub unanswered: u64,
    pub publish_errors: BTreeMap<String, u64>,
    pub window_stalls: u64,
    pub max_lag_us: u64,
    pub api_latency: Latency,
    pub check: Check,
    pub delivered_in_window: u64,
    pub latency: Latency,
    pub closes: BTreeMap<String, u64>,
    pub server_errors: BTreeMap<String, u64>,
    pub foreign: u64,
    pub self_echo: u64,
    pub servers: Vec<ServerSamples>,
    pub loadgen_setup_s: f64,
    pub loadgen_run_s: f64,
    /// Wall time from Go to every worker having reported what it published.
    pub run_wall_s: f64,
    pub workers: usize,
}

pub async fn execute(plan: &Plan, pids: &[u32]) -> anyhow::Result<Outcome> {
    let sample_all = || pids.iter().map(|&p| procfs::sample(p)).collect::<Vec<_>>();
    let before = sample_all();
    let self0 = procfs::self_ticks();

    let mut handles = Vec::with_capacity(plan.specs.len());
    for spec in &plan.specs {
        handles.push(if plan.in_process { Handle::in_process(spec.clone()) } else { Handle::child(spec).await? });
    }
    let mut out = Outcome { workers: handles.len(), ..Outcome::default() };

    // Setup.
    let per_worker = plan.specs.iter().map(|s| s.clients.len()).max().unwrap_or(0);
    let c = &plan.specs[0].connect;
    let mut setup_limit = 30.0 + (c.timeout_ms as f64 / 1000.0) * 2.0 * (per_worker.div_ceil(c.concurrency) as f64);
    if c.rate > 0.0 {
        setup_limit += per_worker as f64 / c.rate;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(setup_limit);
    let mut ready_ticks = vec![0u64; handles.len()];
    out.established_per_target = vec![0; plan.specs[0].targets.len()];
    for (i, h) in handles.iter_mut().enumerate() {
        let FromWorker::Ready(r) = recv_by(h, deadline, "set-up").await? else { bail!("expected Ready") };
        out.attempted += r.attempted;
        out.established += r.established;
        for (t, n) in r.established_per_target.iter().enumerate() {
            out.established_per_target[t] += n;
        }
        merge_counts(&mut out.failures, &r.failures);
        out.handshake.merge(&Latency::from_buckets(&r.handshake));
        out.setup_s = out.setup_s.max(r.setup_us as f64 / 1e6);
        ready_ticks[i] = r.cpu_ticks;
    }
    let after_setup = sample_all();
    let self1 = procfs::self_ticks();
    tokio::time::sleep(plan.settle).await;
    let at_go = sample_all();

    // Run.
    let self2 = procfs::self_ticks();
    let go_at = Instant::now();
    let start_us = now_us() + 500_000;
    for h in &mut handles {
        h.send(&ToWorker::Go { start_us }).await?;
    }
    let t = plan.timing;
    let deadline = Instant::now()
        + Duration::from_micros(500_000 + t.warmup_us + t.duration_us + t.drain_max_us)
        + Duration::from_secs(60);
    let mut published_ticks = vec![0u64; handles.len()];
    let mut flows: Vec<FlowSent> =
        (0..plan.specs[0].flows.len()).map(|f| FlowSent { flow: f as u32, ..FlowSent::default() }).collect();
    for (i, h) in handles.iter_mut().enumerate() {
        let FromWorker::Published(p) = recv_by(h, deadline, "run").await? else { bail!("expected Published") };
        for f in p.flows {
            let slot = flows.get_mut(f.flow as usize).context("a worker reported an unknown flow")?;
            *slot = f;
        }
        out.sent_in_window += p.sent_in_window;
        out.unanswered += p.unanswered;
        merge_counts(&mut out.publish_errors, &p.errors);
        out.window_stalls += p.window_stalls;
        out.max_lag_us = out.max_lag_us.max(p.max_lag_us);
        out.api_latency.merge(&Latency::from_buckets(&p.api_latency));
        published_ticks[i] = p.cpu_ticks;
    }
    out.run_wall_s = go_at.elapsed().as_secs_f64();
    let self3 = procfs::self_ticks();
    let after_run = sample_all();

    // Tally.
    let deadline = Instant::now() + Duration::from_secs(60);
    for h in &mut handles {
        h.send(&ToWorker::Tally { flows: flows.clone() }).await?;
    }
    for h in &mut handles {
        let FromWorker::Result(r) = recv_by(h, deadline, "tally").await? else { bail!("expected Result") };
        out.check.add(&r.check);
        out.delivered_in_window += r.delivered_in_window;
        out.latency.merge(&Latency::from_buckets(&r.latency));
        merge_counts(&mut out.closes, &r.closes);
        merge_counts(&mut out.server_errors, &r.server_errors);
        out.foreign += r.foreign;
        out.self_echo += r.self_echo;
    }
    out.flows = flows;

    let children = !plan.in_process;
    let mut setup_ticks = self1 - self0;
    let mut run_ticks = self3 - self2;
    if children {
        setup_ticks += ready_ticks.iter().sum::<u64>();
        run_ticks += published_ticks.iter().zip(&ready_ticks).map(|(p, r)| p.saturating_sub(*r)).sum::<u64>();
    }
    out.loadgen_setup_s = procfs::ticks_to_secs(setup_ticks);
    out.loadgen_run_s = procfs::ticks_to_secs(run_ticks);
    for h in handles {
        h.finish().await;
    }

    let after_close = match plan.after_close {
        Some(wait) => {
            tokio::time::sleep(wait).await;
            Some(sample_all())
        }
        None => None,
    };
    out.servers = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| ServerSamples {
            pid,
            before: before[i],
            after_setup: after_setup[i],
            at_go: at_go[i],
            after_run: after_run[i],
            after_close: after_close.as_ref().map(|s| s[i]),
        })
        .collect();
    Ok(out)
}

async fn recv_by(h: &mut Handle, deadline: Instant, phase: &str) -> anyhow::Result<FromWorker> {
    match tokio::time::timeout_at(deadline.into(), h.recv()).await {
        Ok(r) => r,
        Err(_) => bail!("a worker did not finish its {phase} phase in time"),
    }
}
