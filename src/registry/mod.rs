//! The node registry: which nodes of a cluster are alive, and what a dead one leaves behind.
//!
//! Every node heart-beats; a node that stops is declared dead by the others, and the first that
//! reaps it removes its sessions and room memberships from presence and answers the users who
//! left rooms by it, so that it can announce them. A node whose heartbeat finds that the cluster
//! forgot it ([`Standing::Forgotten`]: it was reaped while cut off, or the backend lost its state)
//! records its sessions and memberships in presence again. Presence (`crate::presence`) holds
//! what the registry reaps; one backend serves both.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::protocol::{ErrorCode, ProtocolError, RoomName, UserId};

/// One node as `GET /api/v1/nodes` reports it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// The node id.
    #[schema(value_type = String)]
    pub id: Arc<str>,
    /// The address the node listens on.
    pub address: String,
    /// When the node started, in ms since the Unix epoch.
    pub started_at: u64,
    /// The node's last heartbeat, in ms since the Unix epoch by the registry's clock.
    pub last_seen: u64,
    /// Sessions connected to that node.
    pub sessions: usize,
    /// Distinct users connected to that node.
    pub users: usize,
}

/// What a heartbeat learnt about this node's place in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The cluster knows this node and everything it recorded in presence.
    Known,
    /// The cluster had forgotten this node: it declared it dead (it missed heartbeats for too
    /// long) or lost its state (a Redis restarted empty), and its sessions and memberships are gone
    /// from presence. The heartbeat registered the node again; the node must record its sessions
    /// and memberships again.
    Forgotten,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node registry unavailable: {0}")]
    Unavailable(String),
}

impl From<RegistryError> for ProtocolError {
    fn from(e: RegistryError) -> Self {
        ProtocolError::new(ErrorCode::Unavailable, e.to_string())
    }
}

/// The live nodes of a cluster, and the reaping of dead ones.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Records `node` (this process) as alive with its details; called at start and every few
    /// seconds. Answers [`Standing::Forgotten`] when this node had heart-beaten before (since it
    /// started or last deregistered) and the cluster no longer knew it; the node is known again
    /// afterwards, so the next heartbeat answers [`Standing::Known`].
    async fn heartbeat(&self, node: &NodeInfo) -> Result<Standing, RegistryError>;
    /// The live nodes, one entry per node id (a node restarted under the same id shows once),
    /// sorted by id, with `last_seen` the time of their last heartbeat.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, RegistryError>;
    /// Removes what nodes that stopped heart-beating left in presence: their sessions and room
    /// memberships. Answers the (room, user) pairs whose user left the room by it (no session of
    /// theirs is left there on any node), so that the caller can send `leave` presence events. Any
    /// node may call it, concurrently; each dead node's pairs are answered once, by one caller.
    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, RegistryError>;
    /// Removes `node`, this process, from the registry at a clean shutdown, with any session or
    /// membership it still has in presence (a disconnect that failed), reporting no leaves: the
    /// node is going away. A node can only deregister itself; another id is ignored.
    async fn deregister(&self, node: &str) -> Result<(), RegistryError>;
}

/// The live nodes as [`Registry::nodes`] answers them: sorted by id, and a node restarted under
/// the same id once, as its newest instance.
pub fn newest_per_id(mut nodes: Vec<NodeInfo>) -> Vec<NodeInfo> {
    nodes.sort_by(|a, b| a.id.cmp(&b.id).then(b.last_seen.cmp(&a.last_seen)));
    nodes.dedup_by(|later, first| later.id == first.id);
    nodes
}
