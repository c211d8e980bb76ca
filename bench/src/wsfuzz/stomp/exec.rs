//! Running STOMP cases: the session (opened by `handshake`), the case's messages written at a
//! pace under the node's rate limit, the wait for what is owed, and the oracle's verdict as a
//! [`Record`].
//!
//! Pacing: the node's limiter is asked once per frame and once per message that completes none,
//! with a burst of twice `--rate-limit`. A session mirrors it with a bucket that fills slower and
//! holds less, so that no case but a flood meets the limit and every answer can be predicted.

use std::fmt::Write as _;
use std::time::Duration;

use fastrand::Rng;
use tokio::time::Instant;

use super::cases::{Case, Msg, Step};
use super::decoder::Pending;
use super::frame::{Frame, Read, ServerReader};
use super::model::{End, Phase, Prediction, View, predict};
use super::oracle::{Event, Oracle, Verdict, judge};
use crate::wsfuzz::conn::Session;
use crate::wsfuzz::exec::{Record, Settings, Target, escape};
use crate::wsfuzz::frame::ServerFrame as WsFrame;
use crate::wsfuzz::json::Names;
use crate::wsfuzz::oracle::Event as WsEvent;

/// A mirror of the node's rate limiter, kept on the safe side.
struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// For a node with `--rate-limit per_sec` (0: off).
    fn new(per_sec: u32) -> Option<Bucket> {
        (per_sec > 0).then(|| {
            let n = f64::from(per_sec);
            let cap = (2.0 * n - 20.0).max(1.0);
            Bucket { rate: 0.8 * n, cap, tokens: cap, at: Instant::now() }
        })
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.cap);
        self.at = now;
    }

    /// Whether `n` checks fit now.
    fn fits(&mut self, n: usize) -> bool {
        self.refill();
        self.tokens >= (n as f64).min(self.cap)
    }

    fn wait_for(&mut self, n: usize) -> Duration {
        self.refill();
        Duration::from_secs_f64(((n as f64).min(self.cap) - self.tokens).max(0.0) / self.rate)
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// A STOMP session over a raw connection: the WebSocket events read as STOMP.
pub struct StompSession {
    ws: Session,
    reader: ServerReader,
    /// A server frame broke STOMP: the rest of the stream is not read.
    broken: bool,
    pub view: View,
    bucket: Option<Bucket>,
}

impl StompSession {
    pub(super) fn new(ws: Session, user: &str, rate_limit: u32) -> Self {
        StompSession {
            ws,
            reader: ServerReader::default(),
            broken: false,
            view: View::new(user),
            bucket: Bucket::new(rate_limit),
        }
    }

    /// The next events, or none at the deadline (`false`).
    pub(super) async fn pump(&mut self, events: &mut Vec<Event>, deadline: Instant) -> bool {
        match self.ws.next_event(deadline).await {
            Some(e) => {
                self.take(e, events).await;
                true
            }
            None => false,
        }
    }

    async fn drain(&mut self, events: &mut Vec<Event>) {
        while let Some(e) = self.ws.try_event() {
            self.take(e, events).await;
        }
    }

    /// Turns a WebSocket event into STOMP events, answering a close frame with ours.
    async fn take(&mut self, e: WsEvent, events: &mut Vec<Event>) {
        match e {
            WsEvent::Frame(WsFrame::Text(t)) => self.feed(t.as_bytes(), events),
            WsEvent::Frame(WsFrame::Binary(b)) => self.feed(&b, events),
            WsEvent::Frame(WsFrame::Ping(_) | WsFrame::Pong(_)) => {}
            WsEvent::Frame(WsFrame::Close(code, _)) => {
                self.ws.answer_close(code).await;
                events.push(Event::Close(code));
            }
            WsEvent::Bad(why) => events.push(Event::WsBad(why)),
            WsEvent::Eof => events.push(Event::Eof),
            WsEvent::Error(e) => events.push(Event::Error(e)),
        }
    }

    fn feed(&mut self, bytes: &[u8], events: &mut Vec<Event>) {
        if self.broken {
            return;
        }
        self.reader.push(bytes);
        loop {
            match self.reader.next() {
                Ok(Some(Read::Frame(f))) => events.push(Event::Frame(f)),
                Ok(Some(Read::HeartBeat)) => events.push(Event::HeartBeat),
                Ok(None) => return,
                Err(why) => {
                    let at = escape(self.reader.pending(), 80);
                    events.push(Event::Bad(format!("{why} (at: {at})")));
                    self.broken = true;
                    return;
                }
            }
        }
    }

    /// Writes messages whose rate-limiter checks are `costs`, waiting for the bucket when it is
    /// short (the messages then go out in several writes). Stops when the server has ended.
    pub(super) async fn write_paced(
        &mut self,
        msgs: &[Msg],
        costs: &[usize],
        events: &mut Vec<Event>,
    ) -> Result<(), String> {
        let mut buf = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let cost = costs.get(i).copied().unwrap_or(1);
            let wait = self.bucket.as_mut().and_then(|b| (!b.fits(cost)).then(|| b.wait_for(cost)));
            if let Some(wait) = wait {
                self.write(&std::mem::take(&mut buf)).await?;
                let until = Instant::now() + wait;
                while self.pump(events, until).await {}
                if server_ended(events) {
                    return Ok(());
                }
            }
            if let Some(b) = &mut self.bucket {
                b.take(cost);
            }
            buf.extend(m.encode());
        }
        self.write(&buf).await
    }

    pub(super) async fn write(&self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(10), self.ws.raw.write(bytes)).await {
            Ok(r) => r,
            Err(_) => Err("stalled: the server stopped reading".into()),
        }
    }

    /// Closes politely (1000) and waits briefly for the server's close.
    pub async fn close(self) {
        self.ws.close().await;
    }
}

/// Reads events until the oracle has seen what `pred` waits for, or `deadline`: whether it has.
pub(super) async fn wait(
    s: &mut StompSession,
    pred: &Prediction,
    flood: bool,
    events: &mut Vec<Event>,
    deadline: Instant,
) -> bool {
    let mut oracle = Oracle::new(pred, flood);
    let mut fed = 0;
    loop {
        for e in &events[fed..] {
            oracle.see(e);
        }
        fed = events.len();
        if oracle.done() {
            return true;
        }
        if !s.pump(events, deadline).await {
            return false;
        }
    }
}

pub(super) fn server_ended(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Close(_) | Event::Eof | Event::Error(_)))
}

pub(super) fn msgs(steps: &[Step]) -> Vec<Msg> {
    steps
        .iter()
        .flat_map(|s| match s {
            Step::Write(m) => m.clone(),
            Step::Pause(_) => Vec::new(),
        })
        .collect()
}

/// The `receipt` of the sentinel that closes case `id`.
pub(super) fn sentinel_receipt(id: &str) -> String {
    format!("~{id}")
}

/// The case's steps, completed so that the oracle can tell when the node is done: a frame left
/// open gets what completes it (its NUL, the rest of its `content-length`; a NUL in its head,
/// which is a fault), and a session that goes on gets a sentinel `UNSUBSCRIBE` of no
/// subscription with a receipt: its answer comes after every other.
pub fn complete(mut steps: Vec<Step>, phase: &Phase, id: &str, max: usize, flood: bool) -> (Vec<Step>, Prediction) {
    let receipt = sentinel_receipt(id);
    loop {
        let pred = predict(phase.clone(), &msgs(&steps), max, flood);
        let End::Open(pending) = pred.end else { return (steps, pred) };
        let extra = match pending {
            Pending::Idle if pred.expected.last().is_some_and(|e| e.receipt.as_deref() == Some(&receipt)) => {
                return (steps, pred);
            }
            Pending::Idle => Frame::new("UNSUBSCRIBE").header("id", "~").header("receipt", &receipt).render(),
            Pending::Cr => b"\n".to_vec(),
            Pending::Command | Pending::Headers | Pending::Body { needed: None } => b"\0".to_vec(),
            Pending::Body { needed: Some(n) } => [vec![b'~'; n.saturating_sub(1)], vec![0]].concat(),
        };
        if steps.len() > 1000 {
            return (steps, pred);
        }
        steps.push(Step::Write(vec![Msg::new(extra, false)]));
    }
}

fn new_record(id: &str, case: &Case) -> Record {
    Record {
        id: id.to_owned(),
        kind: case.kind,
        note: case.note.clone(),
        outcomes: Vec::new(),
        anomalies: Vec::new(),
        known: Vec::new(),
        input: Vec::new(),
        transcript: String::new(),
    }
}

/// Runs a STOMP case on the connection's session (opening one if needed; dropping it when the
/// case ends it), or a handshake case on a connection of its own.
pub async fn run_case(
    settings: &Settings,
    target: &Target,
    names: &Names,
    slot: &mut Option<StompSession>,
    id: &str,
    case: Case,
    rng: &mut Rng,
) -> Record {
    let mut record = new_record(id, &case);
    if let Some(upgrade) = case.upgrade.clone() {
        super::handshake::run(settings, target, names, upgrade, case, &mut record).await;
        return record;
    }
    if slot.is_none() {
        match super::handshake::open(settings, target, &names.me, rng).await {
            Ok(s) => *slot = Some(s),
            Err(e) => {
                record.anomalies.push(format!("a proper STOMP session failed: {e}"));
                record.outcomes.push("upgrade failed".into());
                return record;
            }
        }
    }
    let s = slot.as_mut().expect("opened above");
    let phase = Phase::Session(s.view.clone());
    let (steps, pred) = complete(case.steps, &phase, id, settings.max_message, case.flood);
    let mut events = Vec::new();
    s.drain(&mut events).await;
    let mut write_error = None;
    let mut costs = pred.costs.iter().copied();
    for step in &steps {
        s.drain(&mut events).await;
        match step {
            Step::Pause(d) => {
                let until = Instant::now() + *d;
                while s.pump(&mut events, until).await {}
            }
            Step::Write(msgs) => {
                let c: Vec<usize> = costs.by_ref().take(msgs.len()).collect();
                for m in msgs {
                    record.input.extend(m.encode());
                }
                if server_ended(&events) || write_error.is_some() {
                    continue;
                }
                let written = if case.flood {
                    let bytes: Vec<u8> = msgs.iter().flat_map(Msg::encode).collect();
                    s.write(&bytes).await
                } else {
                    s.write_paced(msgs, &c, &mut events).await
                };
                if let Err(e) = written {
                    write_error = Some(e);
                }
            }
        }
    }
    let deadline = Instant::now() + settings.answer_timeout;
    let timed_out = !wait(s, &pred, case.flood, &mut events, deadline).await;
    let mut v = judge(&pred, &events, case.flood, timed_out);
    if let Some(e) = &write_error
        && e.starts_with("stalled")
    {
        v.anomalies.push(format!("write {e}"));
    }
    record.transcript = transcript(&steps, &pred, &events, write_error.as_deref(), timed_out);
    finish(&mut record, v, slot, pred).await;
    record
}

pub(super) async fn finish(record: &mut Record, v: Verdict, slot: &mut Option<StompSession>, pred: Prediction) {
    record.outcomes.extend(v.outcomes);
    record.anomalies.extend(v.anomalies);
    record.known.extend(v.known);
    if v.over {
        if let Some(s) = slot.take() {
            s.close().await;
        }
    } else if let Some(s) = slot.as_mut() {
        s.view = pred.view;
    }
}

/// Deliveries listed in a transcript at most (the answers always are).
const MAX_LISTED_DELIVERIES: usize = 30;

pub(super) fn transcript(
    steps: &[Step],
    pred: &Prediction,
    events: &[Event],
    write_error: Option<&str>,
    timed_out: bool,
) -> String {
    let mut out = String::from("steps:\n");
    for s in steps {
        let _ = match s {
            Step::Write(msgs) => {
                let mut line = format!("  write {} message(s):", msgs.len());
                for m in msgs.iter().take(40) {
                    let _ = write!(
                        line,
                        " [{}{} {}]",
                        if m.binary { "binary" } else { "text" },
                        if m.fragments > 1 { format!(" in {} fragments", m.fragments) } else { String::new() },
                        escape(&m.payload, 300)
                    );
                }
                if msgs.len() > 40 {
                    let _ = write!(line, " … ({} more)", msgs.len() - 40);
                }
                writeln!(out, "{line}")
            }
            Step::Pause(d) => writeln!(out, "  pause {d:?}"),
        };
    }
    let _ = writeln!(out, "prediction: end {:?}", pred.end);
    for (i, e) in pred.expected.iter().enumerate().take(60) {
        let _ = writeln!(out, "  {}. {} receipt {:?}: {:?}", i + 1, e.what, e.receipt, e.answer);
    }
    if let Some(e) = write_error {
        let _ = writeln!(out, "write error: {e}");
    }
    let _ = writeln!(out, "events{}:", if timed_out { " (timed out)" } else { "" });
    let (mut beats, mut deliveries) = (0, 0);
    for e in events {
        let _ = match e {
            Event::HeartBeat => {
                beats += 1;
                continue;
            }
            Event::Frame(f) if f.command == "MESSAGE" && f.get("destination") != Some(super::model::ERRORS) => {
                deliveries += 1;
                if deliveries > MAX_LISTED_DELIVERIES {
                    continue;
                }
                writeln!(out, "  {} {}", f.summary(), escape(&f.body, 200))
            }
            Event::Frame(f) => writeln!(out, "  {} {}", f.summary(), escape(&f.body, 200)),
            other => writeln!(out, "  {other:?}"),
        };
    }
    if deliveries > MAX_LISTED_DELIVERIES {
        let _ = writeln!(out, "  ({} more deliveries not listed)", deliveries - MAX_LISTED_DELIVERIES);
    }
    if beats > 0 {
        let _ = writeln!(out, "  ({beats} heart-beats)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::stomp::model::Answer;

    fn step(bytes: &[u8]) -> Step {
        Step::Write(vec![Msg::new(bytes.to_vec(), false)])
    }

    #[test]
    fn cases_are_completed_with_what_they_lack_and_a_sentinel() {
        let phase = Phase::Session(View::new("fz-0"));
        let (steps, pred) = complete(vec![step(b"SEND\ndestination:/user/a\n\nx")], &phase, "c0.1", 1000, false);
        assert_eq!(steps.len(), 3, "the NUL, then the sentinel");
        assert_eq!(pred.expected.len(), 2);
        assert_eq!(pred.expected[1].receipt.as_deref(), Some("~c0.1"));
        let (steps, _) = complete(vec![step(b"SEND\ncontent-length:4\n\nx")], &phase, "c0.2", 1000, false);
        assert_eq!(msgs(&steps)[1].payload, b"~~~\0");
        let (steps, pred) = complete(vec![step(b"SEND\na:b")], &phase, "c0.3", 1000, false);
        assert_eq!(
            (steps.len(), &pred.end),
            (2, &End::Malformed(super::super::decoder::Fault::NulInHeaders, vec![1002]))
        );
        let (steps, pred) = complete(vec![step(b"DISCONNECT\n\n\0")], &phase, "c0.4", 1000, false);
        assert_eq!((steps.len(), pred.end), (1, End::Disconnect));
        let (_, pred) = complete(vec![step(b"\r")], &phase, "c0.5", 1000, true);
        assert_eq!(pred.expected[0].answer, Answer::ReceiptOrRateLimited(super::super::model::Kind::Plain));
    }

    #[test]
    fn the_bucket_stays_under_the_node_limit() {
        let mut b = Bucket::new(100).unwrap();
        assert!(b.fits(180), "a burst of twice the rate, less a margin");
        b.take(180);
        assert!(!b.fits(1));
        assert!(b.wait_for(8) <= Duration::from_millis(101) && b.wait_for(8) >= Duration::from_millis(99));
        assert!(Bucket::new(0).is_none());
    }
}
