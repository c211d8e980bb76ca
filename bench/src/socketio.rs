//! Engine.IO v4 / Socket.IO v5 packets over a raw WebSocket (the `?EIO=4&transport=websocket`
//! transport): one Engine.IO packet per text frame, its type the first character; a Socket.IO
//! packet rides in an Engine.IO `4` (message) packet.
//!
//! Engine.IO: `0` open (JSON handshake), `1` close, `2` ping (the client must answer `3`), `3`
//! pong, `4` message, `5` upgrade, `6` noop. Socket.IO: `0` connect, `1` disconnect, `2` event,
//! `3` ack, `4` connect error, `5`/`6` binary event/ack; then an optional namespace `/nsp,`, an
//! optional ack id (digits), and the JSON data. `42["name",payload]` is an event on the default
//! namespace.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The connect request for the default namespace.
pub const CONNECT: &str = "40";
/// The answer to an Engine.IO ping.
pub const PONG: &str = "3";

#[derive(Debug, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    Open(&'a str),
    Close,
    Ping,
    Pong,
    Message(SocketPacket<'a>),
    Upgrade,
    Noop,
}

#[derive(Debug, PartialEq, Eq)]
pub struct SocketPacket<'a> {
    pub kind: SocketKind,
    /// The namespace; `/` when absent.
    pub namespace: &'a str,
    pub ack_id: Option<u64>,
    /// The JSON data, empty when absent.
    pub data: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

#[derive(Debug, PartialEq, Eq)]
pub struct PacketError(pub &'static str);

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

pub fn parse_engine(text: &str) -> Result<EnginePacket<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(PacketError("empty packet"))?;
    let rest = chars.as_str();
    Ok(match kind {
        '0' => EnginePacket::Open(rest),
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping,
        '3' => EnginePacket::Pong,
        '4' => EnginePacket::Message(parse_socket(rest)?),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        _ => return Err(PacketError("unknown Engine.IO packet type")),
    })
}

pub fn parse_socket(text: &str) -> Result<SocketPacket<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = match chars.next().ok_or(PacketError("empty Socket.IO packet"))? {
        '0' => SocketKind::Connect,
        '1' => SocketKind::Disconnect,
        '2' => SocketKind::Event,
        '3' => SocketKind::Ack,
        '4' => SocketKind::ConnectError,
        '5' => SocketKind::BinaryEvent,
        '6' => SocketKind::BinaryAck,
        _ => return Err(PacketError("unknown Socket.IO packet type")),
    };
    let mut rest = chars.as_str();
    if matches!(kind, SocketKind::BinaryEvent | SocketKind::BinaryAck) {
        // `<attachments>-` precedes the rest; attachments travel in binary frames we never get.
        let dash = rest.find('-').ok_or(PacketError("binary packet without attachment count"))?;
        rest = &rest[dash + 1..];
    }
    let mut namespace = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        namespace = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack_id =
        if digits > 0 { Some(rest[..digits].parse().map_err(|_| PacketError("ack id out of range"))?) } else { None };
    Ok(SocketPacket { kind, namespace, ack_id, data: &rest[digits..] })
}

/// The name and first argument of an event's data `["name", arg, …]` (further arguments are
/// skipped).
#[derive(Debug)]
pub struct Event<'a> {
    pub name: std::borrow::Cow<'a, str>,
    pub arg: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Event<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Event<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event array [name, args…]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Event<'a>, A::Error> {
                let name: std::borrow::Cow<'a, str> =
                    seq.next_element::<CowStr<'a>>()?.ok_or_else(|| de::Error::invalid_length(0, &self))?.0;
                let arg = seq.next_element::<&'a RawValue>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Event { name, arg })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// A string borrowed when it has no escapes.
struct CowStr<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wrap<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
        Wrap::deserialize(d).map(|w| CowStr(w.0))
    }
}

pub fn parse_event(data: &str) -> Result<Event<'_>, serde_json::Error> {
    serde_json::from_str(data)
}

/// `42["name",<json>]`: an event on the default namespace, `payload` already JSON text.
pub fn event(name: &str, payload: &str) -> String {
    let mut s = String::with_capacity(8 + name.len() + payload.len());
    s.push_str("42[\"");
    s.push_str(name);
    s.push_str("\",");
    s.push_str(payload);
    s.push(']');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        let open = r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000}"#;
        assert_eq!(parse_engine(open), Ok(EnginePacket::Open(&open[1..])));
        assert_eq!(parse_engine("2"), Ok(EnginePacket::Ping));
        assert_eq!(parse_engine("3"), Ok(EnginePacket::Pong));
        assert_eq!(parse_engine("1"), Ok(EnginePacket::Close));
        assert_eq!(parse_engine("6"), Ok(EnginePacket::Noop));
        assert!(parse_engine("").is_err());
        assert!(parse_engine("9").is_err());
    }

    #[test]
    fn socket_packets() {
        let p = match parse_engine(r#"40{"sid":"x1"}"#).unwrap() {
            EnginePacket::Message(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            p,
            SocketPacket { kind: SocketKind::Connect, namespace: "/", ack_id: None, data: r#"{"sid":"x1"}"# }
        );
        let p = parse_socket(r#"2/chat,17["msg",1]"#).unwrap();
        assert_eq!((p.kind, p.namespace, p.ack_id, p.data), (SocketKind::Event, "/chat", Some(17), r#"["msg",1]"#));
        let p = parse_socket(r#"312[true]"#).unwrap();
        assert_eq!((p.kind, p.ack_id, p.data), (SocketKind::Ack, Some(12), "[true]"));
        let p = parse_socket(r#"4{"message":"Not authorized"}"#).unwrap();
        assert_eq!(p.kind, SocketKind::ConnectError);
        let p = parse_socket("1").unwrap();
        assert_eq!((p.kind, p.data), (SocketKind::Disconnect, ""));
        let p = parse_socket(r#"51-["up",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((p.kind, p.data), (SocketKind::BinaryEvent, r#"["up",{"_placeholder":true,"num":0}]"#));
        let p = parse_socket("1/admin,").unwrap();
        assert_eq!((p.namespace, p.data), ("/admin", ""));
        assert!(parse_socket("x").is_err());
    }

    #[test]
    fn events() {
        let e = parse_event(r#"["message",{"room":"r1","from":"u","body":{"t":1,"n":2,"p":3}},"extra"]"#).unwrap();
        assert_eq!(e.name, "message");
        assert_eq!(e.arg.unwrap().get(), r#"{"room":"r1","from":"u","body":{"t":1,"n":2,"p":3}}"#);
        let e = parse_event(r#"["joined","room-7"]"#).unwrap();
        assert_eq!((e.name.as_ref(), e.arg.unwrap().get()), ("joined", r#""room-7""#));
        let e = parse_event(r#"["ping"]"#).unwrap();
        assert!(e.arg.is_none());
        let e = parse_event(r#"["we\"ird",1]"#).unwrap();
        assert_eq!(e.name, "we\"ird");
        assert!(parse_event("[]").is_err());
        assert!(parse_event(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn encodes_events() {
        assert_eq!(event("join", r#""r1""#), r#"42["join","r1"]"#);
        let text = event("publish", r#"{"room":"r","body":{"t":1}}"#);
        let EnginePacket::Message(p) = parse_engine(&text).unwrap() else { panic!() };
        assert_eq!(parse_event(p.data).unwrap().name, "publish");
    }
}
