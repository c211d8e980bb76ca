//! The wire contract of PROTOCOL.md: names, error and close codes, client commands and the
//! frames the server sends.
//!
//! Everything that crosses a socket is parsed or encoded here and nowhere else, so the rest of the
//! crate deals in validated types: a [`UserId`] or [`RoomName`] always matches the alphabet of §1.

mod command;
mod event;

use std::fmt;
use std::sync::Arc;

pub(crate) use command::is_object;
pub use command::{
    Command, CommandFrame, DEFAULT_HISTORY_LIMIT, HistoryQuery, MAX_HISTORY_LIMIT, MAX_KEY_LEN, MAX_SEQ, PresenceQuery,
    any_json, checked_body, checked_key, parse_command,
};
pub use event::{
    encode_disconnect, encode_error, encode_message, encode_presence, encode_reply, encode_view, encode_welcome,
    write_message,
};

/// The device label of a session whose client gave none (no `device` claim, `?device=` or STOMP
/// `device` header): what its `welcome` frame and presence name it.
pub const DEFAULT_DEVICE: &str = "default";

/// Longest user id or room name (§1).
pub const MAX_NAME_LEN: usize = 128;

/// Whether `name` matches `^[A-Za-z0-9_.:@-]{1,128}$`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `raw` against the alphabet of PROTOCOL.md §1.
            pub fn parse(raw: &str) -> Result<Self, ProtocolError> {
                if valid_name(raw) {
                    Ok(Self(Arc::from(raw)))
                } else {
                    Err(ProtocolError::bad_request(concat!(
                        "invalid ", $what, ": use 1-128 characters of A-Z a-z 0-9 _ . : @ -"
                    )))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A user id, valid by construction.
    UserId,
    "user id"
);
name_type!(
    /// A room name, valid by construction.
    RoomName,
    "room name"
);

/// A stream: the personal log of one user or the log of one room (§1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    User(UserId),
    Room(RoomName),
}

impl StreamId {
    /// Parses `user:<id>` or `room:<name>`.
    pub fn parse(raw: &str) -> Result<Self, ProtocolError> {
        if let Some(user) = raw.strip_prefix("user:") {
            Ok(Self::User(UserId::parse(user)?))
        } else if let Some(room) = raw.strip_prefix("room:") {
            Ok(Self::Room(RoomName::parse(room)?))
        } else {
            Err(ProtocolError::bad_request("stream must be user:<id> or room:<name>"))
        }
    }

    /// The stream's name as it appears on the wire and as a storage key.
    pub fn key(&self) -> String {
        let (kind, name) = self.parts();
        let mut key = String::with_capacity(kind.len() + name.len());
        key.push_str(kind);
        key.push_str(name);
        key
    }

    /// The name in two parts, `user:` or `room:` and the id, for callers that build keys and
    /// frames around it on every message without going through `fmt`.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Self::User(u) => ("user:", u.as_str()),
            Self::Room(r) => ("room:", r.as_str()),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = self.parts();
        f.write_str(kind)?;
        f.write_str(name)
    }
}

/// The error codes of PROTOCOL.md §4, shared by the WebSocket and the HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    NotMember,
    RateLimited,
    TooLarge,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of §4.
    pub const ALL: [Self; 9] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::NotMember,
        Self::RateLimited,
        Self::TooLarge,
        Self::Unavailable,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::NotMember => "not_member",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status of §5.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::NotMember => 403,
            Self::NotFound => 404,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An error a client or a backend sees: a code of §4 and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// Close codes of PROTOCOL.md §4.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_UTF8: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_LARGE: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const REPLACED: u16 = 4002;
    pub const TOO_SLOW: u16 = 4003;
    pub const KICKED: u16 = 4004;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A message id unique across the cluster: the acceptance time in hex followed by 64 random
/// bits, so ids sort roughly by time and two nodes cannot collide in practice.
pub fn new_mid(ts_ms: u64) -> Arc<str> {
    let mut mid = [0u8; 28];
    let (time, random) = mid.split_at_mut(12);
    write_hex(time, ts_ms);
    write_hex(random, fastrand::u64(..));
    Arc::from(std::str::from_utf8(&mid).expect("hex digits are ASCII"))
}

/// Fills `out` with the low `out.len()` hex digits of `n`, zero-padded, for ids built on every
/// message (a `format!` costs more than the rest of building a message id).
pub(crate) fn write_hex(out: &mut [u8], mut n: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_alphabet() {
        assert!(valid_name("alice"));
        assert!(valid_name("a.b:c@d-e_F9"));
        assert!(valid_name(&"x".repeat(128)));
        assert!(!valid_name(&"x".repeat(129)));
        assert!(!valid_name(""));
        assert!(!valid_name("with space"));
        assert!(!valid_name("émile"));
        assert!(!valid_name("a/b"));
    }

    #[test]
    fn streams_parse_and_print() {
        assert_eq!(StreamId::parse("user:bob").unwrap().to_string(), "user:bob");
        assert_eq!(StreamId::parse("room:private:x").unwrap().to_string(), "room:private:x");
        assert!(StreamId::parse("bob").is_err());
        assert!(StreamId::parse("user:").is_err());
        assert!(StreamId::parse("room:a b").is_err());
    }

    #[test]
    fn mids_are_the_time_then_random_bits_in_hex() {
        let ts = 1_763_800_000_123;
        let mid = new_mid(ts);
        assert_eq!(mid.len(), 28);
        assert_eq!(&mid[..12], format!("{ts:012x}"));
        assert!(mid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{mid}");
        assert_eq!(&new_mid(0x2a)[..12], "00000000002a");
    }

    #[test]
    fn codes_map_to_http() {
        assert_eq!(ErrorCode::NotMember.http_status(), 403);
        assert_eq!(ErrorCode::Unavailable.http_status(), 503);
        assert_eq!(ErrorCode::TooLarge.as_str(), "too_large");
    }
}
