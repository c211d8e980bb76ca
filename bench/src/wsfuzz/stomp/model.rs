//! What PROTOCOL.md §7 says a node owes a STOMP session for the WebSocket messages a case sends:
//! a reference decoder of client frames written from STOMP 1.2 and the node's documented limits
//! (a frame of at most `--max-message-size` bytes from its command to its NUL, 64 headers,
//! escapes, `content-length`), independent of the server's, and a model of the session (its
//! subscriptions and rooms) that says, frame by frame, which answer is owed: a `RECEIPT`, a
//! refusal on `/user/queue/errors`, or an `ERROR` and the close.
//!
//! Where the contract leaves a choice (a frame with two faults of different kinds), the
//! prediction allows each.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::value::RawValue;

use super::cases::Msg;
use super::frame::unescape;

/// Most headers a client frame may carry.
pub const MAX_HEADERS: usize = 64;
/// Deepest nesting a message body may have.
pub const MAX_BODY_DEPTH: usize = 64;
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 256;

const CLIENT_COMMANDS: [&str; 11] =
    ["CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"];

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

/// A client frame as the reference decoder read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    /// Unescaped (but in `CONNECT` and `STOMP`), in order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    /// The first header called `name`: STOMP 1.2 ignores later repeats.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why bytes are not a STOMP 1.2 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// More than the frame size limit, or a `content-length` that cannot fit in it.
    TooLarge,
    TooManyHeaders,
    UnknownCommand,
    NoColon,
    EmptyName,
    CarriageReturn,
    BadEscape,
    InvalidUtf8,
    BadContentLength,
    NoNulAfterBody,
    NulInHeaders,
}

/// Where an incomplete input stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Between frames.
    Idle,
    /// A CR that may start a heart-beat.
    Cr,
    Command,
    Headers,
    /// In the body: the bytes still needed to complete it (with the NUL) when it has a
    /// `content-length`.
    Body {
        needed: Option<usize>,
    },
}

/// One thing the decoder takes from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    HeartBeat,
}

enum Step {
    Item(Item, usize),
    Wait(Pending),
}

/// The reference decoder: bytes in, items out, a fault ends it.
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Decoder {
    pub fn new(max: usize) -> Self {
        Decoder { buf: Vec::new(), max }
    }

    /// The items the bytes complete, or those before the fault and the fault.
    pub fn push(&mut self, bytes: &[u8]) -> (Vec<Item>, Option<Fault>) {
        self.buf.extend_from_slice(bytes);
        let mut items = Vec::new();
        loop {
            match step(&self.buf, self.max) {
                Ok(Step::Item(item, len)) => {
                    self.buf.drain(..len);
                    items.push(item);
                }
                Ok(Step::Wait(_)) => return (items, None),
                Err(fault) => return (items, Some(fault)),
            }
        }
    }

    pub fn pending(&self) -> Pending {
        match step(&self.buf, self.max) {
            Ok(Step::Wait(p)) => p,
            _ => Pending::Idle,
        }
    }
}

/// The first item of `b`.
fn step(b: &[u8], max: usize) -> Result<Step, Fault> {
    match b {
        [] => return Ok(Step::Wait(Pending::Idle)),
        [b'\r'] => return Ok(Step::Wait(Pending::Cr)),
        [b'\n', ..] => return Ok(Step::Item(Item::HeartBeat, 1)),
        [b'\r', b'\n', ..] => return Ok(Step::Item(Item::HeartBeat, 2)),
        _ => {}
    }
    // A line ends at LF; a NUL before it ends the frame too early. Both must lie within the
    // frame's first `max` bytes.
    let line_end = |from: usize| -> Result<Option<usize>, Fault> {
        let window = b.len().min(max);
        match b.get(from..window).and_then(|w| w.iter().position(|&c| c == b'\n' || c == 0)) {
            Some(at) => Ok(Some(from + at)),
            None if b.len() > max => Err(Fault::TooLarge),
            None => Ok(None),
        }
    };
    let Some(end) = line_end(0)? else { return Ok(Step::Wait(Pending::Command)) };
    if b[end] == 0 {
        return Err(Fault::NulInHeaders);
    }
    let command = std::str::from_utf8(strip_cr(&b[..end]))
        .ok()
        .filter(|c| CLIENT_COMMANDS.contains(c))
        .ok_or(Fault::UnknownCommand)?
        .to_owned();
    let escaped = !matches!(command.as_str(), "CONNECT" | "STOMP");
    let mut pos = end + 1;
    let mut headers = Vec::new();
    let mut content_length = None;
    loop {
        let Some(end) = line_end(pos)? else { return Ok(Step::Wait(Pending::Headers)) };
        if b[end] == 0 {
            return Err(Fault::NulInHeaders);
        }
        let line = strip_cr(&b[pos..end]);
        pos = end + 1;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(Fault::TooManyHeaders);
        }
        if line.contains(&b'\r') {
            return Err(Fault::CarriageReturn);
        }
        let colon = line.iter().position(|&c| c == b':').ok_or(Fault::NoColon)?;
        if colon == 0 {
            return Err(Fault::EmptyName);
        }
        let line = std::str::from_utf8(line).map_err(|_| Fault::InvalidUtf8)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (name, value) = if escaped {
            (unescape(name).ok_or(Fault::BadEscape)?, unescape(value).ok_or(Fault::BadEscape)?)
        } else {
            (name.to_owned(), value.to_owned())
        };
        if content_length.is_none() && name == "content-length" {
            content_length = Some(length(&value, max)?);
        }
        headers.push((name, value));
    }
    let body = pos;
    let (nul, len) = match content_length {
        Some(n) => {
            // The frame would end at byte body + n + 1.
            if body + n >= max {
                return Err(Fault::TooLarge);
            }
            match b.get(body + n) {
                None => return Ok(Step::Wait(Pending::Body { needed: Some(body + n + 1 - b.len()) })),
                Some(0) => (body + n, body + n + 1),
                Some(_) => return Err(Fault::NoNulAfterBody),
            }
        }
        None => match b[body..b.len().min(max)].iter().position(|&c| c == 0) {
            Some(at) => (body + at, body + at + 1),
            None if b.len() > max => return Err(Fault::TooLarge),
            None => return Ok(Step::Wait(Pending::Body { needed: None })),
        },
    };
    Ok(Step::Item(Item::Frame(Frame { command, headers, body: b[body..nul].to_vec() }), len))
}

/// A `content-length`: decimal digits, at most `max`.
fn length(value: &str, max: usize) -> Result<usize, Fault> {
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Fault::BadContentLength);
    }
    value.parse::<usize>().ok().filter(|&n| n <= max).ok_or(Fault::TooLarge)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

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

    fn decode(bytes: &[u8]) -> (Vec<Item>, Option<Fault>, Pending) {
        let mut d = Decoder::new(MAX);
        let (items, fault) = d.push(bytes);
        (items, fault, d.pending())
    }

    fn fault(bytes: &[u8]) -> Option<Fault> {
        decode(bytes).1
    }

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
    fn decodes_frames_heart_beats_and_splits_alike() {
        let stream = b"\n\r\nSEND\r\ndestination:/user/a\\cb\n\nhi\0\nACK\nid:1\ncontent-length:3\n\na\0b\0";
        let (items, f, p) = decode(stream);
        assert_eq!((f, p), (None, Pending::Idle));
        assert_eq!(items.len(), 5);
        let Item::Frame(send) = &items[2] else { panic!() };
        assert_eq!((send.get("destination"), &send.body[..]), (Some("/user/a:b"), &b"hi"[..]));
        let Item::Frame(ack) = &items[4] else { panic!() };
        assert_eq!(&ack.body[..], b"a\0b");
        let mut d = Decoder::new(MAX);
        let mut split = Vec::new();
        for &b in stream.iter() {
            split.extend(d.push(&[b]).0);
        }
        assert_eq!(split, items);
        let connect = decode(b"CONNECT\nlogin:a\\c\n\n\0").0;
        assert!(matches!(&connect[0], Item::Frame(f) if f.get("login") == Some("a\\c")), "CONNECT is not escaped");
    }

    #[test]
    fn refuses_what_stomp_and_the_limits_refuse() {
        assert_eq!(fault(b"SEND\nx:1\0\n\n\0"), Some(Fault::NulInHeaders));
        assert_eq!(fault(b"send\n\n\0"), Some(Fault::UnknownCommand));
        assert_eq!(fault(b"MESSAGE\n\n\0"), Some(Fault::UnknownCommand));
        assert_eq!(fault(b"SEND\nnocolon\n\n\0"), Some(Fault::NoColon));
        assert_eq!(fault(b"SEND\n:v\n\n\0"), Some(Fault::EmptyName));
        assert_eq!(fault(b"SEND\na\rb:v\n\n\0"), Some(Fault::CarriageReturn));
        assert_eq!(fault(b"SEND\na:\\t\n\n\0"), Some(Fault::BadEscape));
        assert_eq!(fault(b"SEND\na:\xff\n\n\0"), Some(Fault::InvalidUtf8));
        assert_eq!(fault(b"SEND\ncontent-length:x\n\n\0"), Some(Fault::BadContentLength));
        assert_eq!(fault(b"SEND\ncontent-length:1\n\nab\0"), Some(Fault::NoNulAfterBody));
        assert_eq!(fault(b"SEND\ncontent-length:999\n\n"), Some(Fault::TooLarge), "before the body");
        assert_eq!(fault(b"SEND\ncontent-length:1\ncontent-length:x\n\na\0"), None, "the first wins");
        let many: Vec<u8> = [&b"SEND\n"[..], &b"a:b\n".repeat(65), b"\n\0"].concat();
        assert_eq!(Decoder::new(1000).push(&many).1, Some(Fault::TooManyHeaders));
        let enough: Vec<u8> = [&b"SEND\n"[..], &b"a:b\n".repeat(64), b"\n\0"].concat();
        assert_eq!(Decoder::new(1000).push(&enough).1, None);
        let endless = [&b"SEND\nx:"[..], &[b'a'; MAX]].concat();
        assert_eq!(fault(&endless), Some(Fault::TooLarge));
        assert_eq!(decode(&endless[..MAX]).2, Pending::Headers, "not yet");
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_taken() {
        let head = b"SEND\n\n";
        let exact = [&head[..], &vec![b'x'; MAX - head.len() - 1], b"\0"].concat();
        assert_eq!(exact.len(), MAX);
        assert!(fault(&exact).is_none());
        let over = [&head[..], &vec![b'x'; MAX - head.len()], b"\0"].concat();
        assert_eq!(fault(&over), Some(Fault::TooLarge));
        let cl = |n: usize| format!("SEND\ncontent-length:{n}\n\n").into_bytes();
        let fits = MAX - cl(100).len() - 1;
        assert!(matches!(decode(&cl(fits)).2, Pending::Body { needed: Some(_) }));
        assert_eq!(fault(&cl(fits + 1)), Some(Fault::TooLarge));
    }

    #[test]
    fn pending_input_says_what_completes_it() {
        assert_eq!(decode(b"\r").2, Pending::Cr);
        assert_eq!(decode(b"SEN").2, Pending::Command);
        assert_eq!(decode(b"SEND\na:b").2, Pending::Headers);
        assert_eq!(decode(b"SEND\n\nbody").2, Pending::Body { needed: None });
        assert_eq!(decode(b"SEND\ncontent-length:5\n\nab").2, Pending::Body { needed: Some(4) });
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
