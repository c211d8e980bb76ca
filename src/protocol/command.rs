//! Client → server commands (PROTOCOL.md §3).
//!
//! A frame is parsed in one pass into a flat struct of optional fields, then checked per command
//! type. That way the `id` is known even when the rest of the frame is wrong, and the error reply
//! can carry it.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ProtocolError, RoomName, StreamId, UserId};

/// Largest `limit` a history query may ask for.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// `limit` of a history query that gives none.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// Longest idempotency key accepted.
pub const MAX_KEY_LEN: usize = 256;
/// Most users one presence query may name.
pub const MAX_PRESENCE_USERS: usize = 1000;

/// One parsed frame: the client's correlation id (if any) and the command or why it is invalid.
pub struct CommandFrame {
    /// The raw `id`, echoed verbatim in the reply; always a JSON number or string.
    pub id: Option<Box<RawValue>>,
    pub command: Result<Command, ProtocolError>,
}

#[derive(Debug)]
pub enum Command {
    Send { to: UserId, body: Box<RawValue>, key: Option<String> },
    Join { room: RoomName, since: Option<u64> },
    Leave { room: RoomName },
    Publish { room: RoomName, body: Box<RawValue>, key: Option<String> },
    Sync { since: Option<u64> },
    Ack { seq: u64 },
    Presence(PresenceQuery),
    History { stream: StreamId, query: HistoryQuery },
    Ping,
}

#[derive(Debug)]
pub enum PresenceQuery {
    Users(Vec<UserId>),
    Room(RoomName),
}

/// Which slice of a stream a history request wants (§3 `history`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The first `limit` messages after `since`.
    After { since: u64, limit: usize },
    /// The last `limit` messages before `before`.
    Before { before: u64, limit: usize },
    /// The last `limit` messages.
    Last { limit: usize },
}

/// The highest seq a history query may name: the largest signed 64-bit integer, as the OpenAPI
/// document declares (`int64`) and most clients' integers hold. No stream comes near it.
pub const MAX_SEQ: u64 = i64::MAX as u64;

impl HistoryQuery {
    /// Builds a query from the optional fields shared by the WebSocket and the HTTP API.
    pub fn from_parts(since: Option<u64>, before: Option<u64>, limit: Option<u64>) -> Result<Self, ProtocolError> {
        let limit = match limit {
            None => DEFAULT_HISTORY_LIMIT,
            Some(n) if n as usize > MAX_HISTORY_LIMIT => {
                return Err(ProtocolError::bad_request("limit must be at most 1000"));
            }
            Some(n) => n as usize,
        };
        if since.max(before).is_some_and(|seq| seq > MAX_SEQ) {
            return Err(ProtocolError::bad_request(format!("since and before must be at most {MAX_SEQ}")));
        }
        match (since, before) {
            (Some(_), Some(_)) => Err(ProtocolError::bad_request("give since or before, not both")),
            (Some(since), None) => Ok(Self::After { since, limit }),
            (None, Some(before)) => Ok(Self::Before { before, limit }),
            (None, None) => Ok(Self::Last { limit }),
        }
    }
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    id: Option<Box<RawValue>>,
    to: Option<String>,
    #[serde(default, deserialize_with = "any_json")]
    body: Option<Box<RawValue>>,
    key: Option<String>,
    room: Option<String>,
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<u64>,
    seq: Option<u64>,
    users: Option<Vec<String>>,
    stream: Option<String>,
}

/// A field that may hold any JSON value, `null` included (PROTOCOL.md §3: a message's `body` is
/// any JSON): `Some` whenever the field is present, where a plain `Option` would read `null` as
/// absent. Use with `#[serde(default)]`, which makes an absent field `None`.
pub fn any_json<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    <Box<RawValue> as Deserialize>::deserialize(deserializer).map(Some)
}

fn required<T>(field: Option<T>, name: &str, kind: &str) -> Result<T, ProtocolError> {
    field.ok_or_else(|| ProtocolError::bad_request(format!("{kind} needs `{name}`")))
}

pub fn checked_key(key: Option<String>) -> Result<Option<String>, ProtocolError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_KEY_LEN => Err(ProtocolError::bad_request("key must be 1-256 bytes")),
        other => Ok(other),
    }
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<Box<RawValue>>,
}

/// An id is a JSON number or string.
fn valid_id(id: &RawValue) -> bool {
    let first = id.get().as_bytes().first().copied().unwrap_or(b' ');
    first == b'"' || first == b'-' || first.is_ascii_digit()
}

/// Whether `json` starts (after whitespace) like an object. serde reads a struct from a JSON array
/// too, taking its elements as the fields in declaration order, so without this check
/// `["send",1,"bob",{}]` would be a `send`: a frame or a request body is an object, checked first.
pub(crate) fn is_object(json: &[u8]) -> bool {
    json.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'{')
}

/// Deepest nesting of arrays and objects a message body may have. Recipients parse the body
/// inside the message frame, and common JSON parsers stop at 128 levels (serde_json's default),
/// so a deeper body would be stored and then break every client it reaches.
pub const MAX_BODY_DEPTH: usize = 64;

/// Refuses a body nested deeper than [`MAX_BODY_DEPTH`]; one pass over its bytes.
pub fn checked_body<B: AsRef<RawValue>>(body: B) -> Result<B, ProtocolError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body.as_ref().get().as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BODY_DEPTH {
                    return Err(ProtocolError::bad_request(format!(
                        "body is nested more than {MAX_BODY_DEPTH} levels deep"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(body)
}

/// Parses one text frame. Never fails as a whole: a frame that is not even a JSON object yields
/// `id: None` and a `bad_request`.
pub fn parse_command(text: &str) -> CommandFrame {
    if !is_object(text.as_bytes()) {
        let command = Err(ProtocolError::bad_request("malformed command: a command is a JSON object"));
        return CommandFrame { id: None, command };
    }
    let mut raw: RawFrame<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            // An object whose other fields have the wrong type still names its id.
            let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id).filter(|id| valid_id(id));
            return CommandFrame { id, command: Err(ProtocolError::bad_request(format!("malformed command: {e}"))) };
        }
    };
    if !raw.id.as_deref().is_none_or(valid_id) {
        return CommandFrame { id: None, command: Err(ProtocolError::bad_request("id must be a number or a string")) };
    }
    let (id, kind) = (raw.id.take(), raw.kind.take());
    CommandFrame { id, command: build(kind.as_deref(), raw) }
}

fn build(kind: Option<&str>, raw: RawFrame<'_>) -> Result<Command, ProtocolError> {
    let kind = kind.ok_or_else(|| ProtocolError::bad_request("command needs `type`"))?;
    Ok(match kind {
        "send" => Command::Send {
            to: UserId::parse(&required(raw.to, "to", kind)?)?,
            body: checked_body(required(raw.body, "body", kind)?)?,
            key: checked_key(raw.key)?,
        },
        "join" => Command::Join { room: RoomName::parse(&required(raw.room, "room", kind)?)?, since: raw.since },
        "leave" => Command::Leave { room: RoomName::parse(&required(raw.room, "room", kind)?)? },
        "publish" => Command::Publish {
            room: RoomName::parse(&required(raw.room, "room", kind)?)?,
            body: checked_body(required(raw.body, "body", kind)?)?,
            key: checked_key(raw.key)?,
        },
        "sync" => Command::Sync { since: raw.since },
        "ack" => Command::Ack { seq: required(raw.seq, "seq", kind)? },
        "presence" => match (raw.users, raw.room) {
            (Some(users), None) => {
                if users.len() > MAX_PRESENCE_USERS {
                    return Err(ProtocolError::bad_request("presence takes at most 1000 users"));
                }
                let users = users.iter().map(|u| UserId::parse(u)).collect::<Result<_, _>>()?;
                Command::Presence(PresenceQuery::Users(users))
            }
            (None, Some(room)) => Command::Presence(PresenceQuery::Room(RoomName::parse(&room)?)),
            _ => return Err(ProtocolError::bad_request("presence needs `users` or `room`")),
        },
        "history" => Command::History {
            stream: StreamId::parse(&required(raw.stream, "stream", kind)?)?,
            query: HistoryQuery::from_parts(raw.since, raw.before, raw.limit)?,
        },
        "ping" => Command::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(ProtocolError::bad_request(format!("unknown command type `{shown}`")));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Command {
        parse_command(text).command.expect("valid command")
    }

    fn err(text: &str) -> (Option<String>, String) {
        let frame = parse_command(text);
        let e = frame.command.expect_err("invalid command");
        (frame.id.map(|id| id.get().to_owned()), e.message)
    }

    #[test]
    fn parses_every_command() {
        assert!(matches!(ok(r#"{"type":"send","to":"bob","body":{"a":1}}"#), Command::Send { .. }));
        assert!(matches!(ok(r#"{"type":"join","room":"lobby","since":4}"#), Command::Join { since: Some(4), .. }));
        assert!(matches!(ok(r#"{"type":"leave","room":"lobby"}"#), Command::Leave { .. }));
        assert!(matches!(
            ok(r#"{"type":"publish","room":"r","body":"hi","key":"k1"}"#),
            Command::Publish { key: Some(_), .. }
        ));
        assert!(matches!(ok(r#"{"type":"sync"}"#), Command::Sync { since: None }));
        assert!(matches!(ok(r#"{"type":"ack","seq":9}"#), Command::Ack { seq: 9 }));
        assert!(matches!(
            ok(r#"{"type":"presence","users":["a","b"]}"#),
            Command::Presence(PresenceQuery::Users(u)) if u.len() == 2
        ));
        assert!(matches!(
            ok(r#"{"type":"history","stream":"room:r","before":5,"limit":3}"#),
            Command::History { query: HistoryQuery::Before { before: 5, limit: 3 }, .. }
        ));
        assert!(matches!(ok(r#"{"type":"ping","id":"x"}"#), Command::Ping));
    }

    #[test]
    fn a_null_body_is_a_body_and_a_missing_one_is_not() {
        let Command::Send { body, .. } = ok(r#"{"type":"send","to":"bob","body":null}"#) else { panic!("a send") };
        assert_eq!(body.get(), "null");
        let Command::Publish { body, .. } = ok(r#"{"type":"publish","room":"r","body" : null ,"key":"k"}"#) else {
            panic!("a publish")
        };
        assert_eq!(body.get(), "null");
        assert_eq!(err(r#"{"type":"send","to":"bob"}"#).1, "send needs `body`");
        assert_eq!(err(r#"{"type":"publish","room":"r"}"#).1, "publish needs `body`");
    }

    #[test]
    fn keeps_the_id_when_the_rest_is_wrong() {
        let (id, msg) = err(r#"{"type":"send","id":7,"body":1}"#);
        assert_eq!(id.as_deref(), Some("7"));
        assert!(msg.contains("`to`"), "{msg}");
        let (id, msg) = err(r#"{"type":"join","id":8,"room":5}"#);
        assert_eq!(id.as_deref(), Some("8"), "a field of the wrong type keeps the id");
        assert!(msg.contains("malformed"), "{msg}");
        let (id, msg) = err(r#"{"type":"fly","id":"a"}"#);
        assert_eq!(id.as_deref(), Some("\"a\""));
        assert!(msg.contains("unknown command"), "{msg}");
    }

    #[test]
    fn refuses_bad_input() {
        assert!(err("not json").1.contains("malformed"));
        assert!(err("[1,2]").1.contains("JSON object"));
        // Arrays are not read field by field as commands, nor their first element as the id.
        let positional = r#"["ping",7,null,null,null,null,null,null,null,null,null,null]"#;
        assert_eq!(err(positional), (None, "malformed command: a command is a JSON object".to_owned()));
        assert_eq!(err(r#"["ping"]"#).0, None);
        assert!(matches!(ok(" \r\n\t{\"type\":\"ping\"}"), Command::Ping), "JSON whitespace first");
        assert!(err(r#"{"type":"ping","id":{"x":1}}"#).1.contains("id must be"));
        assert!(err(r#"{"type":"join","room":"bad room"}"#).1.contains("invalid room name"));
        assert!(err(r#"{"type":"history","stream":"room:r","since":1,"before":3}"#).1.contains("not both"));
        assert!(err(r#"{"type":"history","stream":"room:r","limit":1001}"#).1.contains("at most 1000"));
        assert!(err(r#"{"type":"ack","seq":-1}"#).1.contains("malformed"));
        assert!(err(r#"{"id":1}"#).1.contains("needs `type`"));
        assert!(err(r#"{"type":"presence"}"#).1.contains("`users` or `room`"));
        // Found by both fuzzers: serde reads a struct from an array, its elements as the fields.
        assert_eq!(err("[77 ]"), (None, "malformed command: a command is a JSON object".to_owned()));
        assert!(err(r#"["send",1,"bob",{"a":1}]"#).1.contains("a JSON object"));
        let deep = |n: usize| format!(r#"{{"type":"send","to":"b","body":{}"\"[{{"{}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(matches!(ok(&deep(MAX_BODY_DEPTH)), Command::Send { .. }), "brackets in strings do not count");
        assert!(err(&deep(MAX_BODY_DEPTH + 1)).1.contains("nested"));
    }

    #[test]
    fn history_defaults() {
        assert_eq!(HistoryQuery::from_parts(None, None, None).unwrap(), HistoryQuery::Last { limit: 100 });
    }

    #[test]
    fn history_seqs_are_at_most_the_largest_int64() {
        let max = i64::MAX as u64;
        assert_eq!(
            HistoryQuery::from_parts(Some(max), None, None).unwrap(),
            HistoryQuery::After { since: max, limit: 100 }
        );
        for (since, before) in [(Some(max + 1), None), (None, Some(max + 1)), (Some(u64::MAX), None)] {
            let e = HistoryQuery::from_parts(since, before, None).unwrap_err();
            assert!(e.message.contains("at most 9223372036854775807"), "{}", e.message);
        }
        assert!(err(r#"{"type":"history","stream":"room:r","since":9223372036854775808}"#).1.contains("at most"));
    }
}
