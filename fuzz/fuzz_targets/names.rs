//! Names (PROTOCOL.md §1): `valid_name`, `UserId` / `RoomName` / `StreamId` parsing and the
//! token's `rooms` claim patterns, on arbitrary strings.
//!
//! Invariants: a name is accepted exactly when it matches `^[A-Za-z0-9_.:@-]{1,128}$` (checked
//! by a reference written here); a valid name needs no JSON escaping, which the frame encoders
//! rely on when they copy names into frames as they are; stream names round-trip.
//!
//! Input: UTF-8 lines, the name and then the patterns of a `rooms` claim.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::auth::Identity;
use switchyard::protocol::{RoomName, StreamId, UserId, encode_presence, valid_name};

/// `^[A-Za-z0-9_.:@-]{1,128}$`, character by character.
fn reference(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.:@-".contains(c);
    (1..=128).contains(&name.chars().count()) && name.chars().all(allowed)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let name = lines.next().unwrap_or("");
    let patterns: Vec<String> = lines.map(str::to_owned).collect();
    let valid = valid_name(name);
    assert_eq!(valid, reference(name), "valid_name({name:?})");
    assert_eq!(UserId::parse(name).is_ok(), valid);
    assert_eq!(RoomName::parse(name).is_ok(), valid);

    if let Ok(room) = RoomName::parse(name) {
        assert_eq!(room.as_str(), name);
        assert_eq!(room.to_string(), name);
        assert_eq!(serde_json::to_string(name).unwrap(), format!("\"{name}\""), "a valid name needs no escaping");
        let user = UserId::parse(name).unwrap();
        let frame = encode_presence(&room, "join", &user);
        let back: serde_json::Value = serde_json::from_slice(&frame).expect("a presence frame is JSON");
        assert_eq!((back["room"].as_str(), back["user"].as_str()), (Some(name), Some(name)));

        let identity = Identity { user, device: None, rooms: patterns.clone(), expires_at: None };
        let claimed = patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        });
        assert_eq!(identity.has_room_claim(&room), claimed);
    }

    match StreamId::parse(name) {
        Ok(stream) => {
            let (kind, id) = name.split_at(5);
            assert!(kind == "user:" || kind == "room:");
            assert!(valid_name(id));
            assert_eq!(stream.key(), name);
            assert_eq!(stream.to_string(), name);
            assert_eq!(StreamId::parse(&stream.key()).as_ref(), Ok(&stream));
        }
        Err(_) => {
            let ok = |prefix: &str| name.strip_prefix(prefix).is_some_and(reference);
            assert!(!ok("user:") && !ok("room:"), "stream {name:?} refused");
        }
    }
});
