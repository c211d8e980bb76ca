//! Server API request bodies (PROTOCOL.md §5): `api::parse_push`, the exact parse of the
//! message routes (`{body, from?, key?}`), `api::parse_broadcast`, that of the broadcast route
//! (`{body, from?}`), and `api::parse_disconnect`, that of `POST /users/{user}/disconnect`
//! (`{reason?}`, or an empty or `null` body). The routes take raw bytes, so any byte string is
//! a possible body (axum's body limit only bounds its length).
//!
//! Invariants: a refused body is `bad_request` with an API error body of known shape; an accepted
//! one has a valid sender, a 1-256 byte key and a body that is one JSON value at most 64 deep that
//! a message frame carries unchanged; a disconnect reason is at most 100 bytes and fits a close
//! frame's reason and a `disconnect` frame.

#![no_main]

mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use switchyard::api::{ApiError, parse_broadcast, parse_disconnect, parse_push};
use switchyard::message::{Message, Record};
use switchyard::protocol::{
    ErrorCode, RoomName, StreamId, encode_disconnect, encode_message, valid_name,
};

use common::{json_depth, object_members, read_back, serde_accepts};

fn check_refusal(e: &ApiError, data: &[u8]) {
    assert_eq!(e.0.code, ErrorCode::BadRequest, "{}: {:?}", e.0, String::from_utf8_lossy(data));
    let response = switchyard::api::error_response(&e.0);
    assert_eq!(response.status().as_u16(), 400);
}

fuzz_target!(|data: &[u8]| {
    match parse_broadcast(data) {
        Err(e) => check_refusal(&e, data),
        Ok(push) => assert!(push.key.is_none(), "a broadcast has no key"),
    }

    match parse_push(data) {
        Err(e) => check_refusal(&e, data),
        Ok(push) => {
            assert!(parse_broadcast(data).is_ok(), "a message body is a broadcast body too");
            // serde_json does not check UTF-8 inside fields it skips, hence the lossy reading.
            assert!(serde_accepts(data), "a body that is not JSON was accepted: {:?}", String::from_utf8_lossy(data));
            assert!(
                object_members(&String::from_utf8_lossy(data)).is_some(),
                "a body that is not an object was accepted"
            );
            assert!(&*push.from == "system" || valid_name(&push.from), "sender {:?} accepted", push.from);
            if let Some(key) = &push.key {
                assert!((1..=256).contains(&key.len()), "key of {} bytes accepted", key.len());
            }
            let depth = json_depth(&push.body);
            assert!(depth.is_some_and(|d| d <= 64), "body {:?} is not JSON at most 64 deep ({depth:?})", push.body);
            let room = RoomName::parse("lobby").unwrap();
            let draft = Message {
                mid: Arc::from("0123456789ab0123456789abcdef"),
                from: push.from.clone(),
                to: None,
                room: Some(room.clone()),
                body: push.body.clone(),
                ts: 1,
            };
            let stream = StreamId::Room(room);
            let record = Record::encode(&draft);
            assert_eq!(Record::decode(Some(&stream), &record).as_ref(), Some(&draft), "the stored record round-trips");
            let encoded = encode_message(Some((&stream, 1)), &draft);
            assert_eq!(read_back(&encoded).body.map(|b| b.get()), Some(&*push.body));
        }
    }

    match parse_disconnect(data) {
        Err(e) => check_refusal(&e, data),
        Ok(reason) => {
            let trimmed = data.trim_ascii();
            let object = || object_members(&String::from_utf8_lossy(data)).is_some();
            assert!(trimmed.is_empty() || trimmed == b"null" || object(), "not an object, empty or null");
            assert!(reason.len() <= 100, "reason of {} bytes accepted", reason.len());
            let back: serde_json::Value = serde_json::from_slice(&encode_disconnect(4004, &reason)).unwrap();
            assert_eq!(back["reason"].as_str(), Some(reason.as_str()));
        }
    }
});
