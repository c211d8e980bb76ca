//! Who is online and who is in which room, cluster-wide, and which nodes are alive.
//!
//! A user is "in" a room once however many sessions they have joined it with: [`Presence::join`]
//! answers whether this session brought the user in, [`Presence::leave`] whether it took them
//! out, which is what decides the room's `presence` events.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::bus::SessionId;
use crate::protocol::{ErrorCode, ProtocolError, RoomName, UserId};


/// One session as presence reports it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    #[serde(serialize_with = "display")]
    pub session: SessionId,
    #[serde(skip)]
    pub user: UserId,
    pub node: Arc<str>,
    pub device: Option<String>,
    /// ms since the epoch.
    pub connected_at: u64,
}

fn display<S: serde::Serializer>(v: &SessionId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// One node as `GET /api/v1/nodes` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub id: Arc<str>,
    pub address: String,
    pub started_at: u64,
    pub last_seen: u64,
    pub sessions: usize,
    pub users: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence unavailable: {0}")]
    Unavailable(String),
    /// This node missed its heartbeats long enough to be declared dead and reaped: the cluster
    /// forgot its sessions, which must reconnect to be known again.
    #[error("{0}")]
    Reaped(String),
}

impl From<PresenceError> for ProtocolError {
    fn from(e: PresenceError) -> Self {
        ProtocolError::new(ErrorCode::Unavailable, e.to_string())
    }
}

#[async_trait]
pub trait Presence: Send + Sync {
    /// Records that a session is online.
    async fn connect(&self, session: &SessionInfo) -> Result<(), PresenceError>;
    /// Forgets a session. Its rooms must have been left first.
    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError>;
    /// The online sessions of `user`, on every node.
    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError>;
    /// How many sessions each of `users` has online, in the same order.
    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError>;
    /// Adds `session` of `user` to `room`; true when the user was not in the room before.
    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError>;
    /// Removes `session` of `user` from `room`; true when it was the user's last session there.
    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError>;
    /// The number of distinct users in `room` and up to `limit` of their ids, sorted.
    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError>;
    /// Records this node as alive (called at start and on every heartbeat).
    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), PresenceError>;
    /// The live nodes, with their session and user counts.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, PresenceError>;
    /// Removes what nodes that stopped heart-beating left behind: their sessions and room
    /// memberships. Answers the (room, user) pairs whose user left the room by it, so that the
    /// caller can send `leave` presence events. Any node may call it; each dead node is reaped
    /// once.
    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, PresenceError>;
    /// Removes this node from the registry at a clean shutdown (its sessions are gone already).
    async fn deregister(&self, node: &str) -> Result<(), PresenceError>;
}
