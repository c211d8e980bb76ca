//! Client commands (PROTOCOL.md §3) as a session sees them: `parse_command` on the text of a
//! WebSocket text frame, then the reply or error frame the session would write.
//!
//! Invariants checked, beyond "no panic":
//! - the `id` is echoed byte for byte whenever the frame is an object with one number or string
//!   `id` (even when the rest is wrong), and never invented;
//! - an error is `bad_request` and encodes to an error frame with a known code and the same id;
//! - a parsed command holds only valid names, keys and limits, and its body is one JSON value at
//!   most `MAX_BODY_DEPTH` deep that a `message` frame carries unchanged.

#![no_main]

mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use switchyard::message::{Message, Record};
use switchyard::protocol::{
    Command, ErrorCode, HistoryQuery, PresenceQuery, RoomName, StreamId, UserId, encode_error,
    encode_message, encode_reply, parse_command, valid_name,
};

use common::{ERROR_CODES, json_depth, object_members, read_back};

/// PROTOCOL.md's limits, restated rather than imported so that a change to them is noticed.
const MAX_BODY_DEPTH: usize = 64;
const MAX_HISTORY_LIMIT: usize = 1000;
const MAX_PRESENCE_USERS: usize = 1000;

fuzz_target!(|data: &[u8]| {
    // The WebSocket layer closes with 1007 on text that is not UTF-8, and the session answers a
    // binary frame with an error before any parsing: only UTF-8 text reaches `parse_command`.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let frame = parse_command(text);
    let id = frame.id.as_deref();

    if let Some(id) = id {
        let first = id.get().as_bytes()[0];
        assert!(first == b'"' || first == b'-' || first.is_ascii_digit(), "id {} is not a number or string", id.get());
        assert!(json_depth(id.get()) == Some(0), "id {} is not one JSON scalar", id.get());
    }
    check_id_echo(text, id.map(|id| id.get()), frame.command.is_ok());

    match frame.command {
        Err(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest, "a parse error is always bad_request: {e}");
            assert!(!e.message.is_empty());
            let encoded = encode_error(id, &e);
            let back = read_back(&encoded);
            assert_eq!(back.kind, "error");
            assert!(ERROR_CODES.contains(&back.code.as_deref().unwrap_or("")), "unknown code {:?}", back.code);
            assert_eq!(back.message.as_deref(), Some(e.message.as_str()));
            assert_eq!(back.id.map(|i| i.get()), id.map(|i| i.get()), "the error frame echoes the id");
        }
        Ok(command) => {
            check_command(&command);
            if let Some(id) = id {
                let reply = encode_reply(id, serde_json::json!({"mid": "m", "seq": 1}));
                let back = read_back(&reply);
                assert_eq!(back.kind, "reply");
                assert_eq!(back.id.map(|i| i.get()), Some(id.get()), "the reply echoes the id");
            }
        }
    }
});

/// The id the frame must echo, worked out from the frame's members by a parser of our own.
fn check_id_echo(text: &str, got: Option<&str>, parsed: bool) {
    let Some(members) = object_members(text) else {
        assert_eq!(got, None, "an id was found in something that is not one JSON object: {text:?}");
        return;
    };
    let ids: Vec<&str> = members.iter().filter(|(k, _)| k == "id").map(|(_, v)| v.get()).collect();
    match ids.as_slice() {
        [] | ["null"] => assert_eq!(got, None),
        [one] if one.starts_with('"') || one.starts_with('-') || one.as_bytes()[0].is_ascii_digit() => {
            assert_eq!(got, Some(*one), "the id must be echoed as sent: {text:?}");
        }
        [_] => assert!(got.is_none() && !parsed, "an id that is not a number or string is refused"),
        // Duplicate ids: which one would be echoed is ambiguous, so none is and the frame is refused.
        _ => assert!(got.is_none() && !parsed, "duplicate ids are refused without an echo"),
    }
}

fn check_name(name: &str) {
    assert!(valid_name(name), "invalid name {name:?} accepted");
    assert!(name.len() <= 128 && !name.is_empty());
}

fn check_body(to: &UserId, body: &serde_json::value::RawValue) {
    let depth = json_depth(body.get());
    assert!(
        depth.is_some_and(|d| d <= MAX_BODY_DEPTH),
        "body {:?} is not JSON at most 64 deep ({depth:?})",
        body.get()
    );
    let draft = Message {
        mid: Arc::from("0123456789ab0123456789abcdef"),
        from: Arc::from("alice"),
        to: Some(to.clone()),
        room: None,
        body: Arc::from(body.get()),
        ts: 1,
    };
    let stream = StreamId::User(to.clone());
    let record = Record::encode(&draft);
    assert_eq!(Record::decode(Some(&stream), &record).as_ref(), Some(&draft), "the stored record round-trips");
    let encoded = encode_message(Some((&stream, 1)), &draft);
    let back = read_back(&encoded);
    assert_eq!(back.kind, "message");
    assert_eq!(back.body.map(|b| b.get()), Some(body.get()), "the message frame carries the body unchanged");
}

fn check_key(key: &Option<String>) {
    if let Some(key) = key {
        assert!((1..=256).contains(&key.len()), "key of {} bytes accepted", key.len());
    }
}

fn check_room(room: &RoomName) {
    check_name(room.as_str());
    assert_eq!(RoomName::parse(room.as_str()).as_ref(), Ok(room));
}

fn check_command(command: &Command) {
    match command {
        Command::Send { to, body, key } => {
            check_name(to.as_str());
            check_body(to, body);
            check_key(key);
        }
        Command::Publish { room, body, key } => {
            check_room(room);
            check_body(&UserId::parse("bob").unwrap(), body);
            check_key(key);
        }
        Command::Join { room, .. } | Command::Leave { room } => check_room(room),
        Command::Presence(PresenceQuery::Room(room)) => check_room(room),
        Command::Presence(PresenceQuery::Users(users)) => {
            assert!(users.len() <= MAX_PRESENCE_USERS);
            users.iter().for_each(|u| check_name(u.as_str()));
        }
        Command::History { stream, query } => {
            let (kind, name) = stream.parts();
            assert!(kind == "user:" || kind == "room:");
            check_name(name);
            assert_eq!(StreamId::parse(&stream.key()).as_ref(), Ok(stream), "a stream name round-trips");
            let limit = match *query {
                HistoryQuery::After { limit, .. }
                | HistoryQuery::Before { limit, .. }
                | HistoryQuery::Last { limit } => limit,
            };
            assert!(limit <= MAX_HISTORY_LIMIT, "limit {limit} accepted");
        }
        Command::Sync { .. } | Command::Ack { .. } | Command::Ping => {}
    }
}
