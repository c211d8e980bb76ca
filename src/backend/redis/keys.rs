//! The Redis key and channel layout of a cluster, in one place, and the instance names in it.
//! Every name starts with the cluster's `--prefix` (P below), so several clusters or test runs
//! share one Redis.
//!
//! A node process is an *instance* `<node id>@<nonce>`, with a random nonce per process: a node
//! restarted with the same `--node-id` is a new instance, so the state its killed predecessor
//! left behind is still found and reaped instead of being adopted by the new process.
//!
//! | name | type | holds |
//! |---|---|---|
//! | `P:seq:<stream>` | string | the stream's last seq (never expires: seqs are never reused) |
//! | `P:log:<stream>` | stream | entries `0-<seq>`: the message's record `r`, acceptance time `t` |
//! | `P:cur:<user>` | string | the user's read cursor |
//! | `P:idem:<scope>:<key>` | string | `<mid> <seq>` of a keyed append, for 10 minutes |
//! | `P:us:<user>` | hash | `<session hex>.<nonce>` → JSON of the session, user included |
//! | `P:rm:<room>` | hash | user → number of instances that have the user in the room |
//! | `P:ns:<instance>` | set | `<user>\n<session field>`: the sessions the instance added |
//! | `P:nr:<instance>` | set | `<room>\n<user>\n<session hex>`: its session memberships |
//! | `P:nm:<instance>` | hash | `<room>\n<user>` → the instance's sessions of the user in the room |
//! | `P:nodes` | zset | instance → Redis time (ms) of its last heartbeat |
//! | `P:node:<instance>` | string | JSON of the instance's last `NodeInfo`, expiring |
//! | `P:reap:<instance>` | string | lock of the node reaping that instance (`NX PX`) |
//! | `P:u:<user>` | channel | events for a user's sessions (direct messages, disconnects) |
//! | `P:r:<room>` | channel | events for a room's members (messages, presence) |
//! | `P:all` | channel | broadcasts |
//!
//! Scripts that walk one instance's keys (reaping) are handed a key prefix (`P:us:`, `P:rm:`, …)
//! and complete the names themselves, so this needs a single Redis (or a prefix that is a hash
//! tag, `{sy}`, on Redis Cluster).

use std::sync::Arc;

use crate::bus::{SessionId, Topic};
use crate::protocol::{RoomName, StreamId, UserId};

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// `P:<kind>:` followed by `parts`. Keys are built several times per message, so without
    /// `format!`: one exact allocation, no formatting machinery.
    fn key(&self, kind: &str, parts: &[&str]) -> String {
        let len = self.prefix.len() + kind.len() + 2 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        key.push(':');
        key.push_str(kind);
        key.push(':');
        parts.iter().for_each(|p| key.push_str(p));
        key
    }

    pub fn seq(&self, stream: &StreamId) -> String {
        let (kind, name) = stream.parts();
        self.key("seq", &[kind, name])
    }

    pub fn log(&self, stream: &StreamId) -> String {
        let (kind, name) = stream.parts();
        self.key("log", &[kind, name])
    }

    pub fn cursor(&self, user: &UserId) -> String {
        self.key("cur", &[user.as_str()])
    }

    pub fn idempotency(&self, scope: &str, key: &str) -> String {
        self.key("idem", &[scope, ":", key])
    }

    /// `P:us:<user>`: the user's sessions, cluster-wide.
    pub fn user_sessions(&self, user: &UserId) -> String {
        self.key("us", &[user.as_str()])
    }

    /// `P:rm:<room>`: the room's users.
    pub fn room_members(&self, room: &RoomName) -> String {
        self.key("rm", &[room.as_str()])
    }

    /// `P:ns:<instance>`: the sessions an instance added.
    pub fn instance_sessions(&self, instance: &str) -> String {
        self.key("ns", &[instance])
    }

    /// `P:nr:<instance>`: an instance's session memberships.
    pub fn instance_memberships(&self, instance: &str) -> String {
        self.key("nr", &[instance])
    }

    /// `P:nm:<instance>`: an instance's sessions per (room, user).
    pub fn instance_rooms(&self, instance: &str) -> String {
        self.key("nm", &[instance])
    }

    /// `P:nodes`: the registry of instances by last heartbeat.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// `P:node:<instance>`: an instance's details.
    pub fn node(&self, instance: &str) -> String {
        self.key("node", &[instance])
    }

    /// The start of every name of `kind` (`P:us:`, say), for scripts that complete names
    /// themselves from what they read.
    pub fn kind_prefix(&self, kind: KeyKind) -> String {
        let kind = match kind {
            KeyKind::UserSessions => "us",
            KeyKind::RoomMembers => "rm",
            KeyKind::Node => "node",
            KeyKind::ReapLock => "reap",
        };
        self.key(kind, &[])
    }

    pub fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::User(user) => self.key("u", &[user.as_str()]),
            Topic::Room(room) => self.key("r", &[room.as_str()]),
            Topic::All => format!("{}:all", self.prefix),
        }
    }

    /// The topic a channel name stands for, if it is one of this cluster's.
    pub fn topic(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(self.prefix.as_str())?.strip_prefix(':')?;
        if rest == "all" {
            return Some(Topic::All);
        }
        if let Some(user) = rest.strip_prefix("u:") {
            return UserId::parse(user).ok().map(Topic::User);
        }
        let room = rest.strip_prefix("r:")?;
        RoomName::parse(room).ok().map(Topic::Room)
    }
}

/// The kinds of name a script completes itself (see [`Keys::kind_prefix`]).
#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    UserSessions,
    RoomMembers,
    Node,
    ReapLock,
}

/// This process's name in a cluster's Redis: `<node id>@<nonce>`, a new nonce per process (per
/// [`Instance::new`]). Presence and the registry of one node share it.
#[derive(Debug)]
pub struct Instance {
    node: Arc<str>,
    nonce: String,
    name: String,
}

impl Instance {
    pub fn new(node: Arc<str>) -> Self {
        let nonce = format!("{:016x}", fastrand::u64(..));
        Self { name: format!("{node}@{nonce}"), node, nonce }
    }

    /// The node id.
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// `<node id>@<nonce>`, as keys and the registry name this instance.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The field of a session in `P:us:<user>`, tagged with this instance's nonce.
    pub fn session_field(&self, session: SessionId) -> String {
        format!("{session}.{}", self.nonce)
    }

    /// The nonce of an instance name.
    pub fn nonce_of(instance: &str) -> Option<&str> {
        instance.rsplit_once('@').map(|(_, nonce)| nonce)
    }

    /// The nonce of the instance that wrote a session field.
    pub fn nonce_of_field(field: &str) -> Option<&str> {
        field.split_once('.').map(|(_, nonce)| nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip() {
        let keys = Keys::new("sy:test");
        for topic in
            [Topic::User(UserId::parse("alice").unwrap()), Topic::Room(RoomName::parse("a:b.c").unwrap()), Topic::All]
        {
            assert_eq!(keys.topic(&keys.channel(&topic)), Some(topic));
        }
        assert_eq!(keys.topic("other:u:alice"), None);
        assert_eq!(keys.channel(&Topic::All), "sy:test:all");
        assert_eq!(keys.topic("sy:test:x:alice"), None);
    }

    #[test]
    fn keys_follow_the_layout() {
        let keys = Keys::new("sy");
        let stream = StreamId::parse("room:a:b").unwrap();
        assert_eq!(keys.seq(&stream), "sy:seq:room:a:b");
        assert_eq!(keys.log(&stream), "sy:log:room:a:b");
        assert_eq!(keys.cursor(&UserId::parse("bob").unwrap()), "sy:cur:bob");
        assert_eq!(keys.idempotency("u:bob", "k1"), "sy:idem:u:bob:k1");
        let (bob, lobby) = (UserId::parse("bob").unwrap(), RoomName::parse("lobby").unwrap());
        assert_eq!(keys.user_sessions(&bob), "sy:us:bob");
        assert_eq!(keys.room_members(&lobby), "sy:rm:lobby");
        assert_eq!(keys.instance_sessions("n1@ab"), "sy:ns:n1@ab");
        assert_eq!(keys.instance_memberships("n1@ab"), "sy:nr:n1@ab");
        assert_eq!(keys.instance_rooms("n1@ab"), "sy:nm:n1@ab");
        assert_eq!((keys.nodes(), keys.node("n1@ab")), ("sy:nodes".into(), "sy:node:n1@ab".into()));
        assert_eq!(keys.kind_prefix(KeyKind::UserSessions) + "bob", keys.user_sessions(&bob));
        assert_eq!(keys.kind_prefix(KeyKind::RoomMembers) + "lobby", keys.room_members(&lobby));
        assert_eq!(keys.kind_prefix(KeyKind::Node) + "n1@ab", keys.node("n1@ab"));
        assert_eq!(keys.kind_prefix(KeyKind::ReapLock) + "n1@ab", "sy:reap:n1@ab");
    }

    #[test]
    fn instances_tag_their_session_fields() {
        let a = Instance::new(Arc::from("node-a"));
        let b = Instance::new(Arc::from("node-a"));
        assert_ne!(a.name(), b.name(), "a new nonce per process");
        assert!(a.name().starts_with("node-a@"));
        let field = a.session_field(SessionId(255));
        assert!(field.starts_with("00000000000000ff."));
        assert_eq!(Instance::nonce_of_field(&field), Instance::nonce_of(a.name()));
    }
}
