//! The bytes an [`Event`] travels as between nodes, the same on every bus that carries bytes
//! (Redis, NATS, RabbitMQ): the bus names the topic (a channel, subject or routing key), the
//! envelope carries the rest.
//!
//! - `M <exclude session|-> <stream> <seq> <record>`: a stream message, where `<record>` is the
//!   message's [`Record`](crate::message::Record) (its own head line, then the body); written by
//!   the node, or by the store's script when store and bus are the same Redis
//! - `B <record>`: a broadcast
//! - `N <exclude session|->:<length> …`, `\n`, then the frames back to back: pre-encoded frames
//!   (presence events), one field per frame in order
//! - `D <code> <except session|->`, `\n`, then the reason: close the sessions of a user

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;

use super::{Delivery, Event, Notice, SessionId, Topic};
use crate::protocol::StreamId;

/// The head of a stream message's envelope: `M <exclude> <stream> `, to be followed by the seq,
/// a space and the record.
pub(crate) fn message_head(exclude: Option<SessionId>, stream: &StreamId) -> Vec<u8> {
    let (kind, name) = stream.parts();
    let mut head = Vec::with_capacity(24 + kind.len() + name.len());
    head.extend_from_slice(b"M ");
    match exclude {
        Some(session) => head.extend_from_slice(&session.hex()),
        None => head.push(b'-'),
    }
    head.push(b' ');
    head.extend_from_slice(kind.as_bytes());
    head.extend_from_slice(name.as_bytes());
    head.push(b' ');
    head
}

/// The envelope of `event`; `None` for [`Event::Resync`], which never leaves its node.
pub(crate) fn encode(event: &Event) -> Option<Vec<u8>> {
    Some(match event {
        Event::Message(d) => {
            let mut payload = match &d.position {
                None => b"B ".to_vec(),
                Some((stream, seq)) => {
                    let mut head = message_head(d.exclude, stream);
                    head.extend_from_slice(itoa::Buffer::new().format(*seq).as_bytes());
                    head.push(b' ');
                    head
                }
            };
            d.write_record(&mut payload);
            payload
        }
        Event::Frames(notices) => {
            let mut header = String::from("N");
            for n in notices {
                let _ = write!(header, " {}:{}", session_text(n.exclude), n.frame.len());
            }
            header.push('\n');
            let mut payload = header.into_bytes();
            notices.iter().for_each(|n| payload.extend_from_slice(&n.frame));
            payload
        }
        Event::Disconnect { code, except, reason } => {
            let mut payload = format!("D {code} {}\n", session_text(*except)).into_bytes();
            payload.extend_from_slice(reason.as_bytes());
            payload
        }
        Event::Resync => return None,
    })
}

/// The event an envelope received for `topic` carries; `None` when it is malformed (the bus
/// logs and drops it).
pub(crate) fn decode(topic: &Topic, payload: Bytes) -> Option<Event> {
    match payload.first() {
        Some(b'M') => message(topic, payload),
        Some(b'B') if payload.len() >= 2 => {
            Delivery::from_record(None, payload.slice(2..), None).map(|d| Event::Message(Arc::new(d)))
        }
        _ => control(payload),
    }
}

/// `M <exclude> <stream> <seq> <record>`.
fn message(topic: &Topic, payload: Bytes) -> Option<Event> {
    let mut at = 0;
    let mut field = || {
        let start = at;
        let len = payload[start..].iter().position(|b| *b == b' ')?;
        at = start + len + 1;
        std::str::from_utf8(&payload[start..start + len]).ok()
    };
    let (_, exclude, stream, seq) = (field()?, field()?, field()?, field()?);
    let stream = stream_of(topic, stream)?;
    let seq = seq.parse().ok()?;
    let exclude = session_field(exclude);
    let record = payload.slice(at..);
    Some(Event::Message(Arc::new(Delivery::from_record(Some((stream, seq)), record, exclude)?)))
}

/// The envelopes of pre-encoded frames and of disconnects.
fn control(payload: Bytes) -> Option<Event> {
    let newline = payload.iter().position(|b| *b == b'\n')?;
    let body = payload.slice(newline + 1..);
    let header = std::str::from_utf8(&payload[..newline]).ok()?;
    let mut fields = header.split(' ');
    match (fields.next(), fields.next(), fields.next()) {
        (Some("N"), ..) => parse_notices(&header[1..], &body).map(Event::Frames),
        (Some("D"), Some(code), Some(except)) => {
            let code = code.parse().ok()?;
            let reason = Arc::from(String::from_utf8_lossy(&body).as_ref());
            Some(Event::Disconnect { code, reason, except: session_field(except) })
        }
        _ => None,
    }
}

fn session_field(s: &str) -> Option<SessionId> {
    u64::from_str_radix(s, 16).ok().map(SessionId)
}

fn session_text(s: Option<SessionId>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| s.to_string())
}

/// The stream a message names. The store publishes a stream's messages on the topic of the same
/// name, so the topic's already validated name is shared rather than checked and copied again.
fn stream_of(topic: &Topic, text: &str) -> Option<StreamId> {
    match topic {
        Topic::User(user) if text.strip_prefix("user:") == Some(user.as_str()) => Some(StreamId::User(user.clone())),
        Topic::Room(room) if text.strip_prefix("room:") == Some(room.as_str()) => Some(StreamId::Room(room.clone())),
        _ => StreamId::parse(text).ok(),
    }
}

/// The frames of an `N` envelope: `fields` are its `<exclude>:<length>` fields, `body` its payload.
fn parse_notices(fields: &str, body: &Bytes) -> Option<Vec<Notice>> {
    let mut at = 0;
    let notices = fields
        .split_whitespace()
        .map(|field| {
            let (exclude, len) = field.split_once(':')?;
            let end = at + len.parse::<usize>().ok()?;
            let frame = (end <= body.len()).then(|| body.slice(at..end))?;
            at = end;
            Some(Notice { frame, exclude: session_field(exclude) })
        })
        .collect::<Option<Vec<_>>>()?;
    (at == body.len()).then_some(notices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::UserId;

    #[test]
    fn notices_are_split_by_their_lengths() {
        let body = Bytes::from_static(b"{\"a\":1}{}x");
        let notices = parse_notices(" 00000000000000ff:7 -:2 -:1", &body).unwrap();
        let frames: Vec<&[u8]> = notices.iter().map(|n| &n.frame[..]).collect();
        assert_eq!(frames, [&b"{\"a\":1}"[..], b"{}", b"x"]);
        assert_eq!(notices.iter().map(|n| n.exclude).collect::<Vec<_>>(), [Some(SessionId(255)), None, None]);
        assert!(parse_notices(" -:7 -:5", &body).is_none(), "longer than the payload");
        assert!(parse_notices(" -:7", &body).is_none(), "shorter than the payload");
    }

    #[test]
    fn message_head_names_the_excluded_session_and_the_stream() {
        let stream = StreamId::parse("room:a:b").unwrap();
        assert_eq!(message_head(None, &stream), b"M - room:a:b ");
        let head = message_head(Some(SessionId(0xff)), &StreamId::parse("user:bob").unwrap());
        assert_eq!(head, format!("M {} user:bob ", SessionId(0xff)).as_bytes());
        assert_eq!(head, b"M 00000000000000ff user:bob ");
    }

    #[test]
    fn every_event_but_resync_comes_back_as_it_went() {
        let bob = UserId::parse("bob").unwrap();
        let topic = Topic::User(bob.clone());
        let message = Message {
            mid: Arc::from("m1"),
            from: Arc::from("al"),
            to: Some(bob.clone()),
            room: None,
            body: Arc::from("{\"x\":1}"),
            ts: 7,
        };
        let stream = StreamId::User(bob);
        let sent = Event::Message(Arc::new(Delivery::new(Some((stream.clone(), 42)), message, Some(SessionId(9)))));
        let Some(Event::Message(got)) = decode(&topic, Bytes::from(encode(&sent).unwrap())) else { panic!() };
        let Event::Message(want) = &sent else { unreachable!() };
        assert_eq!((got.position.clone(), got.exclude, got.ts()), (Some((stream, 42)), Some(SessionId(9)), 7));
        assert_eq!(got.json(), want.json());
        let frames = Event::Frames(vec![Notice { frame: Bytes::from_static(b"{}"), exclude: None }]);
        let Some(Event::Frames(got)) = decode(&topic, Bytes::from(encode(&frames).unwrap())) else { panic!() };
        assert_eq!((&got[0].frame[..], got[0].exclude), (&b"{}"[..], None));
        let close = Event::Disconnect { code: 4002, reason: Arc::from("bye now"), except: None };
        let Some(Event::Disconnect { code, reason, except }) = decode(&topic, Bytes::from(encode(&close).unwrap()))
        else {
            panic!()
        };
        assert_eq!((code, &*reason, except), (4002, "bye now", None));
        assert!(encode(&Event::Resync).is_none());
        assert!(decode(&topic, Bytes::from_static(b"M - user:bob x rec")).is_none(), "a seq that is no number");
        assert!(decode(&topic, Bytes::from_static(b"Q")).is_none());
    }
}
