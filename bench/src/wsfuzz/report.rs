//! Counting cases as they finish, saving anomalous ones (the bytes sent and a transcript), and
//! the final report in text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::exec::Record;
use super::health::Health;

/// Anomalous cases saved to disk at most (the count goes on).
const MAX_SAVED: usize = 200;
/// Anomalies listed in the report at most.
const MAX_LISTED: usize = 50;

#[derive(Clone, Debug, Serialize)]
pub struct Anomaly {
    pub case: String,
    pub kind: String,
    pub what: Vec<String>,
    pub note: String,
    /// The saved transcript (the bytes are next to it, `.bin`).
    pub saved: Option<String>,
}

#[derive(Debug, Default)]
pub struct Tally {
    pub executions: BTreeMap<String, u64>,
    pub outcomes: BTreeMap<String, u64>,
    pub anomalies: u64,
    pub anomaly_kinds: BTreeMap<String, u64>,
    pub listed: Vec<Anomaly>,
    saved: usize,
    /// The run's --connections, for the replay hint.
    pub connections: usize,
    /// The run's --stomp-share, for the replay hint.
    pub stomp_share: f64,
    /// Known server bugs the oracle tolerated, and in how many cases.
    pub known: BTreeMap<String, u64>,
}

impl Tally {
    pub fn new(connections: usize, stomp_share: f64) -> Self {
        Tally { connections, stomp_share, ..Tally::default() }
    }

    /// Counts a finished case; saves it under `dir` when the oracle found anything.
    pub fn add(&mut self, record: &Record, seed: u64, dir: &Path) {
        *self.executions.entry(record.kind.name().to_owned()).or_default() += 1;
        for o in &record.outcomes {
            *self.outcomes.entry(o.clone()).or_default() += 1;
        }
        for k in &record.known {
            let n = self.known.entry(k.clone()).or_default();
            if *n == 0 {
                eprintln!("{k} (first in case {}, seed {seed}; tolerated)", record.id);
            }
            *n += 1;
        }
        if record.anomalies.is_empty() {
            return;
        }
        self.anomalies += 1;
        for a in &record.anomalies {
            *self.anomaly_kinds.entry(shape(a)).or_default() += 1;
        }
        let saved = (self.saved < MAX_SAVED)
            .then(|| save(record, seed, self.connections, self.stomp_share, dir))
            .and_then(Result::ok);
        if saved.is_some() {
            self.saved += 1;
        }
        eprintln!(
            "anomaly in case {} ({}, seed {seed}): {}{}",
            record.id,
            record.kind.name(),
            record.anomalies.join("; "),
            saved.as_ref().map(|p| format!(" [saved {}]", p.display())).unwrap_or_default()
        );
        if self.listed.len() < MAX_LISTED {
            self.listed.push(Anomaly {
                case: record.id.clone(),
                kind: record.kind.name().to_owned(),
                what: record.anomalies.clone(),
                note: record.note.clone(),
                saved: saved.map(|p| p.display().to_string()),
            });
        }
    }
}

/// An anomaly with its numbers and quoted parts taken out, to count alike ones together.
fn shape(anomaly: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in anomaly.chars().take(120) {
        match c {
            '"' | '`' => {
                quoted = !quoted;
                if quoted {
                    out.push('…');
                }
            }
            _ if quoted => {}
            '0'..='9' => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn save(record: &Record, seed: u64, connections: usize, stomp_share: f64, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let base = format!("{}-{}", record.id, record.kind.name());
    std::fs::write(dir.join(format!("{base}.bin")), &record.input)?;
    let share = if stomp_share > 0.0 { format!(" --stomp-share {stomp_share}") } else { String::new() };
    let mut text = format!(
        "case {} ({}), run seed {seed}\nreplay: switchyard-bench wsfuzz --seed {seed} --connections {connections}{share} --replay {} --target …\nnote: {}\nanomalies:\n",
        record.id,
        record.kind.name(),
        record.id,
        record.note
    );
    for a in &record.anomalies {
        let _ = writeln!(text, "  - {a}");
    }
    let _ = writeln!(text, "outcomes: {:?}\n{}", record.outcomes, record.transcript);
    let path = dir.join(format!("{base}.txt"));
    std::fs::write(&path, text)?;
    Ok(path)
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub targets: Vec<String>,
    pub connections: usize,
    pub duration_s: f64,
    pub executions: u64,
    pub executions_by_kind: BTreeMap<String, u64>,
    pub outcomes: BTreeMap<String, u64>,
    /// Cases with at least one anomaly.
    pub anomalies: u64,
    pub anomaly_kinds: BTreeMap<String, u64>,
    pub anomaly_list: Vec<Anomaly>,
    /// Known server bugs tolerated (`KNOWN: …`) and in how many cases.
    pub known: BTreeMap<String, u64>,
    pub saved_to: String,
    pub health: Health,
}

impl Report {
    pub fn build(
        tally: Tally,
        health: Health,
        seed: u64,
        targets: Vec<String>,
        connections: usize,
        duration_s: f64,
        dir: &Path,
    ) -> Report {
        Report {
            seed,
            targets,
            connections,
            duration_s,
            executions: tally.executions.values().sum(),
            executions_by_kind: tally.executions,
            outcomes: tally.outcomes,
            anomalies: tally.anomalies,
            anomaly_kinds: tally.anomaly_kinds,
            anomaly_list: tally.listed,
            known: tally.known,
            saved_to: dir.display().to_string(),
            health,
        }
    }

    pub fn clean(&self) -> bool {
        self.anomalies == 0 && self.health.healthy()
    }

    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "wsfuzz: seed {}, {} connections, {:.0} s against {}",
            self.seed,
            self.connections,
            self.duration_s,
            self.targets.join(", ")
        );
        let _ = writeln!(
            out,
            "executions: {} ({:.0}/s)",
            self.executions,
            self.executions as f64 / self.duration_s.max(0.001)
        );
        for (kind, n) in &self.executions_by_kind {
            let _ = writeln!(out, "  {kind:<20} {n:>9}");
        }
        let _ = writeln!(out, "outcomes:");
        for (what, n) in &self.outcomes {
            let _ = writeln!(out, "  {what:<28} {n:>9}");
        }
        let _ = writeln!(out, "anomalies: {} cases (saved under {})", self.anomalies, self.saved_to);
        for (shape, n) in &self.anomaly_kinds {
            let _ = writeln!(out, "  {n:>6} × {shape}");
        }
        for a in &self.anomaly_list {
            let _ = writeln!(
                out,
                "  {} ({}): {} [{}]",
                a.case,
                a.kind,
                a.what.join("; "),
                a.saved.as_deref().unwrap_or("not saved")
            );
        }
        for (known, n) in &self.known {
            let _ = writeln!(out, "{known} ({n} cases; tolerated until the server is fixed)");
        }
        let h = &self.health;
        let _ = writeln!(
            out,
            "health: {} rounds; canary ok {} failed {}; /healthz ok {} failed {}",
            h.rounds, h.canary_ok, h.canary_failed, h.healthz_ok, h.healthz_failed
        );
        for f in &h.failures {
            let _ = writeln!(out, "  {f}");
        }
        for p in &h.procs {
            let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
            let n = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            let _ = writeln!(
                out,
                "  pid {}: {}; RSS first {} max {} last {}; fds first {} max {} last {}",
                p.pid,
                if p.alive { "alive" } else { "GONE" },
                kib(p.rss_kib.first),
                kib(p.rss_kib.max),
                kib(p.rss_kib.last),
                n(p.fds.first),
                n(p.fds.max),
                n(p.fds.last)
            );
        }
        let _ = writeln!(out, "result: {}", if self.clean() { "clean" } else { "FAILED" });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::cases::Kind;

    #[test]
    fn counts_and_saves_anomalies() {
        let dir = std::env::temp_dir().join(format!("wsfuzz-test-{}", std::process::id()));
        let mut tally = Tally::default();
        let mut record = Record {
            id: "c1.2".into(),
            kind: Kind::Close,
            note: "close 1000".into(),
            outcomes: vec!["close 1000".into()],
            anomalies: vec![],
            known: vec![],
            input: vec![0x88, 0x80, 1, 2, 3, 4],
            transcript: "steps".into(),
        };
        tally.add(&record, 9, &dir);
        record.anomalies = vec!["close 1011 where RFC 6455 asks for [1002]".into()];
        tally.add(&record, 9, &dir);
        assert_eq!(tally.executions["close"], 2);
        assert_eq!(tally.outcomes["close 1000"], 2);
        assert_eq!(tally.anomalies, 1);
        assert_eq!(tally.anomaly_kinds.keys().next().unwrap(), "close # where RFC # asks for [#]");
        let saved = tally.listed[0].saved.clone().unwrap();
        assert!(std::fs::read_to_string(&saved).unwrap().contains("--replay c1.2"));
        assert_eq!(std::fs::read(dir.join("c1.2-close.bin")).unwrap(), record.input);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
