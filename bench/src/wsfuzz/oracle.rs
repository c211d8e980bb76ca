//! The oracle: holds what the server sent during a case to the model's prediction and to
//! PROTOCOL.md §4. Pure: it sees the events the connection's reader produced, nothing else.
//!
//! Allowed: `reply`/`error` frames that answer owed ids exactly once (error codes of §4),
//! `message` and `presence` events of this session's streams and rooms, pongs that echo pings
//! in order, and a close frame with the predicted code (or a code of §4's list the server may
//! choose at any time: 1008 for its rate limit, 1001 when it shuts down) followed by the end
//! of TCP. Anything else is an anomaly.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::frame::ServerFrame;
use super::model::{End, Prediction};

/// What the connection's reader saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Frame(ServerFrame),
    /// A server frame broke a rule of RFC 6455 (the reader stops parsing there).
    Bad(String),
    /// The server ended TCP (FIN).
    Eof,
    /// The connection failed (a reset, typically).
    Error(String),
}

/// How the client ended its part of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEnd {
    /// It keeps the connection.
    Open,
    /// It sent FIN (`shutdown(SHUT_WR)`).
    Fin,
    /// It reset the connection: nothing more can be seen.
    Reset,
}

/// Error codes of PROTOCOL.md §4.
pub const ERROR_CODES: [&str; 9] = [
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
/// Close codes of PROTOCOL.md §4.
pub const CLOSE_CODES: [u16; 11] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 4001, 4002, 4003, 4004];

/// What a session has shown of itself so far: its user and the rooms it joined.
#[derive(Clone, Debug, Default)]
pub struct SessionView {
    pub user: String,
    pub rooms: HashSet<String>,
}

/// A server text frame, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Welcome {
        user: String,
    },
    /// A reply; `joined` names the room when it answers a `join`.
    Reply {
        id: String,
        joined: Option<String>,
    },
    Error {
        id: Option<String>,
        code: String,
    },
    Message {
        stream: String,
    },
    Presence {
        room: String,
    },
    Disconnect {
        code: u16,
    },
}

#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: String,
    id: Option<Box<RawValue>>,
    code: Option<Box<RawValue>>,
    message: Option<String>,
    reason: Option<String>,
    stream: Option<String>,
    seq: Option<u64>,
    mid: Option<String>,
    from: Option<String>,
    /// Present (`null` included: a STOMP `SEND` of JSON `null` is a message body too).
    #[serde(default, deserialize_with = "present")]
    body: Option<Box<RawValue>>,
    ts: Option<u64>,
    room: Option<String>,
    event: Option<String>,
    user: Option<String>,
    session: Option<String>,
    node: Option<String>,
    ping_interval: Option<u64>,
    truncated: Option<bool>,
}

/// A field that is there, whatever its value (serde reads `null` as a missing `Option`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Classifies a server text frame, or says what is wrong with it.
pub fn classify(text: &str) -> Result<Out, String> {
    let f: Fields = serde_json::from_str(text).map_err(|e| format!("not a frame of PROTOCOL.md §4 ({e})"))?;
    let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(format!("`{}` without {what}", f.kind)) };
    let id = match &f.id {
        Some(raw) if !matches!(raw.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) => {
            return Err(format!("id {} is not a number or a string", raw.get()));
        }
        other => other.as_ref().map(|r| r.get().to_owned()),
    };
    match f.kind.as_str() {
        "welcome" => {
            need(f.session.is_some() && f.node.is_some() && f.ping_interval.is_some(), "session, node, ping_interval")?;
            Ok(Out::Welcome { user: f.user.clone().unwrap_or_default() })
        }
        "reply" => {
            let id = id.ok_or_else(|| "a reply without an id".to_owned())?;
            let joined = f.room.clone().filter(|_| f.truncated.is_some() && f.seq.is_some());
            Ok(Out::Reply { id, joined })
        }
        "error" => {
            let code = f.code.as_ref().and_then(|c| serde_json::from_str::<String>(c.get()).ok()).unwrap_or_default();
            if !ERROR_CODES.contains(&code.as_str()) {
                return Err(format!("error code {code:?} is not one of PROTOCOL.md §4"));
            }
            need(f.message.is_some(), "message")?;
            Ok(Out::Error { id, code })
        }
        "message" => {
            let stream = f.stream.clone().unwrap_or_default();
            need(f.mid.is_some() && f.from.is_some() && f.body.is_some() && f.ts.is_some(), "mid, from, body, ts")?;
            need(stream == "broadcast" || f.seq.is_some(), "seq")?;
            Ok(Out::Message { stream })
        }
        "presence" => {
            need(matches!(f.event.as_deref(), Some("join" | "leave")), "event join or leave")?;
            need(f.user.is_some(), "user")?;
            Ok(Out::Presence { room: f.room.clone().unwrap_or_default() })
        }
        "disconnect" => {
            let code = f.code.as_ref().and_then(|c| serde_json::from_str::<u16>(c.get()).ok());
            need(code.is_some() && f.reason.is_some(), "code, reason")?;
            Ok(Out::Disconnect { code: code.unwrap_or_default() })
        }
        other => Err(format!("unknown frame type {other:?}")),
    }
}

/// The answers seen to owed ids: whether every owed one came.
fn answered_all(pred: &Prediction, events: &[Event]) -> bool {
    let (owed, _) = pred.answer_ids();
    let mut left: HashMap<&str, usize> = HashMap::new();
    for id in owed {
        *left.entry(id).or_default() += 1;
    }
    for e in events {
        if let Event::Frame(ServerFrame::Text(t)) = e
            && let Ok(Out::Reply { id, .. } | Out::Error { id: Some(id), .. }) = classify(t)
            && let Some(n) = left.get_mut(id.as_str())
        {
            *n = n.saturating_sub(1);
        }
    }
    left.values().all(|n| *n == 0)
}

/// Whether the case has seen what it waits for: the connection's end, or (when the session is
/// predicted to go on) every owed answer.
pub fn done(pred: &Prediction, events: &[Event], client: ClientEnd) -> bool {
    if client == ClientEnd::Reset || events.iter().any(|e| matches!(e, Event::Eof | Event::Error(_))) {
        return true;
    }
    let closing = events.iter().any(|e| matches!(e, Event::Frame(ServerFrame::Close(..)) | Event::Bad(_)));
    client == ClientEnd::Open && !closing && pred.end == End::Open && answered_all(pred, events)
}

/// The oracle's judgement of one case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Countable labels: `reply`, `error bad_request`, `close 1002`, `pong`, `open`, …
    pub outcomes: Vec<String>,
    pub anomalies: Vec<String>,
    /// The connection is over (closed, reset, or no longer trusted).
    pub over: bool,
}

/// Judges what the server sent (`events`) against `pred`; `timed_out` when the wait ended
/// before [`done`]. Records the rooms a join reply names into `view`.
pub fn judge(
    pred: &Prediction,
    events: &[Event],
    client: ClientEnd,
    timed_out: bool,
    view: &mut SessionView,
) -> Verdict {
    let mut v = Verdict::default();
    view.rooms.extend(pred.rooms.iter().cloned());
    let (owed, maybe) = pred.answer_ids();
    let mut left: HashMap<&str, usize> = HashMap::new();
    for id in &owed {
        *left.entry(id).or_default() += 1;
    }
    let mut maybe_left: HashSet<&str> = maybe.iter().copied().collect();
    let pings = pred.pings();
    let mut next_ping = 0;
    let mut close: Option<Option<u16>> = None;
    let mut disconnect: Option<u16> = None;
    let mut ended = false;
    for e in events {
        match e {
            Event::Frame(ServerFrame::Text(t)) => match classify(t) {
                Err(why) => v.anomalies.push(format!("server text: {why}: {}", clip(t))),
                Ok(Out::Welcome { .. }) => v.anomalies.push("a second welcome".into()),
                Ok(out @ (Out::Reply { .. } | Out::Error { .. })) => {
                    let id = match &out {
                        Out::Reply { id, joined } => {
                            v.outcomes.push("reply".into());
                            if let Some(room) = joined {
                                view.rooms.insert(room.clone());
                            }
                            Some(id.clone())
                        }
                        Out::Error { id, code } => {
                            v.outcomes.push(format!("error {code}"));
                            if code == "internal" || code == "unavailable" {
                                v.anomalies.push(format!("error {code} in answer to client input: {}", clip(t)));
                            }
                            id.clone()
                        }
                        _ => unreachable!(),
                    };
                    if let Some(id) = id {
                        match left.get_mut(id.as_str()) {
                            Some(n) if *n > 0 => *n -= 1,
                            _ if maybe_left.remove(id.as_str()) => {}
                            _ => v
                                .anomalies
                                .push(format!("an answer to id {} that was not owed (or a second one)", clip(&id))),
                        }
                    }
                }
                Ok(Out::Message { stream }) => {
                    v.outcomes.push("message".into());
                    let mine = stream == "broadcast"
                        || stream.strip_prefix("user:") == Some(view.user.as_str())
                        || stream.strip_prefix("room:").is_some_and(|r| view.rooms.contains(r));
                    if !mine {
                        v.anomalies.push(format!("a message of stream {stream}, which {} does not read", view.user));
                    }
                }
                Ok(Out::Presence { room }) => {
                    v.outcomes.push("presence".into());
                    if !view.rooms.contains(&room) {
                        v.anomalies.push(format!("a presence event of room {room}, which the session never joined"));
                    }
                }
                Ok(Out::Disconnect { code }) => disconnect = Some(code),
            },
            Event::Frame(ServerFrame::Binary(b)) => {
                v.anomalies.push(format!("a binary frame from the server ({} bytes)", b.len()))
            }
            Event::Frame(ServerFrame::Ping(_)) => {}
            Event::Frame(ServerFrame::Pong(p)) => {
                v.outcomes.push("pong".into());
                match pings[next_ping..].iter().position(|sent| sent == p) {
                    Some(i) => next_ping += i + 1,
                    None => v
                        .anomalies
                        .push(format!("a pong ({} bytes) that answers no ping sent, or out of order", p.len())),
                }
            }
            Event::Frame(ServerFrame::Close(code, _)) => close = Some(*code),
            Event::Bad(why) => v.anomalies.push(format!("malformed server frame: {why}")),
            Event::Eof | Event::Error(_) => ended = true,
        }
    }
    let anytime: Vec<u16> = {
        let mut c = vec![1001];
        if pred.messages > 0 {
            c.push(1008);
        }
        c.extend(&pred.lenient);
        c
    };
    if let (Some(Some(code)), Some(d)) = (close, disconnect)
        && code != d
    {
        v.anomalies.push(format!("disconnect frame says {d}, close frame says {code}"));
    }
    if let Some(d) = disconnect
        && !CLOSE_CODES.contains(&d)
    {
        v.anomalies.push(format!("disconnect code {d} is not one of PROTOCOL.md §4"));
    }
    v.over = close.is_some() || ended || client != ClientEnd::Open || timed_out;
    let missing: Vec<&str> = left.iter().filter(|(_, n)| **n > 0).map(|(id, _)| *id).collect();
    let closed_early = matches!(close, Some(Some(c)) if anytime.contains(&c) && !matches!(&pred.end, End::Close(codes) if codes.contains(&c)));
    if !missing.is_empty() && client == ClientEnd::Open && !closed_early {
        v.anomalies.push(format!("no answer to id {}", clip(&missing.join(", "))));
    }
    if client == ClientEnd::Open
        && pred.end == End::Open
        && close.is_none()
        && !pings.is_empty()
        && next_ping < pings.len()
        && !ended
    {
        v.anomalies.push("the last ping was not answered".into());
    }
    if client == ClientEnd::Reset {
        v.outcomes.push("reset".into());
        return v;
    }
    let label = |code: Option<u16>| code.map_or("close (no code)".to_owned(), |c| format!("close {c}"));
    match (&pred.end, close) {
        (End::Open | End::OpenFragment, None) => {
            if ended {
                if client == ClientEnd::Fin {
                    v.outcomes.push("eof after fin".into());
                } else {
                    v.anomalies.push("connection dropped without a close frame".into());
                }
            } else if client == ClientEnd::Fin {
                v.anomalies.push("connection left open after the client's FIN".into());
            } else if timed_out {
                v.anomalies.push("timed out waiting for the answers".into());
            } else {
                v.outcomes.push("open".into());
            }
            return v;
        }
        (End::Open | End::OpenFragment, Some(code)) => {
            if code.is_some_and(|c| anytime.contains(&c)) {
                v.outcomes.push(label(code));
            } else {
                v.anomalies.push(format!("{} where the session should go on", label(code)));
            }
        }
        (End::Close(codes), Some(code)) => {
            if code.is_some_and(|c| codes.contains(&c) || anytime.contains(&c)) {
                v.outcomes.push(label(code));
            } else {
                v.anomalies.push(format!("{} where RFC 6455 asks for {codes:?}", label(code)));
            }
        }
        (End::ClientClose(sent), Some(code)) => {
            if code == *sent || code.is_none() || code == Some(1000) || code.is_some_and(|c| anytime.contains(&c)) {
                v.outcomes.push(format!("echo {}", label(code)));
            } else {
                v.anomalies.push(format!("{} in answer to our close {sent:?}", label(code)));
            }
        }
        (End::Partial { close_ok }, Some(code)) => {
            if code.is_some_and(|c| {
                close_ok.contains(&c) || anytime.contains(&c) || (client == ClientEnd::Fin && matches!(c, 1000 | 1002))
            }) {
                v.outcomes.push(label(code));
            } else {
                v.anomalies.push(format!("{} on a frame cut short (allowed: {close_ok:?})", label(code)));
            }
        }
        (End::Close(codes), None) => {
            v.anomalies.push(if ended {
                format!("connection dropped without a close frame (RFC 6455 asks for {codes:?})")
            } else {
                format!("no close frame within the timeout (RFC 6455 asks for {codes:?})")
            });
            return v;
        }
        (End::ClientClose(_), None) => {
            v.anomalies.push(if ended {
                "connection dropped without answering our close frame".into()
            } else {
                "no close frame in answer to ours within the timeout".into()
            });
            return v;
        }
        (End::Partial { .. }, None) => {
            if ended {
                v.outcomes.push("eof after fin".into());
            } else {
                v.anomalies.push("connection left open after the client's FIN mid-frame".into());
            }
            return v;
        }
    }
    // A close frame came: TCP must end next.
    if !ended {
        v.anomalies.push("no TCP close after the close frame".into());
    }
    if let Some(Some(code)) = close
        && !CLOSE_CODES.contains(&code)
        && pred.end != End::ClientClose(Some(code))
    {
        v.anomalies.push(format!("close code {code} is not one of PROTOCOL.md §4"));
    }
    v
}

fn clip(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_owned();
    }
    let mut cut = 200;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &s[..cut], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::model::{Owed, PROTOCOL_ERROR};

    fn text(s: &str) -> Event {
        Event::Frame(ServerFrame::Text(s.into()))
    }

    fn close(code: u16) -> Event {
        Event::Frame(ServerFrame::Close(Some(code), String::new()))
    }

    fn pred(owed: Vec<Owed>, end: End) -> Prediction {
        Prediction { owed, end, messages: 1, lenient: vec![], consumed: 0, rooms: vec![] }
    }

    fn view() -> SessionView {
        SessionView { user: "fz-1".into(), rooms: HashSet::new() }
    }

    #[test]
    fn classifies_server_frames() {
        assert_eq!(
            classify(r#"{"type":"reply","id":"~c1","room":"r","seq":3,"truncated":false}"#),
            Ok(Out::Reply { id: r#""~c1""#.into(), joined: Some("r".into()) })
        );
        assert_eq!(classify(r#"{"type":"reply","id":1e400}"#), Ok(Out::Reply { id: "1e400".into(), joined: None }));
        assert_eq!(
            classify(r#"{"type":"error","id":5,"code":"bad_request","message":"x"}"#),
            Ok(Out::Error { id: Some("5".into()), code: "bad_request".into() })
        );
        assert!(classify(r#"{"type":"error","code":"oops","message":"x"}"#).unwrap_err().contains("oops"));
        assert!(classify(r#"{"type":"reply"}"#).is_err());
        assert!(classify(r#"{"type":"reply","id":{"a":1}}"#).is_err());
        assert!(
            classify(r#"{"type":"message","stream":"user:a","mid":"m","from":"b","body":1,"ts":1}"#)
                .unwrap_err()
                .contains("seq")
        );
        assert_eq!(
            classify(r#"{"type":"message","stream":"broadcast","mid":"m","from":"system","body":{},"ts":1}"#),
            Ok(Out::Message { stream: "broadcast".into() })
        );
        assert_eq!(
            classify(r#"{"type":"message","stream":"user:a","seq":1,"mid":"m","from":"b","body":null,"ts":1}"#),
            Ok(Out::Message { stream: "user:a".into() }),
            "a null body is a body"
        );
        assert!(classify(r#"{"type":"presence","room":"r","event":"wave","user":"u"}"#).is_err());
        assert_eq!(classify(r#"{"type":"disconnect","code":1002,"reason":"x"}"#), Ok(Out::Disconnect { code: 1002 }));
        assert!(classify("not json").is_err());
        assert!(classify(r#"{"type":"welcome","type":"reply"}"#).is_err(), "duplicate fields");
        assert!(classify(r#"{"type":"surprise"}"#).is_err());
    }

    #[test]
    fn owed_answers_must_come_exactly_once() {
        let p = pred(vec![Owed::Answer("1".into()), Owed::Answer(r#""~s""#.into())], End::Open);
        let good = [
            text(r#"{"type":"error","id":1,"code":"bad_request","message":"m"}"#),
            text(r#"{"type":"reply","id":"~s"}"#),
        ];
        assert!(done(&p, &good, ClientEnd::Open));
        let v = judge(&p, &good, ClientEnd::Open, false, &mut view());
        assert_eq!(v.anomalies, Vec::<String>::new());
        assert_eq!(v.outcomes, vec!["error bad_request", "reply", "open"]);
        assert!(!done(&p, &good[1..], ClientEnd::Open));
        let v = judge(&p, &good[1..], ClientEnd::Open, true, &mut view());
        assert!(v.anomalies.iter().any(|a| a.contains("no answer to id 1")), "{v:?}");
        let twice = [good[0].clone(), good[0].clone(), good[1].clone()];
        let v = judge(&p, &twice, ClientEnd::Open, false, &mut view());
        assert!(v.anomalies.iter().any(|a| a.contains("not owed")), "{v:?}");
        let internal = [text(r#"{"type":"error","id":1,"code":"internal","message":"m"}"#), good[1].clone()];
        assert_eq!(judge(&p, &internal, ClientEnd::Open, false, &mut view()).anomalies.len(), 1);
    }

    #[test]
    fn close_codes_are_held_to_the_prediction() {
        let p = pred(vec![], End::Close(vec![PROTOCOL_ERROR]));
        let proper = [text(r#"{"type":"disconnect","code":1002,"reason":"x"}"#), close(1002), Event::Eof];
        let v = judge(&p, &proper, ClientEnd::Open, false, &mut view());
        assert_eq!((v.anomalies.len(), v.outcomes.clone(), v.over), (0, vec!["close 1002".to_owned()], true));
        let wrong = [close(1011), Event::Eof];
        assert!(judge(&p, &wrong, ClientEnd::Open, false, &mut view()).anomalies[0].contains("asks for [1002]"));
        let dropped = [Event::Eof];
        assert!(
            judge(&p, &dropped, ClientEnd::Open, false, &mut view()).anomalies[0].contains("without a close frame")
        );
        let lingering = [close(1002)];
        assert!(judge(&p, &lingering, ClientEnd::Open, true, &mut view()).anomalies[0].contains("no TCP close"));
        let mismatch = [text(r#"{"type":"disconnect","code":1009,"reason":"x"}"#), close(1002), Event::Eof];
        assert!(judge(&p, &mismatch, ClientEnd::Open, false, &mut view()).anomalies[0].contains("says 1009"));
        let rate_limited = [close(1008), Event::Eof];
        assert!(judge(&p, &rate_limited, ClientEnd::Open, false, &mut view()).anomalies.is_empty());
        let echo = pred(vec![], End::ClientClose(Some(4500)));
        assert!(judge(&echo, &[close(4500), Event::Eof], ClientEnd::Open, false, &mut view()).anomalies.is_empty());
        assert!(!judge(&echo, &[close(1002), Event::Eof], ClientEnd::Open, false, &mut view()).anomalies.is_empty());
        let open = pred(vec![], End::Open);
        assert!(
            judge(&open, &[close(4003), Event::Eof], ClientEnd::Open, false, &mut view()).anomalies[0]
                .contains("should go on")
        );
    }

    #[test]
    fn pongs_echo_pings_in_order() {
        let p = pred(vec![Owed::Pong(b"a".to_vec()), Owed::Pong(b"b".to_vec()), Owed::Answer("1".into())], End::Open);
        let reply = text(r#"{"type":"reply","id":1}"#);
        let pong = |b: &[u8]| Event::Frame(ServerFrame::Pong(b.to_vec()));
        assert!(
            judge(&p, &[pong(b"a"), pong(b"b"), reply.clone()], ClientEnd::Open, false, &mut view())
                .anomalies
                .is_empty()
        );
        assert!(
            judge(&p, &[pong(b"b"), reply.clone()], ClientEnd::Open, false, &mut view()).anomalies.is_empty(),
            "only the latest"
        );
        assert!(
            !judge(&p, &[pong(b"b"), pong(b"a"), reply.clone()], ClientEnd::Open, false, &mut view())
                .anomalies
                .is_empty()
        );
        assert!(
            !judge(&p, &[pong(b"a"), reply.clone()], ClientEnd::Open, false, &mut view()).anomalies.is_empty(),
            "latest unanswered"
        );
        assert!(!judge(&p, &[pong(b"z"), pong(b"b"), reply], ClientEnd::Open, false, &mut view()).anomalies.is_empty());
    }

    #[test]
    fn events_of_other_users_and_rooms_are_leaks() {
        let p = pred(vec![Owed::Answer("1".into())], End::Open);
        let join = text(r#"{"type":"reply","id":1,"room":"lobby","seq":0,"truncated":false}"#);
        let msg = |stream: &str| {
            text(&format!(r#"{{"type":"message","stream":"{stream}","seq":1,"mid":"m","from":"x","body":1,"ts":1}}"#))
        };
        let mut v = view();
        let ok = [
            join.clone(),
            msg("room:lobby"),
            msg("user:fz-1"),
            text(r#"{"type":"presence","room":"lobby","event":"join","user":"x"}"#),
        ];
        assert!(judge(&p, &ok, ClientEnd::Open, false, &mut v).anomalies.is_empty());
        assert!(v.rooms.contains("lobby"));
        let mut fresh = view();
        let leak = [msg("user:fz-2"), msg("room:elsewhere"), text(r#"{"type":"reply","id":1}"#)];
        assert_eq!(judge(&p, &leak, ClientEnd::Open, false, &mut fresh).anomalies.len(), 2);
    }

    #[test]
    fn a_frame_cut_short_then_fin_must_end_the_connection() {
        let p = pred(vec![], End::Partial { close_ok: vec![] });
        assert!(judge(&p, &[Event::Eof], ClientEnd::Fin, false, &mut view()).anomalies.is_empty());
        assert!(judge(&p, &[], ClientEnd::Fin, true, &mut view()).anomalies[0].contains("left open"));
        assert!(judge(&p, &[], ClientEnd::Reset, false, &mut view()).anomalies.is_empty());
        assert!(!done(&p, &[], ClientEnd::Fin));
        assert!(done(&p, &[Event::Eof], ClientEnd::Fin));
    }
}
