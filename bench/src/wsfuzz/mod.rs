//! `wsfuzz`: a WebSocket-level fuzzer for a running node or cluster. Each of `--connections`
//! raw TCP connections upgrades by hand (dev mode, `?user=fz-<n>`) and runs cases drawn from a
//! seeded generator: commands of PROTOCOL.md §3 valid and mutated, frames with any header field
//! wrong, fragmentation, control and close frames, oversized messages, bad lengths with stalls,
//! ping floods, byte-at-a-time writes, resets, and damaged upgrade requests. An oracle holds
//! every answer to a reference model of RFC 6455 and to PROTOCOL.md §4; a health monitor checks
//! once a second that well-behaved clients still get their messages and the nodes live.
//!
//! Layout: `frame` (client frames field by field; a strict reader of server frames), `model`
//! (what the server owes for a byte stream), `json` and `upgrade` (commands and upgrade
//! requests, valid and damaged), `cases` (the generators), `conn` (raw connections), `exec`
//! (running a case), `oracle` (judging what came back), `health`, `report`.
//!
//! With `--stomp-share`, part of the connections speak STOMP 1.2 instead (PROTOCOL.md §7, see
//! `stomp`): their own cases, model and oracle, on the same tally and health monitor.
//!
//! Case `n` of connection `c` is named `c<c>.<n>` and generated from a seed derived from the
//! run's seed, so an anomalous case can be run again alone with `--replay`.

mod cases;
mod conn;
mod exec;
mod frame;
mod health;
mod json;
mod model;
mod oracle;
mod report;
mod stomp;
mod upgrade;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fastrand::Rng;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::cli::WsfuzzArgs;
use crate::http::HttpBase;
use cases::Params;
use exec::{Settings, Target, case_seed, run_case};
use json::Names;
use report::{Report, Tally};

/// Rooms the fuzzing connections share (a private one, which dev-mode users may not join).
const ROOMS: [&str; 5] = ["fz-lobby", "fz-r1", "fz-r2", "fz.quiet", "private:fz"];

pub async fn run(args: &WsfuzzArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!((0.0..=1.0).contains(&args.stomp_share), "--stomp-share is a share of the connections, 0 to 1");
    let seed = args.seed.unwrap_or_else(|| crate::clock::now_us() ^ u64::from(std::process::id()) << 40);
    let targets = args.target.iter().map(|t| target(t)).collect::<anyhow::Result<Vec<_>>>()?;
    let apis = if args.api.is_empty() {
        targets.iter().map(|t| HttpBase::parse(&format!("http://{}", t.host))).collect::<anyhow::Result<Vec<_>>>()?
    } else {
        args.api.iter().map(|a| HttpBase::parse(a)).collect::<anyhow::Result<Vec<_>>>()?
    };
    let settings = Settings {
        max_message: args.max_message_size,
        answer_timeout: Duration::from_secs_f64(args.answer_timeout),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        rate_limit: args.rate_limit,
    };
    if let Some(case) = &args.replay {
        return replay(args, seed, &targets, &settings, case).await;
    }
    let dir = args.save.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("wsfuzz-{seed}")));
    let stomp = (0..args.connections).filter(|&c| stomp::speaks_stomp(c, args.stomp_share)).count();
    eprintln!(
        "wsfuzz: seed {seed}, {} connections ({stomp} STOMP) for {} s against {}; anomalies go to {}",
        args.connections,
        args.duration,
        args.target.join(", "),
        dir.display()
    );
    let monitor = health::Monitor {
        targets: targets.iter().zip(&args.target).map(|(t, url)| (url.clone(), t.addr)).collect(),
        apis,
        api_key: args.api_key.clone(),
        pids: args.pid.clone(),
        run: format!("{:x}", seed & 0xFFFF_FFFF),
    };
    let (stop, stopped) = oneshot::channel();
    let health = tokio::spawn(health::run(monitor, stopped));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let tally = Arc::new(Mutex::new(Tally::new(args.connections, args.stomp_share)));
    let mut workers = Vec::new();
    for conn in 0..args.connections {
        let worker = Worker {
            conn,
            seed,
            stomp: stomp::speaks_stomp(conn, args.stomp_share),
            target: targets[conn % targets.len()].clone(),
            names: names(conn, args.connections),
            settings: settings.clone(),
            pace: if args.rate > 0.0 { Duration::from_secs_f64(1.0 / args.rate) } else { Duration::ZERO },
            deadline,
            tally: tally.clone(),
            dir: dir.clone(),
        };
        workers.push(tokio::spawn(worker.run()));
    }
    for w in workers {
        w.await.context("a fuzzing connection panicked")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let health = health.await.context("the health monitor panicked")?;
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let report = Report::build(tally, health, seed, args.target.clone(), args.connections, elapsed, &dir);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    anyhow::ensure!(
        report.clean(),
        "seed {seed}: {} anomalous cases, {} failed canary rounds, {} failed /healthz checks{}",
        report.anomalies,
        report.health.canary_failed,
        report.health.healthz_failed,
        if report.health.procs.iter().all(|p| p.alive) { "" } else { ", a server process is gone" }
    );
    Ok(())
}

fn target(url: &str) -> anyhow::Result<Target> {
    let addr = crate::net::resolve(url)?;
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.authority().context("no host")?.as_str().to_owned();
    Ok(Target { addr, host })
}

fn names(conn: usize, connections: usize) -> Names {
    Names {
        me: format!("fz-{conn}"),
        users: (0..connections).map(|c| format!("fz-{c}")).collect(),
        rooms: ROOMS.iter().map(|r| (*r).to_owned()).collect(),
    }
}

struct Worker {
    conn: usize,
    seed: u64,
    /// Speaks STOMP instead of JSON.
    stomp: bool,
    target: Target,
    names: Names,
    settings: Settings,
    pace: Duration,
    deadline: Instant,
    tally: Arc<Mutex<Tally>>,
    dir: std::path::PathBuf,
}

impl Worker {
    async fn run(self) {
        if self.stomp {
            return self.run_stomp().await;
        }
        let mut session = None;
        let params = Params { max_message: self.settings.max_message, host: self.target.host.clone() };
        let mut n = 0u64;
        while Instant::now() < self.deadline {
            let started = Instant::now();
            let id = format!("c{}.{n}", self.conn);
            let mut rng = Rng::with_seed(case_seed(self.seed, self.conn, n));
            let case = cases::generate(&mut rng, &self.names, &params, &id);
            let record = run_case(&self.settings, &self.target, &self.names, &mut session, &id, case, &mut rng).await;
            let failed_upgrade = record.outcomes.iter().any(|o| o == "upgrade failed");
            self.tally.lock().unwrap_or_else(|e| e.into_inner()).add(&record, self.seed, &self.dir);
            n += 1;
            // A node that refuses proper upgrades is counted once a second, not flat out.
            let pause = if failed_upgrade { Duration::from_secs(1) } else { self.pace };
            tokio::time::sleep_until(started + pause).await;
        }
        if let Some(s) = session {
            s.close().await;
        }
    }

    async fn run_stomp(self) {
        let mut session = None;
        let mut n = 0u64;
        while Instant::now() < self.deadline {
            let started = Instant::now();
            let id = format!("c{}.{n}", self.conn);
            let mut rng = Rng::with_seed(case_seed(self.seed, self.conn, n));
            let case = stomp::cases::generate(&mut rng, &self.names, self.settings.max_message, &id);
            let record =
                stomp::exec::run_case(&self.settings, &self.target, &self.names, &mut session, &id, case, &mut rng)
                    .await;
            let failed_upgrade = record.outcomes.iter().any(|o| o == "upgrade failed");
            self.tally.lock().unwrap_or_else(|e| e.into_inner()).add(&record, self.seed, &self.dir);
            n += 1;
            let pause = if failed_upgrade { Duration::from_secs(1) } else { self.pace };
            tokio::time::sleep_until(started + pause).await;
        }
        if let Some(s) = session {
            s.close().await;
        }
    }
}

/// Runs one case again (`c<conn>.<n>` of the run with `seed`) on a fresh session and prints
/// what happened.
async fn replay(
    args: &WsfuzzArgs,
    seed: u64,
    targets: &[Target],
    settings: &Settings,
    case: &str,
) -> anyhow::Result<()> {
    let (conn, n) = case
        .strip_prefix('c')
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(c, n)| Some((c.parse::<usize>().ok()?, n.parse::<u64>().ok()?)))
        .context("--replay takes a case name such as c3.117")?;
    anyhow::ensure!(args.seed.is_some(), "--replay needs the run's --seed");
    let target = targets[conn % targets.len()].clone();
    let names = names(conn, args.connections.max(conn + 1));
    let params = Params { max_message: settings.max_message, host: target.host.clone() };
    let mut rng = Rng::with_seed(case_seed(seed, conn, n));
    let record = if stomp::speaks_stomp(conn, args.stomp_share) {
        let generated = stomp::cases::generate(&mut rng, &names, settings.max_message, case);
        let mut session = None;
        let record = stomp::exec::run_case(settings, &target, &names, &mut session, case, generated, &mut rng).await;
        if let Some(s) = session {
            s.close().await;
        }
        record
    } else {
        let generated = cases::generate(&mut rng, &names, &params, case);
        let mut session = None;
        run_case(settings, &target, &names, &mut session, case, generated, &mut rng).await
    };
    println!("case {case} ({}): {}\n{}", record.kind.name(), record.note, record.transcript);
    println!("outcomes: {:?}", record.outcomes);
    for k in &record.known {
        println!("{k}");
    }
    if record.anomalies.is_empty() {
        println!("no anomaly");
        Ok(())
    } else {
        for a in &record.anomalies {
            println!("anomaly: {a}");
        }
        anyhow::bail!("case {case}: {} anomalies", record.anomalies.len())
    }
}
