//! Cluster presence over one shared Redis: every node writes its own sessions and memberships and
//! reads everyone's.
//!
//! # Key layout (`{p}` is the configured prefix)
//!
//! A node process is an *instance* `{node id}@{nonce}`, with a random nonce per [`RedisPresence`]:
//! a node restarted with the same `--node-id` is a new instance, so the state its killed
//! predecessor left behind is still found and reaped instead of being adopted by the new process.
//!
//! | key | type | content |
//! |---|---|---|
//! | `{p}:us:{user}` | HASH | `{session hex}.{nonce}` → JSON of the session (user included) |
//! | `{p}:ns:{instance}` | SET | `{user}\n{session field}`: the sessions this instance added |
//! | `{p}:nr:{instance}` | SET | `{room}\n{user}\n{session hex}`: the session memberships |
//! | `{p}:nm:{instance}` | HASH | `{room}\n{user}` → this instance's sessions of the user in the room |
//! | `{p}:rm:{room}` | HASH | `user` → number of instances that have the user in the room |
//! | `{p}:nodes` | ZSET | instance → Redis time (ms) of its last heartbeat |
//! | `{p}:node:{instance}` | STRING | JSON of the last [`NodeInfo`], expiring after [`NODE_TTL`] |
//! | `{p}:reap:{instance}` | STRING | lock of the node reaping that instance (`NX PX`) |
//!
//! A user is in a room while the room hash has their field; a join or leave changes it only when
//! the instance-level count moves between 0 and 1, in one Lua script, so "entered" and "left" are
//! decided atomically cluster-wide. Every operation is one round trip (a script or a `MULTI`
//! pipeline), and nothing walks the keyspace (no `KEYS`/`SCAN`): a dead instance's state is found
//! through its own `ns`/`nm`/`nr` keys.
//!
//! # Healing
//!
//! Liveness is judged by the Redis clock (`TIME` inside scripts), so skew between nodes does not
//! matter. An instance whose heartbeat is older than [`RedisPresence::DEAD_AFTER`] is dead: reads
//! of sessions ignore it at once, and the first node whose [`Presence::reap`] claims its lock
//! purges it in batches (sessions by `SPOP`, memberships by `HSCAN`), decrementing the room counts
//! and reporting the users whose count reached zero. Each batch deletes what it handles in the
//! same script, so a reap interrupted half-way resumes correctly after the lock expires.
//!
//! The keys of one instance are touched by scripts that declare only some of them, so this needs a
//! single Redis (or a prefix that is a hash tag, `{sy}`, on Redis Cluster).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::presence::{NodeInfo, Presence, PresenceError, SessionInfo};
use crate::bus::SessionId;
use crate::protocol::{RoomName, UserId};

/// How long a node's info outlives its last heartbeat, in case nobody reaps it.
const NODE_TTL: Duration = Duration::from_secs(30);
/// How long one node holds the right to reap a dead instance.
const REAP_LOCK: Duration = Duration::from_secs(30);
/// Items handled per script call while reaping, to keep each call short.
const REAP_BATCH: usize = 500;
/// Rooms up to this size are listed exactly (the first ids in sort order); larger ones by a
/// sample of `HSCAN`, so that a presence query never copies a huge hash.
const FULL_LISTING: usize = 10_000;

/// `nr`, `nm`, `rm`; ARGV: session membership, `{room}\n{user}`, user.
const JOIN: &str = r"
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) > 1 then return 0 end
if redis.call('HINCRBY', KEYS[3], ARGV[3], 1) > 1 then return 0 end
return 1
";

/// Same keys and arguments as [`JOIN`].
const LEAVE: &str = r"
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
";

/// `rm`; ARGV: limit, exact-listing threshold. Answers {count, ids}.
const ROOM: &str = r"
local n = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[1])
if limit == 0 or n == 0 then return {n, {}} end
if n <= math.max(limit, tonumber(ARGV[2])) then return {n, redis.call('HKEYS', KEYS[1])} end
local out, cursor = {}, '0'
repeat
  local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', limit)
  cursor = r[1]
  for i = 1, #r[2], 2 do out[#out + 1] = r[2][i] end
until cursor == '0' or #out >= limit
return {n, out}
";

/// `nodes`, `node:{instance}`; ARGV: instance, info JSON, TTL ms. Answers 1 when newly added.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local added = redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return added
";

/// `nodes`; ARGV: dead-after ms, `{p}:node:`. Answers {info, score, …} of the live instances.
const NODES: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - ARGV[1] + 1, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local info = redis.call('GET', ARGV[2] .. live[i])
  if info then out[#out + 1] = info; out[#out + 1] = live[i + 1] end
end
return out
";

/// `nodes`; ARGV: dead-after ms, `{p}:reap:`, lock ms. Answers the dead instances it locked.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local claimed = {}
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ARGV[1])) do
  if redis.call('SET', ARGV[2] .. inst, '1', 'NX', 'PX', ARGV[3]) then claimed[#claimed + 1] = inst end
end
return claimed
";

/// `ns`; ARGV: `{p}:us:`, batch. Removes up to a batch of the instance's sessions.
const PURGE_SESSIONS: &str = r"
local popped = redis.call('SPOP', KEYS[1], ARGV[2])
for _, e in ipairs(popped) do
  local nl = string.find(e, '\n', 1, true)
  redis.call('HDEL', ARGV[1] .. string.sub(e, 1, nl - 1), string.sub(e, nl + 1))
end
return #popped
";

/// `nm`; ARGV: `{p}:rm:`, cursor, batch. Removes one HSCAN page of the instance's memberships;
/// answers {next cursor, `{room}\n{user}` of every user that left}.
const PURGE_ROOMS: &str = r"
local page = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local out = {page[1]}
for i = 1, #page[2], 2 do
  local f = page[2][i]
  if redis.call('HDEL', KEYS[1], f) == 1 then
    local nl = string.find(f, '\n', 1, true)
    local room, user = ARGV[1] .. string.sub(f, 1, nl - 1), string.sub(f, nl + 1)
    if redis.call('HINCRBY', room, user, -1) <= 0 then
      redis.call('HDEL', room, user)
      out[#out + 1] = f
    end
  end
end
return out
";

struct Scripts {
    join: Script,
    leave: Script,
    room: Script,
    heartbeat: Script,
    nodes: Script,
    claim: Script,
    purge_sessions: Script,
    purge_rooms: Script,
}

/// A session as stored in `{p}:us:{user}`: [`SessionInfo`] with its user.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    session: String,
    user: String,
    node: String,
    device: Option<String>,
    connected_at: u64,
}

/// [`NodeInfo`] as stored in `{p}:node:{instance}`.
#[derive(Deserialize)]
struct StoredNode {
    id: String,
    address: String,
    started_at: u64,
    sessions: usize,
    users: usize,
}

/// Presence shared by every node of a cluster through Redis (see the module docs for the layout).
pub struct RedisPresence {
    conn: ConnectionManager,
    prefix: String,
    node_id: Arc<str>,
    /// `{node id}@{nonce}`: this process's name in the registry.
    instance: String,
    /// The nonce, which tags every session field this process writes.
    nonce: String,
    /// Whether this instance has heart-beaten since it started or deregistered.
    registered: AtomicBool,
    scripts: Scripts,
}

impl RedisPresence {
    /// Runs the join or leave script for one session; true when the user entered or left the
    /// room cluster-wide.
    async fn membership(
        &self,
        script: &Script,
        room: &RoomName,
        user: &UserId,
        session: SessionId,
    ) -> Result<bool, PresenceError> {
        let changed: i64 = script
            .key(self.key("nr", &self.instance))
            .key(self.key("nm", &self.instance))
            .key(self.key("rm", room.as_str()))
            .arg(format!("{room}\n{user}\n{session}"))
            .arg(format!("{room}\n{user}"))
            .arg(user.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }
    /// A node whose last heartbeat (by the Redis clock) is older than this is dead: its sessions
    /// stop counting at once and the next [`Presence::reap`] removes them. Heartbeat well within it.
    pub const DEAD_AFTER: Duration = Duration::from_secs(10);

    /// Presence for node `node_id` under keys starting with `{prefix}:`. Does no I/O.
    pub fn new(conn: ConnectionManager, prefix: &str, node_id: Arc<str>) -> Self {
        let nonce = format!("{:016x}", fastrand::u64(..));
        Self {
            conn,
            prefix: prefix.to_owned(),
            instance: format!("{node_id}@{nonce}"),
            node_id,
            nonce,
            registered: AtomicBool::new(false),
            scripts: Scripts {
                join: Script::new(JOIN),
                leave: Script::new(LEAVE),
                room: Script::new(ROOM),
                heartbeat: Script::new(HEARTBEAT),
                nodes: Script::new(NODES),
                claim: Script::new(CLAIM),
                purge_sessions: Script::new(PURGE_SESSIONS),
                purge_rooms: Script::new(PURGE_ROOMS),
            },
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The field of a session in `{p}:us:{user}`, tagged with the writing instance.
    fn session_field(&self, session: SessionId) -> String {
        format!("{session}.{}", self.nonce)
    }

    /// Nonces of the instances that are dead but not reaped yet, from the Redis time and the
    /// registry that [`Self::registry_pipe`] reads in the same round trip as what they filter.
    fn dead_nonces((secs, micros): (u64, u64), registry: Vec<(String, f64)>) -> HashSet<String> {
        let horizon = (secs * 1000 + micros / 1000).saturating_sub(Self::DEAD_AFTER.as_millis() as u64);
        registry
            .into_iter()
            .filter(|(_, score)| *score <= horizon as f64)
            .filter_map(|(inst, _)| inst.rsplit_once('@').map(|(_, nonce)| nonce.to_owned()))
            .collect()
    }

    /// A pipeline that starts with `TIME` and the whole registry (a few entries per node).
    fn registry_pipe(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME").cmd("ZRANGE").arg(self.nodes_key()).arg(0).arg(-1).arg("WITHSCORES");
        pipe
    }

    /// Removes everything `instance` left: sessions, memberships (answering the users who left
    /// rooms by it), its registry entry. Safe to run twice or concurrently: each batch deletes
    /// what it handles atomically.
    async fn purge(&self, instance: &str) -> Result<Vec<(RoomName, UserId)>, PresenceError> {
        let mut conn = self.conn.clone();
        let (ns, nm) = (self.key("ns", instance), self.key("nm", instance));
        let mut sessions = 0;
        loop {
            let n: usize = self
                .scripts
                .purge_sessions
                .key(&ns)
                .arg(self.key("us", ""))
                .arg(REAP_BATCH)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            sessions += n;
            if n < REAP_BATCH {
                break;
            }
        }
        let mut left = Vec::new();
        let mut cursor = String::from("0");
        loop {
            let page: Vec<String> = self
                .scripts
                .purge_rooms
                .key(&nm)
                .arg(self.key("rm", ""))
                .arg(&cursor)
                .arg(REAP_BATCH)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut page = page.into_iter();
            cursor = page.next().unwrap_or_default();
            left.extend(page.filter_map(|pair| parse_pair(&pair)));
            if cursor == "0" || cursor.is_empty() {
                break;
            }
        }
        redis::pipe()
            .atomic()
            .cmd("UNLINK")
            .arg(&ns)
            .arg(&nm)
            .arg(self.key("nr", instance))
            .arg(self.key("node", instance))
            .ignore()
            .cmd("ZREM")
            .arg(self.nodes_key())
            .arg(instance)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(unavailable)?;
        tracing::info!(instance, sessions, left = left.len(), "removed the presence of a node");
        Ok(left)
    }
}

fn unavailable(e: redis::RedisError) -> PresenceError {
    PresenceError::Unavailable(e.to_string())
}

/// One reply of a pipeline answered as a list of values.
fn parse_reply<T: redis::FromRedisValue>(reply: Option<redis::Value>) -> Result<T, PresenceError> {
    redis::from_redis_value(reply.unwrap_or(redis::Value::Nil)).map_err(|e| PresenceError::Unavailable(e.to_string()))
}

/// Parses a `{room}\n{user}` field; names were valid when written, anything else is skipped.
fn parse_pair(field: &str) -> Option<(RoomName, UserId)> {
    let (room, user) = field.split_once('\n')?;
    Some((RoomName::parse(room).ok()?, UserId::parse(user).ok()?))
}

fn parse_session(json: &str) -> Option<SessionInfo> {
    let s: StoredSession = serde_json::from_str(json).ok()?;
    Some(SessionInfo {
        session: SessionId(u64::from_str_radix(&s.session, 16).ok()?),
        user: UserId::parse(&s.user).ok()?,
        node: Arc::from(s.node),
        device: s.device,
        connected_at: s.connected_at,
    })
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        let stored = StoredSession {
            session: session.session.to_string(),
            user: session.user.to_string(),
            node: session.node.to_string(),
            device: session.device.clone(),
            connected_at: session.connected_at,
        };
        let json = serde_json::to_string(&stored).map_err(|e| PresenceError::Unavailable(e.to_string()))?;
        let field = self.session_field(session.session);
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(self.key("us", session.user.as_str()))
            .arg(&field)
            .arg(json)
            .ignore()
            .cmd("SADD")
            .arg(self.key("ns", &self.instance))
            .arg(format!("{}\n{field}", session.user))
            .ignore()
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        let field = self.session_field(session.session);
        redis::pipe()
            .atomic()
            .cmd("HDEL")
            .arg(self.key("us", session.user.as_str()))
            .arg(&field)
            .ignore()
            .cmd("SREM")
            .arg(self.key("ns", &self.instance))
            .arg(format!("{}\n{field}", session.user))
            .ignore()
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError> {
        let mut pipe = self.registry_pipe();
        pipe.cmd("HGETALL").arg(self.key("us", user.as_str()));
        let (time, registry, all): ((u64, u64), Vec<(String, f64)>, Vec<(String, String)>) =
            pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        let dead = Self::dead_nonces(time, registry);
        let mut sessions: Vec<SessionInfo> = all
            .into_iter()
            .filter(|(field, _)| field.split_once('.').is_some_and(|(_, nonce)| !dead.contains(nonce)))
            .filter_map(|(_, json)| parse_session(&json))
            .collect();
        sessions.sort_by_key(|s| (s.connected_at, s.session));
        Ok(sessions)
    }

    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = self.registry_pipe();
        for user in users {
            pipe.cmd("HKEYS").arg(self.key("us", user.as_str()));
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        let mut replies = replies.into_iter();
        let time = parse_reply(replies.next())?;
        let dead = Self::dead_nonces(time, parse_reply(replies.next())?);
        replies
            .map(|reply| {
                let fields: Vec<String> = parse_reply(Some(reply))?;
                Ok(fields.iter().filter(|f| f.split_once('.').is_some_and(|(_, n)| !dead.contains(n))).count())
            })
            .collect()
    }

    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        self.membership(&self.scripts.join, room, user, session).await
    }

    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        self.membership(&self.scripts.leave, room, user, session).await
    }

    /// Exact (the first `limit` ids in sort order) for rooms of up to 10,000 users; for larger
    /// rooms, `limit` ids sampled by `HSCAN`, sorted.
    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError> {
        let (count, ids): (usize, Vec<String>) = self
            .scripts
            .room
            .key(self.key("rm", room.as_str()))
            .arg(limit)
            .arg(FULL_LISTING)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut users: Vec<UserId> = ids.iter().filter_map(|id| UserId::parse(id).ok()).collect();
        users.sort();
        users.dedup();
        users.truncate(limit);
        Ok((count, users))
    }

    /// Also answers `Unavailable` when this node had been declared dead and reaped (it was
    /// unreachable for longer than [`RedisPresence::DEAD_AFTER`]): it is registered again, but
    /// the sessions and memberships it had are gone from presence and should reconnect.
    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), PresenceError> {
        let json = serde_json::to_string(node).map_err(|e| PresenceError::Unavailable(e.to_string()))?;
        let added: i64 = self
            .scripts
            .heartbeat
            .key(self.nodes_key())
            .key(self.key("node", &self.instance))
            .arg(&self.instance)
            .arg(json)
            .arg(NODE_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if self.registered.swap(true, Ordering::SeqCst) && added == 1 {
            return Err(PresenceError::Reaped(format!(
                "node {} missed heartbeats for {:?} and was reaped; its sessions are no longer in presence",
                self.node_id,
                Self::DEAD_AFTER
            )));
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, PresenceError> {
        let flat: Vec<String> = self
            .scripts
            .nodes
            .key(self.nodes_key())
            .arg(Self::DEAD_AFTER.as_millis() as u64)
            .arg(self.key("node", ""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut nodes: Vec<NodeInfo> = flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let info: StoredNode = serde_json::from_str(&pair[0]).ok()?;
                Some(NodeInfo {
                    id: Arc::from(info.id),
                    address: info.address,
                    started_at: info.started_at,
                    last_seen: pair[1].parse::<f64>().ok()? as u64,
                    sessions: info.sessions,
                    users: info.users,
                })
            })
            .collect();
        // A node restarted under the same id shows once, as its newest instance.
        nodes.sort_by(|a, b| a.id.cmp(&b.id).then(b.last_seen.cmp(&a.last_seen)));
        nodes.dedup_by(|later, first| later.id == first.id);
        Ok(nodes)
    }

    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, PresenceError> {
        let claimed: Vec<String> = self
            .scripts
            .claim
            .key(self.nodes_key())
            .arg(Self::DEAD_AFTER.as_millis() as u64)
            .arg(self.key("reap", ""))
            .arg(REAP_LOCK.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut left = Vec::new();
        for instance in claimed {
            left.extend(self.purge(&instance).await?);
        }
        Ok(left)
    }

    /// Also removes any session or membership this node still had (a disconnect that failed
    /// during shutdown), without reporting leaves: the node is going away.
    async fn deregister(&self, node: &str) -> Result<(), PresenceError> {
        if node != &*self.node_id {
            tracing::warn!(node, own = %self.node_id, "a node can only deregister itself");
            return Ok(());
        }
        self.purge(&self.instance).await?;
        self.registered.store(false, Ordering::SeqCst);
        Ok(())
    }
}
