//! One device of the soak scenario. It keeps a connection to some node, sends direct messages
//! and publishes at random, joins and leaves lounges, and now and then drops its connection
//! (cleanly or abruptly) to come back on another node and resume every stream it follows from
//! the last seq it holds without a gap.
//!
//! What it sends carries an idempotency key, so a command left unanswered by a lost connection
//! is sent again after the reconnect and must still be delivered exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_websockets::Message;

use super::{Phase, Shared};
use crate::clock::now_us;
use crate::ledger::{Arrival, FlowTally};
use crate::net::{Conn, ws_error_kind};
use crate::plan::bump;
use crate::wire::{Probe, Protocol};

/// The seqs of one stream a device holds: every seq up to `upto`, and some above it. A resume
/// asks for what follows `upto`, so a connection lost in the middle of a catch-up leaves no gap.
#[derive(Debug, Default)]
pub(super) struct Watermark {
    upto: u64,
    above: BTreeSet<u64>,
    /// A catch-up answered `truncated`: the next seq to arrive is the oldest one kept.
    restart: bool,
}

impl Watermark {
    pub(super) fn starting_at(seq: u64) -> Self {
        Self { upto: seq, above: BTreeSet::new(), restart: false }
    }

    pub(super) fn upto(&self) -> u64 {
        self.upto
    }

    pub(super) fn saw(&mut self, seq: u64) {
        if std::mem::take(&mut self.restart) && seq > self.upto + 1 {
            self.upto = seq - 1;
            self.above.retain(|&s| s > seq);
        }
        if seq <= self.upto {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }

    /// A catch-up answered `truncated`: what it delivers first is the oldest seq kept.
    pub(super) fn truncated(&mut self) {
        self.restart = true;
    }
}

/// What one device saw over the run.
#[derive(Default)]
pub(super) struct DeviceLog {
    pub(super) established: bool,
    /// Direct messages addressed to this device's user.
    pub(super) direct: FlowTally,
    /// Messages of the device's home room (its own publishes count once their reply came).
    pub(super) home: FlowTally,
    pub(super) lounge_deliveries: u64,
    /// Lounge messages that arrived after the answer to `leave`.
    pub(super) after_leave: u64,
    /// Messages of a stream this device does not follow, or direct messages to someone else
    /// that are not the copy of one it sent.
    pub(super) stray: u64,
    pub(super) truncated: u64,
    pub(super) reconnects_clean: u64,
    pub(super) reconnects_abrupt: u64,
    /// Connections the server ended, by close code or error.
    pub(super) dropped: BTreeMap<String, u64>,
    pub(super) reconnect_failures: BTreeMap<String, u64>,
    /// Error answers to sends and publishes, by code.
    pub(super) refused: BTreeMap<String, u64>,
    /// Commands sent again after a reconnect.
    pub(super) retried: u64,
    pub(super) joins: u64,
    pub(super) leaves: u64,
}

/// A send or publish waiting for its answer.
struct Pending {
    text: String,
    what: Sent,
}

#[derive(Clone, Copy)]
enum Sent {
    Direct { to_user: usize, n: u64 },
    Home { n: u64 },
    Lounge,
}

/// The frame fields this scenario reads.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    truncated: Option<bool>,
    #[serde(default, borrow)]
    stream: Option<&'a str>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
}

/// Why a connection is being left.
enum Leave {
    Clean,
    Abrupt,
    Lost(String),
    Over,
}

pub(super) struct Device {
    shared: Arc<Shared>,
    user: usize,
    home: usize,
    my_stream: String,
    home_stream: String,
    target: usize,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    lounge: Option<(usize, u64)>,
    left_lounges: BTreeSet<usize>,
    marks: HashMap<String, Watermark>,
    rng: fastrand::Rng,
    pub(super) log: DeviceLog,
}

impl Device {
    pub(super) fn new(shared: Arc<Shared>, index: usize) -> Self {
        let (user, home) = shared.user_and_home(index);
        Self {
            my_stream: format!("user:{}", shared.user_name(user)),
            home_stream: format!("room:{}", shared.room_name(home)),
            target: index % shared.targets.len(),
            rng: fastrand::Rng::with_seed(shared.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            shared,
            user,
            home,
            next_id: 1,
            pending: HashMap::new(),
            lounge: None,
            left_lounges: BTreeSet::new(),
            marks: HashMap::new(),
            log: DeviceLog::default(),
        }
    }

    /// Connects and follows its streams; reports on `ready` once, then runs until the phase is
    /// `Over`. While draining it sends nothing new but still reconnects when its connection is
    /// lost, to send again what is unanswered and to catch up.
    pub(super) async fn run(
        mut self,
        mut phase: watch::Receiver<Phase>,
        ready: tokio::sync::mpsc::UnboundedSender<bool>,
    ) -> DeviceLog {
        let first = {
            let shared = self.shared.clone();
            let _permit = shared.gate.acquire().await.expect("open");
            self.connect().await
        };
        let mut conn = match first {
            Ok(c) => c,
            Err(e) => {
                bump(&mut self.log.reconnect_failures, e);
                let _ = ready.send(false);
                return self.log;
            }
        };
        self.log.established = true;
        let _ = ready.send(true);
        drop(ready);
        loop {
            let why = self.serve(&mut conn, &mut phase).await;
            match why {
                Leave::Over => {
                    conn.close().await;
                    return self.log;
                }
                Leave::Clean => {
                    self.log.reconnects_clean += 1;
                    conn.close().await;
                }
                Leave::Abrupt => {
                    self.log.reconnects_abrupt += 1;
                    drop(conn);
                }
                Leave::Lost(why) => bump(&mut self.log.dropped, why),
            }
            // The lounge is left with the connection; pending lounge publishes are not retried.
            if let Some((room, _)) = self.lounge.take() {
                self.left_lounges.insert(room);
            }
            let before = self.pending.len();
            self.pending.retain(|_, p| !matches!(p.what, Sent::Lounge));
            self.shared.outstanding.fetch_sub((before - self.pending.len()) as i64, Ordering::Relaxed);
            conn = loop {
                if *phase.borrow() == Phase::Over {
                    return self.log;
                }
                self.target =
                    (self.target + 1 + self.rng.usize(..self.shared.targets.len() - 1)) % self.shared.targets.len();
                match self.connect().await {
                    Ok(c) => break c,
                    Err(e) => {
                        bump(&mut self.log.reconnect_failures, e);
                        tokio::time::sleep(Duration::from_millis(200 + self.rng.u64(..800))).await;
                    }
                }
            };
        }
    }

    /// Opens a connection to the current target, catches up its own stream and its home room
    /// from what it holds, and sends again what was left unanswered.
    async fn connect(&mut self) -> Result<Conn, String> {
        let s = self.shared.clone();
        let user = s.user_name(self.user);
        let mut conn =
            Conn::open(Protocol::Switchyard, &s.targets[self.target], s.addrs[self.target], &user, None, s.timeout)
                .await?;
        let resume = |mark: Option<&Watermark>| mark.map(Watermark::upto).unwrap_or(0);
        // A brand-new user's stream is empty, so the first sync may start at 0; the home room
        // is joined from its current seq (set-up happens before anything is published).
        let since = resume(self.marks.get(&self.my_stream));
        let sync = format!(r#"{{"type":"sync","id":0,"since":{since}}}"#);
        self.catch_up(&mut conn, sync, self.my_stream.clone()).await?;
        let room = s.room_name(self.home);
        let join = match self.marks.get(&self.home_stream) {
            Some(m) => format!(r#"{{"type":"join","id":0,"room":"{room}","since":{}}}"#, m.upto()),
            None => format!(r#"{{"type":"join","id":0,"room":"{room}"}}"#),
        };
        self.catch_up(&mut conn, join, self.home_stream.clone()).await?;
        self.log.joins += 1;
        let mut again: Vec<(u64, String)> = self.pending.iter().map(|(&id, p)| (id, p.text.clone())).collect();
        again.sort_unstable();
        for (_, text) in again {
            self.log.retried += 1;
            conn.ws.feed(Message::text(text)).await.map_err(|e| ws_error_kind(&e))?;
        }
        conn.ws.flush().await.map_err(|e| ws_error_kind(&e))?;
        Ok(conn)
    }

    /// Sends a `sync`/`join` with id 0 and handles frames until its answer.
    async fn catch_up(&mut self, conn: &mut Conn, command: String, stream: String) -> Result<(), String> {
        conn.send(command).await?;
        let answer = tokio::time::timeout(self.shared.timeout, async {
            loop {
                let text = conn.next_text().await?;
                let Ok(f) = serde_json::from_str::<Incoming>(&text) else {
                    return Err("malformed frame".to_string());
                };
                match (f.kind, f.id) {
                    ("reply", Some(0)) => return Ok((f.seq.unwrap_or(0), f.truncated.unwrap_or(false))),
                    ("error", Some(0)) => return Err(format!("catch-up error {}", code_of(&f))),
                    _ => self.on_frame(&f),
                }
            }
        })
        .await
        .map_err(|_| "catch-up timeout".to_string())??;
        let (seq, truncated) = answer;
        let mark = self.marks.entry(stream).or_insert_with(|| Watermark::starting_at(seq));
        if truncated {
            self.log.truncated += 1;
            mark.truncated();
        }
        Ok(())
    }

    /// One connection's life: until the phase ends it, the device leaves it on purpose, or the
    /// server or the network does.
    async fn serve(&mut self, conn: &mut Conn, phase: &mut watch::Receiver<Phase>) -> Leave {
        let s = self.shared.clone();
        let mut next_act = now_us() + self.exp_us(s.act_mean_us);
        let next_reconnect = now_us() + self.exp_us(s.reconnect_mean_us);
        let mut next_lounge = now_us() + self.exp_us(s.lounge_mean_us);
        loop {
            let current = *phase.borrow_and_update();
            if current == Phase::Over {
                return Leave::Over;
            }
            let acting = current == Phase::Run;
            let wake = if acting { next_act.min(next_reconnect).min(next_lounge) } else { now_us() + 100_000 };
            tokio::select! {
                _ = phase.changed() => {}
                msg = conn.ws.next() => match msg {
                    None => return Leave::Lost("eof".into()),
                    Some(Err(e)) => return Leave::Lost(ws_error_kind(&e)),
                    Some(Ok(m)) => {
                        if let Some(text) = m.as_text() {
                            match serde_json::from_str::<Incoming>(text) {
                                Ok(f) => self.on_frame(&f),
                                // Not a frame of PROTOCOL.md: counted as unexpected, which fails the run.
                                Err(_) => self.log.stray += 1,
                            }
                        } else if let Some((code, _)) = m.as_close() {
                            return Leave::Lost(format!("close {}", u16::from(code)));
                        }
                    }
                },
                _ = tokio::time::sleep(crate::clock::until_us(wake)) => {
                    if !acting {
                        continue;
                    }
                    let now = now_us();
                    if now >= next_reconnect {
                        if self.rng.bool() {
                            return Leave::Clean;
                        }
                        // Drop the socket right after a command, whose answer is then lost:
                        // it is sent again after the reconnect, with its key.
                        if let Some(text) = self.act() {
                            let _ = conn.send(text).await;
                        }
                        return Leave::Abrupt;
                    }
                    let sent = if now >= next_lounge {
                        next_lounge = now + self.exp_us(s.lounge_mean_us);
                        self.lounge_step()
                    } else {
                        next_act = now + self.exp_us(s.act_mean_us);
                        self.act()
                    };
                    if let Some(text) = sent
                        && let Err(e) = conn.send(text).await
                    {
                        return Leave::Lost(e);
                    }
                }
            }
        }
    }

    /// A direct message to another user, or a publish to the home room or the lounge.
    fn act(&mut self) -> Option<String> {
        let s = self.shared.clone();
        let id = self.next_id;
        self.next_id += 1;
        let t = now_us();
        let roll = self.rng.f64();
        let (text, what) = if roll < s.direct_share {
            let mut to = self.rng.usize(..s.users - 1);
            if to >= self.user {
                to += 1;
            }
            let n = s.direct_next[to].fetch_add(1, Ordering::Relaxed);
            let body = Probe { t, n, p: to as u32 }.encode("");
            let key = format!("d{to}-{n}");
            let to_name = s.user_name(to);
            let text = format!(r#"{{"type":"send","id":{id},"to":"{to_name}","key":"{key}","body":{body}}}"#);
            (text, Sent::Direct { to_user: to, n })
        } else if let Some((lounge, _)) = self.lounge.filter(|&(_, id)| id & JOIN_BIT != 0 && self.rng.u8(..4) == 0) {
            let body = Probe { t, n: 0, p: u32::MAX }.encode("");
            let room = s.lounge_name(lounge);
            (format!(r#"{{"type":"publish","id":{id},"room":"{room}","body":{body}}}"#), Sent::Lounge)
        } else {
            let n = s.room_next[self.home].fetch_add(1, Ordering::Relaxed);
            let body = Probe { t, n, p: (s.users + self.home) as u32 }.encode("");
            let key = format!("r{}-{n}", self.home);
            let room = s.room_name(self.home);
            let text = format!(r#"{{"type":"publish","id":{id},"room":"{room}","key":"{key}","body":{body}}}"#);
            (text, Sent::Home { n })
        };
        self.pending.insert(id, Pending { text: text.clone(), what });
        s.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(text)
    }

    /// Joins a random lounge, or leaves the one it is in.
    fn lounge_step(&mut self) -> Option<String> {
        let s = self.shared.clone();
        if s.lounges == 0 {
            return None;
        }
        let text = match self.lounge {
            Some((room, id)) if id & JOIN_BIT != 0 => {
                // Joined (the reply came): leave. Its answer marks the lounge as left.
                let leave_id = self.next_id;
                self.next_id += 1;
                self.lounge = Some((room, leave_id | LEAVE_BIT));
                format!(r#"{{"type":"leave","id":{},"room":"{}"}}"#, leave_id | LEAVE_BIT, s.lounge_name(room))
            }
            Some(_) => return None,
            None => {
                let room = self.rng.usize(..s.lounges);
                let id = self.next_id | JOIN_BIT;
                self.next_id += 1;
                self.lounge = Some((room, 0));
                self.left_lounges.remove(&room);
                format!(r#"{{"type":"join","id":{id},"room":"{}"}}"#, s.lounge_name(room))
            }
        };
        Some(text)
    }

    fn on_frame(&mut self, f: &Incoming<'_>) {
        match f.kind {
            "message" => self.on_message(f),
            "reply" => self.on_answer(f.id, None, f.seq),
            "error" => {
                let code = code_of(f);
                self.on_answer(f.id, Some(code), None);
            }
            _ => {}
        }
    }

    fn on_answer(&mut self, id: Option<u64>, error: Option<String>, seq: Option<u64>) {
        let Some(id) = id else {
            if let Some(code) = error {
                bump(&mut self.log.refused, format!("{code} (no id)"));
            }
            return;
        };
        if id & JOIN_BIT != 0 {
            match (&error, self.lounge) {
                (None, Some((room, 0))) => {
                    self.lounge = Some((room, id));
                    self.log.joins += 1;
                }
                (Some(code), _) => {
                    bump(&mut self.log.refused, format!("join {code}"));
                    self.lounge = None;
                }
                _ => {}
            }
            return;
        }
        if id & LEAVE_BIT != 0 {
            if let Some((room, _)) = self.lounge.take() {
                self.left_lounges.insert(room);
                self.log.leaves += 1;
            }
            if let Some(code) = error {
                bump(&mut self.log.refused, format!("leave {code}"));
            }
            return;
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let s = &self.shared;
        s.outstanding.fetch_sub(1, Ordering::Relaxed);
        match (error, p.what) {
            (Some(code), _) => bump(&mut self.log.refused, code),
            (None, Sent::Direct { to_user, n }) => {
                s.direct_accepted.lock().unwrap()[to_user].insert(n);
                // The reply carries the seq of the sender's copy in its own stream.
                if let (Some(q), Some(m)) = (seq, self.marks.get_mut(&self.my_stream)) {
                    m.saw(q);
                }
            }
            (None, Sent::Home { n }) => {
                s.room_accepted.lock().unwrap()[self.home].insert(n);
                // A retried publish may have come back already in the home room's catch-up.
                if !self.log.home.has(n) {
                    self.record_home(n);
                }
                if let (Some(q), Some(m)) = (seq, self.marks.get_mut(&self.home_stream)) {
                    m.saw(q);
                }
            }
            (None, Sent::Lounge) => {}
        }
    }

    fn on_message(&mut self, f: &Incoming<'_>) {
        let probe: Option<Probe> = f.body.and_then(|b| serde_json::from_str(b.get()).ok());
        let (Some(stream), Some(probe)) = (f.stream, probe) else {
            self.log.stray += 1;
            return;
        };
        if stream == self.my_stream {
            if let (Some(q), Some(m)) = (f.seq, self.marks.get_mut(stream)) {
                m.saw(q);
            }
            if probe.p as usize == self.user {
                if self.log.direct.record(probe.n) == Arrival::New {
                    self.shared.received.fetch_add(1, Ordering::Relaxed);
                }
            } else if probe.p as usize >= self.shared.users {
                self.log.stray += 1;
            }
            // Otherwise: the copy of a message this user sent, for its other devices.
            return;
        }
        if stream == self.home_stream {
            if let (Some(q), Some(m)) = (f.seq, self.marks.get_mut(stream)) {
                m.saw(q);
            }
            self.record_home(probe.n);
            return;
        }
        let lounge = stream.strip_prefix("room:").and_then(|r| self.shared.lounge_index(r));
        match lounge {
            Some(l) if self.lounge.is_some_and(|(room, _)| room == l) => self.log.lounge_deliveries += 1,
            Some(l) if self.left_lounges.contains(&l) => self.log.after_leave += 1,
            _ => self.log.stray += 1,
        }
    }

    fn record_home(&mut self, n: u64) {
        if self.log.home.record(n) == Arrival::New {
            self.shared.received.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn exp_us(&mut self, mean_us: u64) -> u64 {
        if mean_us == u64::MAX {
            return u64::MAX / 4;
        }
        let u = self.rng.f64().max(1e-12);
        (-(u.ln()) * mean_us as f64) as u64
    }
}

/// Command ids of lounge joins and leaves carry a bit, so their answers are told apart.
const JOIN_BIT: u64 = 1 << 50;
const LEAVE_BIT: u64 = 1 << 51;

fn code_of(f: &Incoming<'_>) -> String {
    f.code.and_then(|c| serde_json::from_str::<String>(c.get()).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_holds_only_gapless_seqs() {
        let mut m = Watermark::starting_at(10);
        m.saw(12);
        m.saw(13);
        assert_eq!(m.upto(), 10, "11 is missing");
        m.saw(11);
        assert_eq!(m.upto(), 13);
        m.saw(5);
        assert_eq!(m.upto(), 13);
        m.saw(20);
        m.truncated();
        m.saw(19);
        assert_eq!(m.upto(), 20, "after a truncated catch-up, 14..18 are gone for good");
        m.saw(21);
        assert_eq!(m.upto(), 21);
    }
}
