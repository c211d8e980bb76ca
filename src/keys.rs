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

use crate::broker::Topic;
use crate::protocol::{StreamId, UserId};

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn seq(&self, stream: &StreamId) -> String {
        format!("{}:seq:{stream}", self.prefix)
    }

    pub fn log(&self, stream: &StreamId) -> String {
        format!("{}:log:{stream}", self.prefix)
    }

    pub fn cursor(&self, user: &UserId) -> String {
        format!("{}:cur:{user}", self.prefix)
    }

    pub fn idempotency(&self, scope: &str, key: &str) -> String {
        format!("{}:idem:{scope}:{key}", self.prefix)
    }

    pub fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::User(user) => format!("{}:u:{user}", self.prefix),
            Topic::Room(room) => format!("{}:r:{room}", self.prefix),
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
        assert_eq!(keys.topic("sy:test:x:alice"), None);
    }
}
