//! The node registry over one shared Redis, beside presence (`presence.rs`), whose keys it reaps
//! (key layout and instance names in `keys.rs`).
//!
//! Each instance heart-beats into the `P:nodes` sorted set, scored with Redis's own time, so skew
//! between nodes does not matter. An instance whose heartbeat is older than [`DEAD_AFTER`] is
//! dead: presence stops counting its sessions at once, and the first node whose reap claims its
//! lock purges it in batches (sessions by `SPOP`, memberships by `HSCAN`), decrementing the room
//! counts and reporting the users whose count reached zero. Each batch deletes what it handles in
//! the same script, so a reap interrupted half-way resumes correctly after the lock expires.
//!
//! A heartbeat that adds the instance to `P:nodes` anew, after an earlier one had registered it,
//! means the cluster forgot it (it was reaped, or Redis lost its data): [`Standing::Forgotten`].
//! Every write script carries a deadline in Redis's clock and does nothing when Redis runs it
//! later (see `write_script!`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use serde::Deserialize;

use super::keys::KeyKind;
use super::{Conn, DEAD_AFTER, Instance, Keys, RedisClock, invoke, is_late, write_script};
use crate::protocol::{RoomName, UserId};
use crate::registry::{NodeInfo, Registry, RegistryError, Standing};

/// How long a node's info outlives its last heartbeat, in case nobody reaps it.
const NODE_TTL: Duration = Duration::from_secs(30);
/// How long one node holds the right to reap a dead instance.
const REAP_LOCK: Duration = Duration::from_secs(30);
/// Items handled per script call while reaping, to keep each call short.
const REAP_BATCH: usize = 500;

/// KEYS: `nodes`, `node:<instance>`; ARGV: deadline, instance, info JSON, TTL ms. Answers 1 when
/// the instance was not registered.
const HEARTBEAT: &str = write_script!(
    r"
local added = redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return added
"
);

/// KEYS: `nodes`; ARGV: dead-after ms, `P:node:`. Answers {info, score, …} of the live
/// instances. Reads only.
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

/// KEYS: `nodes`; ARGV: deadline, dead-after ms, `P:reap:`, lock ms. Answers the dead instances
/// it locked.
const CLAIM: &str = write_script!(
    r"
local claimed = {}
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ARGV[2])) do
  if redis.call('SET', ARGV[3] .. inst, '1', 'NX', 'PX', ARGV[4]) then claimed[#claimed + 1] = inst end
end
return claimed
"
);

/// KEYS: `ns`; ARGV: deadline, `P:us:`, batch. Removes up to a batch of the instance's sessions;
/// answers how many.
const PURGE_SESSIONS: &str = write_script!(
    r"
local popped = redis.call('SPOP', KEYS[1], ARGV[3])
for _, e in ipairs(popped) do
  local nl = string.find(e, '\n', 1, true)
  redis.call('HDEL', ARGV[2] .. string.sub(e, 1, nl - 1), string.sub(e, nl + 1))
end
return #popped
"
);

/// KEYS: `nm`; ARGV: deadline, `P:rm:`, cursor, batch. Removes one HSCAN page of the instance's
/// memberships; answers {next cursor, `<room>\n<user>` of every user that left}.
const PURGE_ROOMS: &str = write_script!(
    r"
local page = redis.call('HSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local out = {page[1]}
for i = 1, #page[2], 2 do
  local f = page[2][i]
  if redis.call('HDEL', KEYS[1], f) == 1 then
    local nl = string.find(f, '\n', 1, true)
    local room, user = ARGV[2] .. string.sub(f, 1, nl - 1), string.sub(f, nl + 1)
    if redis.call('HINCRBY', room, user, -1) <= 0 then
      redis.call('HDEL', room, user)
      out[#out + 1] = f
    end
  end
end
return out
"
);

/// KEYS: `ns`, `nm`, `nr`, `node:<instance>`, `nodes`; ARGV: deadline, instance. Removes what
/// is left of a purged instance, its registry entry last.
const FORGET: &str = write_script!(
    r"
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[2])
return 0
"
);

/// KEYS: `nodes`; ARGV: dead-after ms, `live` or `dead`. Answers {instance, score, …} of the live
/// instances, or the dead instances (a Redis Cluster, where a script may not read the names it
/// makes). Reads only.
const BY_AGE: &str = r"
local t = redis.call('TIME')
local horizon = t[1] * 1000 + math.floor(t[2] / 1000) - ARGV[1]
if ARGV[2] == 'live' then return redis.call('ZRANGEBYSCORE', KEYS[1], horizon + 1, '+inf', 'WITHSCORES') end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
";

struct Scripts {
    by_age: Script,
    room_exit: Script,
    heartbeat: Script,
    nodes: Script,
    claim: Script,
    purge_sessions: Script,
    purge_rooms: Script,
    forget: Script,
}

/// [`NodeInfo`] as stored in `P:node:<instance>`.
#[derive(Deserialize)]
struct StoredNode {
    id: String,
    address: String,
    started_at: u64,
    sessions: usize,
    users: usize,
}

/// The registry shared by every node of a cluster through Redis (see the module docs).
pub struct RedisRegistry {
    conn: Conn,
    clock: Arc<RedisClock>,
    keys: Keys,
    /// This process, shared with its [`super::RedisPresence`].
    instance: Arc<Instance>,
    /// Whether this instance has heart-beaten since it started or deregistered.
    registered: AtomicBool,
    scripts: Scripts,
}

impl RedisRegistry {
    /// The registry entry of `instance` under `keys`. Does no I/O.
    pub fn new(conn: Conn, clock: Arc<RedisClock>, keys: Keys, instance: Arc<Instance>) -> Self {
        let scripts = Scripts {
            by_age: Script::new(BY_AGE),
            room_exit: Script::new(super::presence::ROOM_EXIT),
            heartbeat: Script::new(HEARTBEAT),
            nodes: Script::new(NODES),
            claim: Script::new(CLAIM),
            purge_sessions: Script::new(PURGE_SESSIONS),
            purge_rooms: Script::new(PURGE_ROOMS),
            forget: Script::new(FORGET),
        };
        Self { conn, clock, keys, instance, registered: AtomicBool::new(false), scripts }
    }

    /// Removes everything `instance` left: sessions, memberships (answering the users who left
    /// rooms by it), its registry entry. Safe to run twice or concurrently: each batch deletes
    /// what it handles atomically.
    async fn purge(&self, instance: &str) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        if self.keys.tagged() {
            return self.purge_in_steps(instance).await;
        }
        let mut conn = self.conn.clone();
        let (ns, nm) = (self.keys.instance_sessions(instance), self.keys.instance_rooms(instance));
        let mut sessions = 0;
        loop {
            let n: usize = self
                .scripts
                .purge_sessions
                .key(&ns)
                .arg(self.clock.write_deadline())
                .arg(self.keys.kind_prefix(KeyKind::UserSessions))
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
                .arg(self.clock.write_deadline())
                .arg(self.keys.kind_prefix(KeyKind::RoomMembers))
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
        let _: i64 = self
            .scripts
            .forget
            .key(&ns)
            .key(&nm)
            .key(self.keys.instance_memberships(instance))
            .key(self.keys.node(instance))
            .key(self.keys.nodes())
            .arg(self.clock.write_deadline())
            .arg(instance)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        tracing::info!(instance, sessions, left = left.len(), "removed the presence of a node");
        Ok(left)
    }
}

impl RedisRegistry {
    /// [`RedisRegistry::purge`] on a Redis Cluster, where the instance's indexes, each user's
    /// sessions, each room and the registry are in slots of their own. Each batch removes what
    /// it read from the users' sessions or the rooms before it removes it from the index, so a
    /// purge cut short leaves nothing the next one cannot find; and a room counts an instance's
    /// user once however often it is told (`ri`), so running a batch twice is harmless.
    async fn purge_in_steps(&self, instance: &str) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        let mut conn = self.conn.clone();
        let (ns, nm) = (self.keys.instance_sessions(instance), self.keys.instance_rooms(instance));
        let mut sessions = 0;
        loop {
            let members: Vec<String> =
                redis::cmd("SRANDMEMBER").arg(&ns).arg(REAP_BATCH).query_async(&mut conn).await.map_err(unavailable)?;
            if members.is_empty() {
                break;
            }
            let removals = members.iter().filter_map(|member| {
                let (user, field) = member.split_once('\n')?;
                let user = UserId::parse(user).ok()?;
                let cmd = redis::cmd("HDEL").arg(self.keys.user_sessions(&user)).arg(field).to_owned();
                let mut conn = conn.clone();
                Some(async move { cmd.query_async::<i64>(&mut conn).await })
            });
            for removed in futures_util::future::join_all(removals).await {
                removed.map_err(unavailable)?;
            }
            let _: i64 = redis::cmd("SREM").arg(&ns).arg(&members).query_async(&mut conn).await.map_err(unavailable)?;
            sessions += members.len();
        }
        let mut left = Vec::new();
        let mut cursor = String::from("0");
        loop {
            let (next, page): (String, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(&nm)
                .arg(&cursor)
                .arg("COUNT")
                .arg(REAP_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let pairs: Vec<(RoomName, UserId)> = page.iter().filter_map(|(field, _)| parse_pair(field)).collect();
            let exits = pairs.iter().map(|(room, user)| {
                let mut conn = conn.clone();
                let script = &self.scripts.room_exit;
                let keys = [self.keys.room_instances(room), self.keys.room_members(room)];
                let args = [self.clock.write_deadline().to_string(), format!("{user}\n{instance}")];
                async move {
                    let keys = [keys[0].as_str(), keys[1].as_str()];
                    invoke::<i64>(&mut conn, script, &keys, &[&args[0], &args[1], user.as_str()]).await
                }
            });
            let exited = futures_util::future::join_all(exits).await;
            for (pair, exited) in pairs.into_iter().zip(exited) {
                if exited.map_err(unavailable)? == 1 {
                    left.push(pair);
                }
            }
            if !page.is_empty() {
                let fields: Vec<&str> = page.iter().map(|(field, _)| field.as_str()).collect();
                let _: i64 =
                    redis::cmd("HDEL").arg(&nm).arg(fields).query_async(&mut conn).await.map_err(unavailable)?;
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let instance_keys = [ns, nm, self.keys.instance_memberships(instance)];
        let _: i64 = redis::cmd("UNLINK").arg(&instance_keys[..]).query_async(&mut conn).await.map_err(unavailable)?;
        let mut pipe = redis::pipe();
        pipe.cmd("UNLINK").arg(self.keys.node(instance)).ignore();
        pipe.cmd("ZREM").arg(self.keys.nodes()).arg(instance).ignore();
        let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        tracing::info!(instance, sessions, left = left.len(), "removed the presence of a node");
        Ok(left)
    }

    /// The registry's `live` instances with their scores, or its `dead` ones (a Redis Cluster).
    async fn by_age(&self, which: &str) -> Result<Vec<String>, RegistryError> {
        let dead_after = DEAD_AFTER.as_millis().to_string();
        let mut conn = self.conn.clone();
        invoke(&mut conn, &self.scripts.by_age, &[&self.keys.nodes()], &[&dead_after, which]).await.map_err(unavailable)
    }

    /// [`Registry::nodes`] on a Redis Cluster: the live instances, then their details.
    async fn nodes_in_steps(&self) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn.clone();
        let live = self.by_age("live").await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = live.chunks_exact(2).map(|pair| self.keys.node(&pair[0])).collect();
        let infos: Vec<Option<String>> =
            redis::cmd("MGET").arg(names).query_async(&mut conn).await.map_err(unavailable)?;
        Ok(live
            .chunks_exact(2)
            .zip(infos)
            .filter_map(|(pair, info)| Some([info?, pair[1].clone()]))
            .flatten()
            .collect())
    }

    /// The dead instances whose reaping lock this node took (a Redis Cluster).
    async fn claim_in_steps(&self) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn.clone();
        let dead = self.by_age("dead").await?;
        let mut claimed = Vec::new();
        for instance in dead {
            let lock: Option<String> = redis::cmd("SET")
                .arg(self.keys.reap_lock(&instance))
                .arg("1")
                .arg("NX")
                .arg("PX")
                .arg(REAP_LOCK.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if lock.is_some() {
                claimed.push(instance);
            }
        }
        Ok(claimed)
    }
}

fn unavailable(e: redis::RedisError) -> RegistryError {
    if is_late(&e) {
        return RegistryError::Unavailable("redis ran the write after its deadline: nothing was written".into());
    }
    RegistryError::Unavailable(format!("redis: {e}"))
}

/// Parses a `<room>\n<user>` field; names were valid when written, anything else is skipped.
fn parse_pair(field: &str) -> Option<(RoomName, UserId)> {
    let (room, user) = field.split_once('\n')?;
    Some((RoomName::parse(room).ok()?, UserId::parse(user).ok()?))
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<Standing, RegistryError> {
        let json = serde_json::to_string(node).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let instance = self.instance.name();
        let added: i64 = self
            .scripts
            .heartbeat
            .key(self.keys.nodes())
            .key(self.keys.node(instance))
            .arg(self.clock.write_deadline())
            .arg(instance)
            .arg(json)
            .arg(NODE_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if self.registered.swap(true, Ordering::SeqCst) && added == 1 {
            return Ok(Standing::Forgotten);
        }
        Ok(Standing::Known)
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, RegistryError> {
        let flat: Vec<String> = if self.keys.tagged() {
            self.nodes_in_steps().await?
        } else {
            self.scripts
                .nodes
                .key(self.keys.nodes())
                .arg(DEAD_AFTER.as_millis() as u64)
                .arg(self.keys.kind_prefix(KeyKind::Node))
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?
        };
        let nodes: Vec<NodeInfo> = flat
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
        Ok(crate::registry::newest_per_id(nodes))
    }

    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        let claimed: Vec<String> = if self.keys.tagged() {
            self.claim_in_steps().await?
        } else {
            self.scripts
                .claim
                .key(self.keys.nodes())
                .arg(self.clock.write_deadline())
                .arg(DEAD_AFTER.as_millis() as u64)
                .arg(self.keys.kind_prefix(KeyKind::ReapLock))
                .arg(REAP_LOCK.as_millis() as u64)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?
        };
        let mut left = Vec::new();
        for instance in claimed {
            left.extend(self.purge(&instance).await?);
        }
        Ok(left)
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        if node != &**self.instance.node() {
            tracing::warn!(node, own = %self.instance.node(), "a node can only deregister itself");
            return Ok(());
        }
        self.purge(self.instance.name()).await?;
        self.registered.store(false, Ordering::SeqCst);
        Ok(())
    }
}
