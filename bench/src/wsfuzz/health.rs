//! The health oracle, once a second while the fuzzers run: a canary pair of well-behaved
//! clients (alice on the first node, bob on the last) exchange a direct message and a room
//! message and get a room message posted through the server API, each of which must arrive;
//! every node answers `/healthz` with 200; and the server processes stay alive, their resident
//! memory and open file descriptors sampled from `/proc`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use crate::clock::now_us;
use crate::http::{HttpBase, ResponseReader};
use crate::net::Conn;
use crate::procfs;
use crate::wire::{Frame, Probe, Protocol};

const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Failures kept word for word in the report.
const KEPT_FAILURES: usize = 20;

/// Where the monitor looks.
#[derive(Clone, Debug)]
pub struct Monitor {
    /// WebSocket URLs and addresses of the nodes, in the order of `--target`.
    pub targets: Vec<(String, SocketAddr)>,
    /// HTTP bases of the nodes (`/healthz`, and the API of the first).
    pub apis: Vec<HttpBase>,
    pub api_key: Option<String>,
    pub pids: Vec<u32>,
    /// Makes the canary's users and room unique to this run.
    pub run: String,
}

/// First, largest and last reading.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Trio {
    pub first: Option<u64>,
    pub max: Option<u64>,
    pub last: Option<u64>,
}

impl Trio {
    fn add(&mut self, v: Option<u64>) {
        let Some(v) = v else { return };
        self.first.get_or_insert(v);
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        self.last = Some(v);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcStats {
    pub pid: u32,
    pub rss_kib: Trio,
    pub fds: Trio,
    pub alive: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    pub rounds: u64,
    pub canary_ok: u64,
    pub canary_failed: u64,
    pub healthz_ok: u64,
    pub healthz_failed: u64,
    /// The first failures, with the second of the run they happened in.
    pub failures: Vec<String>,
    pub procs: Vec<ProcStats>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.canary_failed == 0 && self.healthz_failed == 0 && self.procs.iter().all(|p| p.alive)
    }

    fn fail(&mut self, at: Duration, what: String) {
        if self.failures.len() < KEPT_FAILURES {
            self.failures.push(format!("{:.0}s: {what}", at.as_secs_f64()));
        }
    }
}

/// Runs checks once a second until `stop` fires, then once more.
pub async fn run(monitor: Monitor, mut stop: oneshot::Receiver<()>) -> Health {
    let start = Instant::now();
    let mut health = Health {
        procs: monitor
            .pids
            .iter()
            .map(|&pid| ProcStats { pid, rss_kib: Trio::default(), fds: Trio::default(), alive: true })
            .collect(),
        ..Health::default()
    };
    let mut canary: Option<Canary> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = false;
    while !last {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => last = true,
        }
        health.rounds += 1;
        let at = start.elapsed();
        sample(&mut health, at);
        for api in &monitor.apis {
            match healthz(api).await {
                Ok(()) => health.healthz_ok += 1,
                Err(e) => {
                    health.healthz_failed += 1;
                    health.fail(at, format!("/healthz of {}: {e}", api.authority));
                }
            }
        }
        match canary_round(&mut canary, &monitor, health.rounds).await {
            Ok(()) => health.canary_ok += 1,
            Err(e) => {
                health.canary_failed += 1;
                health.fail(at, format!("canary: {e}"));
            }
        }
    }
    if let Some(c) = canary {
        c.close().await;
    }
    health
}

fn sample(health: &mut Health, at: Duration) {
    let mut died = Vec::new();
    for p in &mut health.procs {
        let alive = process_alive(p.pid);
        if p.alive && !alive {
            died.push(p.pid);
        }
        p.alive &= alive;
        if alive {
            p.rss_kib.add(procfs::sample(p.pid).rss_kib);
            p.fds.add(std::fs::read_dir(format!("/proc/{}/fd", p.pid)).ok().map(|d| d.count() as u64));
        }
    }
    for pid in died {
        health.fail(at, format!("process {pid} is gone"));
    }
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

async fn healthz(api: &HttpBase) -> Result<(), String> {
    let attempt = async {
        let mut tcp = TcpStream::connect(api.addr).await.map_err(|e| crate::net::io_kind(&e))?;
        let req =
            format!("GET {}/healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", api.prefix, api.authority);
        tcp.write_all(req.as_bytes()).await.map_err(|e| crate::net::io_kind(&e))?;
        let resp = ResponseReader::new(tcp).next().await.map_err(|e| e.to_string())?;
        if resp.status == 200 { Ok(()) } else { Err(format!("HTTP {}", resp.status)) }
    };
    tokio::time::timeout(CHECK_TIMEOUT, attempt).await.map_err(|_| "timeout".to_owned())?
}

/// Alice on the first node, bob on the last, both in one room.
struct Canary {
    alice: Conn,
    bob: Conn,
    names: (String, String, String),
    next_id: u64,
}

async fn canary_round(slot: &mut Option<Canary>, monitor: &Monitor, round: u64) -> Result<(), String> {
    if slot.is_none() {
        *slot = Some(Canary::open(monitor).await?);
    }
    let canary = slot.as_mut().expect("opened above");
    let result = canary.exchange(monitor, round).await;
    if result.is_err() {
        // Start afresh: what was in flight would be read as this round's otherwise.
        if let Some(c) = slot.take() {
            c.close().await;
        }
    }
    result
}

impl Canary {
    async fn open(monitor: &Monitor) -> Result<Canary, String> {
        let names = (
            format!("cn-alice-{}", monitor.run),
            format!("cn-bob-{}", monitor.run),
            format!("cn-room-{}", monitor.run),
        );
        let (first, last) = (&monitor.targets[0], &monitor.targets[monitor.targets.len() - 1]);
        let proto = Protocol::Switchyard;
        let mut alice = Conn::open(proto, &first.0, first.1, &names.0, None, CHECK_TIMEOUT)
            .await
            .map_err(|e| format!("alice could not connect: {e}"))?;
        let mut bob = Conn::open(proto, &last.0, last.1, &names.1, None, CHECK_TIMEOUT)
            .await
            .map_err(|e| format!("bob could not connect: {e}"))?;
        let join = async {
            alice.join(&names.2, None, 1, |_, _| {}).await.map_err(|e| format!("alice's join: {e}"))?;
            bob.join(&names.2, None, 1, |_, _| {}).await.map_err(|e| format!("bob's join: {e}"))?;
            Ok::<(), String>(())
        };
        tokio::time::timeout(CHECK_TIMEOUT, join).await.map_err(|_| "join timeout".to_owned())??;
        Ok(Canary { alice, bob, names, next_id: 2 })
    }

    async fn close(self) {
        tokio::join!(self.alice.close(), self.bob.close());
    }

    /// One direct message alice → bob, one room message bob → alice, one API post to the room
    /// for both; each must arrive (and the senders get their replies).
    async fn exchange(&mut self, monitor: &Monitor, round: u64) -> Result<(), String> {
        let proto = Protocol::Switchyard;
        let (alice_name, bob_name, room) = self.names.clone();
        let id = self.next_id;
        self.next_id += 2;
        let dm = Probe { t: now_us(), n: round, p: 1 }.encode("");
        self.alice.send(proto.send(id, &bob_name, &dm)).await.map_err(|e| format!("alice's send: {e}"))?;
        let (a, b) = tokio::join!(wait_reply(&mut self.alice, id), wait_probe(&mut self.bob, round, 1));
        a.map_err(|e| format!("alice's direct message: no reply ({e})"))?;
        b.map_err(|e| format!("bob did not get alice's direct message ({e})"))?;
        let post = Probe { t: now_us(), n: round, p: 2 }.encode("");
        self.bob.send(proto.publish(id + 1, &room, &post)).await.map_err(|e| format!("bob's publish: {e}"))?;
        let (b, a) = tokio::join!(wait_reply(&mut self.bob, id + 1), wait_probe(&mut self.alice, round, 2));
        b.map_err(|e| format!("bob's room message: no reply ({e})"))?;
        a.map_err(|e| format!("alice did not get bob's room message ({e})"))?;
        if let Some(api) = monitor.apis.first() {
            let body = format!(r#"{{"body":{},"from":"canary"}}"#, Probe { t: now_us(), n: round, p: 3 }.encode(""));
            api_post(api, monitor.api_key.as_deref(), &format!("/api/v1/rooms/{room}/messages"), &body).await?;
            let (a, b) = tokio::join!(wait_probe(&mut self.alice, round, 3), wait_probe(&mut self.bob, round, 3));
            a.map_err(|e| format!("{alice_name} did not get the API's room message ({e})"))?;
            b.map_err(|e| format!("{bob_name} did not get the API's room message ({e})"))?;
        }
        Ok(())
    }
}

async fn wait_reply(conn: &mut Conn, id: u64) -> Result<(), String> {
    wait_for(conn, |f| match f {
        Frame::Reply { id: Some(i), .. } if *i == id => Some(Ok(())),
        Frame::Error { id: Some(i), code } if *i == id => Some(Err(format!("error {code}"))),
        _ => None,
    })
    .await
}

async fn wait_probe(conn: &mut Conn, round: u64, kind: u32) -> Result<(), String> {
    wait_for(conn, |f| match f {
        Frame::Message { probe: Some(p), .. } if p.n == round && p.p == kind => Some(Ok(())),
        _ => None,
    })
    .await
}

async fn wait_for(
    conn: &mut Conn,
    mut check: impl FnMut(&Frame<'_>) -> Option<Result<(), String>>,
) -> Result<(), String> {
    let wait = async {
        loop {
            let text = conn.next_text().await?;
            if let Some(result) = check(&Protocol::Switchyard.parse(&text)) {
                return result;
            }
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, wait).await.map_err(|_| "timeout".to_owned())?
}

async fn api_post(api: &HttpBase, key: Option<&str>, path: &str, body: &str) -> Result<(), String> {
    let attempt = async {
        let mut tcp = TcpStream::connect(api.addr).await.map_err(|e| crate::net::io_kind(&e))?;
        let mut req = Vec::new();
        api.post(path, key, body, &mut req);
        tcp.write_all(&req).await.map_err(|e| crate::net::io_kind(&e))?;
        let resp = ResponseReader::new(tcp).next().await.map_err(|e| e.to_string())?;
        if resp.status == 200 {
            Ok(())
        } else {
            Err(format!("API post: HTTP {} {}", resp.status, String::from_utf8_lossy(&resp.body)))
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, attempt).await.map_err(|_| "API post timeout".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trio_keeps_first_max_last() {
        let mut t = Trio::default();
        for v in [Some(5), None, Some(9), Some(7)] {
            t.add(v);
        }
        assert_eq!(t, Trio { first: Some(5), max: Some(9), last: Some(7) });
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 7));
    }
}
