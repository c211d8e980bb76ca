//! Who is online and who is in which room, cluster-wide.
//!
//! A user is "in" a room once however many sessions they have joined it with: [`Presence::join`]
//! answers whether this session brought the user in, [`Presence::leave`] whether it took them
//! out, which is what decides the room's `presence` events. Each node records its own sessions
//! and memberships; what a dead node leaves behind is removed by the node registry
//! (`crate::registry`), which one backend serves together with presence.

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::bus::SessionId;
use crate::protocol::{ErrorCode, ProtocolError, RoomName, UserId};

/// One session as presence reports it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    /// The session id (16 hex digits).
    #[serde(serialize_with = "display")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{16}$")]
    pub session: SessionId,
    #[serde(skip)]
    pub user: UserId,
    /// The id of the node the session is connected to.
    #[schema(value_type = String)]
    pub node: Arc<str>,
    /// The device label: the token's `device` claim, else `?device=`, else `default` when the
    /// client gave none (`protocol::DEFAULT_DEVICE`).
    #[serde(serialize_with = "device_or_default")]
    #[schema(value_type = String, required = true)]
    pub device: Option<String>,
    /// When the session connected, in ms since the Unix epoch.
    pub connected_at: u64,
}

fn device_or_default<S: serde::Serializer>(device: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(device.as_deref().unwrap_or(crate::protocol::DEFAULT_DEVICE))
}

fn display<S: serde::Serializer>(v: &SessionId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence unavailable: {0}")]
    Unavailable(String),
}

impl From<PresenceError> for ProtocolError {
    fn from(e: PresenceError) -> Self {
        ProtocolError::new(ErrorCode::Unavailable, e.to_string())
    }
}

/// The sessions and room memberships of every node. A session's id is unique cluster-wide.
#[async_trait]
pub trait Presence: Send + Sync {
    /// Records that a session of this node is online; it shows in [`Presence::sessions`] and
    /// [`Presence::session_counts`] on every node until it disconnects or its node is reaped.
    async fn connect(&self, session: &SessionInfo) -> Result<(), PresenceError>;
    /// Forgets a session of this node; forgetting one never recorded does nothing. Its rooms must
    /// have been left first.
    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError>;
    /// The online sessions of `user`, on every node, oldest first; a dead node's sessions stop
    /// showing as soon as it is declared dead, before it is reaped.
    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError>;
    /// How many sessions each of `users` has online, in the same order, counted as
    /// [`Presence::sessions`] lists them.
    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError>;
    /// Adds `session` of `user` to `room`; true when the user was not in the room before (with any
    /// session, on any node). Joining again with the same session changes nothing.
    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError>;
    /// Removes `session` of `user` from `room`; true when it was the user's last session there.
    /// Leaving with a session that is not in the room changes nothing and answers false.
    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError>;
    /// The number of distinct users in `room` and up to `limit` of their ids, sorted and distinct
    /// (a backend may answer a sample of a very large room rather than its first ids).
    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError>;
}
