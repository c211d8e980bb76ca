//! The key-value layout of presence and the node registry on JetStream, in one place, and the
//! instance names in it. For `--prefix P`, with `<P>` the prefix as a bucket name (see
//! `name_part`):
//!
//! | bucket | key | holds |
//! |---|---|---|
//! | `<P>_presence` | `u.<user>` | JSON map: session hex → the session, with the instance that recorded it |
//! | `<P>_presence` | `m.<room>.<user>` | JSON list of the user's session hexes in the room |
//! | `<P>_presence` | `i.<instance>.s.<user>.<session>` | index: a session the instance recorded (empty) |
//! | `<P>_presence` | `i.<instance>.m.<room>.<user>.<session>` | index: a membership it recorded (empty) |
//! | `<P>_nodes` | `n.<instance>` | JSON of the instance's last `NodeInfo`; the entry's time is its last heartbeat |
//! | `<P>_nodes` | `r.<instance>` | the claim of the node reaping that instance; its time is the claim's |
//!
//! Every name is one key token (see [`token`]): names hold `.`, which would split them, so no name
//! can pass for two segments and `m.<room>.<user>` is one room and one user whatever they are
//! called. An index key names everything its data key needs, so a reaper finds what an instance
//! recorded by listing `i.<instance>.>` alone.
//!
//! A node process is an *instance* `<node id>@<nonce>`, with a random nonce per process, as on
//! Redis: a node restarted with the same `--node-id` is a new instance, so what its killed
//! predecessor left is still found and reaped instead of being adopted.

use std::sync::Arc;

use crate::bus::SessionId;
use crate::protocol::{RoomName, UserId};

/// A name as one key token: every byte but `A-Z a-z 0-9 - _` as `=XX`. Names never hold `=`, so no
/// two names share a token, and a token never holds `.`.
pub(crate) fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(b as char),
            _ => out.push_str(&format!("={b:02X}")),
        }
    }
    out
}

/// The name a [`token`] stands for; `None` for anything else.
pub(crate) fn name_of(token: &str) -> Option<String> {
    let mut out = Vec::with_capacity(token.len());
    let mut bytes = token.bytes();
    while let Some(b) = bytes.next() {
        if b == b'=' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The names of one cluster's presence and registry buckets.
#[derive(Clone, Debug)]
pub(crate) struct BucketNames {
    pub(crate) presence: String,
    pub(crate) nodes: String,
}

impl BucketNames {
    pub(crate) fn new(prefix: &str) -> Self {
        let part = super::store::name_part(prefix);
        Self { presence: format!("{part}_presence"), nodes: format!("{part}_nodes") }
    }
}

/// `u.<user>`: the user's sessions, cluster-wide.
pub(crate) fn user_sessions(user: &UserId) -> String {
    format!("u.{}", token(user.as_str()))
}

/// `m.<room>.<user>`: the user's sessions in the room.
pub(crate) fn membership(room: &RoomName, user: &UserId) -> String {
    format!("m.{}.{}", token(room.as_str()), token(user.as_str()))
}

/// `m.<room>.*`: every membership of the room.
pub(crate) fn room_members(room: &RoomName) -> String {
    format!("m.{}.*", token(room.as_str()))
}

/// The user of a membership key, if it is one.
pub(crate) fn member_of(key: &str) -> Option<UserId> {
    let mut parts = key.split('.');
    let (Some("m"), Some(_room), Some(user), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    UserId::parse(&name_of(user)?).ok()
}

/// `i.<instance>.s.<user>.<session>`: the index entry of a session the instance recorded.
pub(crate) fn indexed_session(instance: &str, user: &UserId, session: SessionId) -> String {
    format!("i.{instance}.s.{}.{session}", token(user.as_str()))
}

/// `i.<instance>.m.<room>.<user>.<session>`: the index entry of a membership it recorded.
pub(crate) fn indexed_membership(instance: &str, room: &RoomName, user: &UserId, session: SessionId) -> String {
    format!("i.{instance}.m.{}.{}.{session}", token(room.as_str()), token(user.as_str()))
}

/// `i.<instance>.>`: everything the instance recorded.
pub(crate) fn index(instance: &str) -> String {
    format!("i.{instance}.>")
}

/// What an index key stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Indexed {
    Session(UserId, SessionId),
    Membership(RoomName, UserId, SessionId),
}

impl Indexed {
    /// Parses a key under `i.<instance>.`; `None` for anything else.
    pub(crate) fn parse(key: &str) -> Option<Self> {
        let parts: Vec<&str> = key.split('.').collect();
        let session = |hex: &str| u64::from_str_radix(hex, 16).ok().map(SessionId);
        let user = |t: &str| UserId::parse(&name_of(t)?).ok();
        match parts[..] {
            ["i", _, "s", u, s] => Some(Self::Session(user(u)?, session(s)?)),
            ["i", _, "m", r, u, s] => {
                Some(Self::Membership(RoomName::parse(&name_of(r)?).ok()?, user(u)?, session(s)?))
            }
            _ => None,
        }
    }
}

/// `n.<instance>`: the instance's registry entry.
pub(crate) fn node(instance: &str) -> String {
    format!("n.{instance}")
}

/// `n.*`: every registry entry.
pub(crate) const NODES: &str = "n.*";

/// `r.<instance>`: the claim of the node reaping the instance.
pub(crate) fn claim(instance: &str) -> String {
    format!("r.{instance}")
}

/// The instance of a registry entry's key.
pub(crate) fn instance_of(key: &str) -> Option<&str> {
    key.strip_prefix("n.").filter(|rest| !rest.is_empty() && !rest.contains('.'))
}

/// This process's name in the cluster's buckets: `<node id>@<nonce>`, a new nonce per process (per
/// [`Instance::new`]), written as one key token. Presence and the registry of one node share it.
#[derive(Debug)]
pub(crate) struct Instance {
    node: Arc<str>,
    token: String,
}

impl Instance {
    pub(crate) fn new(node: Arc<str>) -> Self {
        let token = token(&format!("{node}@{:016x}", fastrand::u64(..)));
        Self { node, token }
    }

    /// The node id.
    pub(crate) fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// `<node id>@<nonce>` as a key token, as keys name this instance.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_split_and_never_collide() {
        for name in ["a.b", "a=2Eb", "a:b@c", "a_b", "a-b", "A.9"] {
            let t = token(name);
            assert!(!t.contains('.') && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)), "{t}");
            assert_eq!(name_of(&t).as_deref(), Some(name));
        }
        assert_ne!(token("a.b"), token("a_b"));
        assert_eq!(token("x.y:z@w"), "x=2Ey=3Az=40w");
        assert_eq!(name_of("bad=4"), None);
    }

    #[test]
    fn keys_follow_the_layout_and_parse_back() {
        let (room, user) = (RoomName::parse("chat.en:1").unwrap(), UserId::parse("al.ice@x").unwrap());
        assert_eq!(user_sessions(&user), "u.al=2Eice=40x");
        assert_eq!(membership(&room, &user), "m.chat=2Een=3A1.al=2Eice=40x");
        assert_eq!(member_of(&membership(&room, &user)), Some(user.clone()));
        assert_eq!(member_of("m.a.b.c"), None);
        let session = SessionId(255);
        let key = indexed_session("n1=40ab", &user, session);
        assert_eq!(key, "i.n1=40ab.s.al=2Eice=40x.00000000000000ff");
        assert_eq!(Indexed::parse(&key), Some(Indexed::Session(user.clone(), session)));
        let key = indexed_membership("n1=40ab", &room, &user, session);
        assert!(key.starts_with(index("n1=40ab").trim_end_matches('>')));
        assert_eq!(Indexed::parse(&key), Some(Indexed::Membership(room, user, session)));
        assert_eq!(Indexed::parse("i.n1.x.y"), None);
        assert_eq!(instance_of(&node("n1=40ab")), Some("n1=40ab"));
        assert_eq!(instance_of(&claim("n1=40ab")), None);
        assert_eq!(BucketNames::new("sy.t").presence, "sy_2Et_presence");
    }

    #[test]
    fn instances_are_new_per_process() {
        let (a, b) = (Instance::new(Arc::from("node.a")), Instance::new(Arc::from("node.a")));
        assert_ne!(a.token(), b.token());
        assert!(a.token().starts_with("node=2Ea=40") && !a.token().contains('.'));
        assert_eq!(&**a.node(), "node.a");
    }
}
