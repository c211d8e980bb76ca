//! One client connection: connect, handshake, join; then read every frame, count what arrives,
//! and, if it is a publisher, publish its flow on schedule (rate mode) or as fast as its window
//! allows (flat out).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_websockets::Message;

use super::{JOIN_ID, Phase, Progress, SYNC_ID, SetupMsg, Shared, Window};
use crate::clock::{now_us, until_us};
use crate::ledger::{Arrival, FlowTally, Ranges};
use crate::net::{Conn, Failure, ws_error_kind};
use crate::plan::{Audience, bump};
use crate::schedule::Schedule;
use crate::socketio;
use crate::wire::{Frame, Probe, Protocol};

/// A flat-out publisher whose sentinel shows no progress for this long resets its window.
const STALL_US: u64 = 1_000_000;

#[derive(Default)]
pub(crate) struct ClientOutcome {
    /// Set up completely (connected, handshake, joined).
    pub established: bool,
    /// How it ended, if before the run did.
    pub end: Option<String>,
    /// What arrived, by flow.
    pub flows: Vec<(u32, FlowTally)>,
    pub delivered_in_window: u64,
    pub foreign: u64,
    pub self_echo: u64,
    pub server_errors: BTreeMap<String, u64>,
    pub publisher: Option<PubOutcome>,
}

impl ClientOutcome {
    pub fn tally(&self, flow: u32) -> Option<&FlowTally> {
        self.flows.iter().find(|(f, _)| *f == flow).map(|(_, t)| t)
    }

    fn tally_mut(&mut self, flow: u32) -> &mut FlowTally {
        let i = match self.flows.iter().position(|(f, _)| *f == flow) {
            Some(i) => i,
            None => {
                self.flows.push((flow, FlowTally::default()));
                self.flows.len() - 1
            }
        };
        &mut self.flows[i].1
    }
}

/// What a publisher did.
#[derive(Debug, Default)]
pub(crate) struct PubOutcome {
    pub flow: u32,
    pub sent: u64,
    pub sent_in_window: u64,
    pub rejected: Ranges,
    /// Answers received (replies and errors), when the protocol answers.
    pub answered: Ranges,
    pub answers_expected: bool,
    pub errors: BTreeMap<String, u64>,
    pub stalls: u64,
    pub max_lag_us: u64,
}

impl PubOutcome {
    pub fn unanswered(&self) -> u64 {
        if self.answers_expected { self.sent - self.answered.len().min(self.sent) } else { 0 }
    }
}

pub(crate) async fn run(i: usize, shared: Arc<Shared>, setup_tx: mpsc::UnboundedSender<SetupMsg>) -> ClientOutcome {
    let spec = &shared.spec.clients[i];
    let proto = shared.spec.protocol;
    let mut out = ClientOutcome::default();

    let permit = shared.gate.acquire().await.expect("the gate is never closed");
    shared.pace().await;
    let started = Instant::now();
    let setup = async {
        let mut conn = Conn::open(
            proto,
            &shared.spec.targets[spec.target],
            shared.addrs[spec.target],
            &spec.user,
            spec.source,
            shared.connect_timeout(),
        )
        .await?;
        if shared.spec.sync {
            match tokio::time::timeout(shared.connect_timeout(), conn.sync(None, SYNC_ID, |_, _| {})).await {
                Err(_) => return Err("sync timeout".to_string()),
                Ok(Err(e)) => return Err(format!("sync: {e}")),
                Ok(Ok(_)) => {}
            }
        }
        if let Some(r) = spec.room {
            let room = &shared.spec.rooms[r as usize];
            match tokio::time::timeout(shared.connect_timeout(), conn.join(room, None, JOIN_ID, |_, _| {})).await {
                Err(_) => return Err("join timeout".to_string()),
                Ok(Err(e)) => return Err(format!("join: {e}")),
                Ok(Ok(_)) => {}
            }
        }
        Ok::<_, Failure>(conn)
    }
    .await;
    drop(permit);
    let mut conn = match setup {
        Ok(conn) => conn,
        Err(reason) => {
            let _ = setup_tx.send(SetupMsg { target: spec.target, result: Err(reason) });
            return out;
        }
    };
    out.established = true;
    let _ = setup_tx.send(SetupMsg { target: spec.target, result: Ok(started.elapsed().as_micros() as u64) });
    drop(setup_tx);

    let sentinel_for: Vec<(u32, Arc<Progress>)> =
        spec.sentinel_for.iter().filter_map(|&f| shared.progress.get(f as usize)?.clone().map(|p| (f, p))).collect();
    let mut publisher = spec.publishes.map(|f| Publisher::new(f, &shared));
    let progress = publisher.as_ref().and_then(|p| p.progress.clone());
    let mut phase_rx = shared.phase.clone();
    let mut phase = *phase_rx.borrow_and_update();
    // Kept across loop turns, so the watch is not re-registered on every frame.
    let mut next_phase = Box::pin(next_phase_of(phase_rx));
    let mut window = match phase {
        Phase::Run(w) => Some(w),
        _ => None,
    };
    let mut receiver = Receiver { proto, own_flow: spec.publishes, sentinel_for, shared: &shared };
    let mut close_label: Option<String> = None;

    loop {
        let now = now_us();
        let wake = match (&mut publisher, phase) {
            (Some(p), Phase::Run(w)) => p.next_wake_us(&w, now),
            _ => None,
        };
        let window_full = matches!((&publisher, phase), (Some(p), Phase::Run(w)) if p.window_full() && now < w.end_us);
        tokio::select! {
            biased;
            changed = &mut next_phase => {
                let Some((rx, p)) = changed else { break };
                phase = p;
                next_phase = Box::pin(next_phase_of(rx));
                match phase {
                    Phase::Run(w) => window = Some(w),
                    Phase::Close => {
                        conn.close().await;
                        break;
                    }
                    _ => {}
                }
            }
            msg = conn.ws.next() => match msg {
                None => {
                    out.end = Some(close_label.take().unwrap_or_else(|| "eof".into()));
                    break;
                }
                Some(Err(e)) => {
                    out.end = Some(close_label.take().unwrap_or_else(|| ws_error_kind(&e)));
                    break;
                }
                Some(Ok(m)) => {
                    if let Some(text) = m.as_text() {
                        let at = now_us();
                        if receiver.on_text(text, at, window.as_ref(), &mut out, publisher.as_mut())
                            && let Err(e) = conn.send(socketio::PONG.to_string()).await
                        {
                            out.end = Some(e);
                            break;
                        }
                    } else if let Some((code, _)) = m.as_close() {
                        close_label = Some(format!("close {}", u16::from(code)));
                    }
                }
            },
            _ = tokio::time::sleep(until_us(wake.unwrap_or(0))), if wake.is_some() => {
                if let (Some(p), Phase::Run(w)) = (&mut publisher, phase)
                    && let Err(e) = p.fire(&mut conn, &w, &shared.pad).await
                {
                    out.end = Some(e);
                    break;
                }
            }
            _ = async { progress.as_ref().expect("a flat-out publisher has progress").notify.notified().await },
                if window_full && progress.is_some() => {}
        }
    }
    out.publisher = publisher.map(|p| p.out);
    out
}

/// The next phase (`None`: the coordinator is gone), and the receiver to wait on again.
async fn next_phase_of(mut rx: watch::Receiver<Phase>) -> Option<(watch::Receiver<Phase>, Phase)> {
    rx.changed().await.ok()?;
    let p = *rx.borrow_and_update();
    Some((rx, p))
}

/// Counts what arrives at one client.
struct Receiver<'a> {
    proto: Protocol,
    own_flow: Option<u32>,
    sentinel_for: Vec<(u32, Arc<Progress>)>,
    shared: &'a Shared,
}

impl Receiver<'_> {
    /// Handles one text message received at `at` (one frame, or several STOMP frames); true
    /// when it must be answered with a pong.
    fn on_text(
        &mut self,
        text: &str,
        at: u64,
        window: Option<&Window>,
        out: &mut ClientOutcome,
        mut publisher: Option<&mut Publisher>,
    ) -> bool {
        self.shared.saw_traffic(at);
        let mut pong = false;
        for frame in self.proto.frames(text) {
            match frame {
                Frame::Message { probe: Some(p), .. } => self.on_probe(p, at, window, out),
                Frame::Message { probe: None, .. } => out.foreign += 1,
                Frame::Reply { id: Some(id), .. } => {
                    if let Some(p) = publisher.as_deref_mut() {
                        p.on_answer(id, None);
                    }
                }
                Frame::Error { id: Some(id), code } if id < JOIN_ID && publisher.is_some() => {
                    publisher.as_deref_mut().expect("checked").on_answer(id, Some(code));
                }
                Frame::Error { code, .. } => bump(&mut out.server_errors, code),
                Frame::Ping => pong = true,
                _ => {}
            }
        }
        pong
    }

    fn on_probe(&mut self, p: Probe, at: u64, window: Option<&Window>, out: &mut ClientOutcome) {
        if Some(p.p) == self.own_flow {
            out.self_echo += 1;
            return;
        }
        if out.tally_mut(p.p).record(p.n) == Arrival::Duplicate {
            return;
        }
        if let Some(w) = window {
            if w.measures(at) {
                out.delivered_in_window += 1;
            }
            if w.measures(p.t) {
                self.shared.latency.lock().unwrap().record_between(p.t, at);
            }
        }
        if let Some((_, progress)) = self.sentinel_for.iter().find(|(f, _)| *f == p.p) {
            progress.received.fetch_add(1, Ordering::Relaxed);
            progress.notify.notify_one();
        }
    }
}

/// The publishing side of a client.
struct Publisher {
    proto: Protocol,
    target: PubTarget,
    rate: f64,
    offset_us: u64,
    window: u32,
    progress: Option<Arc<Progress>>,
    /// Window slots given up after a stall.
    forgiven: u64,
    seen_progress: u64,
    progress_at_us: u64,
    out: PubOutcome,
}

enum PubTarget {
    Room(String),
    User(String),
}

impl Publisher {
    fn new(flow: u32, shared: &Shared) -> Self {
        let spec = &shared.spec.flows[flow as usize];
        let target = match &spec.audience {
            Audience::Room(r) => PubTarget::Room(shared.spec.rooms[*r as usize].clone()),
            Audience::User(u) => PubTarget::User(u.clone()),
        };
        let proto = shared.spec.protocol;
        Self {
            proto,
            target,
            rate: spec.rate,
            offset_us: spec.offset_us,
            window: spec.window.max(1),
            progress: shared.progress.get(flow as usize).cloned().flatten(),
            forgiven: 0,
            seen_progress: 0,
            progress_at_us: 0,
            out: PubOutcome { flow, answers_expected: proto.answers_publishes(), ..PubOutcome::default() },
        }
    }

    /// The rate-mode schedule of this run.
    fn schedule(&self, w: &Window) -> Schedule {
        Schedule { start_us: w.start_us, offset_us: self.offset_us, rate: self.rate, end_us: w.end_us }
    }

    fn outstanding(&self) -> u64 {
        let seen = self.progress.as_ref().map_or(0, |p| p.received.load(Ordering::Relaxed));
        self.out.sent.saturating_sub(seen + self.out.rejected.len() + self.forgiven)
    }

    fn window_full(&self) -> bool {
        self.rate <= 0.0 && self.outstanding() >= self.window as u64
    }

    /// When to fire next, if at all.
    fn next_wake_us(&mut self, w: &Window, now: u64) -> Option<u64> {
        if self.rate > 0.0 {
            let s = self.schedule(w);
            return (self.out.sent < s.total()).then(|| s.due_at(self.out.sent));
        }
        if now >= w.end_us {
            return None;
        }
        if self.progress_at_us == 0 {
            self.progress_at_us = now.max(w.start_us);
        }
        if self.outstanding() < self.window as u64 {
            Some(now.max(w.start_us))
        } else {
            Some(self.progress_at_us + STALL_US)
        }
    }

    /// Sends what is due now.
    async fn fire(&mut self, conn: &mut Conn, w: &Window, pad: &str) -> Result<(), Failure> {
        let now = now_us();
        if now < w.start_us {
            return Ok(());
        }
        let count = if self.rate > 0.0 {
            self.schedule(w).due_by(now).saturating_sub(self.out.sent)
        } else {
            if now >= w.end_us {
                return Ok(());
            }
            let seen = self.progress.as_ref().map_or(0, |p| p.received.load(Ordering::Relaxed));
            if seen != self.seen_progress {
                self.seen_progress = seen;
                self.progress_at_us = now;
            }
            let outstanding = self.outstanding();
            if outstanding >= self.window as u64 {
                if now >= self.progress_at_us + STALL_US {
                    self.forgiven += outstanding;
                    self.out.stalls += 1;
                    self.progress_at_us = now;
                }
                return Ok(());
            }
            self.window as u64 - outstanding
        };
        for _ in 0..count {
            let n = self.out.sent;
            let t = now_us();
            if self.rate > 0.0 {
                self.out.max_lag_us = self.out.max_lag_us.max(t.saturating_sub(self.schedule(w).due_at(n)));
            }
            let body = Probe { t, n, p: self.out.flow }.encode(pad);
            let frame = match &self.target {
                PubTarget::Room(room) => self.proto.publish(n, room, &body),
                PubTarget::User(user) => self.proto.send(n, user, &body),
            };
            conn.ws.feed(Message::text(frame)).await.map_err(|e| ws_error_kind(&e))?;
            self.out.sent += 1;
            if w.measures(t) {
                self.out.sent_in_window += 1;
            }
        }
        conn.ws.flush().await.map_err(|e| ws_error_kind(&e))
    }

    /// A reply (`error: None`) or an error answer to publish number `id`.
    fn on_answer(&mut self, id: u64, error: Option<String>) {
        if id >= self.out.sent || !self.out.answered.insert(id) {
            bump(&mut self.out.errors, "answer to an unknown or answered id");
            return;
        }
        if let Some(code) = error {
            self.out.rejected.insert(id);
            bump(&mut self.out.errors, code);
        }
    }
}
