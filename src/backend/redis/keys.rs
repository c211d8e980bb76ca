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
//! and complete the names themselves, which one Redis allows.
//!
//! On a Redis Cluster ([`Keys::cluster`]) every name carries a hash tag, so that what one script
//! touches is in one slot, and no script completes names itself: `P:seq:{user:alice}`,
//! `P:log:{room:lobby}`, `P:idem:{user:alice}:<scope>:<key>` (one per stream of a message stored
//! in steps), `P:cur:{user:alice}`, `P:us:{user:alice}`, `P:rm:{room:lobby}` and
//! `P:ri:{room:lobby}` (`<user>\n<instance>` of every instance counted in `rm`), `P:ns:{n:<instance>}`
//! and its `nr`/`nm`, `P:nodes:{registry}`, `P:node:{registry}:<instance>`,
//! `P:reap:{registry}:<instance>`; channels `P:u:{user:alice}` and `P:r:{room:lobby}`, whose tag is
//! their stream's (a message is `SPUBLISH`ed on the shard that stored it), and `P:all`.

use std::sync::Arc;

use crate::bus::{SessionId, Topic};
use crate::protocol::{RoomName, StreamId, UserId};

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
    /// Redis Cluster: names carry hash tags (see [`Keys::cluster`]).
    tagged: bool,
}

impl Keys {
    /// The names on one Redis.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), tagged: false }
    }

    /// The names on a Redis Cluster: the same, with a hash tag in each, so that every name a
    /// script touches at once is in one slot. A stream's seq, log and idempotency keys and its
    /// channel carry the stream (`{user:alice}`, `{room:lobby}`), and so do the user's cursor and
    /// sessions and the room's members; an instance's indexes carry the instance
    /// (`{n:<instance>}`), and the registry one tag of its own (`{registry}`).
    pub fn cluster(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), tagged: true }
    }

    /// Whether the names carry hash tags (a Redis Cluster).
    pub fn tagged(&self) -> bool {
        self.tagged
    }

    /// `P:<kind>:` followed by `parts`, and on a cluster `{tag}` in between. Keys are built
    /// several times per message, so without `format!`: one exact allocation, no formatting
    /// machinery.
    fn name(&self, kind: &str, tag: &[&str], parts: &[&str]) -> String {
        let tag_len = if self.tagged { 2 + tag.iter().map(|p| p.len()).sum::<usize>() } else { 0 };
        let len = self.prefix.len() + kind.len() + 2 + tag_len + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        key.push(':');
        key.push_str(kind);
        key.push(':');
        if self.tagged {
            key.push('{');
            tag.iter().for_each(|p| key.push_str(p));
            key.push('}');
        }
        parts.iter().for_each(|p| key.push_str(p));
        key
    }

    /// A name of `kind` for `stream`: `P:<kind>:<stream>`, on a cluster `P:<kind>:{<stream>}`.
    fn of_stream(&self, kind: &str, stream: &StreamId) -> String {
        let (what, name) = stream.parts();
        if self.tagged { self.name(kind, &[what, name], &[]) } else { self.name(kind, &[], &[what, name]) }
    }

    fn of_user(&self, kind: &str, user: &UserId) -> String {
        if self.tagged {
            self.name(kind, &["user:", user.as_str()], &[])
        } else {
            self.name(kind, &[], &[user.as_str()])
        }
    }

    fn of_room(&self, kind: &str, room: &RoomName) -> String {
        if self.tagged {
            self.name(kind, &["room:", room.as_str()], &[])
        } else {
            self.name(kind, &[], &[room.as_str()])
        }
    }

    fn of_instance(&self, kind: &str, instance: &str) -> String {
        if self.tagged { self.name(kind, &["n:", instance], &[]) } else { self.name(kind, &[], &[instance]) }
    }

    pub fn seq(&self, stream: &StreamId) -> String {
        self.of_stream("seq", stream)
    }

    pub fn log(&self, stream: &StreamId) -> String {
        self.of_stream("log", stream)
    }

    pub fn cursor(&self, user: &UserId) -> String {
        self.of_user("cur", user)
    }

    /// The idempotency key of an append whose first entry is `stream` (on a cluster it shares
    /// that stream's slot; an append split over slots has one per stream, see `store.rs`).
    pub fn idempotency(&self, stream: Option<&StreamId>, scope: &str, key: &str) -> String {
        match stream {
            Some(stream) if self.tagged => {
                let (what, name) = stream.parts();
                self.name("idem", &[what, name], &[":", scope, ":", key])
            }
            _ => self.name("idem", &[], &[scope, ":", key]),
        }
    }

    /// `P:us:<user>`: the user's sessions, cluster-wide.
    pub fn user_sessions(&self, user: &UserId) -> String {
        self.of_user("us", user)
    }

    /// `P:rm:<room>`: the room's users.
    pub fn room_members(&self, room: &RoomName) -> String {
        self.of_room("rm", room)
    }

    /// `P:ri:{room:<room>}` (a cluster only): `<user>\n<instance>` for every instance that has
    /// the user in the room, so that a room's count moves once per instance whatever is retried.
    pub fn room_instances(&self, room: &RoomName) -> String {
        self.of_room("ri", room)
    }

    /// `P:ns:<instance>`: the sessions an instance added.
    pub fn instance_sessions(&self, instance: &str) -> String {
        self.of_instance("ns", instance)
    }

    /// `P:nr:<instance>`: an instance's session memberships.
    pub fn instance_memberships(&self, instance: &str) -> String {
        self.of_instance("nr", instance)
    }

    /// `P:nm:<instance>`: an instance's sessions per (room, user).
    pub fn instance_rooms(&self, instance: &str) -> String {
        self.of_instance("nm", instance)
    }

    /// `P:nodes`: the registry of instances by last heartbeat.
    pub fn nodes(&self) -> String {
        if self.tagged { self.name("nodes", &["registry"], &[]) } else { format!("{}:nodes", self.prefix) }
    }

    /// `P:node:<instance>`: an instance's details.
    pub fn node(&self, instance: &str) -> String {
        self.kind_prefix(KeyKind::Node) + instance
    }

    /// `P:reap:<instance>`: the lock of the node reaping the instance.
    pub fn reap_lock(&self, instance: &str) -> String {
        self.kind_prefix(KeyKind::ReapLock) + instance
    }

    /// The start of every name of `kind` (`P:us:`, say), for scripts that complete names
    /// themselves from what they read (one Redis only; the registry's names share its tag).
    pub fn kind_prefix(&self, kind: KeyKind) -> String {
        let (kind, tag): (&str, &[&str]) = match kind {
            KeyKind::UserSessions => ("us", &[]),
            KeyKind::RoomMembers => ("rm", &[]),
            KeyKind::Node => ("node", &["registry"]),
            KeyKind::ReapLock => ("reap", &["registry"]),
        };
        let separator: &[&str] = if self.tagged && !tag.is_empty() { &[":"] } else { &[] };
        self.name(kind, tag, separator)
    }

    pub fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::User(user) => self.of_user("u", user),
            Topic::Room(room) => self.of_room("r", room),
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
            return UserId::parse(self.untag(user, "user:")?).ok().map(Topic::User);
        }
        let room = rest.strip_prefix("r:")?;
        RoomName::parse(self.untag(room, "room:")?).ok().map(Topic::Room)
    }

    /// A channel's name part without its hash tag's braces and kind (`{user:alice}` → `alice`).
    fn untag<'a>(&self, name: &'a str, what: &str) -> Option<&'a str> {
        if !self.tagged {
            return Some(name);
        }
        name.strip_prefix('{')?.strip_suffix('}')?.strip_prefix(what)
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
        assert_eq!(keys.idempotency(Some(&stream), "u:bob", "k1"), "sy:idem:u:bob:k1");
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
    fn cluster_names_keep_what_a_script_touches_in_one_slot() {
        use crate::backend::redis::conn::slot;
        let keys = Keys::cluster("sy");
        let (bob, lobby) = (UserId::parse("bob").unwrap(), RoomName::parse("lobby").unwrap());
        let (dm, room) = (StreamId::User(bob.clone()), StreamId::Room(lobby.clone()));
        assert_eq!(keys.seq(&dm), "sy:seq:{user:bob}");
        assert_eq!(keys.log(&room), "sy:log:{room:lobby}");
        assert_eq!(keys.idempotency(Some(&dm), "u:al", "k1"), "sy:idem:{user:bob}:u:al:k1");
        let user_slot = slot(keys.seq(&dm).as_bytes());
        for name in [
            keys.log(&dm),
            keys.cursor(&bob),
            keys.user_sessions(&bob),
            keys.idempotency(Some(&dm), "u:al", "k1"),
            keys.channel(&Topic::User(bob.clone())),
        ] {
            assert_eq!(slot(name.as_bytes()), user_slot, "{name}");
        }
        let room_slot = slot(keys.seq(&room).as_bytes());
        for name in [keys.log(&room), keys.room_members(&lobby), keys.room_instances(&lobby)] {
            assert_eq!(slot(name.as_bytes()), room_slot, "{name}");
        }
        assert_eq!(slot(keys.channel(&Topic::Room(lobby.clone())).as_bytes()), room_slot);
        let instance = slot(keys.instance_sessions("n1@ab").as_bytes());
        assert_eq!(slot(keys.instance_rooms("n1@ab").as_bytes()), instance);
        assert_eq!(slot(keys.instance_memberships("n1@ab").as_bytes()), instance);
        let registry = slot(keys.nodes().as_bytes());
        assert_eq!(slot(keys.node("n1@ab").as_bytes()), registry);
        assert_eq!(slot(keys.reap_lock("n2@cd").as_bytes()), registry);
        for topic in [Topic::User(bob), Topic::Room(lobby), Topic::All] {
            assert_eq!(keys.topic(&keys.channel(&topic)), Some(topic.clone()));
            assert_eq!(Keys::new("sy").topic(&keys.channel(&topic)).is_some(), topic == Topic::All);
        }
    }

    /// How the streams of 100,000 users (ids `user<n>`, and bare numbers, which some systems tag
    /// with as they are) and 10,000 rooms spread over 3 and over 6 masters, each serving an even
    /// share of the slots as `redis-cli --cluster create` splits them. Printed with
    /// `cargo test --lib stream_keys_spread -- --nocapture`.
    #[test]
    fn stream_keys_spread_evenly_over_the_masters() {
        use crate::backend::redis::conn::{SLOTS, slot};
        let keys = Keys::cluster("switchyard");
        let owner = |masters: usize, slot: u16| {
            // redis-cli gives master i the slots from round(i * 16384 / n) on.
            (0..masters).rev().find(|&i| usize::from(slot) >= (i * usize::from(SLOTS) + masters / 2) / masters).unwrap()
        };
        let users = |style: fn(u32) -> String| {
            (0..100_000).map(move |n| StreamId::User(UserId::parse(&style(n)).unwrap())).collect::<Vec<_>>()
        };
        let rooms: Vec<StreamId> =
            (0..10_000).map(|n| StreamId::Room(RoomName::parse(&format!("room-{n}")).unwrap())).collect();
        for (what, streams, tolerance) in [
            ("users user<n>", users(|n| format!("user{n}")), 0.01),
            ("users <n>", users(|n| n.to_string()), 0.01),
            ("rooms room-<n>", rooms, 0.03),
        ] {
            for masters in [3, 6] {
                let mut counts = vec![0usize; masters];
                for stream in &streams {
                    counts[owner(masters, slot(keys.seq(stream).as_bytes()))] += 1;
                }
                let even = streams.len() as f64 / masters as f64;
                let worst = counts.iter().map(|&c| (c as f64 - even).abs() / even).fold(0.0, f64::max);
                println!(
                    "{what} over {masters} masters: {counts:?}, at most {:.2} % from an even share",
                    worst * 100.0
                );
                assert!(worst < tolerance, "{what} over {masters} masters: {counts:?}");
            }
        }
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
