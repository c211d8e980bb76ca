//! The STOMP handshake: the upgrade (`/stomp`, or `/ws` offering a STOMP subprotocol), `CONNECT`
//! and `CONNECTED`, for the session a fuzzing connection keeps, and the handshake cases, each on a
//! connection of its own.

use std::fmt::Write as _;
use std::time::Duration;

use fastrand::Rng;
use tokio::time::Instant;

use super::cases::{Case, Msg, Step, Upgrade};
use super::decoder::Pending;
use super::exec::{StompSession, finish, msgs, sentinel_receipt, server_ended, transcript, wait};
use super::frame::Frame;
use super::model::{Dest, End, Phase, Prediction, predict};
use super::oracle::{Event, judge};
use crate::wsfuzz::conn::{Raw, Session};
use crate::wsfuzz::exec::{Record, Settings, Target, escape};
use crate::wsfuzz::json::Names;
use crate::wsfuzz::upgrade::{self, accept_for, random_key};

/// How long the frames sent with `CONNECT` in one message may wait for their answers before
/// the client sends anything else.
const PIPELINE_WAIT: Duration = Duration::from_secs(2);

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

/// A handshake case: its upgrade on a connection of its own, the first flight (`CONNECT` and
/// whatever is pipelined behind it) and the answers to all of it before the client sends
/// anything else, then `DISCONNECT`.
pub async fn run(
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
        v.anomalies.push(stalled.clone());
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
