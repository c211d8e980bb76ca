//! Cluster presence on JetStream key-value buckets: every node writes its own sessions and
//! memberships and reads everyone's (layout and instance names in `keys.rs`).
//!
//! A user's sessions are one key, `u.<user>`, and their sessions in a room another,
//! `m.<room>.<user>`; both change by compare-and-set (`kv.rs`), so concurrent writers on any nodes
//! never lose each other's changes. A join that finds the room key absent brought the user in; a
//! leave that empties it took them out, and erases it: "entered" and "left" are decided by
//! JetStream's compare-and-set, cluster-wide, and a room's users are its keys.
//!
//! Before a session or membership is written, the instance indexes it under
//! `i.<instance>.…`; the index entry is removed only after the data is. So whatever an instance
//! wrote, its index lists, and the registry (`registry.rs`) reaps a dead instance by its index
//! alone, without walking anyone else's keys.
//!
//! Liveness is judged by the NATS server's clock: reads of sessions list the registry, and skip
//! the sessions of instances dead for [`DEAD_AFTER`](super::DEAD_AFTER), before anyone reaps them.
//!
//! Unlike Redis's scripts, a write here has no deadline: one answered `unavailable` because its
//! acknowledgement never came may still have been stored. Its index entry was written first, so
//! it goes with its instance, when the node deregisters or is reaped.

use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv as nats_kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::kv::{self, Change, KvError, Listing};
use super::{Buckets, Instance, dead_instances, keys};
use crate::bus::SessionId;
use crate::presence::{Presence, PresenceError, SessionInfo};
use crate::protocol::{RoomName, UserId};

/// Users whose sessions [`Presence::session_counts`] reads at once.
const READS_AT_ONCE: usize = 16;

/// A session as stored in `u.<user>`, under its hex id.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSession {
    /// The token of the instance that recorded it (see `keys.rs`).
    instance: String,
    node: String,
    device: Option<String>,
    connected_at: u64,
}

/// The value of `u.<user>`: session hex → session.
type Sessions = BTreeMap<String, StoredSession>;

/// Presence shared by every node of a cluster through JetStream (see the module docs).
pub struct NatsPresence {
    buckets: Buckets,
    /// This process, shared with its [`super::NatsRegistry`].
    instance: Arc<Instance>,
    dead_after: Duration,
}

impl NatsPresence {
    /// Presence of `instance` in `buckets`, which counts an instance dead after `dead_after`
    /// ([`super::DEAD_AFTER`] but in tests). Does no I/O.
    pub fn new(buckets: Buckets, instance: Arc<Instance>, dead_after: Duration) -> Self {
        Self { buckets, instance, dead_after }
    }

    /// The live sessions in the value of `u.<user>`, given the dead instances.
    fn live(user: &UserId, value: Option<&[u8]>, dead: &HashSet<String>) -> Vec<SessionInfo> {
        decode::<Sessions>(value)
            .into_iter()
            .filter(|(_, s)| !dead.contains(&s.instance))
            .filter_map(|(hex, s)| {
                Some(SessionInfo {
                    session: SessionId(u64::from_str_radix(&hex, 16).ok()?),
                    user: user.clone(),
                    node: Arc::from(s.node),
                    device: s.device,
                    connected_at: s.connected_at,
                })
            })
            .collect()
    }

    async fn read(&self, key: &str) -> Result<Option<Bytes>, PresenceError> {
        self.buckets.presence.get(key).await.map_err(|e| unavailable(kv::failed("reading", key, e)))
    }

    async fn dead(&self) -> Result<HashSet<String>, PresenceError> {
        dead_instances(&self.buckets.nodes, self.dead_after).await.map_err(unavailable)
    }
}

/// Removes `sessions` from `u.<user>`, erasing it when none is left.
pub(super) async fn remove_sessions(
    bucket: &nats_kv::Store,
    user: &UserId,
    sessions: &[SessionId],
) -> Result<(), KvError> {
    kv::modify(bucket, &keys::user_sessions(user), |value| {
        let Some(value) = value else { return Change::Keep(()) };
        let mut all: Sessions = decode(Some(value));
        let before = all.len();
        for session in sessions {
            all.remove(&session.to_string());
        }
        match all.len() {
            n if n == before => Change::Keep(()),
            0 => Change::Erase(()),
            _ => Change::Put(encode(&all), ()),
        }
    })
    .await
}

/// Removes `sessions` of `user` from `room`; true when it took the user out (it removed the last
/// of their sessions there).
pub(super) async fn remove_memberships(
    bucket: &nats_kv::Store,
    room: &RoomName,
    user: &UserId,
    sessions: &[SessionId],
) -> Result<bool, KvError> {
    kv::modify(bucket, &keys::membership(room, user), |value| {
        let Some(value) = value else { return Change::Keep(false) };
        let mut members: Vec<String> = decode(Some(value));
        let before = members.len();
        members.retain(|hex| !sessions.iter().any(|s| *hex == s.to_string()));
        match members.len() {
            n if n == before => Change::Keep(false),
            0 => Change::Erase(true),
            _ => Change::Put(encode(&members), false),
        }
    })
    .await
}

/// A stored value, or its default when absent or unreadable (a value this version cannot read is
/// replaced at the next write rather than blocking it).
fn decode<T: serde::de::DeserializeOwned + Default>(value: Option<&[u8]>) -> T {
    value.and_then(|v| serde_json::from_slice(v).ok()).unwrap_or_default()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("maps and lists of strings serialize")
}

fn unavailable(e: KvError) -> PresenceError {
    PresenceError::Unavailable(format!("nats: {e}"))
}

#[async_trait]
impl Presence for NatsPresence {
    async fn connect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        let bucket = &self.buckets.presence;
        let index = keys::indexed_session(self.instance.token(), &session.user, session.session);
        kv::put(bucket, &index, Bytes::new()).await.map_err(unavailable)?;
        let stored = StoredSession {
            instance: self.instance.token().to_owned(),
            node: session.node.to_string(),
            device: session.device.clone(),
            connected_at: session.connected_at,
        };
        let hex = session.session.to_string();
        kv::modify(bucket, &keys::user_sessions(&session.user), |value| {
            let mut all: Sessions = decode(value);
            all.insert(hex.clone(), stored.clone());
            Change::Put(encode(&all), ())
        })
        .await
        .map_err(unavailable)
    }

    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        let bucket = &self.buckets.presence;
        remove_sessions(bucket, &session.user, &[session.session]).await.map_err(unavailable)?;
        let index = keys::indexed_session(self.instance.token(), &session.user, session.session);
        kv::purge(bucket, &index).await.map_err(unavailable)
    }

    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError> {
        let key = keys::user_sessions(user);
        let (dead, value) = tokio::try_join!(self.dead(), self.read(&key))?;
        let mut sessions = Self::live(user, value.as_deref(), &dead);
        sessions.sort_by_key(|s| (s.connected_at, s.session));
        Ok(sessions)
    }

    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let dead = &self.dead().await?;
        futures_util::stream::iter(users.to_vec())
            .map(|user| async move {
                let value = self.read(&keys::user_sessions(&user)).await?;
                Ok(Self::live(&user, value.as_deref(), dead).len())
            })
            .buffered(READS_AT_ONCE)
            .try_collect()
            .await
    }

    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        let bucket = &self.buckets.presence;
        let index = keys::indexed_membership(self.instance.token(), room, user, session);
        kv::put(bucket, &index, Bytes::new()).await.map_err(unavailable)?;
        let hex = session.to_string();
        kv::modify(bucket, &keys::membership(room, user), |value| {
            let mut members: Vec<String> = decode(value);
            if members.contains(&hex) {
                return Change::Keep(false);
            }
            let entered = members.is_empty();
            members.push(hex.clone());
            Change::Put(encode(&members), entered)
        })
        .await
        .map_err(unavailable)
    }

    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        let bucket = &self.buckets.presence;
        let left = remove_memberships(bucket, room, user, &[session]).await.map_err(unavailable)?;
        let index = keys::indexed_membership(self.instance.token(), room, user, session);
        kv::purge(bucket, &index).await.map_err(unavailable)?;
        Ok(left)
    }

    /// Exact: the room's users are counted and their first `limit` ids in sort order kept, so
    /// the answer costs a walk of the room's keys and memory for `limit` ids.
    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError> {
        let mut listing =
            Listing::start(&self.buckets.presence, &keys::room_members(room), false).await.map_err(unavailable)?;
        let (mut count, mut first) = (0, BinaryHeap::with_capacity(limit.min(1024) + 1));
        while let Some(page) = listing.next_page().await.map_err(unavailable)? {
            for user in page.iter().filter_map(|listed| keys::member_of(&listed.key)) {
                count += 1;
                keep_smallest(&mut first, user, limit);
            }
        }
        let mut users: Vec<UserId> = first.into_vec();
        users.sort();
        Ok((count, users))
    }
}

/// Adds `item` to `heap`, a max-heap that keeps the `limit` smallest items it was given.
fn keep_smallest<T: Ord>(heap: &mut BinaryHeap<T>, item: T, limit: usize) {
    if heap.len() < limit {
        heap.push(item);
    } else if heap.peek().is_some_and(|largest| item < *largest) {
        heap.pop();
        heap.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_ids_are_kept() {
        let mut heap = BinaryHeap::new();
        for i in [5, 3, 9, 1, 7, 3, 0] {
            keep_smallest(&mut heap, i, 3);
        }
        assert_eq!(heap.into_sorted_vec(), [0, 1, 3]);
        let mut none = BinaryHeap::new();
        keep_smallest(&mut none, 1, 0);
        assert!(none.is_empty());
    }

    #[test]
    fn unreadable_values_read_as_empty() {
        assert!(decode::<Sessions>(Some(b"not json")).is_empty());
        assert!(decode::<Vec<String>>(None).is_empty());
        let dead = HashSet::from(["gone".to_owned()]);
        let mut all = Sessions::new();
        for (hex, instance) in [("00000000000000ff", "live"), ("0000000000000001", "gone"), ("zz", "live")] {
            let session = StoredSession { instance: instance.into(), node: "n1".into(), device: None, connected_at: 1 };
            all.insert(hex.into(), session);
        }
        let alice = UserId::parse("alice").unwrap();
        let live = NatsPresence::live(&alice, Some(&encode(&all)), &dead);
        assert_eq!(live.iter().map(|s| s.session).collect::<Vec<_>>(), [SessionId(255)], "dead and malformed skipped");
    }
}
