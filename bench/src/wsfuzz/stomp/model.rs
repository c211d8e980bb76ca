//! What PROTOCOL.md §7 says a node owes a STOMP session for the WebSocket messages a case sends:
//! the frames the reference `decoder` reads out of them, and a model of the session (its
//! subscriptions and rooms) that says, frame by frame, which answer is owed: a `RECEIPT`, a
//! refusal on `/user/queue/errors`, or an `ERROR` and the close.
//!
//! Where the contract leaves a choice (a frame with two faults of different kinds), the
//! prediction allows each.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::value::RawValue;

use super::cases::Msg;
use super::decoder::{Decoder, Fault, Frame, Item, Pending};

/// Deepest nesting a message body may have.
pub const MAX_BODY_DEPTH: usize = 64;
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 256;

pub const USER_QUEUE: &str = "/user/queue/messages";
pub const ERRORS: &str = "/user/queue/errors";
pub const BROADCAST: &str = "/broadcast";
pub const TOPIC: &str = "/topic/";
/// Rooms a dev-mode user may not enter (the node's default `--private-prefix`).
pub const PRIVATE_PREFIX: &str = "private:";

pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_UTF8: u16 = 1007;
pub const POLICY: u16 = 1008;
pub const TOO_LARGE: u16 = 1009;

/// Whether `name` matches `^[A-Za-z0-9_.:@-]{1,128}$` (PROTOCOL.md §1).
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Deepest nesting of arrays and objects in JSON text.
pub fn depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for c in json.bytes() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A subscription's destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    UserQueue,
    Broadcast,
    Errors,
    Room(String),
}

impl Dest {
    /// The destination a `MESSAGE` names.
    pub fn of_message(destination: &str) -> Option<Dest> {
        match destination {
            USER_QUEUE => Some(Dest::UserQueue),
            BROADCAST => Some(Dest::Broadcast),
            ERRORS => Some(Dest::Errors),
            _ => destination.strip_prefix(TOPIC).map(|r| Dest::Room(r.to_owned())),
        }
    }
}

/// What one STOMP session has shown of itself: its user and its subscriptions.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: String,
    /// The subscriptions now, by destination (the server keeps one per destination).
    pub subs: BTreeMap<Dest, String>,
    /// Rooms whose membership the model cannot know (an `UNSUBSCRIBE` whose id named several).
    pub maybe_rooms: BTreeSet<String>,
    /// Every (destination, id) the session subscribed with: what its `MESSAGE`s may carry.
    pub ever: BTreeSet<(Dest, String)>,
    /// Those that asked for `ack:client` or `ack:client-individual`.
    pub client_ack: BTreeSet<(Dest, String)>,
}

impl View {
    pub fn new(me: &str) -> Self {
        View { me: me.to_owned(), ..View::default() }
    }

    fn member(&self, room: &str) -> bool {
        self.subs.contains_key(&Dest::Room(room.to_owned()))
    }
}

/// What a `RECEIPT` must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Plain,
    /// `mid` and `seq` (a stored `SEND`).
    Send,
}

/// The answer owed to one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `RECEIPT` when the frame asked for one, else nothing.
    Receipt(Kind),
    /// A `MESSAGE` on `/user/queue/errors` with one of these codes and the frame's receipt.
    Refusal(Vec<&'static str>),
    /// `ERROR` (with `receipt-id` when the frame asked for a receipt), then close 1002.
    Fault,
    /// A frame with two problems, a refusal and a fault: the contract ranks neither.
    RefusalOrFault(Vec<&'static str>),
    /// Accepted, or refused with one of these codes: the model cannot know which.
    ReceiptOrRefusal(Kind, Vec<&'static str>),
    /// A frame of a flood: accepted, or refused `rate_limited`.
    ReceiptOrRateLimited(Kind),
    /// `CONNECTED` for this user.
    Connected(String),
    /// `ERROR`, then close with one of these codes (a refused `CONNECT`).
    ConnectRefused(Vec<u16>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub receipt: Option<String>,
    pub answer: Answer,
    /// The frame, for reports: its command and destination or id.
    pub what: String,
}

impl Expected {
    /// Whether the server says nothing to it when all goes well (a frame accepted without a
    /// receipt).
    pub fn silent(&self) -> bool {
        self.receipt.is_none() && matches!(self.answer, Answer::Receipt(_))
    }
}

/// How the connection ends after the case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// It goes on; the input stops where `Pending` says.
    Open(Pending),
    /// `DISCONNECT`: close 1000 (after its `RECEIPT`), no `ERROR`.
    Disconnect,
    /// The last expected answer closes (`Fault`, `ConnectRefused`).
    Answered,
    /// The decoder refuses the input: `ERROR`, then close with one of these codes.
    Malformed(Fault, Vec<u16>),
    /// The WebSocket layer refuses a message (too large, or a text message not UTF-8).
    Ws(u16),
    /// No `CONNECT` came: after `--handshake-timeout`, `ERROR` and close 1008.
    NoConnect,
}

#[derive(Clone, Debug)]
pub struct Prediction {
    pub expected: Vec<Expected>,
    pub end: End,
    /// Per message: how many times the node's rate limiter is asked (once per frame, and once
    /// for a message that completes none).
    pub costs: Vec<usize>,
    /// The session after the case, if it goes on as predicted.
    pub view: View,
    /// Where the closing `ERROR` of a refused `CONNECT` or of the WebSocket layer before
    /// `CONNECT` may be missing (the session did not start).
    pub before_connect: bool,
}

/// Where a case starts.
#[derive(Clone, Debug)]
pub enum Phase {
    /// A session after `CONNECTED`.
    Session(View),
    /// A fresh connection whose first frame must be `CONNECT`; the user given at the upgrade, if
    /// any.
    Connect { upgrade_user: Option<String> },
}

/// Predicts what a node with frames (and WebSocket messages) of at most `max` bytes owes for
/// `msgs`. `flood`: every accepted frame may instead be refused `rate_limited`.
pub fn predict(phase: Phase, msgs: &[Msg], max: usize, flood: bool) -> Prediction {
    let (mut view, mut connected) = match &phase {
        Phase::Session(view) => (view.clone(), true),
        Phase::Connect { .. } => (View::default(), false),
    };
    let upgrade_user = match &phase {
        Phase::Connect { upgrade_user } => upgrade_user.clone(),
        Phase::Session(_) => None,
    };
    let mut decoder = Decoder::new(max);
    let mut expected = Vec::new();
    let mut costs = Vec::new();
    let mut end = None;
    for msg in msgs {
        if end.is_some() {
            break;
        }
        if msg.payload.len() > max {
            costs.push(1);
            end = Some(End::Ws(TOO_LARGE));
            break;
        }
        if !msg.binary && std::str::from_utf8(&msg.payload).is_err() {
            costs.push(1);
            end = Some(End::Ws(INVALID_UTF8));
            break;
        }
        let (items, fault) = decoder.push(&msg.payload);
        let frames = items.iter().filter(|i| matches!(i, Item::Frame(_))).count();
        costs.push(frames.max(1));
        for item in items {
            let Item::Frame(frame) = item else { continue };
            if !connected {
                let answer = connect(&frame, upgrade_user.as_deref());
                if let Answer::Connected(user) = &answer {
                    view = View::new(user);
                    connected = true;
                }
                let refused = matches!(answer, Answer::ConnectRefused(_));
                expected.push(Expected { receipt: None, answer, what: frame.command.clone() });
                if refused {
                    end = Some(End::Answered);
                    break;
                }
                continue;
            }
            let (mut answer, closes) = session_frame(&mut view, &frame);
            if flood && let Answer::Receipt(kind) = answer {
                answer = Answer::ReceiptOrRateLimited(kind);
            }
            expected.push(Expected {
                receipt: frame.get("receipt").map(str::to_owned),
                answer,
                what: describe(&frame),
            });
            if let Some(closes) = closes {
                end = Some(closes);
                break;
            }
        }
        if end.is_none()
            && let Some(fault) = fault
        {
            let codes = if fault == Fault::TooLarge { vec![TOO_LARGE] } else { vec![PROTOCOL_ERROR] };
            end = Some(End::Malformed(fault, codes));
        }
    }
    let end = end.unwrap_or_else(|| match decoder.pending() {
        Pending::Idle if !connected => End::NoConnect,
        pending => End::Open(pending),
    });
    Prediction { expected, end, costs, view, before_connect: !connected }
}

/// The frame for reports.
fn describe(frame: &Frame) -> String {
    let target = frame.get("destination").or_else(|| frame.get("id")).unwrap_or("");
    format!("{} {:?}", frame.command, target)
}

/// The answer to the first frame of a connection (PROTOCOL.md §7, "Connecting"), in dev mode.
fn connect(frame: &Frame, upgrade_user: Option<&str>) -> Answer {
    if !matches!(frame.command.as_str(), "CONNECT" | "STOMP") {
        return Answer::ConnectRefused(vec![PROTOCOL_ERROR]);
    }
    let mut codes = Vec::new();
    if let Some(versions) = frame.get("accept-version")
        && !versions.split(',').any(|v| v.trim() == "1.2")
    {
        codes.push(PROTOCOL_ERROR);
    }
    let user = match upgrade_user {
        Some(user) => Some(user.to_owned()),
        None => match frame.get("login") {
            Some(login) if valid_name(login) => Some(login.to_owned()),
            _ => None,
        },
    };
    if user.is_none() {
        codes.push(POLICY);
    }
    if let Some(beats) = frame.get("heart-beat") {
        let number = |s: &str| {
            let s = s.trim();
            !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && s.parse::<u64>().is_ok()
        };
        if !beats.split_once(',').is_some_and(|(x, y)| number(x) && number(y)) {
            codes.push(PROTOCOL_ERROR);
        }
    }
    match (user, codes.is_empty()) {
        (Some(user), true) => Answer::Connected(user),
        _ => {
            codes.sort_unstable();
            codes.dedup();
            Answer::ConnectRefused(codes)
        }
    }
}

/// The answer to a frame of a session, applied to `view`; the end it brings, if any.
fn session_frame(view: &mut View, frame: &Frame) -> (Answer, Option<End>) {
    let fault = (Answer::Fault, Some(End::Answered));
    match frame.command.as_str() {
        "SEND" => match send(view, frame) {
            answer @ Answer::Fault => (answer, Some(End::Answered)),
            answer => (answer, None),
        },
        "SUBSCRIBE" => {
            let (Some(id), Some(destination)) = (frame.get("id"), frame.get("destination")) else { return fault };
            match subscribe(view, frame, id, destination) {
                answer @ Answer::Fault => (answer, Some(End::Answered)),
                answer => (answer, None),
            }
        }
        "UNSUBSCRIBE" => {
            let Some(id) = frame.get("id") else { return fault };
            unsubscribe(view, id);
            (Answer::Receipt(Kind::Plain), None)
        }
        "ACK" | "NACK" if frame.get("id").or_else(|| frame.get("message-id")).is_some() => {
            (Answer::Receipt(Kind::Plain), None)
        }
        "DISCONNECT" => (Answer::Receipt(Kind::Plain), Some(End::Disconnect)),
        // ACK or NACK without an id, CONNECT or STOMP again, transactions.
        _ => fault,
    }
}

fn send(view: &View, frame: &Frame) -> Answer {
    let Some(destination) = frame.get("destination") else { return Answer::Fault };
    let (name, room) = if let Some(user) = destination.strip_prefix("/user/").filter(|u| !u.contains('/')) {
        (user, false)
    } else if let Some(room) = destination.strip_prefix(TOPIC) {
        (room, true)
    } else {
        return Answer::Fault;
    };
    let key_bad = frame.get("key").is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN);
    let body_bad = match std::str::from_utf8(&frame.body) {
        Err(_) => true,
        Ok(text) => {
            let json = frame
                .get("content-type")
                .is_some_and(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
            json && (serde_json::from_str::<Box<RawValue>>(text).is_err() || depth(text) > MAX_BODY_DEPTH)
        }
    };
    if key_bad || body_bad || !valid_name(name) {
        return Answer::Refusal(vec!["bad_request"]);
    }
    if !room || view.member(name) {
        Answer::Receipt(Kind::Send)
    } else if view.maybe_rooms.contains(name) {
        Answer::ReceiptOrRefusal(Kind::Send, vec!["not_member"])
    } else {
        Answer::Refusal(vec!["not_member"])
    }
}

fn subscribe(view: &mut View, frame: &Frame, id: &str, destination: &str) -> Answer {
    let since_bad = frame
        .get("since")
        .is_some_and(|s| s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) || s.parse::<u64>().is_err());
    let dest = match destination {
        USER_QUEUE => Dest::UserQueue,
        BROADCAST => Dest::Broadcast,
        ERRORS => Dest::Errors,
        _ => match destination.strip_prefix(TOPIC) {
            Some(room) => Dest::Room(room.to_owned()),
            None if since_bad => return Answer::RefusalOrFault(vec!["bad_request"]),
            None => return Answer::Fault,
        },
    };
    let mut refusals = Vec::new();
    if since_bad {
        refusals.push("bad_request");
    }
    if let Dest::Room(room) = &dest {
        if !valid_name(room) {
            refusals.push("bad_request");
        } else if room.starts_with(PRIVATE_PREFIX) {
            refusals.push("forbidden");
        }
    }
    if !refusals.is_empty() {
        refusals.dedup();
        return Answer::Refusal(refusals);
    }
    if let Dest::Room(room) = &dest {
        view.maybe_rooms.remove(room);
    }
    if matches!(frame.get("ack"), Some("client" | "client-individual")) {
        view.client_ack.insert((dest.clone(), id.to_owned()));
    }
    view.ever.insert((dest.clone(), id.to_owned()));
    view.subs.insert(dest, id.to_owned());
    Answer::Receipt(Kind::Plain)
}

/// The server ends a subscription to the user's queue or a room with this id (one of them, if
/// several share it), else the broadcast one, else the error queue's.
fn unsubscribe(view: &mut View, id: &str) {
    let streams: Vec<Dest> = view
        .subs
        .iter()
        .filter(|(d, i)| matches!(d, Dest::UserQueue | Dest::Room(_)) && i.as_str() == id)
        .map(|(d, _)| d.clone())
        .collect();
    match streams.len() {
        0 => {
            for dest in [Dest::Broadcast, Dest::Errors] {
                if view.subs.get(&dest).is_some_and(|i| i == id) {
                    view.subs.remove(&dest);
                    break;
                }
            }
        }
        1 => {
            view.subs.remove(&streams[0]);
        }
        _ => {
            for dest in streams {
                view.subs.remove(&dest);
                if let Dest::Room(room) = dest {
                    view.maybe_rooms.insert(room);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 200;

    fn msg(bytes: &[u8]) -> Msg {
        Msg::new(bytes.to_vec(), true)
    }

    fn session() -> Phase {
        Phase::Session(View::new("fz-0"))
    }

    fn answers(p: &Prediction) -> Vec<Answer> {
        p.expected.iter().map(|e| e.answer.clone()).collect()
    }

    #[test]
    fn session_frames_are_owed_receipts_refusals_or_faults() {
        let frames = b"SUBSCRIBE\nid:1\ndestination:/topic/fz-r1\nreceipt:a\n\n\0\
SEND\ndestination:/topic/fz-r1\nreceipt:b\n\nx\0\
SEND\ndestination:/topic/fz-r2\nreceipt:c\n\nx\0\
SEND\ndestination:/user/a b\n\nx\0\
SEND\ndestination:/user/fz-1\ncontent-type:application/json\n\n{oops\0\
SUBSCRIBE\nid:2\ndestination:/topic/private:x\n\n\0\
SUBSCRIBE\nid:3\ndestination:/user/queue/messages\nsince:-1\n\n\0\
UNSUBSCRIBE\nid:1\nreceipt:d\n\n\0\
SEND\ndestination:/topic/fz-r1\nreceipt:e\n\nx\0\
BEGIN\ntransaction:t\nreceipt:f\n\n\0\
SEND\ndestination:/user/fz-1\n\nnever read\0";
        let p = predict(session(), &[msg(frames)], 1 << 16, false);
        assert_eq!(
            answers(&p),
            vec![
                Answer::Receipt(Kind::Plain),
                Answer::Receipt(Kind::Send),
                Answer::Refusal(vec!["not_member"]),
                Answer::Refusal(vec!["bad_request"]),
                Answer::Refusal(vec!["bad_request"]),
                Answer::Refusal(vec!["forbidden"]),
                Answer::Refusal(vec!["bad_request"]),
                Answer::Receipt(Kind::Plain),
                Answer::Refusal(vec!["not_member"]),
                Answer::Fault,
            ]
        );
        assert_eq!(p.end, End::Answered);
        assert_eq!(p.expected[9].receipt.as_deref(), Some("f"));
        assert_eq!(p.costs, vec![11], "the frame after the fault is read, not run");
        let fault = predict(
            session(),
            &[msg(b"SEND\ndestination:/queue/x\n\n\0SEND\ndestination:/user/a\n\n\0")],
            1 << 16,
            false,
        );
        assert_eq!((answers(&fault), fault.end), (vec![Answer::Fault], End::Answered), "nothing after a fault");
        let unknown =
            predict(session(), &[msg(b"SUBSCRIBE\nid:1\ndestination:/queue/x\nsince:x\n\n\0")], 1 << 16, false);
        assert_eq!(answers(&unknown), vec![Answer::RefusalOrFault(vec!["bad_request"])]);
    }

    #[test]
    fn the_websocket_layer_and_the_decoder_end_a_case() {
        let too_big = Msg::new(vec![b'\n'; 300], false);
        let p = predict(session(), &[msg(b"DISCONNECT\n\n\0"), too_big.clone()], MAX, false);
        assert_eq!(p.end, End::Disconnect);
        let p = predict(session(), &[msg(b"\n"), too_big], MAX, false);
        assert_eq!((p.end, p.costs), (End::Ws(TOO_LARGE), vec![1, 1]));
        let p = predict(session(), &[Msg::new(b"SEND\na:\xff\n\n\0".to_vec(), false)], MAX, false);
        assert_eq!(p.end, End::Ws(INVALID_UTF8), "a text message must be UTF-8 first");
        let p = predict(session(), &[msg(b"SEND\na:\xff\n\n\0")], MAX, false);
        assert_eq!(p.end, End::Malformed(Fault::InvalidUtf8, vec![PROTOCOL_ERROR]));
        let split = [msg(&[b'a'; 150]), msg(&[b'a'; 150])];
        assert_eq!(predict(session(), &split, MAX, false).end, End::Malformed(Fault::TooLarge, vec![TOO_LARGE]));
    }

    #[test]
    fn connect_is_checked_then_the_session_starts() {
        let phase = || Phase::Connect { upgrade_user: None };
        let ok = predict(
            phase(),
            &[msg(b"CONNECT\nlogin:fz-3\naccept-version:1.1,1.2\n\n\0SEND\ndestination:/user/fz-1\nreceipt:r\n\nx\0")],
            MAX,
            false,
        );
        assert_eq!(answers(&ok), vec![Answer::Connected("fz-3".into()), Answer::Receipt(Kind::Send)]);
        assert_eq!(ok.view.me, "fz-3");
        for (frame, codes) in [
            (&b"CONNECT\n\n\0"[..], vec![POLICY]),
            (b"CONNECT\nlogin:a b\n\n\0", vec![POLICY]),
            (b"CONNECT\nlogin:a\naccept-version:1.0,1.1\n\n\0", vec![PROTOCOL_ERROR]),
            (b"CONNECT\nlogin:a\nheart-beat:100\n\n\0", vec![PROTOCOL_ERROR]),
            (b"CONNECT\nheart-beat:x,1\n\n\0", vec![PROTOCOL_ERROR, POLICY]),
            (b"SEND\ndestination:/user/a\n\n\0", vec![PROTOCOL_ERROR]),
        ] {
            let p = predict(phase(), &[msg(frame)], MAX, false);
            assert_eq!((answers(&p), p.end), (vec![Answer::ConnectRefused(codes)], End::Answered), "{frame:?}");
        }
        let waiting = predict(phase(), &[msg(b"\n\r\n")], MAX, false);
        assert_eq!((waiting.expected.len(), waiting.end), (0, End::NoConnect));
        let upgraded = predict(
            Phase::Connect { upgrade_user: Some("fz-1".into()) },
            &[msg(b"STOMP\nlogin:x y\n\n\0")],
            MAX,
            false,
        );
        assert_eq!(answers(&upgraded), vec![Answer::Connected("fz-1".into())], "login is ignored");
    }

    #[test]
    fn json_depth_and_names() {
        assert_eq!(depth(r#"{"a":["[[[",{"b":[]}]}"#), 4);
        assert!(valid_name("a:b@c.d_e-f") && !valid_name("") && !valid_name("a b") && !valid_name(&"a".repeat(129)));
    }
}
