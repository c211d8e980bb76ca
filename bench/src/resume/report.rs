//! The figures of a resume run, as JSON or human-readable lines.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::latency::Summary;
use crate::report::{counts, opt};

#[derive(Serialize)]
pub struct ResumeReport {
    pub scenario: &'static str,
    pub protocol: &'static str,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub clients: usize,
    pub established: u64,
    pub connect_failures: BTreeMap<String, u64>,
    /// The SIGKILL: seconds after publishing started, and whether it was sent.
    pub kill: Option<Kill>,
    pub publish: ResumePublish,
    pub delivery: ResumeDelivery,
    pub recovery: Recovery,
    /// Send → first receipt of every message, µs (catch-up deliveries included).
    pub latency_us: Summary,
    /// How the clients' connections ended, by reason (the kill shows as eof/reset).
    pub disconnects: BTreeMap<String, u64>,
    /// Reconnect attempts that failed, by reason.
    pub reconnect_failures: BTreeMap<String, u64>,
    pub servers: Vec<ResumeServer>,
    pub loadgen_cpu_s: f64,
}

#[derive(Serialize)]
pub struct Kill {
    pub pid: u32,
    pub at_s: f64,
    pub sent: bool,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct ResumePublish {
    pub sent: u64,
    pub rejected: u64,
    pub unanswered: u64,
    pub errors: BTreeMap<String, u64>,
    pub per_s: f64,
}

#[derive(Serialize)]
pub struct ResumeDelivery {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    /// `100 × received / expected`.
    pub delivered_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub unexpected: u64,
}

#[derive(Serialize)]
pub struct Recovery {
    /// Clients whose connection ended during the run.
    pub affected: u64,
    /// …and that got a new one.
    pub reconnected: u64,
    /// Kill → catch-up request answered on the new node, µs.
    pub reconnect_us: Summary,
    /// Affected clients that caught up (see the module doc).
    pub caught_up: u64,
    /// Kill → caught up, µs.
    pub catch_up_us: Summary,
    /// The slowest client's catch-up, seconds (`None` when one never caught up).
    pub all_caught_up_s: Option<f64>,
}

#[derive(Serialize)]
pub struct ResumeServer {
    pub pid: u32,
    pub rss_before_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// CPU seconds from before set-up to the end (`None` for the killed one).
    pub cpu_s: Option<f64>,
}

pub fn human(r: &ResumeReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "scenario resume · protocol {} · params {}", r.protocol, r.params);
    let _ = writeln!(
        s,
        "clients: {} requested, {} established; failures: {}",
        r.clients,
        r.established,
        counts(&r.connect_failures)
    );
    match &r.kill {
        Some(k) => {
            let _ = writeln!(
                s,
                "kill: pid {} at {:.2} s, sent {}{}",
                k.pid,
                k.at_s,
                k.sent,
                k.error.as_ref().map_or(String::new(), |e| format!(" ({e})"))
            );
        }
        None => {
            let _ = writeln!(s, "kill: none (no --kill-pid)");
        }
    }
    let p = &r.publish;
    let _ = writeln!(
        s,
        "publishes: {} sent ({:.1}/s), {} rejected, {} unanswered; errors: {}",
        p.sent,
        p.per_s,
        p.rejected,
        p.unanswered,
        counts(&p.errors)
    );
    let d = &r.delivery;
    let _ = writeln!(
        s,
        "delivery: expected {}, received {} ({:.3} %), lost {}, duplicates {}, reordered {}, unexpected {}",
        d.expected, d.received, d.delivered_pct, d.lost, d.duplicates, d.reordered, d.unexpected
    );
    let v = &r.recovery;
    let _ = writeln!(s, "recovery: {} affected, {} reconnected, {} caught up", v.affected, v.reconnected, v.caught_up);
    let _ = writeln!(s, "  kill → resumed: {}", v.reconnect_us.human());
    let _ = writeln!(s, "  kill → caught up: {}", v.catch_up_us.human());
    let within = match (v.affected, v.all_caught_up_s) {
        (0, _) => "n/a (no client lost its connection)".to_string(),
        (_, Some(x)) => format!("{x:.3} s"),
        (_, None) => "NOT ALL CAUGHT UP".to_string(),
    };
    let _ = writeln!(s, "  every client caught up within: {within}");
    let _ = writeln!(s, "latency send→first receipt (catch-up included): {}", r.latency_us.human());
    let _ =
        writeln!(s, "disconnects: {}; reconnect failures: {}", counts(&r.disconnects), counts(&r.reconnect_failures));
    for sv in &r.servers {
        let _ = writeln!(
            s,
            "process pid {}: RSS KiB before {} end {}; CPU s {}",
            sv.pid,
            opt(sv.rss_before_kib),
            opt(sv.rss_end_kib),
            sv.cpu_s.map_or("n/a (gone)".into(), |c| format!("{c:.2}"))
        );
    }
    let _ = writeln!(s, "load generator: CPU s {:.2}", r.loadgen_cpu_s);
    s
}
