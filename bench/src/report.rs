//! The figures of a run, as one JSON object (`--json`) or as human-readable lines. Every field
//! is defined where it is declared; bench/README.md repeats the definitions.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::latency::Summary;
use crate::procfs::{Sample, ticks_to_secs};
use crate::run::{Outcome, ServerSamples};
use crate::scenarios::Plan;

#[derive(Serialize)]
pub struct Report {
    pub scenario: String,
    pub protocol: String,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub connections: Connections,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Send → first receipt, µs, of messages sent during the measured window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Summary>,
    /// HTTP request written → response read, µs (api scenario), every request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_latency_us: Option<Summary>,
    /// Connections that ended before the run did, by reason ("close 4003", "eof", …).
    pub unexpected_closes: BTreeMap<String, u64>,
    /// Error frames not answering a publish, by code.
    pub server_errors: BTreeMap<String, u64>,
    /// The --pid processes (the nodes), in --target order.
    pub servers: Vec<Server>,
    /// Sums over the --pid processes.
    pub servers_total: ServersTotal,
    /// The --also-pid processes (e.g. Redis).
    pub others: Vec<Server>,
    pub loadgen: Loadgen,
}

#[derive(Serialize)]
pub struct Connections {
    pub requested: usize,
    pub established: u64,
    pub established_per_target: Vec<u64>,
    /// Failed attempts by reason.
    pub failed: BTreeMap<String, u64>,
    /// From the first connect to the last client set up or failed (the slowest worker), seconds.
    pub setup_s: f64,
    /// `established / setup_s`.
    pub connects_per_s: f64,
    /// TCP connect → handshake (and join) done, per connection, µs.
    pub handshake_us: Summary,
    pub worker_processes: usize,
    pub source_ips: usize,
}

#[derive(Serialize)]
pub struct Publish {
    /// Publishes per second asked for (0: flat out).
    pub requested_rate: f64,
    pub sent: u64,
    /// Sent with a send time inside the measured window.
    pub sent_in_window: u64,
    /// `sent_in_window / duration`.
    pub per_s: f64,
    /// Refused by the server (an error answer or a non-2xx status): not expected anywhere.
    pub rejected: u64,
    /// No answer by the end (Switchyard and the API answer every publish).
    pub unanswered: u64,
    pub errors: BTreeMap<String, u64>,
    /// Flat out: times a publisher saw no delivery to its sentinel for 1 s and reset its window.
    pub window_stalls: u64,
    /// Rate mode: the largest delay of a send behind its schedule, ms (large: the generator or
    /// its connection could not keep the rate).
    pub max_schedule_lag_ms: f64,
}

#[derive(Serialize)]
pub struct Delivery {
    /// Σ over flows of accepted messages × receivers they were addressed to (set up clients).
    pub expected: u64,
    /// Distinct expected messages that arrived (first receipts).
    pub received: u64,
    /// `expected - received`: never arrived by the end of the drain.
    pub lost: u64,
    pub lost_pct: f64,
    /// Extra receipts of a message the receiver already had.
    pub duplicates: u64,
    /// New messages that arrived after a later one of the same flow.
    pub reordered: u64,
    /// Distinct messages that arrived where they were not expected (refused, or not addressed
    /// to that receiver).
    pub unexpected: u64,
    /// Message events without a probe body (another client's traffic).
    pub foreign: u64,
    /// A publisher's own message delivered back to it.
    pub self_echo: u64,
    /// First receipts whose receive time is inside the measured window.
    pub in_window: u64,
    /// `in_window / duration`.
    pub per_s: f64,
}

#[derive(Serialize)]
pub struct Server {
    pub pid: u32,
    /// Index in --target this pid stands for (when one pid per target was given).
    pub target: Option<usize>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_setup_kib: Option<u64>,
    /// After the settle time, before publishing (idle: the holding figure).
    pub rss_held_kib: Option<u64>,
    pub rss_after_run_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_close_kib: Option<u64>,
    /// `(rss_held - rss_before) / connections established on its target`, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// CPU seconds (user + system, any core) while clients connected.
    pub cpu_setup_s: Option<f64>,
    /// CPU seconds from Go to the end of the drain.
    pub cpu_run_s: Option<f64>,
}

#[derive(Serialize)]
pub struct ServersTotal {
    pub rss_delta_kib: Option<i64>,
    /// `Σ (rss_held - rss_before) / Σ established`, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    pub cpu_setup_s: Option<f64>,
    pub cpu_run_s: Option<f64>,
}

#[derive(Serialize)]
pub struct Loadgen {
    pub cpu_setup_s: f64,
    pub cpu_run_s: f64,
    /// Go → every worker done draining, seconds.
    pub run_wall_s: f64,
}

fn diff(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

fn cpu(a: &Sample, b: &Sample) -> Option<f64> {
    diff(a.cpu_ticks, b.cpu_ticks).map(ticks_to_secs)
}

/// `nodes`: how many of the sampled processes are the --pid nodes (the rest are --also-pid).
pub fn build(plan: &Plan, o: &Outcome, nodes: usize) -> Report {
    let common_targets = plan.specs[0].targets.clone();
    let duration_s = plan.timing.duration_us as f64 / 1e6;
    let (node_samples, other_samples) = o.servers.split_at(nodes.min(o.servers.len()));
    let per_target = node_samples.len() == common_targets.len();
    let servers: Vec<Server> = node_samples
        .iter()
        .enumerate()
        .map(|(i, s)| server(s, per_target.then_some(i), per_target.then(|| o.established_per_target[i])))
        .collect();
    let others: Vec<Server> = other_samples.iter().map(|s| server(s, None, None)).collect();
    let sum =
        |f: &dyn Fn(&ServerSamples) -> Option<f64>| -> Option<f64> { node_samples.iter().map(f).sum::<Option<f64>>() };
    let rss_delta: Option<i64> = node_samples
        .iter()
        .map(|s| Some(s.at_go.rss_kib? as i64 - s.before.rss_kib? as i64))
        .sum::<Option<i64>>()
        .filter(|_| !node_samples.is_empty());
    let servers_total = ServersTotal {
        rss_delta_kib: rss_delta,
        rss_per_connection_bytes: rss_delta
            .filter(|_| o.established > 0)
            .map(|d| d as f64 * 1024.0 / o.established as f64),
        cpu_setup_s: sum(&|s| cpu(&s.before, &s.after_setup)).filter(|_| !node_samples.is_empty()),
        cpu_run_s: sum(&|s| cpu(&s.at_go, &s.after_run)).filter(|_| !node_samples.is_empty()),
    };
    let publishing = plan.rate.is_some();
    let sent: u64 = o.flows.iter().map(|f| f.sent).sum();
    let rejected: u64 = o.flows.iter().map(|f| f.rejected.len()).sum();
    Report {
        scenario: plan.scenario.into(),
        protocol: plan.specs[0].protocol.name().into(),
        targets: common_targets,
        params: plan.params.clone(),
        connections: Connections {
            requested: plan.connections,
            established: o.established,
            established_per_target: o.established_per_target.clone(),
            failed: o.failures.clone(),
            setup_s: o.setup_s,
            connects_per_s: if o.setup_s > 0.0 { o.established as f64 / o.setup_s } else { 0.0 },
            handshake_us: o.handshake.summary(),
            worker_processes: o.workers,
            source_ips: plan.source_ips,
        },
        publish: publishing.then(|| Publish {
            requested_rate: plan.rate.unwrap_or(0.0),
            sent,
            sent_in_window: o.sent_in_window,
            per_s: o.sent_in_window as f64 / duration_s,
            rejected,
            unanswered: o.unanswered,
            errors: o.publish_errors.clone(),
            window_stalls: o.window_stalls,
            max_schedule_lag_ms: o.max_lag_us as f64 / 1000.0,
        }),
        delivery: publishing.then(|| Delivery {
            expected: o.check.expected,
            received: o.check.received,
            lost: o.check.lost,
            lost_pct: if o.check.expected > 0 { 100.0 * o.check.lost as f64 / o.check.expected as f64 } else { 0.0 },
            duplicates: o.check.duplicates,
            reordered: o.check.reordered,
            unexpected: o.check.unexpected,
            foreign: o.foreign,
            self_echo: o.self_echo,
            in_window: o.delivered_in_window,
            per_s: o.delivered_in_window as f64 / duration_s,
        }),
        latency_us: publishing.then(|| o.latency.summary()),
        api_latency_us: (o.api_latency.count() > 0).then(|| o.api_latency.summary()),
        unexpected_closes: o.closes.clone(),
        server_errors: o.server_errors.clone(),
        servers,
        servers_total,
        others,
        loadgen: Loadgen { cpu_setup_s: o.loadgen_setup_s, cpu_run_s: o.loadgen_run_s, run_wall_s: o.run_wall_s },
    }
}

fn server(s: &ServerSamples, target: Option<usize>, established: Option<u64>) -> Server {
    let delta = s.at_go.rss_kib.zip(s.before.rss_kib).map(|(a, b)| a as f64 - b as f64);
    Server {
        pid: s.pid,
        target,
        rss_before_kib: s.before.rss_kib,
        rss_after_setup_kib: s.after_setup.rss_kib,
        rss_held_kib: s.at_go.rss_kib,
        rss_after_run_kib: s.after_run.rss_kib,
        rss_after_close_kib: s.after_close.and_then(|c| c.rss_kib),
        rss_per_connection_bytes: delta.zip(established.filter(|&n| n > 0)).map(|(d, n)| d * 1024.0 / n as f64),
        cpu_setup_s: cpu(&s.before, &s.after_setup),
        cpu_run_s: cpu(&s.at_go, &s.after_run),
    }
}

pub(crate) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("n/a".into(), |v| v.to_string())
}

fn secs(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2}"))
}

pub(crate) fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

pub fn human(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.connections;
    let _ = writeln!(
        s,
        "scenario {} · protocol {} · {} target(s) · params {}",
        r.scenario,
        r.protocol,
        r.targets.len(),
        r.params
    );
    let _ = writeln!(
        s,
        "connections: {} requested, {} established {:?}, failed: {}; {} worker process(es), {} source IPs",
        c.requested,
        c.established,
        c.established_per_target,
        counts(&c.failed),
        c.worker_processes,
        c.source_ips
    );
    let _ = writeln!(
        s,
        "set-up: {:.2} s, {:.0} connects/s; handshake {}",
        c.setup_s,
        c.connects_per_s,
        c.handshake_us.human()
    );
    if let Some(p) = &r.publish {
        let asked = if p.requested_rate > 0.0 { format!("{:.0}/s asked", p.requested_rate) } else { "flat out".into() };
        let _ = writeln!(
            s,
            "publishes: {:.1}/s in window ({asked}); {} sent, {} in window, {} rejected, {} unanswered; errors: {}; window stalls {}; max schedule lag {:.1} ms",
            p.per_s,
            p.sent,
            p.sent_in_window,
            p.rejected,
            p.unanswered,
            counts(&p.errors),
            p.window_stalls,
            p.max_schedule_lag_ms
        );
    }
    if let Some(d) = &r.delivery {
        let _ = writeln!(s, "deliveries: {:.1}/s in window ({} in window)", d.per_s, d.in_window);
        let _ = writeln!(
            s,
            "accounting: expected {}, received {}, lost {} ({:.4} %), duplicates {}, reordered {}, unexpected {}, foreign {}, self-echo {}",
            d.expected, d.received, d.lost, d.lost_pct, d.duplicates, d.reordered, d.unexpected, d.foreign, d.self_echo
        );
    }
    if let Some(l) = &r.latency_us {
        let _ = writeln!(s, "latency send→receive (window): {}", l.human());
    }
    if let Some(l) = &r.api_latency_us {
        let _ = writeln!(s, "API request→response: {}", l.human());
    }
    let _ =
        writeln!(s, "unexpected closes: {}; server errors: {}", counts(&r.unexpected_closes), counts(&r.server_errors));
    for (kind, v) in r.servers.iter().map(|v| ("server", v)).chain(r.others.iter().map(|v| ("other", v))) {
        let _ = writeln!(
            s,
            "{kind} pid {}{}: RSS KiB before {} set-up {} held {} after run {}{}; per connection {} B; CPU s set-up {} run {}",
            v.pid,
            v.target.map_or(String::new(), |t| format!(" (target {t})")),
            opt(v.rss_before_kib),
            opt(v.rss_after_setup_kib),
            opt(v.rss_held_kib),
            opt(v.rss_after_run_kib),
            v.rss_after_close_kib.map_or(String::new(), |k| format!(" after close {k}")),
            v.rss_per_connection_bytes.map_or("n/a".into(), |b| format!("{b:.0}")),
            secs(v.cpu_setup_s),
            secs(v.cpu_run_s),
        );
    }
    if !r.servers.is_empty() {
        let t = &r.servers_total;
        let _ = writeln!(
            s,
            "servers total: RSS delta {} KiB, {} B per connection; CPU s set-up {} run {}",
            opt(t.rss_delta_kib),
            t.rss_per_connection_bytes.map_or("n/a".into(), |b| format!("{b:.0}")),
            secs(t.cpu_setup_s),
            secs(t.cpu_run_s)
        );
    }
    let _ = writeln!(
        s,
        "load generator: CPU s set-up {:.2} run {:.2} (run wall {:.2} s)",
        r.loadgen.cpu_setup_s, r.loadgen.cpu_run_s, r.loadgen.run_wall_s
    );
    s
}
