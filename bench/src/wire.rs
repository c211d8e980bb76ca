//! The three wire protocols the tool speaks, behind one shape: URLs, the frames a client sends
//! (join, publish, send) and what it makes of the frames it receives ([`Frame`]).
//!
//! - `switchyard`: PROTOCOL.md — dev-mode `?user=`, `welcome` first, commands with `id` get one
//!   `reply`/`error`, `message` events carry `stream` and `seq`.
//! - `socketio`: Socket.IO v4 over a raw WebSocket ([`crate::socketio`]); the peer server joins
//!   `join`ed rooms and answers `joined`, relays `publish`/`send` as `message` events.
//! - `relay`: the `ws` + Redis relay peer: JSON frames `join`/`joined`, `publish`, `send`,
//!   `message`.
//!
//! Every message body the tool sends is a [`Probe`]: send time, number in its flow, flow id.

use std::borrow::Cow;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::socketio::{self, EnginePacket, SocketKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Switchyard,
    Socketio,
    Relay,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Switchyard => "switchyard",
            Protocol::Socketio => "socketio",
            Protocol::Relay => "relay",
        }
    }

    /// The path used when a target URL has none.
    fn default_path(self) -> &'static str {
        match self {
            Protocol::Switchyard => "/ws",
            Protocol::Socketio => "/socket.io/",
            Protocol::Relay => "/",
        }
    }

    /// The URL a client of `user` opens on the target `base` (`ws://host:port[/path]`).
    pub fn ws_url(self, base: &str, user: &str) -> String {
        let mut url = with_default_path(base, self.default_path());
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
        }
    }

    /// Whether publish/send get an answer (a `reply` or an `error`) the tool can count.
    pub fn answers_publishes(self) -> bool {
        self == Protocol::Switchyard
    }

    /// What the server sent, as far as the tool cares.
    pub fn parse(self, text: &str) -> Frame<'_> {
        match self {
            Protocol::Switchyard | Protocol::Relay => parse_json_frame(text),
            Protocol::Socketio => parse_socketio_frame(text),
        }
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
