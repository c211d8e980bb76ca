//! The neutral message: what stores keep and buses carry, in no wire protocol's format.
//!
//! A message is accepted once (it gets its `mid` and `ts` then), appended to one or two streams
//! (each copy gets that stream's seq), and encoded by each wire protocol once per node, when it
//! reaches the node's hub (see [`crate::bus::Delivery`]). Nothing below knows about JSON frames.
//!
//! [`Record`] is the compact byte form shared by the backends that keep or move bytes (the
//! embedded store, Redis streams and pub/sub): `<ts> <mid> <from> <to|->\n<body>`. Every field of
//! the head is a name of PROTOCOL.md §1 or a server-made id, none of which holds a space or a
//! newline, so the head splits on spaces and the body is everything after the first newline,
//! byte for byte. A room message's room is its stream's name and is not repeated.

use std::sync::Arc;

use crate::protocol::{RoomName, StreamId, UserId, valid_name};

/// A message as accepted, before or apart from any stream position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub mid: Arc<str>,
    /// The sending user, or the name a backend gave (`system` by default).
    pub from: Arc<str>,
    /// The recipient of a direct message.
    pub to: Option<UserId>,
    /// The room of a room message.
    pub room: Option<RoomName>,
    /// The body as raw JSON text, validated when it was parsed, delivered byte for byte.
    pub body: Arc<str>,
    /// When it was accepted, in ms since the Unix epoch.
    pub ts: u64,
}

/// A message at its place in a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub message: Message,
}

/// The compact byte form of a message (see the module header).
pub struct Record;

impl Record {
    /// Room for the head of a record: a time, a mid and two names.
    pub(crate) const HEAD: usize = 64 + 2 * 128;

    /// Appends the record of `message` to `out`.
    pub fn write(out: &mut Vec<u8>, message: &Message) {
        out.reserve(Self::HEAD + message.body.len());
        let mut ts = itoa::Buffer::new();
        out.extend_from_slice(ts.format(message.ts).as_bytes());
        out.push(b' ');
        out.extend_from_slice(message.mid.as_bytes());
        out.push(b' ');
        out.extend_from_slice(message.from.as_bytes());
        out.push(b' ');
        match &message.to {
            Some(to) => out.extend_from_slice(to.as_str().as_bytes()),
            None => out.push(b'-'),
        }
        out.push(b'\n');
        out.extend_from_slice(message.body.as_bytes());
    }

    /// The record of `message` on its own.
    pub fn encode(message: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        Self::write(&mut out, message);
        out
    }

    /// The fields of a record of `stream` (`None`: a broadcast), borrowed from its bytes; `None`
    /// when they are not a record.
    pub fn view<'a>(stream: Option<&'a StreamId>, bytes: &'a [u8]) -> Option<MessageView<'a>> {
        Self::view_checked(stream, bytes, Self::check(bytes)?)
    }

    /// Checks that `bytes` are a record and finds its fields, for [`Record::view_checked`].
    pub fn check(bytes: &[u8]) -> Option<Layout> {
        // One pass over the head for its three spaces and its newline: a node parses every
        // message it receives, and splitting the head field by field cost three times as much.
        let mut ends = [0; 4];
        let mut found = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if b == b' ' || b == b'\n' {
                *ends.get_mut(found)? = i;
                found += 1;
                if b == b'\n' {
                    break;
                }
            }
        }
        if found != 4 || bytes[ends[3]] != b'\n' {
            return None;
        }
        let head = std::str::from_utf8(&bytes[..ends[3]]).ok()?;
        let (ts, mid, from, to) =
            (&head[..ends[0]], &head[ends[0] + 1..ends[1]], &head[ends[1] + 1..ends[2]], &head[ends[2] + 1..]);
        if mid.is_empty() || from.is_empty() || (to != "-" && !valid_name(to)) {
            return None;
        }
        Some(Layout { ends, ts: ts.parse().ok()? })
    }

    /// The fields of a record of `stream` whose [`Layout`] [`Record::check`] found, without
    /// checking it again; `None` when `layout` is not that of `bytes`.
    pub fn view_checked<'a>(stream: Option<&'a StreamId>, bytes: &'a [u8], layout: Layout) -> Option<MessageView<'a>> {
        let ends = layout.ends;
        let head = std::str::from_utf8(bytes.get(..ends[3])?).ok()?;
        let to = match head.get(ends[2] + 1..)? {
            "-" => None,
            name => Some(name),
        };
        let room = match stream {
            Some(StreamId::Room(room)) => Some(room.as_str()),
            _ => None,
        };
        Some(MessageView {
            mid: head.get(ends[0] + 1..ends[1])?,
            from: head.get(ends[1] + 1..ends[2])?,
            to,
            room,
            body: &bytes[ends[3] + 1..],
            ts: layout.ts,
        })
    }

    /// Decodes a record of `stream` (`None`: a broadcast); `None` when it is not one.
    pub fn decode(stream: Option<&StreamId>, bytes: &[u8]) -> Option<Message> {
        let view = Self::view(stream, bytes)?;
        let to = match (view.to, stream) {
            (None, _) => None,
            (Some(name), Some(StreamId::User(user))) if user.as_str() == name => Some(user.clone()),
            (Some(name), _) => Some(UserId::parse(name).ok()?),
        };
        let room = match stream {
            Some(StreamId::Room(room)) => Some(room.clone()),
            _ => None,
        };
        Some(Message {
            mid: Arc::from(view.mid),
            from: Arc::from(view.from),
            to,
            room,
            body: Arc::from(std::str::from_utf8(view.body).ok()?),
            ts: view.ts,
        })
    }
}

/// Where the fields of a record are and when its message was accepted, as [`Record::check`]
/// found them: a record received from a bus is parsed once, however often it is viewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Where the head's three spaces and its newline are.
    ends: [usize; 4],
    ts: u64,
}

impl Layout {
    /// When the message was accepted, in ms since the Unix epoch.
    pub fn ts(&self) -> u64 {
        self.ts
    }
}

/// A message's fields, borrowed from a [`Message`] or from a record's bytes, which is what a wire
/// protocol encodes: a message received from a bus is encoded straight from its bytes. The body
/// stays bytes: it was checked when the message was accepted, and a frame copies it as it is
/// (a record read back into a [`Message`] is checked again by [`Record::decode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageView<'a> {
    pub mid: &'a str,
    pub from: &'a str,
    pub to: Option<&'a str>,
    pub room: Option<&'a str>,
    pub body: &'a [u8],
    pub ts: u64,
}

impl Message {
    pub fn view(&self) -> MessageView<'_> {
        MessageView {
            mid: &self.mid,
            from: &self.from,
            to: self.to.as_ref().map(UserId::as_str),
            room: self.room.as_ref().map(RoomName::as_str),
            body: self.body.as_bytes(),
            ts: self.ts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm() -> Message {
        Message {
            mid: Arc::from("0000018f0000abcdef0123456789"),
            from: Arc::from("alice"),
            to: Some(UserId::parse("bob").unwrap()),
            room: None,
            body: Arc::from("{\"text\":\"a b\\nc\"}"),
            ts: 1_763_800_000_123,
        }
    }

    #[test]
    fn a_direct_message_round_trips_in_either_party_stream() {
        let record = Record::encode(&dm());
        assert_eq!(&record[..], &b"1763800000123 0000018f0000abcdef0123456789 alice bob\n{\"text\":\"a b\\nc\"}"[..]);
        for stream in ["user:bob", "user:alice"] {
            let stream = StreamId::parse(stream).unwrap();
            assert_eq!(Record::decode(Some(&stream), &record), Some(dm()));
        }
    }

    #[test]
    fn a_room_message_takes_its_room_from_the_stream() {
        let room = RoomName::parse("lobby").unwrap();
        let message = Message { to: None, room: Some(room.clone()), body: Arc::from("null"), ..dm() };
        let record = Record::encode(&message);
        assert!(record.ends_with(b" alice -\nnull"));
        assert_eq!(Record::decode(Some(&StreamId::Room(room.clone())), &record), Some(message.clone()));
        assert_eq!(Record::view(Some(&StreamId::Room(room)), &record), Some(message.view()));
        let broadcast = Message { room: None, ..message };
        assert_eq!(Record::decode(None, &Record::encode(&broadcast)), Some(broadcast));
    }

    #[test]
    fn malformed_records_are_refused() {
        let stream = StreamId::parse("user:bob").unwrap();
        let bad = [
            &b"no newline"[..],
            b"1 m a\nbody",
            b"1 m a b c\nbody",
            b"x m a -\nbody",
            b"1 m a b!d\n{}",
            b"1 m a b",
            b"",
            b"1  a -\n{}",
        ];
        for bad in bad {
            assert_eq!(Record::decode(Some(&stream), bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
