//! The STOMP oracle: holds what the node sent during a case to the model's prediction and to
//! PROTOCOL.md §7, and to nothing the contract does not promise.
//!
//! The node answers a session's frames in their order, so the answers (`RECEIPT`, a `MESSAGE`
//! on `/user/queue/errors`, `ERROR`, `CONNECTED`) are matched one by one with the frames owed
//! one: each frame with a `receipt` gets exactly one answer carrying it, the one the model
//! allows; an `ERROR` ends the session, and nothing but the close frame and the end of TCP may
//! follow it. Other `MESSAGE`s are deliveries, checked on their own: a destination the session
//! subscribed to with the `subscription` id it gave, the stream of that destination, a JSON
//! body.

use serde::Deserialize;

use super::frame::ServerFrame;
use super::model::{Answer, Dest, End, Expected, Kind, Prediction, valid_name};

/// What the connection's reader saw, as STOMP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Frame(ServerFrame),
    HeartBeat,
    /// A server frame broke a rule of STOMP 1.2 (the reader stops there).
    Bad(String),
    /// The WebSocket close frame and its code.
    Close(Option<u16>),
    /// A WebSocket frame broke a rule of RFC 6455.
    WsBad(String),
    Eof,
    Error(String),
}

/// Error codes of PROTOCOL.md §4.
const ERROR_CODES: [&str; 9] = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "not_member",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
];

/// A close that the node may choose at any time: it is shutting down.
const ANYTIME: [u16; 1] = [1001];

/// The oracle's judgement of one case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub outcomes: Vec<String>,
    pub anomalies: Vec<String>,
    /// Deviations tolerated as known server bugs, to be removed once fixed.
    pub known: Vec<String>,
    /// The connection is over (closed, or no longer trusted).
    pub over: bool,
}

/// An answer to a frame.
#[derive(Debug)]
enum Ans {
    Receipt(String),
    Refusal { receipt: Option<String>, code: String },
    Error(Option<String>),
    Connected(Option<String>),
}

#[derive(Deserialize)]
struct Refusal {
    code: String,
    message: String,
    receipt: Option<String>,
}

/// Where the walk through the events got to.
struct Walk {
    /// The next frame owed an answer.
    next: usize,
    /// Matching stopped at a wrong answer (the rest would only repeat it).
    broken: bool,
    /// The close codes allowed after the `ERROR` seen, if one was.
    error: Option<Vec<u16>>,
    close: Option<Option<u16>>,
    ended: bool,
    outcomes: Vec<String>,
    anomalies: Vec<String>,
    known: Vec<String>,
}

/// The oracle of one case, fed the events as they come (each is looked at once).
pub struct Oracle<'a> {
    pred: &'a Prediction,
    flood: bool,
    w: Walk,
}

impl<'a> Oracle<'a> {
    /// For a case predicted `pred`; `flood`: any frame may be refused `rate_limited`.
    pub fn new(pred: &'a Prediction, flood: bool) -> Self {
        let w = Walk {
            next: 0,
            broken: false,
            error: None,
            close: None,
            ended: false,
            outcomes: Vec::new(),
            anomalies: Vec::new(),
            known: Vec::new(),
        };
        Oracle { pred, flood, w }
    }

    pub fn see(&mut self, e: &Event) {
        let (pred, flood, w) = (self.pred, self.flood, &mut self.w);
        match e {
            Event::Frame(f) => {
                if w.close.is_some() {
                    w.anomalies.push(format!("a frame after the close frame: {}", f.summary()));
                    return;
                }
                if w.error.is_some() {
                    w.anomalies.push(format!("a frame after ERROR: {}", f.summary()));
                    return;
                }
                match answer_of(f, &mut w.anomalies) {
                    Some(ans) => answer(pred, w, ans, f, flood),
                    None => delivery(pred, f, w),
                }
            }
            Event::HeartBeat => {}
            Event::Bad(why) => w.anomalies.push(format!("malformed server frame: {why}")),
            Event::WsBad(why) => w.anomalies.push(format!("malformed WebSocket frame: {why}")),
            Event::Close(code) => w.close = Some(*code),
            Event::Eof | Event::Error(_) => w.ended = true,
        }
    }

    /// Whether the case has seen what it waits for: the end of the connection, or (when the
    /// session is predicted to go on) an answer to every frame owed one.
    pub fn done(&self) -> bool {
        let (pred, w) = (self.pred, &self.w);
        w.ended
            || (matches!(pred.end, End::Open(_))
                && w.error.is_none()
                && w.close.is_none()
                && (w.broken || all_answered(pred, w.next)))
    }

    /// The verdict; `timed_out` when the wait ended before [`done`](Self::done).
    pub fn judge(self, timed_out: bool) -> Verdict {
        judge_walk(self.pred, self.w, self.flood, timed_out)
    }
}

/// [`Oracle::done`] for a whole list of events.
#[cfg(test)]
pub fn done(pred: &Prediction, events: &[Event], flood: bool) -> bool {
    let mut o = Oracle::new(pred, flood);
    events.iter().for_each(|e| o.see(e));
    o.done()
}

/// [`Oracle::judge`] for a whole list of events.
pub fn judge(pred: &Prediction, events: &[Event], flood: bool, timed_out: bool) -> Verdict {
    let mut o = Oracle::new(pred, flood);
    events.iter().for_each(|e| o.see(e));
    o.judge(timed_out)
}

/// Whether every frame from `next` on is one that gets no answer when all goes well.
fn all_answered(pred: &Prediction, next: usize) -> bool {
    pred.expected[next.min(pred.expected.len())..].iter().all(Expected::silent)
}

fn judge_walk(pred: &Prediction, w: Walk, flood: bool, timed_out: bool) -> Verdict {
    let mut v = Verdict { outcomes: w.outcomes, anomalies: w.anomalies, known: w.known, ..Verdict::default() };
    v.known.dedup();
    let early = matches!(w.close, Some(Some(c)) if ANYTIME.contains(&c) || (flood && c == 1008));
    if !w.broken && !early && !all_answered(pred, w.next) && w.error.is_none() {
        let first = (w.next..pred.expected.len()).find(|&i| !pred.expected[i].silent()).expect("not all silent");
        let e = &pred.expected[first];
        v.anomalies.push(format!(
            "no answer to frame {} ({}{}){}",
            first + 1,
            e.what,
            e.receipt.as_ref().map(|r| format!(", receipt {r:?}")).unwrap_or_default(),
            if timed_out { " within the timeout" } else { "" }
        ));
    }
    // A wrong answer leaves the model of the session in doubt: the next case starts afresh.
    v.over = w.close.is_some() || w.ended || timed_out || flood || w.broken || !matches!(pred.end, End::Open(_));
    let label = |code: Option<u16>| code.map_or("close (no code)".to_owned(), |c| format!("close {c}"));
    match (&pred.end, w.close) {
        (End::Open(_), None) => {
            if w.ended {
                v.anomalies.push("connection dropped without a close frame".into());
            } else if w.error.is_some() {
                v.anomalies.push("ERROR, then no close frame".into());
            } else {
                v.outcomes.push("stomp open".into());
            }
            return v;
        }
        (End::Open(_), Some(code)) => {
            if early {
                v.outcomes.push(format!("stomp {}", label(code)));
            } else {
                v.anomalies.push(format!("{} where the session should go on", label(code)));
            }
            if w.error.is_none() {
                v.anomalies.push(format!("{} without an ERROR first", label(code)));
            }
        }
        (End::Disconnect, Some(code)) => {
            if code == Some(1000) || early {
                v.outcomes.push(format!("stomp {} after DISCONNECT", label(code)));
            } else {
                v.anomalies.push(format!("{} after DISCONNECT (1000 expected)", label(code)));
            }
            if w.error.is_some() && !early {
                v.anomalies.push("an ERROR in answer to DISCONNECT".into());
            }
        }
        (_, Some(code)) => {
            let allowed = match &pred.end {
                End::Malformed(_, codes) => codes.clone(),
                End::Ws(c) => vec![*c],
                End::NoConnect => vec![super::model::POLICY],
                _ => w.error.clone().unwrap_or_default(),
            };
            if early || code.is_some_and(|c| allowed.contains(&c)) {
                v.outcomes.push(format!("stomp {}", label(code)));
            } else {
                v.anomalies.push(format!("{} where {allowed:?} is owed", label(code)));
            }
            let error_optional = pred.before_connect && matches!(pred.end, End::Ws(_));
            if w.error.is_none() && !error_optional {
                v.anomalies.push(format!("{} without an ERROR first", label(code)));
            }
        }
        (end, None) => {
            v.anomalies.push(if w.ended {
                format!("connection dropped without a close frame (owed: {end:?})")
            } else {
                format!("no close frame within the timeout (owed: {end:?})")
            });
            return v;
        }
    }
    if !w.ended {
        v.anomalies.push("no TCP close after the close frame".into());
    }
    v
}

/// The answer a frame is, or `None` for a delivery.
fn answer_of(f: &ServerFrame, anomalies: &mut Vec<String>) -> Option<Ans> {
    match f.command.as_str() {
        "RECEIPT" => match f.get("receipt-id") {
            Some(id) => Some(Ans::Receipt(id.to_owned())),
            None => {
                anomalies.push("RECEIPT without receipt-id".into());
                None
            }
        },
        "ERROR" => {
            if f.get("message").is_none() {
                anomalies.push("ERROR without a message header".into());
            }
            Some(Ans::Error(f.get("receipt-id").map(str::to_owned)))
        }
        "CONNECTED" => Some(Ans::Connected(f.get("user-name").map(str::to_owned))),
        "MESSAGE" if f.get("destination") == Some(super::model::ERRORS) => {
            match serde_json::from_slice::<Refusal>(&f.body) {
                Ok(r) => {
                    if !ERROR_CODES.contains(&r.code.as_str()) {
                        anomalies.push(format!("refusal code {:?} is not one of PROTOCOL.md §4", r.code));
                    }
                    if r.message.is_empty() {
                        anomalies.push("a refusal with an empty message".into());
                    }
                    Some(Ans::Refusal { receipt: r.receipt, code: r.code })
                }
                Err(e) => {
                    anomalies.push(format!(
                        "a refusal whose body is not {{code, message, receipt}} ({e}): {}",
                        String::from_utf8_lossy(&f.body)
                    ));
                    None
                }
            }
        }
        _ => None,
    }
}

/// Matches an answer with the next frame owed one.
fn answer(pred: &Prediction, w: &mut Walk, ans: Ans, f: &ServerFrame, flood: bool) {
    if let Ans::Refusal { code, .. } = &ans {
        w.outcomes.push(format!("stomp refused {code}"));
        if let Some(sub) = f.get("subscription")
            && !pred.view.ever.contains(&(Dest::Errors, sub.to_owned()))
        {
            w.anomalies.push(format!("a refusal for subscription {sub:?}, which the session never made"));
        }
    }
    match &ans {
        Ans::Receipt(_) => w.outcomes.push("stomp receipt".into()),
        Ans::Error(_) => w.outcomes.push("stomp ERROR".into()),
        Ans::Connected(_) => w.outcomes.push("stomp connected".into()),
        Ans::Refusal { .. } => {}
    }
    if w.broken {
        if matches!(ans, Ans::Error(_)) {
            w.error = Some(vec![1002, 1008, 1009, 1007]);
        }
        return;
    }
    loop {
        let Some(e) = pred.expected.get(w.next) else {
            match ans {
                Ans::Error(_) if matches!(pred.end, End::Malformed(..) | End::Ws(_) | End::NoConnect) => {
                    w.error = Some(Vec::new());
                }
                Ans::Error(_) if flood => w.error = Some(vec![1008]),
                _ => {
                    w.anomalies.push(format!("an answer no frame is owed: {}", f.summary()));
                    w.broken = true;
                }
            }
            return;
        };
        let receipt = e.receipt.as_deref();
        let ok = match (&e.answer, &ans) {
            (Answer::Receipt(kind), Ans::Receipt(id))
            | (Answer::ReceiptOrRefusal(kind, _), Ans::Receipt(id))
            | (Answer::ReceiptOrRateLimited(kind), Ans::Receipt(id))
                if Some(id.as_str()) == receipt =>
            {
                if *kind == Kind::Send {
                    let seq = f.get("seq").and_then(|s| s.parse::<u64>().ok());
                    if f.get("mid").is_none_or(str::is_empty) || seq.is_none() {
                        w.anomalies.push(format!("RECEIPT of a SEND without mid and seq: {}", f.summary()));
                    }
                }
                true
            }
            (Answer::Refusal(codes), Ans::Refusal { receipt: r, code })
            | (Answer::RefusalOrFault(codes), Ans::Refusal { receipt: r, code })
            | (Answer::ReceiptOrRefusal(_, codes), Ans::Refusal { receipt: r, code })
                if r.as_deref() == receipt =>
            {
                if !codes.contains(&code.as_str()) {
                    w.anomalies.push(format!("frame {} ({}) refused {code}, not {codes:?}", w.next + 1, e.what));
                }
                true
            }
            (Answer::ReceiptOrRateLimited(_), Ans::Refusal { receipt: r, code })
                if r.as_deref() == receipt && code == "rate_limited" =>
            {
                true
            }
            (Answer::Fault | Answer::RefusalOrFault(_), Ans::Error(id)) => {
                if id.as_deref() != receipt {
                    w.anomalies.push(format!(
                        "ERROR for frame {} ({}) with receipt-id {id:?}, not {receipt:?}",
                        w.next + 1,
                        e.what
                    ));
                }
                w.error = Some(vec![1002]);
                w.next = pred.expected.len();
                return;
            }
            (Answer::ConnectRefused(codes), Ans::Error(_)) => {
                w.error = Some(codes.clone());
                w.next = pred.expected.len();
                return;
            }
            (Answer::Connected(user), Ans::Connected(got)) => {
                if got.as_deref() != Some(user.as_str()) {
                    w.anomalies.push(format!("CONNECTED for user {got:?}, not {user:?}"));
                }
                check_connected(f, &mut w.anomalies);
                true
            }
            (_, Ans::Error(_)) if flood => {
                w.error = Some(vec![1008]);
                w.next = pred.expected.len();
                return;
            }
            _ if e.silent() => {
                w.next += 1;
                continue;
            }
            (Answer::ReceiptOrRefusal(..), _) if receipt.is_none() => {
                w.next += 1;
                continue;
            }
            _ => false,
        };
        if ok {
            w.next += 1;
        } else {
            w.anomalies.push(format!(
                "frame {} ({}{}) is owed {:?}, got {}",
                w.next + 1,
                e.what,
                receipt.map(|r| format!(", receipt {r:?}")).unwrap_or_default(),
                e.answer,
                f.summary()
            ));
            w.broken = true;
            if matches!(ans, Ans::Error(_)) {
                w.error = Some(vec![1002, 1008, 1009, 1007]);
            }
        }
        return;
    }
}

fn check_connected(f: &ServerFrame, anomalies: &mut Vec<String>) {
    if f.get("version") != Some("1.2") {
        anomalies.push(format!("CONNECTED with version {:?}", f.get("version")));
    }
    let beats = f.get("heart-beat").and_then(|b| b.split_once(','));
    if !beats.is_some_and(|(x, y)| x.parse::<u64>().is_ok() && y.parse::<u64>().is_ok()) {
        anomalies.push(format!("CONNECTED with heart-beat {:?}", f.get("heart-beat")));
    }
    if f.get("session").is_none_or(str::is_empty) {
        anomalies.push("CONNECTED without a session".into());
    }
}

/// A `MESSAGE` of a subscription: it must be one the session made, of that destination's
/// stream, with a JSON body.
fn delivery(pred: &Prediction, f: &ServerFrame, w: &mut Walk) {
    if f.command != "MESSAGE" {
        return;
    }
    w.outcomes.push("stomp message".into());
    let summary = f.summary();
    let mut bad = |what: String| w.anomalies.push(format!("{what}: {summary}"));
    let Some(dest) = f.get("destination").and_then(Dest::of_message) else {
        bad("a MESSAGE to an unknown destination".into());
        return;
    };
    let Some(sub) = f.get("subscription") else {
        bad("a MESSAGE without subscription".into());
        return;
    };
    let key = (dest.clone(), sub.to_owned());
    if !pred.view.ever.contains(&key) {
        bad(format!("a MESSAGE for subscription {sub:?} to {dest:?}, which the session never made"));
    }
    if f.get("message-id").is_none_or(str::is_empty) {
        bad("a MESSAGE without message-id".into());
    }
    if f.get("content-type") != Some("application/json") {
        bad("a MESSAGE whose content-type is not application/json".into());
    }
    // JSON as RFC 8259 writes it: a number beyond f64 (`-1e400`, which a JSON client may send)
    // is JSON too.
    if serde_json::from_slice::<serde::de::IgnoredAny>(&f.body).is_err() {
        bad("a MESSAGE whose body is not JSON".into());
    }
    if pred.view.client_ack.contains(&key) && f.get("ack").is_none() {
        bad("a MESSAGE of an ack:client subscription without ack".into());
    }
    if let Some(event) = f.get("event") {
        let body = serde_json::from_slice::<serde_json::Value>(&f.body).ok();
        let user = body.and_then(|b| b.get("user").and_then(|u| u.as_str().map(str::to_owned)));
        if !matches!(dest, Dest::Room(_)) || !matches!(event, "join" | "leave") || !user.is_some_and(|u| valid_name(&u))
        {
            bad("a presence MESSAGE that is not event join/leave of a room with {\"user\"}".into());
        }
        return;
    }
    let stream = match &dest {
        Dest::UserQueue => format!("user:{}", pred.view.me),
        Dest::Room(room) => format!("room:{room}"),
        Dest::Broadcast => "broadcast".to_owned(),
        Dest::Errors => unreachable!("refusals are answers"),
    };
    if f.get("stream") != Some(stream.as_str()) {
        bad(format!("a MESSAGE to {dest:?} of stream {:?}", f.get("stream")));
    }
    let number = |name: &str| f.get(name).is_some_and(|v| v.parse::<u64>().is_ok());
    if (dest != Dest::Broadcast && !number("seq")) || !number("ts") || f.get("from").is_none() {
        bad("a MESSAGE without seq, ts or from".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::stomp::cases::Msg;
    use crate::wsfuzz::stomp::model::{Phase, View, predict};

    fn frame(command: &str, headers: &[(&str, &str)], body: &str) -> Event {
        Event::Frame(ServerFrame {
            command: command.into(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            body: body.as_bytes().to_vec(),
        })
    }

    fn receipt(id: &str) -> Event {
        frame("RECEIPT", &[("receipt-id", id)], "")
    }

    fn refusal(code: &str, receipt: Option<&str>) -> Event {
        let body = serde_json::json!({"code": code, "message": "m", "receipt": receipt}).to_string();
        frame("MESSAGE", &[("destination", "/user/queue/errors"), ("message-id", "e1")], &body)
    }

    fn error(receipt: Option<&str>) -> Event {
        let mut headers = vec![("message", "bad")];
        if let Some(r) = receipt {
            headers.push(("receipt-id", r));
        }
        frame("ERROR", &headers, "bad")
    }

    fn pred(frames: &str) -> Prediction {
        let mut view = View::new("fz-0");
        view.subs.insert(Dest::Room("r".into()), "s-r".into());
        view.ever.insert((Dest::Room("r".into()), "s-r".into()));
        predict(Phase::Session(view), &[Msg::new(frames.as_bytes().to_vec(), false)], 1 << 16, false)
    }

    const SENTINEL: &str = "UNSUBSCRIBE\nid:~\nreceipt:~\n\n\0";

    #[test]
    fn every_receipt_gets_one_answer_in_order() {
        let p = pred(&format!(
            "SEND\ndestination:/user/fz-1\nreceipt:a\n\nx\0SEND\ndestination:/topic/x\n\nx\0SEND\ndestination:/user/fz-1\n\nx\0{SENTINEL}"
        ));
        let send_receipt = frame("RECEIPT", &[("receipt-id", "a"), ("mid", "m"), ("seq", "4")], "");
        let good = [send_receipt.clone(), refusal("not_member", None), receipt("~")];
        assert!(done(&p, &good, false));
        let v = judge(&p, &good, false, false);
        assert_eq!(v.anomalies, Vec::<String>::new());
        assert_eq!(v.outcomes, vec!["stomp receipt", "stomp refused not_member", "stomp receipt", "stomp open"]);
        assert!(!done(&p, &good[..2], false));
        let v = judge(&p, &good[..2], false, true);
        assert!(v.anomalies[0].contains("no answer to frame 4"), "{v:?}");
        let twice = [send_receipt.clone(), send_receipt.clone(), refusal("not_member", None), receipt("~")];
        assert!(!judge(&p, &twice, false, false).anomalies.is_empty());
        let no_seq = [receipt("a"), refusal("not_member", None), receipt("~")];
        assert!(judge(&p, &no_seq, false, false).anomalies[0].contains("mid and seq"));
        let wrong_code = [send_receipt, refusal("forbidden", None), receipt("~")];
        assert!(judge(&p, &wrong_code, false, false).anomalies[0].contains("refused forbidden"));
    }

    #[test]
    fn a_fault_gets_error_then_the_close_and_nothing_after() {
        let p =
            pred("SUBSCRIBE\nid:1\ndestination:/queue/x\nreceipt:q\n\n\0SEND\ndestination:/user/a\nreceipt:z\n\n\0");
        let close = |c| Event::Close(Some(c));
        let good = [error(Some("q")), close(1002), Event::Eof];
        assert!(done(&p, &good, false));
        assert_eq!(judge(&p, &good, false, false).anomalies, Vec::<String>::new());
        let no_id = [error(None), close(1002), Event::Eof];
        assert!(judge(&p, &no_id, false, false).anomalies[0].contains("receipt-id"));
        let after = [error(Some("q")), receipt("z"), close(1002), Event::Eof];
        assert!(judge(&p, &after, false, false).anomalies[0].contains("after ERROR"));
        let silent_close = [close(1002), Event::Eof];
        assert!(judge(&p, &silent_close, false, false).anomalies.iter().any(|a| a.contains("without an ERROR")));
        let wrong = [error(Some("q")), close(1011), Event::Eof];
        assert!(judge(&p, &wrong, false, false).anomalies[0].contains("1011"));
        let malformed = pred("SEND\nno colon\n\n\0");
        assert!(judge(&malformed, &[error(None), close(1002), Event::Eof], false, false).anomalies.is_empty());
    }

    #[test]
    fn deliveries_must_belong_to_the_session() {
        let p = pred(SENTINEL);
        let msg = |dest: &str, sub: &str, stream: &str| {
            frame(
                "MESSAGE",
                &[
                    ("destination", dest),
                    ("subscription", sub),
                    ("message-id", "m"),
                    ("seq", "1"),
                    ("stream", stream),
                    ("from", "x"),
                    ("ts", "1"),
                    ("content-type", "application/json"),
                ],
                "{}",
            )
        };
        let ok = [msg("/topic/r", "s-r", "room:r"), receipt("~")];
        assert!(judge(&p, &ok, false, false).anomalies.is_empty());
        let Event::Frame(mut huge) = msg("/topic/r", "s-r", "room:r") else { unreachable!() };
        huge.body = b"-1e400".to_vec();
        assert!(judge(&p, &[Event::Frame(huge), receipt("~")], false, false).anomalies.is_empty(), "JSON past f64");
        let leaks = [
            msg("/topic/other", "s-r", "room:other"),
            msg("/topic/r", "s-x", "room:r"),
            msg("/topic/r", "s-r", "room:q"),
            receipt("~"),
        ];
        assert_eq!(judge(&p, &leaks, false, false).anomalies.len(), 3);
    }

    #[test]
    fn bugs_found_and_fixed_stay_anomalies() {
        // A session reading everything closed as too slow by a repair of a truncated catch-up.
        let m = "too slow: messages expired before they could be delivered; resume with since";
        let expired = [frame("ERROR", &[("message", m)], m), Event::Close(Some(4003)), Event::Eof];
        let mut view = View::new("fz-0");
        view.ever.insert((Dest::UserQueue, "q".into()));
        let p = predict(Phase::Session(view), &[Msg::new(SENTINEL.into(), false)], 1 << 16, false);
        assert!(judge(&p, &expired, false, false).anomalies.iter().any(|a| a.contains("4003")));
        // SENDs before a frame that does not decode, in one message: answered, then the ERROR.
        let batch = pred(
            "SEND\ndestination:/user/a\nreceipt:1\n\n\0SEND\ndestination:/user/b\nreceipt:2\n\n\0SEND\nno colon\n\n\0",
        );
        let dropped = [error(None), Event::Close(Some(1002)), Event::Eof];
        assert!(!judge(&batch, &dropped, false, false).anomalies.is_empty());
        let send = |r: &str| frame("RECEIPT", &[("receipt-id", r), ("mid", "m"), ("seq", "1")], "");
        let answered = [send("1"), send("2"), error(None), Event::Close(Some(1002)), Event::Eof];
        assert!(judge(&batch, &answered, false, false).anomalies.is_empty());
        // Presence events of an ack:client subscription carry an ack header too.
        let mut view = View::new("fz-0");
        let key = (Dest::Room("r".into()), "s".to_owned());
        view.ever.insert(key.clone());
        view.client_ack.insert(key);
        let p = predict(Phase::Session(view), &[Msg::new(SENTINEL.as_bytes().to_vec(), false)], 1 << 16, false);
        let head = [
            ("destination", "/topic/r"),
            ("subscription", "s"),
            ("message-id", "e"),
            ("content-type", "application/json"),
        ];
        let presence = frame("MESSAGE", &[&head[..], &[("event", "join")]].concat(), r#"{"user":"u"}"#);
        assert!(judge(&p, &[presence, receipt("~")], false, false).anomalies[0].contains("without ack"));
        let message = frame(
            "MESSAGE",
            &[&head[..], &[("seq", "1"), ("stream", "room:r"), ("from", "u"), ("ts", "1")]].concat(),
            "1",
        );
        assert!(judge(&p, &[message, receipt("~")], false, false).anomalies[0].contains("without ack"));
    }

    #[test]
    fn a_flood_may_be_refused_or_closed_with_1008() {
        let msgs = [Msg::new(
            b"SEND\ndestination:/user/a\nreceipt:1\n\n\0SEND\ndestination:/user/a\nreceipt:2\n\n\0".to_vec(),
            false,
        )];
        let p = predict(Phase::Session(View::new("fz-0")), &msgs, 1 << 16, true);
        let send = frame("RECEIPT", &[("receipt-id", "1"), ("mid", "m"), ("seq", "1")], "");
        let v = judge(&p, &[send.clone(), refusal("rate_limited", Some("2"))], true, false);
        assert!(v.anomalies.is_empty() && v.over, "{v:?}");
        let closed = [send, error(None), Event::Close(Some(1008)), Event::Eof];
        assert!(judge(&p, &closed, true, false).anomalies.is_empty());
    }
}
