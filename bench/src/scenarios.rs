//! Turns a scenario's options into worker specs: who connects where, from which source address,
//! in which process, and which flows exist.
//!
//! Placement rules: connection `i` of a scenario goes to target `i mod T` (round-robin) and to
//! worker `i mod W`; source addresses rotate per connection. A WebSocket publisher lives in the
//! worker of its sentinel (the room's first member, or its receiver), so a flat-out window can be
//! paced by deliveries without crossing processes.

use std::time::Duration;

use anyhow::{bail, ensure};
use serde_json::json;

use crate::cli::{ApiArgs, Common, DirectArgs, FanoutArgs, IdleArgs, Load};
use crate::clock::secs_us;
use crate::net::source_ip;
use crate::plan::{Audience, ClientSpec, ConnectOpts, FlowSpec, Timing, Via, WorkerSpec};
use crate::schedule::Schedule;
use crate::wire::Protocol;

/// Connections one worker process holds at most by default (the fd limit is ~20,000).
const CONNS_PER_PROC: usize = 18_000;
/// Above this many connections, bind to extra source addresses by default.
const CONNS_PER_SOURCE: usize = 25_000;

pub struct Plan {
    pub scenario: &'static str,
    pub specs: Vec<WorkerSpec>,
    pub connections: usize,
    pub source_ips: usize,
    pub params: serde_json::Value,
    /// Wait between set-up and publishing (idle: before reading RSS).
    pub settle: Duration,
    /// Idle: read RSS again this long after closing.
    pub after_close: Option<Duration>,
    pub timing: Timing,
    /// Total publishes per second asked for (0: flat out; `None`: no publishing).
    pub rate: Option<f64>,
    /// Whether the run's workers run in this process.
    pub in_process: bool,
}

struct Layout {
    workers: usize,
    sources: usize,
    targets: usize,
    next_conn: usize,
    clients: Vec<Vec<ClientSpec>>,
}

impl Layout {
    fn new(common: &Common, total: usize) -> Self {
        let workers = if common.procs == 0 { total.div_ceil(CONNS_PER_PROC).max(1) } else { common.procs };
        let sources = common.source_ips.unwrap_or(if total > 20_000 { total.div_ceil(CONNS_PER_SOURCE) } else { 0 });
        Self { workers, sources, targets: common.target.len(), next_conn: 0, clients: vec![Vec::new(); workers] }
    }

    /// Adds a client to `worker`; returns its index there.
    fn add(&mut self, worker: usize, user: String, target: usize, room: Option<u32>, publishes: Option<u32>) -> usize {
        let source = (self.sources > 0).then(|| source_ip(self.next_conn % self.sources));
        self.next_conn += 1;
        let list = &mut self.clients[worker];
        list.push(ClientSpec { user, target, source, room, publishes, sentinel_for: Vec::new() });
        list.len() - 1
    }

    fn sentinel(&mut self, worker: usize, index: usize, flow: u32) {
        self.clients[worker][index].sentinel_for.push(flow);
    }
}

pub(crate) fn id_prefix(common: &Common) -> String {
    common.id_prefix.clone().unwrap_or_else(|| format!("b{:06x}", fastrand::u32(..0x100_0000)))
}

fn timing(load: &Load) -> Timing {
    Timing {
        warmup_us: secs_us(load.warmup),
        duration_us: secs_us(load.duration),
        drain_max_us: secs_us(load.drain),
        quiet_us: 1_000_000,
    }
}

pub(crate) fn validate(common: &Common, load: Option<&Load>) -> anyhow::Result<()> {
    ensure!(!common.target.is_empty(), "give at least one --target");
    for t in &common.target {
        crate::net::resolve(t)?;
    }
    for a in &common.api {
        crate::http::HttpBase::parse(a)?;
    }
    ensure!(
        common.pid.is_empty() || common.pid.len() == common.target.len(),
        "--pid takes one pid per --target, in the same order"
    );
    if let Some(l) = load {
        ensure!(l.duration > 0.0, "--duration must be positive");
        ensure!(l.warmup >= 0.0 && l.drain >= 0.0 && l.settle >= 0.0, "times must not be negative");
    }
    Ok(())
}

fn finish(
    common: &Common,
    layout: Layout,
    rooms: Vec<String>,
    flows: Vec<FlowSpec>,
    timing: Timing,
    pad: usize,
) -> (Vec<WorkerSpec>, usize, bool) {
    let workers = layout.workers;
    let specs = layout
        .clients
        .into_iter()
        .enumerate()
        .map(|(index, clients)| WorkerSpec {
            index,
            protocol: common.protocol,
            targets: common.target.clone(),
            api: common.api.clone(),
            api_key: common.api_key.clone(),
            connect: ConnectOpts {
                concurrency: common.connect_concurrency.div_ceil(workers).max(1),
                rate: common.connect_rate / workers as f64,
                timeout_ms: (common.connect_timeout * 1000.0) as u64,
            },
            rooms: rooms.clone(),
            clients,
            flows: flows.clone(),
            timing,
            pad,
            sync: false,
        })
        .collect();
    (specs, layout.sources, workers == 1)
}

pub fn idle(a: &IdleArgs) -> anyhow::Result<Plan> {
    let c = &a.common;
    validate(c, None)?;
    let id = id_prefix(c);
    let rooms: Vec<String> = (0..a.rooms).map(|r| format!("{}{id}-r{r}", c.room_prefix)).collect();
    let mut layout = Layout::new(c, a.connections);
    for i in 0..a.connections {
        let room = (a.rooms > 0).then(|| (i % a.rooms) as u32);
        layout.add(i % layout.workers, format!("{id}-i{i}"), i % layout.targets, room, None);
    }
    let timing = Timing { warmup_us: 0, duration_us: 0, drain_max_us: 0, quiet_us: 0 };
    ensure!(!a.sync || c.protocol == Protocol::Switchyard, "--sync is for --protocol switchyard");
    let (mut specs, source_ips, in_process) = finish(c, layout, rooms, Vec::new(), timing, 0);
    for spec in &mut specs {
        spec.sync = a.sync;
    }
    Ok(Plan {
        scenario: "idle",
        specs,
        connections: a.connections,
        source_ips,
        params: json!({"connections": a.connections, "settle_s": a.settle, "rooms": a.rooms, "sync": a.sync, "id_prefix": id}),
        settle: Duration::from_secs_f64(a.settle),
        after_close: (a.after_close > 0.0).then(|| Duration::from_secs_f64(a.after_close)),
        timing,
        rate: None,
        in_process,
    })
}

/// R rooms of M members; returns the layout, room names, and each room's first member.
fn rooms_and_members(
    c: &Common,
    id: &str,
    rooms: usize,
    members: usize,
    extra: usize,
) -> (Layout, Vec<String>, Vec<(usize, usize)>) {
    let names: Vec<String> = (0..rooms).map(|r| format!("{}{id}-r{r}", c.room_prefix)).collect();
    let mut layout = Layout::new(c, rooms * members + extra);
    let mut first = Vec::with_capacity(rooms);
    for r in 0..rooms {
        for m in 0..members {
            let i = r * members + m;
            let worker = i % layout.workers;
            let local = layout.add(worker, format!("{id}-m{r}.{m}"), i % layout.targets, Some(r as u32), None);
            if m == 0 {
                first.push((worker, local));
            }
        }
    }
    (layout, names, first)
}

pub fn fanout(a: &FanoutArgs) -> anyhow::Result<Plan> {
    let c = &a.common;
    validate(c, Some(&a.load))?;
    ensure!(a.rooms > 0 && a.members > 0, "--rooms and --members must be at least 1");
    ensure!(a.rate >= 0.0, "--rate must not be negative");
    let publishers = a.publishers.unwrap_or(a.rooms);
    ensure!(publishers > 0, "--publishers must be at least 1");
    let id = id_prefix(c);
    let (mut layout, rooms, first) = rooms_and_members(c, &id, a.rooms, a.members, publishers);
    let mut flows = Vec::with_capacity(publishers);
    for k in 0..publishers {
        let r = k % a.rooms;
        let (worker, sentinel) = first[r];
        layout.add(worker, format!("{id}-p{k}"), k % layout.targets, Some(r as u32), Some(k as u32));
        if a.rate == 0.0 {
            layout.sentinel(worker, sentinel, k as u32);
        }
        flows.push(FlowSpec {
            audience: Audience::Room(r as u32),
            via: Via::Ws,
            rate: a.rate / publishers as f64,
            offset_us: Schedule::offset_for(k, publishers, a.rate / publishers as f64),
            window: a.load.window,
            runner: worker,
        });
    }
    let timing = timing(&a.load);
    let connections = a.rooms * a.members + publishers;
    let (specs, source_ips, in_process) = finish(c, layout, rooms, flows, timing, a.load.pad);
    Ok(Plan {
        scenario: "fanout",
        specs,
        connections,
        source_ips,
        params: json!({
            "rooms": a.rooms, "members": a.members, "publishers": publishers, "rate": a.rate,
            "window": a.load.window, "pad": a.load.pad, "warmup_s": a.load.warmup,
            "duration_s": a.load.duration, "id_prefix": id,
        }),
        settle: Duration::from_secs_f64(a.load.settle),
        after_close: None,
        timing,
        rate: Some(a.rate),
        in_process,
    })
}

pub fn direct(a: &DirectArgs) -> anyhow::Result<Plan> {
    let c = &a.common;
    validate(c, Some(&a.load))?;
    ensure!(a.pairs > 0, "--pairs must be at least 1");
    ensure!(a.rate >= 0.0, "--rate must not be negative");
    let id = id_prefix(c);
    let mut layout = Layout::new(c, 2 * a.pairs);
    let t = layout.targets;
    let mut flows = Vec::with_capacity(a.pairs);
    for i in 0..a.pairs {
        let worker = i % layout.workers;
        let receiver = format!("{id}-d{i}");
        let local = layout.add(worker, receiver.clone(), (i + 1) % t, None, None);
        layout.add(worker, format!("{id}-s{i}"), i % t, None, Some(i as u32));
        if a.rate == 0.0 {
            layout.sentinel(worker, local, i as u32);
        }
        flows.push(FlowSpec {
            audience: Audience::User(receiver),
            via: Via::Ws,
            rate: a.rate / a.pairs as f64,
            offset_us: Schedule::offset_for(i, a.pairs, a.rate / a.pairs as f64),
            window: a.load.window,
            runner: worker,
        });
    }
    let timing = timing(&a.load);
    let (specs, source_ips, in_process) = finish(c, layout, Vec::new(), flows, timing, a.load.pad);
    Ok(Plan {
        scenario: "direct",
        specs,
        connections: 2 * a.pairs,
        source_ips,
        params: json!({
            "pairs": a.pairs, "rate": a.rate, "window": a.load.window, "pad": a.load.pad,
            "warmup_s": a.load.warmup, "duration_s": a.load.duration,
            "cross_node": t > 1, "id_prefix": id,
        }),
        settle: Duration::from_secs_f64(a.load.settle),
        after_close: None,
        timing,
        rate: Some(a.rate),
        in_process,
    })
}

pub fn api(a: &ApiArgs) -> anyhow::Result<Plan> {
    let c = &a.common;
    validate(c, Some(&a.load))?;
    if c.protocol != Protocol::Switchyard {
        bail!("the api scenario is for Switchyard only (the peers have no server API)");
    }
    ensure!(!c.api.is_empty(), "give the API bases with --api http://127.0.0.1:PORT[,…]");
    ensure!(a.rooms > 0 && a.members > 0 && a.connections > 0, "rooms, members, connections ≥ 1");
    ensure!(a.rate >= 0.0, "--rate must not be negative");
    let id = id_prefix(c);
    let (layout, rooms, _) = rooms_and_members(c, &id, a.rooms, a.members, 0);
    let flows = (0..a.connections)
        .map(|k| FlowSpec {
            audience: Audience::Room((k % a.rooms) as u32),
            via: Via::Http { api: k % c.api.len(), pipeline: a.pipeline.max(1) },
            rate: a.rate / a.connections as f64,
            offset_us: Schedule::offset_for(k, a.connections, a.rate / a.connections as f64),
            window: a.pipeline.max(1),
            runner: k % layout.workers,
        })
        .collect();
    let timing = timing(&a.load);
    let (specs, source_ips, in_process) = finish(c, layout, rooms, flows, timing, a.load.pad);
    Ok(Plan {
        scenario: "api",
        specs,
        connections: a.rooms * a.members,
        source_ips,
        params: json!({
            "rooms": a.rooms, "members": a.members, "http_connections": a.connections,
            "pipeline": a.pipeline.max(1), "rate": a.rate, "pad": a.load.pad,
            "warmup_s": a.load.warmup, "duration_s": a.load.duration, "id_prefix": id,
        }),
        settle: Duration::from_secs_f64(a.load.settle),
        after_close: None,
        timing,
        rate: Some(a.rate),
        in_process,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &str) -> Command {
        Cli::parse_from(std::iter::once("switchyard-bench").chain(args.split_whitespace())).command
    }

    #[test]
    fn fanout_places_publishers_with_their_sentinels() {
        let Command::Fanout(a) = parse(
            "fanout --target ws://127.0.0.1:1,ws://127.0.0.1:2,ws://127.0.0.1:3 --procs 2 \
             --rooms 3 --members 4 --publishers 6 --rate 0 --id-prefix t",
        ) else {
            panic!()
        };
        let plan = fanout(&a).unwrap();
        assert_eq!(plan.connections, 18);
        let all: Vec<&ClientSpec> = plan.specs.iter().flat_map(|s| &s.clients).collect();
        assert_eq!(all.len(), 18);
        for (k, flow) in plan.specs[0].flows.iter().enumerate() {
            let Audience::Room(r) = flow.audience else { panic!() };
            assert_eq!(r as usize, k % 3);
            let spec = &plan.specs[flow.runner];
            assert!(spec.clients.iter().any(|c| c.publishes == Some(k as u32)));
            let sentinel = spec.clients.iter().find(|c| c.sentinel_for.contains(&(k as u32))).unwrap();
            assert_eq!(sentinel.room, Some(r));
            assert!(sentinel.publishes.is_none());
        }
        // Members of each room on every target.
        for r in 0..3u32 {
            let mut targets: Vec<usize> =
                all.iter().filter(|c| c.room == Some(r) && c.publishes.is_none()).map(|c| c.target).collect();
            targets.sort();
            targets.dedup();
            assert_eq!(targets.len(), 3, "room {r}");
        }
    }

    #[test]
    fn direct_pairs_cross_nodes() {
        let Command::Direct(a) =
            parse("direct --target ws://127.0.0.1:1,ws://127.0.0.1:2 --pairs 5 --rate 100 --id-prefix t")
        else {
            panic!()
        };
        let plan = direct(&a).unwrap();
        assert!(plan.in_process);
        let spec = &plan.specs[0];
        for (i, flow) in spec.flows.iter().enumerate() {
            assert_eq!(flow.rate, 20.0);
            let Audience::User(u) = &flow.audience else { panic!() };
            let receiver = spec.clients.iter().find(|c| &c.user == u).unwrap();
            let sender = spec.clients.iter().find(|c| c.publishes == Some(i as u32)).unwrap();
            assert_ne!(receiver.target, sender.target);
        }
    }

    #[test]
    fn large_idle_runs_spread_over_processes_and_sources() {
        let Command::Idle(a) = parse("idle --target ws://127.0.0.1:1 -n 40000 --id-prefix t") else { panic!() };
        let plan = idle(&a).unwrap();
        assert_eq!(plan.specs.len(), 3);
        assert!(!plan.in_process);
        assert_eq!(plan.source_ips, 2);
        assert!(plan.specs.iter().all(|s| s.clients.len() <= CONNS_PER_PROC));
        let on_second = plan.specs.iter().flat_map(|s| &s.clients).filter(|c| c.source == Some(source_ip(1))).count();
        assert_eq!(on_second, 20_000);
    }

    #[test]
    fn refuses_remote_targets() {
        let Command::Idle(a) = parse("idle --target ws://192.0.2.1:80") else { panic!() };
        assert!(idle(&a).is_err());
    }
}
