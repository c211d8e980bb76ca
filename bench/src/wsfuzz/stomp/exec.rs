//! Running STOMP cases: the session (an upgrade on `/stomp` or `/ws` with a STOMP subprotocol,
//! `CONNECT`, `CONNECTED`), the case's messages written at a pace under the node's rate limit,
//! the wait for what is owed, and the oracle's verdict as a [`Record`].
//!
//! Pacing: the node's limiter is asked once per frame and once per message that completes none,
//! with a burst of twice `--rate-limit`. A session mirrors it with a bucket that fills slower and
//! holds less, so that no case but a flood meets the limit and every answer can be predicted.

use std::fmt::Write as _;
use std::time::Duration;

use fastrand::Rng;
use tokio::time::Instant;

use super::cases::{Case, Msg, Step, Upgrade};
use super::frame::{Frame, Read, ServerReader};
use super::model::{Dest, End, Pending, Phase, Prediction, View, predict};
use super::oracle::{Event, Oracle, Verdict, judge};
use crate::wsfuzz::conn::{Raw, Session};
use crate::wsfuzz::exec::{Record, Settings, Target, escape};
use crate::wsfuzz::frame::ServerFrame as WsFrame;
use crate::wsfuzz::json::Names;
use crate::wsfuzz::oracle::Event as WsEvent;
use crate::wsfuzz::upgrade::{self, accept_for, random_key};

/// How long the frames sent with `CONNECT` in one message may wait for their answers before
/// the client sends anything else.
const PIPELINE_WAIT: Duration = Duration::from_secs(2);

/// `run_handshake` finds that frames sent behind `CONNECT` in its message are not read until
/// the client sends another message.
const KNOWN_PIPELINE: &str = "KNOWN: frames sent behind CONNECT in the same WebSocket message get no answer until the client sends another message";

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
    fn new(ws: Session, user: &str, rate_limit: u32) -> Self {
        StompSession {
            ws,
            reader: ServerReader::default(),
            broken: false,
            view: View::new(user),
            bucket: Bucket::new(rate_limit),
        }
    }

    /// The next events, or none at the deadline (`false`).
    async fn pump(&mut self, events: &mut Vec<Event>, deadline: Instant) -> bool {
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
    async fn write_paced(&mut self, msgs: &[Msg], costs: &[usize], events: &mut Vec<Event>) -> Result<(), String> {
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

    async fn write(&self, bytes: &[u8]) -> Result<(), String> {
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
async fn wait(
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

fn server_ended(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Close(_) | Event::Eof | Event::Error(_)))
}

/// The upgrade request of a client that speaks STOMP.
fn request(host: &str, target: &str, protocols: Option<&str>, key: &str) -> Vec<u8> {
    let mut out = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocols {
        let _ = write!(out, "Sec-WebSocket-Protocol: {p}\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Upgrades, sends `CONNECT` and waits for `CONNECTED`; then, most of the time, subscribes to
/// the error queue. Each choice is one a proper client may make.
pub async fn open(settings: &Settings, target: &Target, me: &str, rng: &mut Rng) -> Result<StompSession, String> {
    let (path, protocols, login) = match rng.u8(..4) {
        0 => ("/stomp".to_owned(), None, true),
        1 => (format!("/stomp?user={me}&device=fz"), None, false),
        2 => (format!("/ws?user={me}"), Some("v12.stomp"), false),
        _ => ("/ws".to_owned(), Some("v10.stomp, v12.stomp"), true),
    };
    let key = random_key(rng);
    let raw = Raw::connect(target.addr, settings.answer_timeout).await?;
    raw.write(&request(&target.host, &path, protocols, &key)).await.map_err(|e| format!("writing the upgrade: {e}"))?;
    let (head, rest) = match raw.read_head(settings.answer_timeout).await {
        Ok(Some(got)) => got,
        Ok(None) => return Err(format!("{path}: connection closed before an HTTP response")),
        Err(e) => return Err(format!("{path}: reading the upgrade response: {e}")),
    };
    if head.status != 101 {
        return Err(format!("{path}: HTTP {} to a proper STOMP upgrade", head.status));
    }
    if head.header("sec-websocket-accept") != Some(accept_for(&key).as_str()) {
        return Err(format!("{path}: wrong Sec-WebSocket-Accept"));
    }
    let echoed = head.header("sec-websocket-protocol");
    if echoed != protocols.map(|_| "v12.stomp") {
        return Err(format!("{path} offering {protocols:?}: Sec-WebSocket-Protocol {echoed:?}"));
    }
    let mut s = StompSession::new(Session::start(raw, rest, me), me, settings.rate_limit);
    let mut connect = Frame::new(if rng.u8(..4) == 0 { "STOMP" } else { "CONNECT" });
    if login {
        connect = connect.header("login", me);
    }
    if let Some(v) = [None, Some("1.2"), Some("1.0,1.1,1.2")][rng.usize(..3)] {
        connect = connect.header("accept-version", v);
    }
    if let Some(b) = [None, Some("0,0"), Some("1000,1000")][rng.usize(..3)] {
        connect = connect.header("heart-beat", b);
    }
    let msgs = [Msg::new(connect.render(), rng.u8(..4) == 0)];
    let pred =
        predict(Phase::Connect { upgrade_user: (!login).then(|| me.to_owned()) }, &msgs, settings.max_message, false);
    s.write(&msgs[0].encode()).await?;
    let mut events = Vec::new();
    let deadline = Instant::now() + settings.answer_timeout;
    let finished = wait(&mut s, &pred, false, &mut events, deadline).await;
    let v = judge(&pred, &events, false, !finished);
    if !v.anomalies.is_empty() || v.over {
        return Err(format!("{path}: {} got {}", connect.command, v.anomalies.join("; ")));
    }
    if rng.u8(..4) != 0 {
        let id = format!("s-{}", super::model::ERRORS);
        let sub = Frame::new("SUBSCRIBE")
            .header("id", &id)
            .header("destination", super::model::ERRORS)
            .header("receipt", "~open");
        let msgs = [Msg::new(sub.render(), false)];
        let pred = predict(Phase::Session(s.view.clone()), &msgs, settings.max_message, false);
        let mut events = Vec::new();
        s.write_paced(&msgs, &pred.costs, &mut events).await?;
        let finished = wait(&mut s, &pred, false, &mut events, deadline).await;
        let v = judge(&pred, &events, false, !finished);
        if !v.anomalies.is_empty() || v.over {
            return Err(format!("SUBSCRIBE {}: {}", super::model::ERRORS, v.anomalies.join("; ")));
        }
        s.view = pred.view;
        debug_assert!(s.view.subs.contains_key(&Dest::Errors));
    }
    Ok(s)
}

fn msgs(steps: &[Step]) -> Vec<Msg> {
    steps
        .iter()
        .flat_map(|s| match s {
            Step::Write(m) => m.clone(),
            Step::Pause(_) => Vec::new(),
        })
        .collect()
}

/// The `receipt` of the sentinel that closes case `id`.
fn sentinel_receipt(id: &str) -> String {
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
        run_handshake(settings, target, names, upgrade, case, &mut record).await;
        return record;
    }
    if slot.is_none() {
        match open(settings, target, &names.me, rng).await {
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

async fn finish(record: &mut Record, v: Verdict, slot: &mut Option<StompSession>, pred: Prediction) {
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

/// A handshake case: its upgrade on a connection of its own, the first flight (`CONNECT` and
/// whatever is pipelined behind it) and the answers to all of it before the client sends
/// anything else, then `DISCONNECT`.
async fn run_handshake(
    settings: &Settings,
    target: &Target,
    names: &Names,
    upgrade: Upgrade,
    case: Case,
    record: &mut Record,
) {
    let key = random_key(&mut Rng::new());
    let req = request(&target.host, &upgrade.target, upgrade.protocols.as_deref(), &key);
    record.input = req.clone();
    let mut log = format!("request:\n{}\n", escape(&req, 600));
    let raw = match Raw::connect(target.addr, settings.answer_timeout).await {
        Ok(raw) => raw,
        Err(e) => {
            record.anomalies.push(format!("could not connect: {e}"));
            record.transcript = log;
            return;
        }
    };
    if let Err(e) = raw.write(&req).await {
        record.anomalies.push(format!("writing the upgrade: {e}"));
        record.transcript = log;
        return;
    }
    let (head, rest) = match raw.read_head(settings.answer_timeout).await {
        Ok(Some(got)) => got,
        other => {
            record.anomalies.push(format!("no HTTP response to a STOMP upgrade: {other:?}"));
            record.transcript = log;
            return;
        }
    };
    let _ = writeln!(log, "HTTP {} {:?}", head.status, head.headers);
    record.outcomes.push(format!("http {}", head.status));
    if head.status != upgrade.status {
        record.anomalies.push(format!("HTTP {} to {} (owed {})", head.status, upgrade.target, upgrade.status));
    }
    if head.status != 101 {
        let len = head.header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let body = raw.read_body(rest, len, Duration::from_secs(2)).await;
        record.anomalies.extend(upgrade::check_error_body(head.status, head.header("content-type"), &body));
        record.transcript = log;
        return;
    }
    if head.header("sec-websocket-accept") != Some(accept_for(&key).as_str()) {
        record.anomalies.push("wrong Sec-WebSocket-Accept".into());
    }
    if head.header("sec-websocket-protocol") != upgrade.echo {
        record.anomalies.push(format!(
            "Sec-WebSocket-Protocol {:?} in answer to {:?} (owed {:?})",
            head.header("sec-websocket-protocol"),
            upgrade.protocols,
            upgrade.echo
        ));
    }
    let mut s = StompSession::new(Session::start(raw, rest, &names.me), &names.me, settings.rate_limit);
    let phase = Phase::Connect { upgrade_user: upgrade.user.clone() };
    // The first flight, completed if a frame is left open, but with no sentinel: its answers
    // must come without anything sent after it.
    let mut steps = case.steps;
    let mut pred = predict(phase.clone(), &msgs(&steps), settings.max_message, false);
    while let End::Open(pending @ (Pending::Cr | Pending::Command | Pending::Headers | Pending::Body { .. })) = pred.end
    {
        let extra = match pending {
            Pending::Cr => b"\n".to_vec(),
            Pending::Body { needed: Some(n) } => [vec![b'~'; n.saturating_sub(1)], vec![0]].concat(),
            _ => b"\0".to_vec(),
        };
        steps.push(Step::Write(vec![Msg::new(extra, false)]));
        pred = predict(phase.clone(), &msgs(&steps), settings.max_message, false);
    }
    let mut events = Vec::new();
    let first = msgs(&steps);
    let bytes: Vec<u8> = first.iter().flat_map(Msg::encode).collect();
    record.input.extend(&bytes);
    let mut write_error = s.write_paced(&first, &pred.costs, &mut events).await.err();
    let until = Instant::now() + PIPELINE_WAIT.min(settings.answer_timeout);
    let answered_in_time = wait(&mut s, &pred, false, &mut events, until).await;
    let mut stalled = None;
    if !answered_in_time && !pred.before_connect && matches!(pred.end, End::Open(_)) {
        let n = pred.expected.iter().filter(|e| !e.silent()).count();
        stalled = Some(format!(
            "{} of the {n} answers owed to the frames sent with CONNECT had not come {} s later",
            n - answered(&pred, &events),
            PIPELINE_WAIT.as_secs()
        ));
    }
    // Then DISCONNECT, whose RECEIPT must come after everything else, and the close.
    if matches!(pred.end, End::Open(_)) && !pred.before_connect && !server_ended(&events) {
        let bye = Frame::new("DISCONNECT").header("receipt", &sentinel_receipt(&record.id)).render();
        steps.push(Step::Write(vec![Msg::new(bye, false)]));
        pred = predict(phase, &msgs(&steps), settings.max_message, false);
        if let Some(Step::Write(m)) = steps.last() {
            let bytes = m[0].encode();
            record.input.extend(&bytes);
            if write_error.is_none() {
                write_error = s.write_paced(m, &[1], &mut events).await.err();
            }
        }
    }
    let mut deadline = Instant::now() + settings.answer_timeout;
    if pred.end == End::NoConnect {
        deadline += settings.handshake_timeout;
        record.outcomes.push("stomp no CONNECT".into());
    }
    let timed_out = !wait(&mut s, &pred, false, &mut events, deadline).await;
    let mut v = judge(&pred, &events, false, timed_out);
    if let Some(stalled) = &stalled {
        if v.anomalies.is_empty() && !timed_out {
            v.known.push(KNOWN_PIPELINE.into());
        } else {
            v.anomalies.push(stalled.clone());
        }
        let _ = writeln!(log, "{stalled}");
    }
    log.push_str(&transcript(&steps, &pred, &events, write_error.as_deref(), timed_out));
    record.transcript = log;
    let mut slot = Some(s);
    v.over = true;
    finish(record, v, &mut slot, pred).await;
}

/// How many answers owed have come (RECEIPTs, refusals, CONNECTED).
fn answered(pred: &Prediction, events: &[Event]) -> usize {
    let owed = pred.expected.iter().filter(|e| !e.silent()).count();
    let got = events
        .iter()
        .filter(|e| match e {
            Event::Frame(f) => {
                matches!(f.command.as_str(), "RECEIPT" | "CONNECTED" | "ERROR")
                    || f.get("destination") == Some(super::model::ERRORS)
            }
            _ => false,
        })
        .count();
    got.min(owed)
}

/// Deliveries listed in a transcript at most (the answers always are).
const MAX_LISTED_DELIVERIES: usize = 30;

fn transcript(
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
            (2, &End::Malformed(super::super::model::Fault::NulInHeaders, vec![1002]))
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
