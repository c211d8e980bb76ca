//! Running one case: the session it needs, its steps, the wait for what is owed, and the
//! oracle's verdict, kept as a [`Record`] (with the exact bytes sent, for the anomaly report).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use fastrand::Rng;
use tokio::time::Instant;

use super::cases::{Case, Kind, Step};
use super::conn::{Raw, Session};
use super::frame::{FrameSpec, OP_CONTINUATION, OP_TEXT, ServerFrame};
use super::json::Names;
use super::model::{End, Prediction, predict};
use super::oracle::{ClientEnd, Event, Out, classify, done, judge};
use super::upgrade::{self, Delivery, Expect, Request};

/// One node to fuzz.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub host: String,
}

/// Settings every case shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_message: usize,
    pub answer_timeout: Duration,
    pub handshake_timeout: Duration,
    /// The nodes' `--rate-limit` (STOMP sessions pace themselves under it; 0: off).
    pub rate_limit: u32,
}

/// One case as run: what was sent, what came back, and the verdict.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: String,
    pub kind: Kind,
    pub note: String,
    pub outcomes: Vec<String>,
    pub anomalies: Vec<String>,
    /// Deviations tolerated as known server bugs (`KNOWN: …`), to be removed once fixed.
    pub known: Vec<String>,
    /// The bytes written (after the upgrade for WebSocket cases; the request for HTTP ones).
    pub input: Vec<u8>,
    pub transcript: String,
}

/// The seed of case `n` of connection `conn`: cases can be run again one by one.
pub fn case_seed(seed: u64, conn: usize, n: u64) -> u64 {
    splitmix(seed ^ splitmix((conn as u64) << 32 ^ n))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Runs `case` on the connection's session (opening one if needed; dropping it when the case
/// ends it).
pub async fn run_case(
    settings: &Settings,
    target: &Target,
    names: &Names,
    slot: &mut Option<Session>,
    id: &str,
    case: Case,
    rng: &mut Rng,
) -> Record {
    let mut record = Record {
        id: id.to_owned(),
        kind: case.kind,
        note: case.note.clone(),
        outcomes: Vec::new(),
        anomalies: Vec::new(),
        known: Vec::new(),
        input: Vec::new(),
        transcript: String::new(),
    };
    if let Some(req) = case.http {
        run_http(settings, target, req, &mut record).await;
        return record;
    }
    if slot.is_none() {
        let key = upgrade::random_key(rng);
        match Session::open(target.addr, &target.host, &names.me, &key, settings.answer_timeout).await {
            Ok(s) => *slot = Some(s),
            Err(e) => {
                record.anomalies.push(format!("a proper upgrade failed: {e}"));
                record.outcomes.push("upgrade failed".into());
                return record;
            }
        }
    }
    let session = slot.as_mut().expect("opened above");
    let (steps, pred) = complete_steps(case.steps, id, settings.max_message);
    record.input = written(&steps);
    let client = match steps.last() {
        Some(Step::Fin) => ClientEnd::Fin,
        Some(Step::Reset) => ClientEnd::Reset,
        _ => ClientEnd::Open,
    };
    let mut events = Vec::new();
    let mut write_error = None;
    let mut stopped = false;
    for step in &steps {
        while let Some(e) = session.try_event() {
            take(session, &mut events, e).await;
        }
        stopped |= server_ended(&events);
        match step {
            Step::Write(b) | Step::Trickle(b) if !stopped && write_error.is_none() => {
                let write = async {
                    match step {
                        Step::Trickle(_) => session.raw.trickle(b).await,
                        _ => session.raw.write(b).await,
                    }
                };
                match tokio::time::timeout(settings.answer_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => write_error = Some(e),
                    Err(_) => write_error = Some("stalled: the server stopped reading".into()),
                }
            }
            Step::Write(_) | Step::Trickle(_) => {}
            Step::Pause(d) => {
                let until = Instant::now() + *d;
                while let Some(e) = session.next_event(until).await {
                    take(session, &mut events, e).await;
                }
            }
            Step::Fin => session.raw.fin(),
            Step::Reset => session.raw.arm_reset(),
        }
    }
    // Our own close frame went out: nothing more may follow it, not even an answer to theirs.
    session.close_sent |= matches!(pred.end, End::ClientClose(_));
    let mut timed_out = false;
    if client != ClientEnd::Reset {
        let deadline = Instant::now() + settings.answer_timeout;
        while !done(&pred, &events, client) {
            match session.next_event(deadline).await {
                Some(e) => take(session, &mut events, e).await,
                None => {
                    timed_out = true;
                    break;
                }
            }
        }
    }
    let mut verdict = judge(&pred, &events, client, timed_out, &mut session.view);
    if let Some(e) = &write_error
        && e.starts_with("stalled")
    {
        verdict.anomalies.push(format!("write {e}"));
    }
    if verdict.over {
        *slot = None;
    }
    record.outcomes = verdict.outcomes;
    record.anomalies = verdict.anomalies;
    record.transcript = transcript(&steps, &pred, &events, write_error.as_deref(), timed_out);
    record
}

/// Takes an event in, answering a close frame from the server with ours.
async fn take(session: &mut Session, events: &mut Vec<Event>, e: Event) {
    if let Event::Frame(ServerFrame::Close(code, _)) = &e {
        session.answer_close(*code).await;
    }
    events.push(e);
}

fn server_ended(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Eof | Event::Error(_) | Event::Bad(_) | Event::Frame(ServerFrame::Close(..))))
}

/// The case's steps, completed so that the oracle can tell when the server is done: a message
/// left open gets its final fragment, a session that goes on gets a sentinel `ping` whose reply
/// marks the end of what the case is owed, and a frame cut short gets a stall and the client's
/// FIN.
pub fn complete_steps(mut steps: Vec<Step>, id: &str, max: usize) -> (Vec<Step>, Prediction) {
    let mut pred = predict(&written(&steps), max);
    if matches!(steps.last(), Some(Step::Fin | Step::Reset)) {
        return (steps, pred);
    }
    if pred.end == End::OpenFragment {
        steps.push(Step::Write(FrameSpec::new(OP_CONTINUATION, Vec::new(), [1, 2, 3, 4]).encode()));
        pred = predict(&written(&steps), max);
    }
    match pred.end {
        End::Open => {
            let sentinel = format!(r#"{{"type":"ping","id":"~{id}"}}"#);
            steps.push(Step::Write(FrameSpec::new(OP_TEXT, sentinel.into_bytes(), [0x0F, 0xF0, 0x55, 0xAA]).encode()));
            pred = predict(&written(&steps), max);
        }
        End::Partial { .. } => {
            steps.push(Step::Pause(Duration::from_millis(300)));
            steps.push(Step::Fin);
        }
        _ => {}
    }
    (steps, pred)
}

pub fn written(steps: &[Step]) -> Vec<u8> {
    steps
        .iter()
        .flat_map(|s| match s {
            Step::Write(b) | Step::Trickle(b) => b.as_slice(),
            _ => &[],
        })
        .copied()
        .collect()
}

async fn run_http(settings: &Settings, target: &Target, req: Request, record: &mut Record) {
    record.input = req.bytes.clone();
    let mut log = format!("request ({:?}, expect {:?}):\n{}\n", req.delivery, req.expect, escape(&req.bytes, 2000));
    let raw = match Raw::connect(target.addr, settings.answer_timeout).await {
        Ok(raw) => raw,
        Err(e) => {
            record.anomalies.push(format!("could not connect: {e}"));
            record.transcript = log;
            return;
        }
    };
    let sent = match req.delivery {
        Delivery::Whole | Delivery::HalfThenWait => raw.write(&req.bytes).await,
        Delivery::Trickle => raw.trickle(&req.bytes).await,
        Delivery::HalfThenFin => {
            let r = raw.write(&req.bytes).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            raw.fin();
            r
        }
    };
    if let Err(e) = &sent {
        let _ = writeln!(log, "write: {e}");
    }
    let wait = if req.expect == Expect::TimeoutDrop {
        settings.handshake_timeout + Duration::from_secs(3)
    } else {
        settings.answer_timeout
    };
    let head = raw.read_head(wait).await;
    let drop_ok = matches!(req.expect, Expect::RefuseOrDrop | Expect::TimeoutDrop);
    match head {
        Ok(None) => {
            let _ = writeln!(log, "closed without a response");
            if drop_ok {
                record.outcomes.push("http dropped".into());
            } else {
                record.anomalies.push(format!("connection closed without an HTTP response ({})", req.note));
            }
        }
        Err(e) if e == "connection reset" && drop_ok => {
            let _ = writeln!(log, "reset without a response");
            record.outcomes.push("http reset".into());
        }
        Err(e) if e == "timeout" => {
            let _ = writeln!(log, "no response within {wait:?}");
            record.anomalies.push(if req.expect == Expect::TimeoutDrop {
                format!("connection still open {}s after the handshake timeout", wait.as_secs())
            } else {
                format!("no HTTP response within {wait:?} ({})", req.note)
            });
        }
        Err(e) => {
            let _ = writeln!(log, "response: {e}");
            record.anomalies.push(format!("bad HTTP response: {e} ({})", req.note));
        }
        Ok(Some((head, rest))) => {
            let _ = writeln!(log, "HTTP {} {:?}", head.status, head.headers);
            record.outcomes.push(format!("http {}", head.status));
            match head.status {
                101 => {
                    if matches!(req.expect, Expect::Refuse | Expect::RefuseOrDrop | Expect::TimeoutDrop) {
                        record.anomalies.push(format!("101 to a request that RFC 6455 §4.2.1 refuses: {}", req.note));
                    }
                    record.anomalies.extend(upgrade::check_switching(&head, &req));
                    after_switching(settings, raw, rest, &req, record, &mut log).await;
                }
                400..=499 | 503 | 505 => {
                    if req.expect == Expect::Upgrade {
                        record.anomalies.push(format!("HTTP {} to a proper upgrade ({})", head.status, req.note));
                    }
                    let len = head.header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    let body = raw.read_body(rest, len, Duration::from_secs(2)).await;
                    let _ = writeln!(log, "body: {}", escape(&body, 500));
                    if let Some(wrong) = upgrade::check_error_body(head.status, head.header("content-type"), &body) {
                        record.anomalies.push(wrong);
                    }
                    if req.other_version && head.header("sec-websocket-version").map(str::trim) != Some("13") {
                        record.anomalies.push(format!(
                            "HTTP {} to {} without Sec-WebSocket-Version: 13 (RFC 6455 §4.4)",
                            head.status, req.note
                        ));
                    }
                    if head.status == 503 || (head.status == 505 && req.expect != Expect::RefuseOrDrop) {
                        record.anomalies.push(format!("HTTP {} ({})", head.status, req.note));
                    }
                }
                other => record.anomalies.push(format!("HTTP {other} to an upgrade request ({})", req.note)),
            }
        }
    }
    record.transcript = log;
}

/// After a `101`: the `welcome`, the reply to a pipelined command, and a clean close.
async fn after_switching(
    settings: &Settings,
    raw: Raw,
    rest: Vec<u8>,
    req: &Request,
    record: &mut Record,
    log: &mut String,
) {
    let mut session = Session::start(raw, rest, &req.user);
    if let Err(e) = session.welcome(&req.user, settings.answer_timeout).await {
        record.anomalies.push(format!("after 101: {e}"));
        return;
    }
    if let Some(id) = &req.pipelined {
        let deadline = Instant::now() + settings.answer_timeout;
        let answered = loop {
            match session.next_event(deadline).await {
                Some(Event::Frame(ServerFrame::Text(t))) => {
                    let _ = writeln!(log, "< {}", escape(t.as_bytes(), 300));
                    if matches!(classify(&t), Ok(Out::Reply { id: got, .. }) if &got == id) {
                        break true;
                    }
                }
                Some(other) => {
                    let _ = writeln!(log, "< {other:?}");
                    if matches!(other, Event::Eof | Event::Error(_)) {
                        break false;
                    }
                }
                None => break false,
            }
        };
        if !answered {
            record.anomalies.push("no reply to the command sent right behind the upgrade request".into());
        }
    }
    session.answer_close(Some(1000)).await;
    let deadline = Instant::now() + settings.answer_timeout;
    let mut echoed = None;
    loop {
        match session.next_event(deadline).await {
            Some(Event::Frame(ServerFrame::Close(code, _))) => echoed = Some(code),
            Some(Event::Eof | Event::Error(_)) => break,
            Some(Event::Bad(why)) => record.anomalies.push(format!("malformed server frame: {why}")),
            Some(_) => {}
            None => {
                record.anomalies.push("no TCP close after the close handshake".into());
                break;
            }
        }
    }
    match echoed {
        Some(Some(1000) | None) => record.outcomes.push("echo close 1000".into()),
        Some(Some(c)) => record.anomalies.push(format!("close {c} in answer to our close 1000")),
        None => record.anomalies.push("no close frame in answer to ours".into()),
    }
}

/// Bytes as text with everything but printable ASCII escaped, cut at `max`.
pub fn escape(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7E => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if bytes.len() > max {
        let _ = write!(out, "… ({} bytes)", bytes.len());
    }
    out
}

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
            Step::Write(b) => writeln!(out, "  write {} bytes: {}", b.len(), escape(b, 400)),
            Step::Trickle(b) => writeln!(out, "  trickle {} bytes: {}", b.len(), escape(b, 400)),
            Step::Pause(d) => writeln!(out, "  pause {d:?}"),
            Step::Fin => writeln!(out, "  fin"),
            Step::Reset => writeln!(out, "  reset"),
        };
    }
    let owed = pred.owed.len();
    let _ = writeln!(
        out,
        "prediction: end {:?}, {} owed (answers {:?}), {} messages, lenient {:?}",
        pred.end,
        owed,
        pred.answer_ids().0,
        pred.messages,
        pred.lenient
    );
    if let Some(e) = write_error {
        let _ = writeln!(out, "write error: {e}");
    }
    let _ = writeln!(out, "events{}:", if timed_out { " (timed out)" } else { "" });
    for e in events {
        let _ = match e {
            Event::Frame(ServerFrame::Text(t)) => writeln!(out, "  text {}", escape(t.as_bytes(), 400)),
            Event::Frame(ServerFrame::Ping(p)) => writeln!(out, "  ping {}", escape(p, 40)),
            Event::Frame(ServerFrame::Pong(p)) => writeln!(out, "  pong {}", escape(p, 40)),
            other => writeln!(out, "  {other:?}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_completed_for_the_oracle() {
        let text = |s: &str| FrameSpec::new(OP_TEXT, s.as_bytes().to_vec(), [1, 1, 1, 1]);
        let (steps, pred) = complete_steps(vec![Step::Write(text(r#"{"id":1}"#).encode())], "c0.1", 100);
        assert_eq!(steps.len(), 2, "a sentinel");
        assert_eq!(pred.answer_ids().0, vec!["1", "\"~c0.1\""]);
        let open = text("{\"id\":2").fin(false).encode();
        let (steps, pred) = complete_steps(vec![Step::Write(open)], "c0.2", 100);
        assert_eq!(steps.len(), 3, "a final fragment, then a sentinel");
        assert_eq!(pred.end, End::Open);
        let cut = text("{}").encode()[..3].to_vec();
        let (steps, _) = complete_steps(vec![Step::Write(cut)], "c0.3", 100);
        assert!(matches!(steps[..], [_, Step::Pause(_), Step::Fin]));
        let bad = text("\u{0}").encode();
        let mut unmasked = bad.clone();
        unmasked[1] &= 0x7F;
        let (steps, pred) = complete_steps(vec![Step::Write(unmasked)], "c0.4", 100);
        assert_eq!((steps.len(), pred.end), (1, End::Close(vec![1002])), "nothing after a fatal frame");
    }

    #[test]
    fn case_seeds_differ_by_connection_and_number() {
        let seeds: std::collections::HashSet<u64> =
            (0..50).flat_map(|c| (0..50).map(move |n| case_seed(7, c, n))).collect();
        assert_eq!(seeds.len(), 2500);
        assert_eq!(case_seed(7, 3, 9), case_seed(7, 3, 9));
    }

    #[test]
    fn escapes_bytes() {
        assert_eq!(escape(b"a\r\n\xff", 10), "a\\r\\n\\xff");
        assert_eq!(escape(b"abcdef", 3), "abc… (6 bytes)");
    }
}
