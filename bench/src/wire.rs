//! The three wire protocols the tool speaks, behind one shape: URLs, the frames a client sends
//! (join, publish, send) and what it makes of the frames it receives ([`Frame`]).
//!
//! - `switchyard`: PROTOCOL.md — dev-mode `?user=`, `welcome` first, commands with `id` get one
//!   `reply`/`error`, `message` events carry `stream` and `seq`.
//! - `socketio`: Socket.IO v4 over a raw WebSocket ([`crate::socketio`]); the peer server joins
//!   `join`ed rooms and answers `joined`, relays `publish`/`send` as `message` events.
//! - `relay`: the `ws` + Redis relay peer: JSON frames `join`/`joined`, `publish`, `send`,
//!   `message`.
//! - `stomp`: STOMP 1.2 as Switchyard speaks it (PROTOCOL.md §7, [`crate::stomp`]): `/stomp`,
//!   `CONNECT` with `login` (dev mode), every client subscribed to `/user/queue/messages`, a room
//!   joined with `SUBSCRIBE /topic/<room>`, `SEND` to `/topic/<room>` or `/user/<id>`; every
//!   frame the tool sends asks for a `RECEIPT`, which answers it as a `reply` does.
//! - `stomp-rabbitmq`: the same against RabbitMQ's Web-STOMP plugin (`/ws`, guest login):
//!   rooms are `/topic/<room>` (amq.topic), a user's queue is `/exchange/amq.direct/<user>`
//!   (an exclusive auto-delete queue per subscriber, so nothing outlives a run).
//!
//! Every message body the tool sends is a [`Probe`]: send time, number in its flow, flow id.

use std::borrow::Cow;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::socketio::{self, EnginePacket, SocketKind};
use crate::stomp::{self, RawFrame};

/// The receipt (and reply id) of a STOMP client's subscription to its own queue, made at
/// connect time; far above publish ids and the join id.
pub const QUEUE_RECEIPT: u64 = u64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Switchyard,
    Socketio,
    Relay,
    /// STOMP 1.2 over WebSocket, Switchyard's `/stomp`.
    Stomp,
    /// STOMP 1.2 over RabbitMQ's Web-STOMP plugin.
    #[value(name = "stomp-rabbitmq")]
    #[serde(rename = "stomp-rabbitmq")]
    StompRabbitmq,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Switchyard => "switchyard",
            Protocol::Socketio => "socketio",
            Protocol::Relay => "relay",
            Protocol::Stomp => "stomp",
            Protocol::StompRabbitmq => "stomp-rabbitmq",
        }
    }

    pub fn is_stomp(self) -> bool {
        matches!(self, Protocol::Stomp | Protocol::StompRabbitmq)
    }

    /// The path used when a target URL has none.
    fn default_path(self) -> &'static str {
        match self {
            Protocol::Switchyard => "/ws",
            Protocol::Socketio => "/socket.io/",
            Protocol::Relay => "/",
            Protocol::Stomp => "/stomp",
            Protocol::StompRabbitmq => "/ws",
        }
    }

    /// The URL a client of `user` opens on the target `base` (`ws://host:port[/path]`).
    pub fn ws_url(self, base: &str, user: &str) -> String {
        let mut url = with_default_path(base, self.default_path());
        if self.is_stomp() {
            // The identity goes in CONNECT.
            return url;
        }
        url.push(if url.contains('?') { '&' } else { '?' });
        if self == Protocol::Socketio {
            url.push_str("EIO=4&transport=websocket&");
        }
        url.push_str("user=");
        url.push_str(user);
        url
    }

    /// Join `room` (`since`: Switchyard's catch-up point). Switchyard answers a `reply` with
    /// `id`; the peers answer `joined`.
    pub fn join(self, id: u64, room: &str, since: Option<u64>) -> String {
        match self {
            Protocol::Switchyard => match since {
                Some(s) => format!(r#"{{"type":"join","id":{id},"room":"{room}","since":{s}}}"#),
                None => format!(r#"{{"type":"join","id":{id},"room":"{room}"}}"#),
            },
            Protocol::Socketio => socketio::event("join", &format!(r#""{room}""#)),
            Protocol::Relay => format!(r#"{{"type":"join","room":"{room}"}}"#),
            Protocol::Stomp => {
                let id = id.to_string();
                stomp::subscribe(&id, &format!("/topic/{room}"), &id, since)
            }
            Protocol::StompRabbitmq => {
                let id = id.to_string();
                stomp::subscribe(&id, &format!("/topic/{room}"), &id, None)
            }
        }
    }

    /// Publish `body` (JSON text) to `room`; only Switchyard answers (a `reply` with `id`).
    pub fn publish(self, id: u64, room: &str, body: &str) -> String {
        match self {
            Protocol::Switchyard => {
                format!(r#"{{"type":"publish","id":{id},"room":"{room}","body":{body}}}"#)
            }
            Protocol::Socketio => socketio::event("publish", &format!(r#"{{"room":"{room}","body":{body}}}"#)),
            Protocol::Relay => format!(r#"{{"type":"publish","room":"{room}","body":{body}}}"#),
            Protocol::Stomp | Protocol::StompRabbitmq => stomp::send(&format!("/topic/{room}"), id, body),
        }
    }

    /// Send `body` to user `to`; only Switchyard answers (a `reply` with `id`).
    pub fn send(self, id: u64, to: &str, body: &str) -> String {
        match self {
            Protocol::Switchyard => {
                format!(r#"{{"type":"send","id":{id},"to":"{to}","body":{body}}}"#)
            }
            Protocol::Socketio => socketio::event("send", &format!(r#"{{"to":"{to}","body":{body}}}"#)),
            Protocol::Relay => format!(r#"{{"type":"send","to":"{to}","body":{body}}}"#),
            Protocol::Stomp => stomp::send(&format!("/user/{to}"), id, body),
            Protocol::StompRabbitmq => stomp::send(&format!("/exchange/amq.direct/{to}"), id, body),
        }
    }

    /// STOMP: the `CONNECT` frame of `user` (Switchyard's dev mode names the user in `login`;
    /// RabbitMQ takes its default guest account).
    pub fn stomp_connect(self, user: &str) -> String {
        match self {
            Protocol::StompRabbitmq => stomp::connect("/", &[("login", "guest"), ("passcode", "guest")]),
            _ => stomp::connect("switchyard", &[("login", user)]),
        }
    }

    /// STOMP: the subscription to `user`'s own queue, answered by `RECEIPT` [`QUEUE_RECEIPT`].
    pub fn stomp_own_queue(self, user: &str) -> String {
        let receipt = QUEUE_RECEIPT.to_string();
        match self {
            Protocol::StompRabbitmq => stomp::subscribe("q", &format!("/exchange/amq.direct/{user}"), &receipt, None),
            _ => stomp::subscribe("q", "/user/queue/messages", &receipt, None),
        }
    }

    /// Whether publish/send get an answer (a `reply` or an `error`) the tool can count.
    pub fn answers_publishes(self) -> bool {
        matches!(self, Protocol::Switchyard | Protocol::Stomp | Protocol::StompRabbitmq)
    }

    /// What the server sent, as far as the tool cares: the first frame of a STOMP message
    /// (see [`frames`](Self::frames) for all of them).
    pub fn parse(self, text: &str) -> Frame<'_> {
        match self {
            Protocol::Switchyard | Protocol::Relay => parse_json_frame(text),
            Protocol::Socketio => parse_socketio_frame(text),
            Protocol::Stomp | Protocol::StompRabbitmq => self.frames(text).next().unwrap_or(Frame::Other),
        }
    }

    /// Every frame of a received message: one, but for STOMP, whose messages may carry several
    /// (and heart-beats, which yield nothing).
    pub fn frames(self, text: &str) -> Frames<'_> {
        if self.is_stomp() { Frames::Stomp(text) } else { Frames::One(Some(self.parse(text))) }
    }
}

/// The frames of one WebSocket message.
pub enum Frames<'a> {
    One(Option<Frame<'a>>),
    /// What is left of a STOMP message.
    Stomp(&'a str),
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        match self {
            Frames::One(frame) => frame.take(),
            Frames::Stomp(rest) => match stomp::next_frame(rest) {
                Ok(Some((frame, after))) => {
                    *rest = after;
                    Some(stomp_frame(frame))
                }
                Ok(None) => None,
                Err(_) => {
                    *rest = "";
                    Some(Frame::Malformed)
                }
            },
        }
    }
}

/// What a STOMP server frame means to the tool. A `MESSAGE` with an `event` header is a
/// presence event (Switchyard), one with an `error` header a refusal on `/user/queue/errors`
/// (its body names the refused frame's receipt); `RECEIPT` answers like a `reply`, `ERROR` like
/// an `error` (the connection closes after it).
fn stomp_frame(frame: RawFrame<'_>) -> Frame<'_> {
    match frame.command {
        "MESSAGE" => {
            let (mut seq, mut stream, mut refused) = (None, None, None);
            for (name, value) in frame.headers() {
                match name {
                    "seq" if seq.is_none() => seq = value.parse().ok(),
                    "stream" if stream.is_none() => stream = Some(stomp::unescape(value)),
                    "event" => return Frame::Other,
                    "error" if refused.is_none() => refused = Some(stomp::unescape(value).into_owned()),
                    _ => {}
                }
            }
            if let Some(code) = refused {
                #[derive(Deserialize)]
                struct Refusal<'a> {
                    #[serde(borrow)]
                    receipt: Option<Cow<'a, str>>,
                }
                let receipt = serde_json::from_str::<Refusal>(frame.body).ok().and_then(|r| r.receipt?.parse().ok());
                return Frame::Error { id: receipt, code };
            }
            Frame::Message { probe: serde_json::from_str(frame.body).ok(), stream, seq }
        }
        "RECEIPT" => Frame::Reply {
            id: frame.header("receipt-id").and_then(|r| r.parse().ok()),
            seq: frame.header("seq").and_then(|s| s.parse().ok()),
        },
        "CONNECTED" => Frame::Welcome,
        "ERROR" => Frame::Error {
            id: frame.header("receipt-id").and_then(|r| r.parse().ok()),
            code: format!("ERROR {}", frame.header("message").as_deref().unwrap_or(frame.body)),
        },
        _ => Frame::Other,
    }
}

/// Switchyard `sync` with an optional `since`.
pub fn sync(id: u64, since: Option<u64>) -> String {
    match since {
        Some(s) => format!(r#"{{"type":"sync","id":{id},"since":{s}}}"#),
        None => format!(r#"{{"type":"sync","id":{id}}}"#),
    }
}

fn with_default_path(base: &str, default: &str) -> String {
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let rest = &base[after_scheme..];
    let path_start = rest.find(['/', '?']);
    match path_start {
        None => format!("{base}{default}"),
        Some(i) if &rest[i..] == "/" => format!("{}{default}", &base[..after_scheme + i]),
        Some(_) => base.to_string(),
    }
}

/// The body of every message the tool sends: `t` the send time (µs since the Unix epoch), `n`
/// the number of the message in its flow (0, 1, 2, …), `p` the flow (a publisher and its
/// audience: one room, or one recipient).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct Probe {
    pub t: u64,
    pub n: u64,
    pub p: u32,
}

impl Probe {
    /// The JSON text; `pad` (if any) goes into an `x` field to make the body larger.
    pub fn encode(&self, pad: &str) -> String {
        if pad.is_empty() {
            format!(r#"{{"t":{},"n":{},"p":{}}}"#, self.t, self.n, self.p)
        } else {
            format!(r#"{{"t":{},"n":{},"p":{},"x":"{pad}"}}"#, self.t, self.n, self.p)
        }
    }

    fn from_raw(raw: Option<&RawValue>) -> Option<Probe> {
        serde_json::from_str(raw?.get()).ok()
    }
}

/// A received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A message event; `probe` is `None` when its body is not one of the tool's.
    Message { probe: Option<Probe>, stream: Option<Cow<'a, str>>, seq: Option<u64> },
    /// Switchyard's answer to a command with an id.
    Reply { id: Option<u64>, seq: Option<u64> },
    /// Switchyard's error (with the id of the command, if it had one).
    Error { id: Option<u64>, code: String },
    /// A peer's join acknowledgement.
    Joined { room: String },
    /// Switchyard's first frame.
    Welcome,
    /// Engine.IO open packet.
    Open,
    /// Socket.IO namespace connected.
    Connected,
    /// Socket.IO namespace refused.
    ConnectError(String),
    /// Engine.IO ping: answer [`socketio::PONG`].
    Ping,
    /// The server says the session ends (Switchyard `disconnect`, Engine.IO close, Socket.IO
    /// disconnect).
    Disconnect { code: Option<u16> },
    /// Anything else (presence, pong, noop, unknown types).
    Other,
    /// Not parseable.
    Malformed,
}

#[derive(Deserialize)]
struct JsonFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    stream: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
}

fn parse_json_frame(text: &str) -> Frame<'_> {
    let Ok(f) = serde_json::from_str::<JsonFrame>(text) else {
        return Frame::Malformed;
    };
    match f.kind.as_ref() {
        "message" => Frame::Message { probe: Probe::from_raw(f.body), stream: f.stream, seq: f.seq },
        "reply" => Frame::Reply { id: f.id, seq: f.seq },
        "error" => Frame::Error {
            id: f.id,
            code: f.code.and_then(|c| serde_json::from_str::<String>(c.get()).ok()).unwrap_or_default(),
        },
        "joined" => Frame::Joined { room: f.room.map(Cow::into_owned).unwrap_or_default() },
        "welcome" => Frame::Welcome,
        "disconnect" => Frame::Disconnect { code: f.code.and_then(|c| serde_json::from_str::<u16>(c.get()).ok()) },
        _ => Frame::Other,
    }
}

#[derive(Deserialize)]
struct SocketioMessage<'a> {
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
}

fn parse_socketio_frame(text: &str) -> Frame<'_> {
    let packet = match socketio::parse_engine(text) {
        Ok(EnginePacket::Message(p)) => p,
        Ok(EnginePacket::Open(_)) => return Frame::Open,
        Ok(EnginePacket::Ping) => return Frame::Ping,
        Ok(EnginePacket::Close) => return Frame::Disconnect { code: None },
        Ok(_) => return Frame::Other,
        Err(_) => return Frame::Malformed,
    };
    if packet.namespace != "/" {
        return Frame::Other;
    }
    match packet.kind {
        SocketKind::Connect => Frame::Connected,
        SocketKind::ConnectError => Frame::ConnectError(packet.data.to_string()),
        SocketKind::Disconnect => Frame::Disconnect { code: None },
        SocketKind::Event => {
            let Ok(event) = socketio::parse_event(packet.data) else {
                return Frame::Malformed;
            };
            match event.name.as_ref() {
                "message" => {
                    let probe = event
                        .arg
                        .and_then(|a| serde_json::from_str::<SocketioMessage>(a.get()).ok())
                        .and_then(|m| Probe::from_raw(m.body));
                    Frame::Message { probe, stream: None, seq: None }
                }
                "joined" => Frame::Joined {
                    room: event.arg.and_then(|a| serde_json::from_str::<String>(a.get()).ok()).unwrap_or_default(),
                },
                _ => Frame::Other,
            }
        }
        _ => Frame::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = Protocol::Switchyard;
        assert_eq!(s.ws_url("ws://127.0.0.1:9100", "u1"), "ws://127.0.0.1:9100/ws?user=u1");
        assert_eq!(s.ws_url("ws://127.0.0.1:9100/", "u1"), "ws://127.0.0.1:9100/ws?user=u1");
        assert_eq!(s.ws_url("ws://127.0.0.1:9100/ws", "u1"), "ws://127.0.0.1:9100/ws?user=u1");
        assert_eq!(s.ws_url("ws://127.0.0.1:9100/ws?device=b", "u1"), "ws://127.0.0.1:9100/ws?device=b&user=u1");
        assert_eq!(
            Protocol::Socketio.ws_url("ws://127.0.0.1:3101", "u2"),
            "ws://127.0.0.1:3101/socket.io/?EIO=4&transport=websocket&user=u2"
        );
        assert_eq!(Protocol::Relay.ws_url("ws://127.0.0.1:3201", "u3"), "ws://127.0.0.1:3201/?user=u3");
    }

    #[test]
    fn outgoing_frames_are_json() {
        let body = Probe { t: 1, n: 2, p: 3 }.encode("");
        assert_eq!(body, r#"{"t":1,"n":2,"p":3}"#);
        for p in [Protocol::Switchyard, Protocol::Relay] {
            for frame in
                [p.join(7, "r1", None), p.join(7, "r1", Some(4)), p.publish(8, "r1", &body), p.send(9, "u1", &body)]
            {
                let v: serde_json::Value = serde_json::from_str(&frame).expect(&frame);
                assert!(v["type"].is_string());
            }
        }
        assert_eq!(
            Protocol::Switchyard.publish(8, "r1", &body),
            r#"{"type":"publish","id":8,"room":"r1","body":{"t":1,"n":2,"p":3}}"#
        );
        assert_eq!(Protocol::Switchyard.join(1, "r", Some(5)), r#"{"type":"join","id":1,"room":"r","since":5}"#);
        assert_eq!(Protocol::Socketio.join(1, "r", None), r#"42["join","r"]"#);
        assert_eq!(Protocol::Socketio.send(1, "u", &body), r#"42["send",{"to":"u","body":{"t":1,"n":2,"p":3}}]"#);
        assert_eq!(sync(3, Some(9)), r#"{"type":"sync","id":3,"since":9}"#);
        let padded = Probe { t: 1, n: 2, p: 3 }.encode("xxxx");
        let v: serde_json::Value = serde_json::from_str(&padded).unwrap();
        assert_eq!(v["x"], "xxxx");
    }

    #[test]
    fn switchyard_frames() {
        let s = Protocol::Switchyard;
        let msg = r#"{"type":"message","stream":"room:r1","seq":12,"mid":"m","from":"a","room":"r1","body":{"t":100,"n":5,"p":2,"x":"pad"},"ts":1}"#;
        assert_eq!(
            s.parse(msg),
            Frame::Message { probe: Some(Probe { t: 100, n: 5, p: 2 }), stream: Some("room:r1".into()), seq: Some(12) }
        );
        let foreign = r#"{"type":"message","stream":"user:b","seq":1,"body":"hello"}"#;
        assert!(matches!(s.parse(foreign), Frame::Message { probe: None, seq: Some(1), .. }));
        assert_eq!(s.parse(r#"{"type":"reply","id":4,"mid":"m","seq":3}"#), Frame::Reply { id: Some(4), seq: Some(3) });
        assert_eq!(
            s.parse(r#"{"type":"error","id":4,"code":"rate_limited","message":"slow down"}"#),
            Frame::Error { id: Some(4), code: "rate_limited".into() }
        );
        assert_eq!(
            s.parse(r#"{"type":"error","code":"bad_request","message":"x"}"#),
            Frame::Error { id: None, code: "bad_request".into() }
        );
        assert_eq!(
            s.parse(r#"{"type":"welcome","session":"s","user":"u","node":"n","ping_interval":25}"#),
            Frame::Welcome
        );
        assert_eq!(
            s.parse(r#"{"type":"disconnect","code":4003,"reason":"too slow"}"#),
            Frame::Disconnect { code: Some(4003) }
        );
        assert_eq!(s.parse(r#"{"type":"presence","room":"r","event":"join","user":"b"}"#), Frame::Other);
        assert_eq!(s.parse("not json"), Frame::Malformed);
    }

    #[test]
    fn relay_frames() {
        let r = Protocol::Relay;
        assert_eq!(r.parse(r#"{"type":"joined","room":"r9"}"#), Frame::Joined { room: "r9".into() });
        assert_eq!(
            r.parse(r#"{"type":"message","to":"u","from":"s","body":{"t":1,"n":0,"p":0}}"#),
            Frame::Message { probe: Some(Probe { t: 1, n: 0, p: 0 }), stream: None, seq: None }
        );
    }

    #[test]
    fn stomp_urls_and_outgoing_frames() {
        let s = Protocol::Stomp;
        assert_eq!(s.ws_url("ws://127.0.0.1:9100", "u1"), "ws://127.0.0.1:9100/stomp");
        assert_eq!(Protocol::StompRabbitmq.ws_url("ws://127.0.0.1:15674", "u1"), "ws://127.0.0.1:15674/ws");
        assert_eq!(
            s.stomp_connect("u1"),
            "CONNECT\naccept-version:1.2\nhost:switchyard\nheart-beat:0,0\nlogin:u1\n\n\0"
        );
        assert!(Protocol::StompRabbitmq.stomp_connect("u1").contains("\nlogin:guest\npasscode:guest\n"));
        assert_eq!(
            s.stomp_own_queue("u1"),
            format!("SUBSCRIBE\nid:q\ndestination:/user/queue/messages\nreceipt:{QUEUE_RECEIPT}\n\n\0")
        );
        assert!(Protocol::StompRabbitmq.stomp_own_queue("u1").contains("\ndestination:/exchange/amq.direct/u1\n"));
        assert_eq!(s.join(7, "q:r1", Some(4)), "SUBSCRIBE\nid:7\ndestination:/topic/q\\cr1\nreceipt:7\nsince:4\n\n\0");
        assert_eq!(
            Protocol::StompRabbitmq.join(7, "r1", Some(4)),
            "SUBSCRIBE\nid:7\ndestination:/topic/r1\nreceipt:7\n\n\0"
        );
        let body = Probe { t: 1, n: 2, p: 3 }.encode("");
        assert_eq!(
            s.publish(8, "r1", &body),
            "SEND\ndestination:/topic/r1\ncontent-type:application/json\nreceipt:8\ncontent-length:19\n\n{\"t\":1,\"n\":2,\"p\":3}\0"
        );
        assert!(s.send(9, "u2", &body).starts_with("SEND\ndestination:/user/u2\n"));
        assert!(
            Protocol::StompRabbitmq.send(9, "u2", &body).starts_with("SEND\ndestination:/exchange/amq.direct/u2\n")
        );
        assert!(s.answers_publishes() && Protocol::StompRabbitmq.answers_publishes());
    }

    #[test]
    fn stomp_frames() {
        let s = Protocol::Stomp;
        let body = r#"{"t":100,"n":5,"p":2,"x":"pad"}"#;
        let msg = format!(
            "MESSAGE\nsubscription:4611686018427387904\ndestination:/topic/r1\nmessage-id:m1\nseq:12\n\
             stream:room\\cr1\nack:room\\cr1/12\nfrom:a\nts:1\ncontent-type:application/json\n\
             content-length:{}\n\n{body}\0",
            body.len()
        );
        assert_eq!(
            s.parse(&msg),
            Frame::Message { probe: Some(Probe { t: 100, n: 5, p: 2 }), stream: Some("room:r1".into()), seq: Some(12) }
        );
        // RabbitMQ's MESSAGE: no seq, no stream.
        let rabbit = "MESSAGE\nsubscription:q\ndestination:/exchange/amq.direct/u\nmessage-id:T_q@@session-x@@1\n\
                      redelivered:false\ncontent-type:application/json\ncontent-length:19\n\n{\"t\":1,\"n\":0,\"p\":0}\0";
        assert_eq!(
            Protocol::StompRabbitmq.parse(rabbit),
            Frame::Message { probe: Some(Probe { t: 1, n: 0, p: 0 }), stream: None, seq: None }
        );
        let foreign = "MESSAGE\nsubscription:q\nseq:1\ncontent-length:7\n\n\"hello\"\0";
        assert!(matches!(s.parse(foreign), Frame::Message { probe: None, seq: Some(1), .. }));
        let presence =
            "MESSAGE\nsubscription:7\ndestination:/topic/r\nmessage-id:event-1\nevent:join\n\n{\"user\":\"b\"}\0";
        assert_eq!(s.parse(presence), Frame::Other);
        assert_eq!(s.parse("RECEIPT\nreceipt-id:4\nmid:m\nseq:3\n\n\0"), Frame::Reply { id: Some(4), seq: Some(3) });
        assert_eq!(s.parse("RECEIPT\nreceipt-id:r-x\n\n\0"), Frame::Reply { id: None, seq: None });
        let refused = "MESSAGE\ndestination:/user/queue/errors\nmessage-id:error-0\nerror:rate_limited\n\
                       content-type:application/json\n\n{\"code\":\"rate_limited\",\"message\":\"slow\",\"receipt\":\"8\"}\0";
        assert_eq!(s.parse(refused), Frame::Error { id: Some(8), code: "rate_limited".into() });
        assert_eq!(
            s.parse("ERROR\nmessage:unknown destination /x\nreceipt-id:5\n\nunknown destination /x\0"),
            Frame::Error { id: Some(5), code: "ERROR unknown destination /x".into() }
        );
        assert_eq!(s.parse("CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0"), Frame::Welcome);
        assert_eq!(s.parse("\n"), Frame::Other);
        assert_eq!(s.parse("MESSAGE\nno end"), Frame::Malformed);
        // Several frames in one message, heart-beats between them.
        let two = format!("{msg}\nRECEIPT\nreceipt-id:9\n\n\0\n");
        let frames: Vec<Frame<'_>> = s.frames(&two).collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1], Frame::Reply { id: Some(9), seq: None });
        // Every other protocol: one frame per message, as before.
        assert_eq!(Protocol::Switchyard.frames(r#"{"type":"welcome"}"#).collect::<Vec<_>>(), vec![Frame::Welcome]);
    }

    #[test]
    fn socketio_frames() {
        let s = Protocol::Socketio;
        assert_eq!(s.parse(r#"0{"sid":"a","pingInterval":25000}"#), Frame::Open);
        assert_eq!(s.parse(r#"40{"sid":"b"}"#), Frame::Connected);
        assert_eq!(s.parse("2"), Frame::Ping);
        assert_eq!(s.parse(r#"42["joined","r1"]"#), Frame::Joined { room: "r1".into() });
        assert_eq!(
            s.parse(r#"42["message",{"room":"r1","from":"p","body":{"t":9,"n":8,"p":7}}]"#),
            Frame::Message { probe: Some(Probe { t: 9, n: 8, p: 7 }), stream: None, seq: None }
        );
        assert_eq!(
            s.parse(r#"42["message",{"to":"u","from":"p","body":1}]"#),
            Frame::Message { probe: None, stream: None, seq: None }
        );
        assert_eq!(s.parse(r#"42/other,["message",{}]"#), Frame::Other);
        assert_eq!(s.parse("41"), Frame::Disconnect { code: None });
        assert_eq!(s.parse("1"), Frame::Disconnect { code: None });
        assert!(matches!(s.parse(r#"44{"message":"no"}"#), Frame::ConnectError(_)));
        assert_eq!(s.parse("42nope"), Frame::Malformed);
    }
}
