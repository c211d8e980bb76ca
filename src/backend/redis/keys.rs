//! The Redis key and channel layout of a cluster, in one place. Every name starts with the
//! cluster's `--redis-prefix` (P below), so several clusters or test runs share one Redis.
//!
//! | name | type | holds |
//! |---|---|---|
//! | `P:seq:<stream>` | string | the stream's last seq (never expires: seqs are never reused) |
//! | `P:log:<stream>` | stream | entries `0-<seq>` with the frame `f` and acceptance time `t` |
//! | `P:cur:<user>` | string | the user's read cursor |
//! | `P:idem:<scope>:<key>` | string | `<mid> <seq>` of a keyed append, for 10 minutes |
//! | `P:u:<user>` | channel | events for a user's sessions (direct messages, disconnects) |
//! | `P:r:<room>` | channel | events for a room's members (messages, presence) |
//! | `P:all` | channel | broadcasts |
//!
//! Presence keys are described in `presence/redis.rs`.

use crate::bus::Topic;
use crate::protocol::{StreamId, UserId};

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
        crate::protocol::RoomName::parse(room).ok().map(Topic::Room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RoomName;

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
    }
}
