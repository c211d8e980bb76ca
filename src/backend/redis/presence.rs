//! Cluster presence over one shared Redis: every node writes its own sessions and memberships and
//! reads everyone's (key layout and instance names in `keys.rs`).
//!
//! A user is in a room while the room hash `P:rm:<room>` has their field; a join or leave changes
//! it only when the instance-level count in `P:nm:<instance>` moves between 0 and 1, in one Lua
//! script, so "entered" and "left" are decided atomically cluster-wide. Every operation is one
//! round trip (a script, or a pipeline of reads), and nothing walks the keyspace: what a dead
//! instance leaves is found through its own `ns`/`nm`/`nr` keys by the registry
//! (`registry.rs`), which reaps it.
//!
//! Liveness is judged by the Redis clock, so skew between nodes does not matter: reads of
//! sessions fetch `TIME` and the registry in the same round trip and ignore the sessions of
//! instances dead for [`DEAD_AFTER`], before anyone reaps them. Every write script carries a
//! deadline in Redis's clock and does nothing when Redis runs it later (see `write_script!`), so
//! a write the node answered `unavailable` never lands afterwards.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use redis::Script;
use serde::{Deserialize, Serialize};

use super::{Conn, DEAD_AFTER, Instance, Keys, RedisClock, invoke, is_late, write_script};
use crate::bus::SessionId;
use crate::presence::{Presence, PresenceError, SessionInfo};
use crate::protocol::{RoomName, UserId};

/// Rooms up to this size are listed exactly (the first ids in sort order); larger ones by a
/// sample of `HSCAN`, so that a presence query never copies a huge hash.
const FULL_LISTING: usize = 10_000;

/// KEYS: `us:<user>`, `ns:<instance>`; ARGV: deadline, session field, session JSON, `ns` member.
const CONNECT: &str = write_script!(
    r"
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 0
"
);

/// Same keys as [`CONNECT`]; ARGV: deadline, session field, `ns` member.
const DISCONNECT: &str = write_script!(
    r"
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[3])
return 0
"
);

/// KEYS: `nr`, `nm`, `rm`; ARGV: deadline, session membership, `<room>\n<user>`, user. Answers 1
/// when the user entered the room.
const JOIN: &str = write_script!(
    r"
if redis.call('SADD', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) > 1 then return 0 end
if redis.call('HINCRBY', KEYS[3], ARGV[4], 1) > 1 then return 0 end
return 1
"
);

/// Same keys and arguments as [`JOIN`]. Answers 1 when the user left the room.
const LEAVE: &str = write_script!(
    r"
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[3])
if redis.call('HINCRBY', KEYS[3], ARGV[4], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[4])
return 1
"
);

/// On a Redis Cluster, where a script keeps to one slot, the writes above go in steps: the
/// instance's own keys in one script, the user's or the room's in another (see `Cluster`).
///
/// KEYS: a set; ARGV: deadline, member. Answers 1 when added.
const SET_ADD: &str = write_script!("return redis.call('SADD', KEYS[1], ARGV[2])\n");

/// KEYS: a set; ARGV: deadline, member. Answers 1 when removed.
const SET_REMOVE: &str = write_script!("return redis.call('SREM', KEYS[1], ARGV[2])\n");

/// KEYS: a hash; ARGV: deadline, field, value.
const HASH_SET: &str = write_script!("return redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])\n");

/// KEYS: a hash; ARGV: deadline, field.
const HASH_DELETE: &str = write_script!("return redis.call('HDEL', KEYS[1], ARGV[2])\n");

/// KEYS: `nr`, `nm` of the instance; ARGV: deadline, session membership, `<room>\n<user>`.
/// Answers 1 when the instance's first session of the user joined the room.
const INSTANCE_JOIN: &str = write_script!(
    r"
if redis.call('SADD', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) > 1 then return 0 end
return 1
"
);

/// Same keys and arguments as [`INSTANCE_JOIN`]. Answers 1 when the instance's last session of
/// the user left the room.
const INSTANCE_LEAVE: &str = write_script!(
    r"
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[3])
return 1
"
);

/// KEYS: `ri`, `rm` of the room; ARGV: deadline, `<user>\n<instance>`, user. Counts the instance
/// in the room's user once, however often it is run; answers 1 when the user entered the room.
const ROOM_ENTER: &str = write_script!(
    r"
if redis.call('SADD', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) > 1 then return 0 end
return 1
"
);

/// Same keys and arguments as [`ROOM_ENTER`]. Answers 1 when the user left the room.
pub(super) const ROOM_EXIT: &str = write_script!(
    r"
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[3])
return 1
"
);

/// `rm`; ARGV: limit, exact-listing threshold. Answers {count, ids}. Reads only.
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

struct Scripts {
    connect: Script,
    disconnect: Script,
    join: Script,
    leave: Script,
    room: Script,
    /// The steps of the writes on a Redis Cluster.
    cluster: ClusterScripts,
}

struct ClusterScripts {
    set_add: Script,
    set_remove: Script,
    hash_set: Script,
    hash_delete: Script,
    instance_join: Script,
    instance_leave: Script,
    room_enter: Script,
    room_exit: Script,
}

/// A session as stored in `P:us:<user>`: [`SessionInfo`] with its user.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    session: String,
    user: String,
    node: String,
    device: Option<String>,
    connected_at: u64,
}

/// Presence shared by every node of a cluster through Redis (see the module docs).
pub struct RedisPresence {
    conn: Conn,
    clock: Arc<RedisClock>,
    keys: Keys,
    /// This process, shared with its [`super::RedisRegistry`].
    instance: Arc<Instance>,
    scripts: Scripts,
}

impl RedisPresence {
    /// Presence of `instance` under `keys`. Does no I/O.
    pub fn new(conn: Conn, clock: Arc<RedisClock>, keys: Keys, instance: Arc<Instance>) -> Self {
        let scripts = Scripts {
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            join: Script::new(JOIN),
            leave: Script::new(LEAVE),
            room: Script::new(ROOM),
            cluster: ClusterScripts {
                set_add: Script::new(SET_ADD),
                set_remove: Script::new(SET_REMOVE),
                hash_set: Script::new(HASH_SET),
                hash_delete: Script::new(HASH_DELETE),
                instance_join: Script::new(INSTANCE_JOIN),
                instance_leave: Script::new(INSTANCE_LEAVE),
                room_enter: Script::new(ROOM_ENTER),
                room_exit: Script::new(ROOM_EXIT),
            },
        };
        Self { conn, clock, keys, instance, scripts }
    }

    /// Connects or disconnects a session of this instance.
    async fn session(&self, script: &Script, session: &SessionInfo, json: Option<String>) -> Result<(), PresenceError> {
        let field = self.instance.session_field(session.session);
        let member = format!("{}\n{field}", session.user);
        if self.keys.tagged() {
            return self.session_in_steps(session, field, member, json).await;
        }
        let mut invocation = script.key(self.keys.user_sessions(&session.user));
        invocation.key(self.keys.instance_sessions(self.instance.name())).arg(self.clock.write_deadline()).arg(field);
        if let Some(json) = json {
            invocation.arg(json);
        }
        let _: i64 = invocation.arg(member).invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(())
    }

    /// [`RedisPresence::session`] on a Redis Cluster: the instance's index first and the user's
    /// sessions second when connecting, the other way round when disconnecting, so that whatever
    /// a dead instance left in the user's sessions is in its index for the reaper.
    async fn session_in_steps(
        &self,
        session: &SessionInfo,
        field: String,
        member: String,
        json: Option<String>,
    ) -> Result<(), PresenceError> {
        let scripts = &self.scripts.cluster;
        let index = self.keys.instance_sessions(self.instance.name());
        let sessions = self.keys.user_sessions(&session.user);
        let mut conn = self.conn.clone();
        let deadline = || self.clock.write_deadline().to_string();
        match json {
            Some(json) => {
                let _: i64 = invoke(&mut conn, &scripts.set_add, &[&index], &[&deadline(), &member])
                    .await
                    .map_err(unavailable)?;
                let _: i64 = invoke(&mut conn, &scripts.hash_set, &[&sessions], &[&deadline(), &field, &json])
                    .await
                    .map_err(unavailable)?;
            }
            None => {
                let _: i64 = invoke(&mut conn, &scripts.hash_delete, &[&sessions], &[&deadline(), &field])
                    .await
                    .map_err(unavailable)?;
                let _: i64 = invoke(&mut conn, &scripts.set_remove, &[&index], &[&deadline(), &member])
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// A join or leave on a Redis Cluster: the instance's count of the user's sessions in the
    /// room first; when it moves between 0 and 1, the room's count of instances second (counted
    /// once per instance, however often it runs). A join whose second step fails takes back its
    /// first, so that the session can join again.
    async fn membership_in_steps(
        &self,
        join: bool,
        room: &RoomName,
        user: &UserId,
        session: SessionId,
    ) -> Result<bool, PresenceError> {
        let scripts = &self.scripts.cluster;
        let instance = self.instance.name();
        let mut conn = self.conn.clone();
        let membership = format!("{room}\n{user}\n{session}");
        let pair = format!("{room}\n{user}");
        let on_instance = [self.keys.instance_memberships(instance), self.keys.instance_rooms(instance)];
        let on_instance = [on_instance[0].as_str(), on_instance[1].as_str()];
        let on_room = [self.keys.room_instances(room), self.keys.room_members(room)];
        let (first, undo, second) = match join {
            true => (&scripts.instance_join, &scripts.instance_leave, &scripts.room_enter),
            false => (&scripts.instance_leave, &scripts.instance_join, &scripts.room_exit),
        };
        let deadline = || self.clock.write_deadline().to_string();
        let moved: i64 =
            invoke(&mut conn, first, &on_instance, &[&deadline(), &membership, &pair]).await.map_err(unavailable)?;
        if moved == 0 {
            return Ok(false);
        }
        let member = format!("{user}\n{instance}");
        let on_room = [on_room[0].as_str(), on_room[1].as_str()];
        let changed: Result<i64, _> = invoke(&mut conn, second, &on_room, &[&deadline(), &member, user.as_str()]).await;
        match changed {
            Ok(changed) => Ok(changed == 1),
            Err(e) => {
                if join {
                    let undone: Result<i64, _> =
                        invoke(&mut conn, undo, &on_instance, &[&deadline(), &membership, &pair]).await;
                    if let Err(e) = undone {
                        tracing::warn!(error = %e, %room, %user, "taking back half a join failed: the room counts the user on this node until it is reaped");
                    }
                }
                // A leave whose second step failed stays left on this instance; the room forgets
                // the instance when it is reaped.
                Err(unavailable(e))
            }
        }
    }

    /// Runs the join or leave script for one session; true when the user entered or left the
    /// room cluster-wide.
    async fn membership(
        &self,
        script: &Script,
        room: &RoomName,
        user: &UserId,
        session: SessionId,
    ) -> Result<bool, PresenceError> {
        let instance = self.instance.name();
        let changed: i64 = script
            .key(self.keys.instance_memberships(instance))
            .key(self.keys.instance_rooms(instance))
            .key(self.keys.room_members(room))
            .arg(self.clock.write_deadline())
            .arg(format!("{room}\n{user}\n{session}"))
            .arg(format!("{room}\n{user}"))
            .arg(user.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }

    /// A pipeline that starts with `TIME` and the whole registry (a few entries per node), which
    /// [`dead_nonces`] turns into the instances whose sessions no longer count.
    fn registry_pipe(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME").cmd("ZRANGE").arg(self.keys.nodes()).arg(0).arg(-1).arg("WITHSCORES");
        pipe
    }

    /// The nonces of the dead instances not reaped yet, read on their own (a Redis Cluster, where
    /// the registry is in a slot of its own).
    async fn dead(&self) -> Result<HashSet<String>, PresenceError> {
        let (time, registry): ((u64, u64), Vec<(String, f64)>) =
            self.registry_pipe().query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(dead_nonces(time, registry))
    }
}

/// Nonces of the instances that are dead but not reaped yet, from the Redis time and the
/// registry read in the same round trip as what they filter.
fn dead_nonces((secs, micros): (u64, u64), registry: Vec<(String, f64)>) -> HashSet<String> {
    let horizon = (secs * 1000 + micros / 1000).saturating_sub(DEAD_AFTER.as_millis() as u64);
    registry
        .into_iter()
        .filter(|(_, score)| *score <= horizon as f64)
        .filter_map(|(instance, _)| Instance::nonce_of(&instance).map(str::to_owned))
        .collect()
}

/// Whether a session field was written by an instance that is not dead.
fn live(field: &str, dead: &HashSet<String>) -> bool {
    Instance::nonce_of_field(field).is_some_and(|nonce| !dead.contains(nonce))
}

fn unavailable(e: redis::RedisError) -> PresenceError {
    if is_late(&e) {
        return PresenceError::Unavailable("redis ran the write after its deadline: nothing was written".into());
    }
    PresenceError::Unavailable(format!("redis: {e}"))
}

/// One reply of a pipeline answered as a list of values.
fn parse_reply<T: redis::FromRedisValue>(reply: Option<redis::Value>) -> Result<T, PresenceError> {
    redis::from_redis_value(reply.unwrap_or(redis::Value::Nil)).map_err(|e| PresenceError::Unavailable(e.to_string()))
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
        self.session(&self.scripts.connect, session, Some(json)).await
    }

    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        self.session(&self.scripts.disconnect, session, None).await
    }

    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError> {
        let (dead, all): (HashSet<String>, Vec<(String, String)>) = if self.keys.tagged() {
            // The registry and the user's sessions are in different slots: read them together.
            let sessions = redis::cmd("HGETALL").arg(self.keys.user_sessions(user)).to_owned();
            let mut conn = self.conn.clone();
            let (dead, all) = tokio::join!(self.dead(), sessions.query_async(&mut conn));
            (dead?, all.map_err(unavailable)?)
        } else {
            let mut pipe = self.registry_pipe();
            pipe.cmd("HGETALL").arg(self.keys.user_sessions(user));
            let (time, registry, all): ((u64, u64), Vec<(String, f64)>, Vec<(String, String)>) =
                pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
            (dead_nonces(time, registry), all)
        };
        let mut sessions: Vec<SessionInfo> = all
            .into_iter()
            .filter(|(field, _)| live(field, &dead))
            .filter_map(|(_, json)| parse_session(&json))
            .collect();
        sessions.sort_by_key(|s| (s.connected_at, s.session));
        Ok(sessions)
    }

    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        if self.keys.tagged() {
            // One slot per user: the cluster connection pipelines the reads to each master.
            let reads = users.iter().map(|user| {
                let mut conn = self.conn.clone();
                let cmd = redis::cmd("HKEYS").arg(self.keys.user_sessions(user)).to_owned();
                async move { cmd.query_async::<Vec<String>>(&mut conn).await }
            });
            let (dead, fields) = tokio::join!(self.dead(), futures_util::future::join_all(reads));
            let dead = dead?;
            return fields
                .into_iter()
                .map(|fields| Ok(fields.map_err(unavailable)?.iter().filter(|f| live(f, &dead)).count()))
                .collect();
        }
        let mut pipe = self.registry_pipe();
        for user in users {
            pipe.cmd("HKEYS").arg(self.keys.user_sessions(user));
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        let mut replies = replies.into_iter();
        let time = parse_reply(replies.next())?;
        let dead = dead_nonces(time, parse_reply(replies.next())?);
        replies
            .map(|reply| {
                let fields: Vec<String> = parse_reply(Some(reply))?;
                Ok(fields.iter().filter(|f| live(f, &dead)).count())
            })
            .collect()
    }

    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        if self.keys.tagged() {
            return self.membership_in_steps(true, room, user, session).await;
        }
        self.membership(&self.scripts.join, room, user, session).await
    }

    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        if self.keys.tagged() {
            return self.membership_in_steps(false, room, user, session).await;
        }
        self.membership(&self.scripts.leave, room, user, session).await
    }

    /// Exact (the first `limit` ids in sort order) for rooms of up to 10,000 users; for larger
    /// rooms, `limit` ids sampled by `HSCAN`, sorted.
    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError> {
        let (count, ids): (usize, Vec<String>) = self
            .scripts
            .room
            .key(self.keys.room_members(room))
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
}
