//! Server → client STOMP frames (PROTOCOL.md §7), built from the same neutral message as the JSON
//! frames.
//!
//! A `MESSAGE` is written in two parts: `MESSAGE` and its `subscription` header, which differ per
//! session, and everything after them, which does not. The second part is encoded once per node
//! and message ([`message_tail`]) and shared by every STOMP session that takes it; a session holds
//! the id of each of its subscriptions ([`SubscriptionId`]), from which its first part is written.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::frame::{write_escaped, write_frame, write_header};
use crate::message::MessageView;
use crate::protocol::{RoomName, StreamId, UserId};

pub(crate) const USER_QUEUE: &str = "/user/queue/messages";
pub(crate) const ERRORS: &str = "/user/queue/errors";
pub(crate) const BROADCAST: &str = "/broadcast";
pub(crate) const TOPIC: &str = "/topic/";
/// `SEND` to a user: `/user/<id>`.
pub(crate) const USER: &str = "/user/";

/// Writes the value of a `MESSAGE`'s `ack` header, which an `ACK` names as its `id`:
/// `<stream>/<seq>` (only those of the user's own stream move its cursor).
fn write_ack(out: &mut Vec<u8>, stream: &StreamId, seq: &str) {
    write_stream(out, stream);
    out.push(b'/');
    out.extend_from_slice(seq.as_bytes());
}

/// `user:<id>` or `room:<name>`, escaped.
fn write_stream(out: &mut Vec<u8>, stream: &StreamId) {
    let (kind, name) = stream.parts();
    write_escaped(out, kind);
    write_escaped(out, name);
}

/// A header whose name needs no escape, its value written by `value`.
fn header_with(out: &mut Vec<u8>, name: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(name);
    out.push(b':');
    value(out);
    out.push(b'\n');
}

/// A header whose name needs no escape.
fn header(out: &mut Vec<u8>, name: &[u8], value: &str) {
    header_with(out, name, |out| write_escaped(out, value));
}

/// What a `MESSAGE` starts with, before its subscription's id.
const MESSAGE_HEAD: &[u8] = b"MESSAGE\nsubscription:";

/// Longest escaped subscription id kept inline: clients' ids are short (`sub-0` for stompjs and
/// Spring), so an idle session's subscription to its queue needs no allocation.
const INLINE_ID: usize = 22;

/// A subscription's id as its `MESSAGE`s' `subscription` header carries it, escaped once. What a
/// session writes before a shared tail ([`message_tail`]) is [`SubscriptionId::head`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SubscriptionId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Boxed(Box<[u8]>),
}

impl SubscriptionId {
    pub(crate) fn new(id: &str) -> Self {
        let mut escaped = Vec::new();
        write_escaped(&mut escaped, id);
        if escaped.len() > INLINE_ID {
            return Self::Boxed(escaped.into_boxed_slice());
        }
        let mut bytes = [0; INLINE_ID];
        bytes[..escaped.len()].copy_from_slice(&escaped);
        Self::Inline { len: escaped.len() as u8, bytes }
    }

    /// Whether `id`, as a client names it, is this one.
    pub(crate) fn is(&self, id: &str) -> bool {
        *self == Self::new(id)
    }

    fn escaped(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..*len as usize],
            Self::Boxed(bytes) => bytes,
        }
    }

    /// The start of a `MESSAGE` for this subscription, in pieces: the command and the
    /// `subscription` header.
    pub(crate) fn head(&self) -> [&[u8]; 3] {
        [MESSAGE_HEAD, self.escaped(), b"\n"]
    }
}

/// The start of a `MESSAGE` that answers no subscription (a refusal reported to a session that
/// did not subscribe to its error queue), in the pieces of [`SubscriptionId::head`].
pub(crate) const UNSUBSCRIBED_HEAD: [&[u8]; 3] = [b"MESSAGE\n", b"", b""];

/// Room for everything in a message's tail but the body and the names.
const TAIL_OVERHEAD: usize = 224;

/// A `MESSAGE`'s headers after `subscription`, its body and the NUL. `stream` is `None` for a
/// broadcast, which has no seq. Written field by field with no allocation but the frame's: it
/// runs once per message and node, on every message a STOMP session takes.
pub(crate) fn message_tail(stream: Option<(&StreamId, u64)>, message: MessageView<'_>) -> Bytes {
    let mut out = Vec::with_capacity(TAIL_OVERHEAD + message.body.len());
    header_with(&mut out, b"destination", |out| match stream {
        Some((StreamId::User(_), _)) => out.extend_from_slice(USER_QUEUE.as_bytes()),
        Some((StreamId::Room(room), _)) => {
            out.extend_from_slice(TOPIC.as_bytes());
            write_escaped(out, room.as_str());
        }
        None => out.extend_from_slice(BROADCAST.as_bytes()),
    });
    header(&mut out, b"message-id", message.mid);
    let mut number = itoa::Buffer::new();
    match stream {
        Some((stream, seq)) => {
            let seq = number.format(seq);
            header(&mut out, b"seq", seq);
            header_with(&mut out, b"stream", |out| write_stream(out, stream));
            header_with(&mut out, b"ack", |out| write_ack(out, stream, seq));
        }
        None => {
            header(&mut out, b"stream", "broadcast");
            header(&mut out, b"ack", message.mid);
        }
    }
    header(&mut out, b"from", message.from);
    if let Some(to) = message.to {
        header(&mut out, b"to", to);
    }
    header(&mut out, b"ts", number.format(message.ts));
    write_body(&mut out, "application/json", message.body);
    Bytes::from(out)
}

/// `content-type`, `content-length`, the blank line, the body and the NUL.
fn write_body(out: &mut Vec<u8>, content_type: &str, body: &[u8]) {
    header(out, b"content-type", content_type);
    header(out, b"content-length", itoa::Buffer::new().format(body.len()));
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
}

/// Presence events have no id of their own; STOMP wants one per `MESSAGE`.
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// The tail of a presence event's `MESSAGE` (header `event:join` or `event:leave`, body
/// `{"user":"<id>"}`), and its room, from the JSON `presence` frame that the cluster carries.
/// `None` for any other frame.
pub(crate) fn presence_tail(json: &[u8]) -> Option<(RoomName, Bytes)> {
    #[derive(serde::Deserialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        room: &'a str,
        event: &'a str,
        user: &'a str,
    }
    let p: Presence = serde_json::from_slice(json).ok()?;
    if p.kind != "presence" {
        return None;
    }
    let room = RoomName::parse(p.room).ok()?;
    let user = UserId::parse(p.user).ok()?;
    let mut out = Vec::with_capacity(TAIL_OVERHEAD);
    header_with(&mut out, b"destination", |out| {
        out.extend_from_slice(TOPIC.as_bytes());
        write_escaped(out, room.as_str());
    });
    // An `ack` too, as every `MESSAGE` of a subscription in a client ack mode needs one.
    let id = format!("event-{}", EVENTS.fetch_add(1, Ordering::Relaxed));
    write_header(&mut out, "message-id", &id);
    write_header(&mut out, "ack", &id);
    write_header(&mut out, "event", p.event);
    write_header(&mut out, "stream", &StreamId::Room(room.clone()).to_string());
    let body = serde_json::to_vec(&serde_json::json!({ "user": user.as_str() })).expect("serializes");
    write_body(&mut out, "application/json", &body);
    Some((room, Bytes::from(out)))
}

/// `CONNECTED`, with the heart-beats the server will send and wants, in milliseconds.
pub(crate) fn connected(session: &str, user: &UserId, heart_beat: (u64, u64)) -> Bytes {
    let beats = format!("{},{}", heart_beat.0, heart_beat.1);
    let server = concat!("switchyard/", env!("CARGO_PKG_VERSION"));
    let headers = [
        ("version", "1.2"),
        ("heart-beat", &beats[..]),
        ("session", session),
        ("user-name", user.as_str()),
        ("server", server),
    ];
    frame(|out| write_frame(out, "CONNECTED", &headers, b""))
}

/// `RECEIPT` for `receipt_id`, with `extra` headers (`mid` and `seq` of a stored `SEND`).
pub(crate) fn receipt(receipt_id: &str, extra: &[(&str, &str)]) -> Bytes {
    let mut headers = vec![("receipt-id", receipt_id)];
    headers.extend_from_slice(extra);
    frame(|out| write_frame(out, "RECEIPT", &headers, b""))
}

/// The `RECEIPT` of a stored `SEND`: `receipt-id`, `mid` and `seq`.
pub(crate) fn send_receipt(receipt_id: &str, mid: &str, seq: u64) -> Bytes {
    let mut out = Vec::with_capacity(48 + receipt_id.len() + mid.len());
    out.extend_from_slice(b"RECEIPT\n");
    header(&mut out, b"receipt-id", receipt_id);
    header(&mut out, b"mid", mid);
    header(&mut out, b"seq", itoa::Buffer::new().format(seq));
    out.extend_from_slice(b"\n\0");
    Bytes::from(out)
}

/// `ERROR` with `message` as header and body; `receipt-id` when the frame at fault asked for a
/// receipt.
pub(crate) fn error(message: &str, receipt_id: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(96 + 2 * message.len());
    out.extend_from_slice(b"ERROR\n");
    write_header(&mut out, "message", message);
    if let Some(id) = receipt_id {
        write_header(&mut out, "receipt-id", id);
    }
    write_body(&mut out, "text/plain", message.as_bytes());
    Bytes::from(out)
}

/// A refused `SEND` or `SUBSCRIBE` for `/user/queue/errors`: the tail after `subscription`, body
/// `{"code","message","receipt"}`.
pub(crate) fn refusal_tail(code: &str, message: &str, receipt_id: Option<&str>) -> Vec<u8> {
    let body = serde_json::to_vec(&serde_json::json!({ "code": code, "message": message, "receipt": receipt_id }))
        .expect("serializes");
    let mut out = Vec::with_capacity(TAIL_OVERHEAD + body.len());
    write_header(&mut out, "destination", ERRORS);
    let id = format!("error-{}", EVENTS.fetch_add(1, Ordering::Relaxed));
    write_header(&mut out, "message-id", &id);
    write_header(&mut out, "ack", &id);
    write_header(&mut out, "error", code);
    write_body(&mut out, "application/json", &body);
    out
}

fn frame(write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut out = Vec::with_capacity(128);
    write(&mut out);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stomp::frame::{Decoder, Item};

    /// Decodes a server frame with the client decoder, which takes any command word it knows:
    /// the test frames are rewritten as `SEND` (their headers are escaped the same way).
    fn decode_as_send(frame: &[u8], command: &str) -> crate::stomp::frame::Frame {
        let rest = frame.strip_prefix(command.as_bytes()).expect("command first");
        let mut decoder = Decoder::new(1 << 20);
        decoder.push(b"SEND");
        decoder.push(rest);
        match decoder.next() {
            Ok(Some(Item::Frame(frame))) => frame,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_subscription_id_is_kept_escaped_and_inline_when_short() {
        assert_eq!(std::mem::size_of::<Option<SubscriptionId>>(), 24);
        let short = SubscriptionId::new("sub:0");
        assert!(matches!(short, SubscriptionId::Inline { .. }));
        assert_eq!(short.head().concat(), b"MESSAGE\nsubscription:sub\\c0\n");
        assert!(short.is("sub:0") && !short.is("sub-0") && !short.is("sub:00"));
        let long = "s".repeat(INLINE_ID + 1);
        let boxed = SubscriptionId::new(&long);
        assert!(matches!(boxed, SubscriptionId::Boxed(_)));
        assert!(boxed.is(&long) && !boxed.is(&long[1..]));
        assert_eq!(boxed.head().concat(), [&b"MESSAGE\nsubscription:"[..], long.as_bytes(), b"\n"].concat());
        let edge = SubscriptionId::new(&long[1..]);
        assert!(matches!(edge, SubscriptionId::Inline { len, .. } if len as usize == INLINE_ID));
    }

    #[test]
    fn a_message_is_a_head_per_session_and_a_shared_tail() {
        let room = StreamId::Room(RoomName::parse("a:b").unwrap());
        let view =
            MessageView { mid: "m1", from: "ann", to: None, room: Some("a:b"), body: br#"{"x":"\u0000"}"#, ts: 7 };
        let tail = message_tail(Some((&room, 42)), view);
        let subscription = SubscriptionId::new("sub:1");
        let frame = decode_as_send(&[&subscription.head().concat()[..], &tail[..]].concat(), "MESSAGE");
        let h = &frame.headers;
        assert_eq!(h.get("subscription"), Some("sub:1"));
        assert_eq!(h.get("destination"), Some("/topic/a:b"));
        assert_eq!((h.get("message-id"), h.get("seq"), h.get("stream")), (Some("m1"), Some("42"), Some("room:a:b")));
        assert_eq!((h.get("ack"), h.get("from"), h.get("ts")), (Some("room:a:b/42"), Some("ann"), Some("7")));
        assert_eq!(h.get("content-type"), Some("application/json"));
        assert_eq!(&frame.body[..], br#"{"x":"\u0000"}"#);
        assert_eq!(h.get("content-length"), Some(&*frame.body.len().to_string()));
    }

    #[test]
    fn presence_receipts_and_errors() {
        let json =
            crate::protocol::encode_presence(&RoomName::parse("r").unwrap(), "join", &UserId::parse("bo").unwrap());
        let (room, tail) = presence_tail(&json).expect("a presence frame");
        assert_eq!(room.as_str(), "r");
        let frame = decode_as_send(&[&SubscriptionId::new("7").head().concat()[..], &tail[..]].concat(), "MESSAGE");
        assert_eq!((frame.headers.get("event"), frame.headers.get("destination")), (Some("join"), Some("/topic/r")));
        assert_eq!(frame.headers.get("ack"), frame.headers.get("message-id"));
        assert_eq!(&frame.body[..], br#"{"user":"bo"}"#);
        assert!(presence_tail(br#"{"type":"disconnect","code":4002,"reason":"x"}"#).is_none());
        let r = decode_as_send(&receipt("r-1", &[("mid", "m"), ("seq", "3")]), "RECEIPT");
        assert_eq!((r.headers.get("receipt-id"), r.headers.get("seq")), (Some("r-1"), Some("3")));
        let e = decode_as_send(&error("bad:frame\nhere", Some("r2")), "ERROR");
        assert_eq!((e.headers.get("message"), e.headers.get("receipt-id")), (Some("bad:frame\nhere"), Some("r2")));
        let c = connected("s1", &UserId::parse("bo").unwrap(), (25000, 50000));
        assert!(c.starts_with(b"CONNECTED\nversion:1.2\nheart-beat:25000,50000\nsession:s1\nuser-name:bo\n"));
    }
}
