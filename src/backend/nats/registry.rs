//! The node registry on a JetStream key-value bucket, beside presence (`presence.rs`), whose keys
//! it reaps (layout and instance names in `keys.rs`).
//!
//! Each instance heart-beats into `n.<instance>`; the entry's time, which the NATS server sets,
//! is its last heartbeat, so skew between nodes does not matter. A heartbeat writes by
//! compare-and-set on the revision this instance wrote last: when the key is gone although the
//! instance heart-beat before (since it started or deregistered), the cluster forgot it (it was
//! reaped, or NATS lost its data): [`Standing::Forgotten`], and the heartbeat creates it again.
//!
//! An instance whose heartbeat is older than [`DEAD_AFTER`](super::DEAD_AFTER) by the server's
//! clock is dead: presence stops counting its sessions at once, and a reaper claims it by creating
//! `r.<instance>` (one creator wins; a claim older than [`REAP_LOCKS_FOR`] dead-after times may
//! be taken over, by compare-and-set, from a reaper that died). The winner checks, by its claim's own time, that
//! the instance is still dead, then removes what the instance's index lists, a page at a time,
//! each user's sessions and each room membership by compare-and-set, and answers the users whose
//! membership it emptied; then the index, the entry and the claim. A reap interrupted half-way is
//! redone by the next claim, and removing what was removed already answers nothing, so even
//! reapers that overlap answer each (room, user) once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::UpdateErrorKind;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;

use super::keys::{self, Indexed};
use super::kv::{self, KvError, Listing, failed};
use super::presence::{remove_memberships, remove_sessions};
use super::{Buckets, Instance, is_dead};
use crate::bus::SessionId;
use crate::protocol::{RoomName, UserId};
use crate::registry::{NodeInfo, Registry, RegistryError, Standing};

/// How long one node holds the right to reap a dead instance before another may take it over, in
/// dead-after times (30 s with [`DEAD_AFTER`](super::DEAD_AFTER)).
const REAP_LOCKS_FOR: u32 = 3;
/// Keys of a reaped instance's data changed at once.
const REMOVALS_AT_ONCE: usize = 16;

/// [`NodeInfo`] as stored in `n.<instance>`.
#[derive(Deserialize)]
struct StoredNode {
    id: String,
    address: String,
    started_at: u64,
    sessions: usize,
    users: usize,
}

/// What this instance last wrote to its registry entry.
#[derive(Clone, Default)]
struct Beat {
    /// The revision, `None` before the first heartbeat since start or deregistration.
    revision: Option<u64>,
    /// The value (tests heart-beat again with it).
    #[cfg(test)]
    value: Bytes,
}

/// The registry shared by every node of a cluster through JetStream (see the module docs).
pub struct NatsRegistry {
    buckets: Buckets,
    /// This process, shared with its [`super::NatsPresence`].
    instance: Arc<Instance>,
    dead_after: Duration,
    beat: Mutex<Beat>,
}

impl NatsRegistry {
    /// The registry entry of `instance` in `buckets`, which counts an instance dead after
    /// `dead_after` ([`super::DEAD_AFTER`] but in tests). Does no I/O.
    pub fn new(buckets: Buckets, instance: Arc<Instance>, dead_after: Duration) -> Self {
        Self { buckets, instance, dead_after, beat: Mutex::new(Beat::default()) }
    }

    fn last_beat(&self) -> Beat {
        self.beat.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Heart-beats again with the last heartbeat's details, if this instance is registered (tests:
    /// a cluster whose other node died keeps the live ones fresh).
    #[cfg(test)]
    pub(crate) async fn beat_again(&self) {
        let last = self.last_beat();
        if last.revision.is_some() {
            self.write_beat(last.value).await.expect("a heartbeat");
        }
    }

    /// Writes this instance's entry: see the module docs.
    async fn write_beat(&self, value: Bytes) -> Result<Standing, RegistryError> {
        let nodes = &self.buckets.nodes;
        let key = keys::node(self.instance.token());
        let last = self.last_beat().revision;
        let (revision, standing) = match nodes.update(&key, value.clone(), last.unwrap_or(0)).await {
            Ok(revision) => (revision, Standing::Known),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                // Gone (forgotten), or holding a heartbeat of ours whose answer was lost.
                let current = nodes.entry(&key).await.map_err(|e| unavailable(failed("reading", &key, e)))?;
                let standing = match (&current, last) {
                    (None, Some(_)) => Standing::Forgotten,
                    _ => Standing::Known,
                };
                let expected = current.map_or(0, |e| e.revision);
                let revision = nodes.update(&key, value.clone(), expected).await;
                (revision.map_err(|e| unavailable(failed("writing", &key, e)))?, standing)
            }
            Err(e) => return Err(unavailable(failed("writing", &key, e))),
        };
        *self.beat.lock().unwrap_or_else(|p| p.into_inner()) = Beat {
            revision: Some(revision),
            #[cfg(test)]
            value,
        };
        Ok(standing)
    }

    /// Claims the right to reap `instance`, which the listing taken at `now_ms` found dead: the
    /// claim's revision, or `None` when another node holds it, or the instance is gone or alive.
    async fn claim(&self, instance: &str, now_ms: u64) -> Result<Option<u64>, RegistryError> {
        let nodes = &self.buckets.nodes;
        let key = keys::claim(instance);
        let mine = Bytes::from(self.instance.token().to_owned());
        let revision = match nodes.update(&key, mine.clone(), 0).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                let held = nodes.entry(&key).await.map_err(|e| unavailable(failed("reading", &key, e)))?;
                let Some(held) = held else { return Ok(None) };
                if !is_dead(now_ms, kv::epoch_ms(held.created), self.dead_after * REAP_LOCKS_FOR) {
                    return Ok(None);
                }
                tracing::warn!(instance, "taking over the reaping of a node from a reaper that stopped");
                match nodes.update(&key, mine, held.revision).await {
                    Ok(revision) => revision,
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => return Ok(None),
                    Err(e) => return Err(unavailable(failed("claiming", &key, e))),
                }
            }
            Err(e) => return Err(unavailable(failed("claiming", &key, e))),
        };
        // The listing may be old news: judge again by the claim's own time.
        let (claimed, entry) = tokio::try_join!(
            async { nodes.entry(&key).await.map_err(|e| unavailable(failed("reading", &key, e))) },
            async {
                let node = keys::node(instance);
                nodes.entry(&node).await.map_err(|e| unavailable(failed("reading", &node, e)))
            },
        )?;
        let claimed_ms = claimed.filter(|c| c.revision == revision).map(|c| kv::epoch_ms(c.created));
        let still_dead = match (claimed_ms, entry) {
            (Some(at), Some(entry)) => is_dead(at, kv::epoch_ms(entry.created), self.dead_after),
            _ => false,
        };
        if !still_dead {
            kv::erase(nodes, &key, revision).await.map_err(unavailable)?;
            return Ok(None);
        }
        Ok(Some(revision))
    }

    /// Removes everything `instance` recorded in presence, a page of its index at a time, and
    /// then the index; answers the users who left rooms by it. Safe to run twice or concurrently.
    async fn purge(&self, instance: &str) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        let bucket = &self.buckets.presence;
        let mut listing = Listing::start(bucket, &keys::index(instance), false).await.map_err(unavailable)?;
        let (mut left, mut removed) = (Vec::new(), 0);
        while let Some(page) = listing.next_page().await.map_err(unavailable)? {
            removed += page.len();
            let (mut sessions, mut memberships) = (BTreeMap::new(), BTreeMap::new());
            for indexed in page.iter().filter_map(|listed| Indexed::parse(&listed.key)) {
                match indexed {
                    Indexed::Session(user, session) => sessions.entry(user).or_insert_with(Vec::new).push(session),
                    Indexed::Membership(room, user, session) => {
                        memberships.entry((room, user)).or_insert_with(Vec::new).push(session)
                    }
                }
            }
            futures_util::stream::iter(sessions)
                .map(|(user, ids): (UserId, Vec<SessionId>)| async move { remove_sessions(bucket, &user, &ids).await })
                .buffer_unordered(REMOVALS_AT_ONCE)
                .try_collect::<()>()
                .await
                .map_err(unavailable)?;
            let emptied: Vec<Option<(RoomName, UserId)>> = futures_util::stream::iter(memberships)
                .map(|((room, user), ids)| async move {
                    let emptied = remove_memberships(bucket, &room, &user, &ids).await?;
                    Ok::<_, KvError>(emptied.then_some((room, user)))
                })
                .buffer_unordered(REMOVALS_AT_ONCE)
                .try_collect()
                .await
                .map_err(unavailable)?;
            left.extend(emptied.into_iter().flatten());
        }
        kv::purge(bucket, &keys::index(instance)).await.map_err(unavailable)?;
        tracing::info!(instance, removed, left = left.len(), "removed the presence of a node");
        Ok(left)
    }

    /// Removes the registry entry of a purged instance, and the claim under which it was reaped.
    async fn forget(&self, instance: &str, claim: Option<u64>) -> Result<(), RegistryError> {
        let nodes = &self.buckets.nodes;
        kv::purge(nodes, &keys::node(instance)).await.map_err(unavailable)?;
        if let Some(revision) = claim {
            kv::erase(nodes, &keys::claim(instance), revision).await.map_err(unavailable)?;
        }
        Ok(())
    }
}

fn unavailable(e: KvError) -> RegistryError {
    RegistryError::Unavailable(format!("nats: {e}"))
}

#[async_trait]
impl Registry for NatsRegistry {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<Standing, RegistryError> {
        let json = serde_json::to_vec(node).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        self.write_beat(Bytes::from(json)).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, RegistryError> {
        let listing = Listing::start(&self.buckets.nodes, keys::NODES, true).await.map_err(unavailable)?;
        let (now_ms, entries) = listing.all().await.map_err(unavailable)?;
        let nodes: Vec<NodeInfo> = entries
            .into_iter()
            .filter(|entry| !is_dead(now_ms, entry.written_ms, self.dead_after))
            .filter_map(|entry| {
                let info: StoredNode = serde_json::from_slice(&entry.value).ok()?;
                Some(NodeInfo {
                    id: Arc::from(info.id),
                    address: info.address,
                    started_at: info.started_at,
                    last_seen: entry.written_ms,
                    sessions: info.sessions,
                    users: info.users,
                })
            })
            .collect();
        Ok(crate::registry::newest_per_id(nodes))
    }

    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        let listing = Listing::start(&self.buckets.nodes, keys::NODES, false).await.map_err(unavailable)?;
        let (now_ms, entries) = listing.all().await.map_err(unavailable)?;
        let mut left = Vec::new();
        for entry in entries.iter().filter(|e| is_dead(now_ms, e.written_ms, self.dead_after)) {
            let Some(instance) = keys::instance_of(&entry.key) else { continue };
            if let Some(claim) = self.claim(instance, now_ms).await? {
                left.extend(self.purge(instance).await?);
                self.forget(instance, Some(claim)).await?;
            }
        }
        Ok(left)
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        if node != &**self.instance.node() {
            tracing::warn!(node, own = %self.instance.node(), "a node can only deregister itself");
            return Ok(());
        }
        self.purge(self.instance.token()).await?;
        self.forget(self.instance.token(), None).await?;
        *self.beat.lock().unwrap_or_else(|p| p.into_inner()) = Beat::default();
        Ok(())
    }
}
