//! Server → client frames (PROTOCOL.md §4), encoded once into shared bytes.
//!
//! A message frame is encoded once per stream entry and the same `Bytes` go to every recipient,
//! so nothing here runs per recipient.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{ProtocolError, RoomName, StreamId, UserId};
use crate::message::{Message, MessageView};

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string to a Vec cannot fail");
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    serde_json::to_writer(&mut *out, &n).expect("writing a number to a Vec cannot fail");
}

/// `"user:<id>"` or `"room:<name>"`. Names are valid by construction (PROTOCOL.md §1), and their
/// alphabet needs no JSON escape, so the bytes are copied as they are.
fn push_stream(out: &mut Vec<u8>, stream: &StreamId) {
    let (kind, name) = stream.parts();
    out.push(b'"');
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
}

/// A stream message's frame up to its seq.
fn push_head(out: &mut Vec<u8>, stream: &StreamId) {
    out.extend_from_slice(br#"{"type":"message","stream":"#);
    push_stream(out, stream);
    out.extend_from_slice(br#","seq":"#);
}

/// Encodes a `message` event. `stream` is `None` for a broadcast, which has no seq.
pub fn encode_message(stream: Option<(&StreamId, u64)>, message: &Message) -> Bytes {
    encode_view(stream, message.view())
}

/// [`encode_message`] from borrowed fields.
pub fn encode_view(stream: Option<(&StreamId, u64)>, message: MessageView<'_>) -> Bytes {
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + message.body.len());
    write_view(&mut out, stream, message);
    Bytes::from(out)
}

/// Appends a `message` event to `out` (see [`encode_message`]).
pub fn write_message(out: &mut Vec<u8>, stream: Option<(&StreamId, u64)>, message: &Message) {
    write_view(out, stream, message.view())
}

fn write_view(out: &mut Vec<u8>, stream: Option<(&StreamId, u64)>, message: MessageView<'_>) {
    match stream {
        Some((stream, seq)) => {
            push_head(out, stream);
            push_u64(out, seq);
        }
        None => out.extend_from_slice(br#"{"type":"message","stream":"broadcast""#),
    }
    push_fields(out, message);
}

/// Room for everything in a message frame but the body: the field names, a stream name, an id,
/// a sender and the numbers. A larger frame grows its buffer once.
const FRAME_OVERHEAD: usize = 192;

/// Everything after `stream` (and `seq`): mid, from, to or room, body, ts, and the closing brace.
fn push_fields(out: &mut Vec<u8>, draft: MessageView<'_>) {
    out.extend_from_slice(br#","mid":"#);
    push_json_str(out, draft.mid);
    out.extend_from_slice(br#","from":"#);
    push_json_str(out, draft.from);
    if let Some(to) = draft.to {
        out.extend_from_slice(br#","to":""#);
        out.extend_from_slice(to.as_bytes());
        out.push(b'"');
    }
    if let Some(room) = draft.room {
        out.extend_from_slice(br#","room":""#);
        out.extend_from_slice(room.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(br#","body":"#);
    out.extend_from_slice(draft.body);
    out.extend_from_slice(br#","ts":"#);
    push_u64(out, draft.ts);
    out.push(b'}');
}

#[derive(Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: &'a str,
    user: &'a str,
    device: &'a str,
    node: &'a str,
    ping_interval: u64,
}

/// The `welcome` frame. It always names the device, as presence will know it: the client's label,
/// else [`super::DEFAULT_DEVICE`].
pub fn encode_welcome(session: &str, user: &UserId, device: Option<&str>, node: &str, ping_interval: u64) -> Bytes {
    let device = device.unwrap_or(super::DEFAULT_DEVICE);
    let welcome = Welcome { kind: "welcome", session, user: user.as_str(), device, node, ping_interval };
    Bytes::from(serde_json::to_vec(&welcome).expect("welcome serializes"))
}

#[derive(Serialize)]
struct Presence<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    event: &'a str,
    user: &'a str,
}

/// A `presence` event: `event` is `join` or `leave`.
pub fn encode_presence(room: &RoomName, event: &str, user: &UserId) -> Bytes {
    let p = Presence { kind: "presence", room: room.as_str(), event, user: user.as_str() };
    Bytes::from(serde_json::to_vec(&p).expect("presence serializes"))
}

#[derive(Serialize)]
struct Disconnect<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: u16,
    reason: &'a str,
}

pub fn encode_disconnect(code: u16, reason: &str) -> Bytes {
    let d = Disconnect { kind: "disconnect", code, reason };
    Bytes::from(serde_json::to_vec(&d).expect("disconnect serializes"))
}

/// A `reply` to the command that carried `id`, with `fields` (a struct or map) inlined.
///
/// `fields` is serialized as an object of its own whose opening brace becomes the comma after
/// `id`: what `#[serde(flatten)]` writes, at a third of the cost (every send is answered).
pub fn encode_reply<T: Serialize>(id: &RawValue, fields: T) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(br#"{"type":"reply","id":"#);
    out.extend_from_slice(id.get().as_bytes());
    let start = out.len();
    serde_json::to_writer(&mut out, &fields).expect("reply serializes");
    match &out[start..] {
        b"{}" => {
            out.truncate(start);
            out.push(b'}');
        }
        [b'{', ..] => out[start] = b',',
        other => panic!("reply fields must be an object, got {}", String::from_utf8_lossy(other)),
    }
    Bytes::from(out)
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    code: &'static str,
    message: &'a str,
}

pub fn encode_error(id: Option<&RawValue>, err: &ProtocolError) -> Bytes {
    let frame = ErrorFrame { kind: "error", id, code: err.code.as_str(), message: &err.message };
    Bytes::from(serde_json::to_vec(&frame).expect("error serializes"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn draft() -> Message {
        Message {
            mid: Arc::from("m1"),
            from: Arc::from("alice"),
            to: Some(UserId::parse("bob").unwrap()),
            room: None,
            body: Arc::from(r#"{"text":"hi \"there\""}"#),
            ts: 1763800000123,
        }
    }

    #[test]
    fn message_frame_is_valid_json_with_every_field() {
        let stream = StreamId::parse("user:bob").unwrap();
        let bytes = encode_message(Some((&stream, 12)), &draft());
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["stream"], "user:bob");
        assert_eq!(v["seq"], 12);
        assert_eq!(v["mid"], "m1");
        assert_eq!(v["from"], "alice");
        assert_eq!(v["to"], "bob");
        assert_eq!(v["body"]["text"], "hi \"there\"");
        assert_eq!(v["ts"], 1763800000123u64);
    }

    #[test]
    fn room_message_names_its_room() {
        let mut d = draft();
        d.to = None;
        d.room = Some(RoomName::parse("a:b").unwrap());
        let stream = StreamId::Room(RoomName::parse("a:b").unwrap());
        let v: serde_json::Value = serde_json::from_slice(&encode_message(Some((&stream, 7)), &d)).unwrap();
        assert_eq!(v["stream"], "room:a:b");
        assert_eq!(v["room"], "a:b");
        assert_eq!(v["seq"], 7);
    }

    #[test]
    fn broadcast_has_no_seq() {
        let mut d = draft();
        d.to = None;
        let v: serde_json::Value = serde_json::from_slice(&encode_message(None, &d)).unwrap();
        assert_eq!(v["stream"], "broadcast");
        assert!(v.get("seq").is_none());
    }

    #[test]
    fn reply_inlines_fields_and_echoes_id() {
        let id = RawValue::from_string("\"abc\"".into()).unwrap();
        let bytes = encode_reply(&id, serde_json::json!({"seq": 3}));
        assert_eq!(&bytes[..], br#"{"type":"reply","id":"abc","seq":3}"#);
        #[derive(Serialize)]
        struct Empty {}
        let id = RawValue::from_string("7".into()).unwrap();
        assert_eq!(&encode_reply(&id, Empty {})[..], br#"{"type":"reply","id":7}"#);
        #[derive(Serialize)]
        struct Accepted<'a> {
            mid: &'a str,
            seq: u64,
        }
        let bytes = encode_reply(&id, Accepted { mid: "m\"1", seq: 2 });
        assert_eq!(&bytes[..], br#"{"type":"reply","id":7,"mid":"m\"1","seq":2}"#);
    }
}
