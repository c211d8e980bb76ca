//! Single-node presence: plain maps behind one lock. Presence changes on connect, join and leave,
//! never per message, so one lock is not on any hot path. The memory registry
//! (`registry.rs`) reads its counts and clears it when the node deregisters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::bus::SessionId;
use crate::presence::{Presence, PresenceError, SessionInfo};
use crate::protocol::{RoomName, UserId};

#[derive(Default)]
struct State {
    users: HashMap<UserId, Vec<SessionInfo>>,
    rooms: HashMap<RoomName, BTreeMap<UserId, HashSet<SessionId>>>,
}

#[derive(Default)]
pub struct MemoryPresence {
    state: Mutex<State>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sessions and the users online.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.users.values().map(Vec::len).sum(), state.users.len())
    }

    /// Forgets every session and membership (the node deregistered).
    pub(crate) fn clear(&self) {
        *self.state() = State::default();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn connect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        self.state().users.entry(session.user.clone()).or_default().push(session.clone());
        Ok(())
    }

    async fn disconnect(&self, session: &SessionInfo) -> Result<(), PresenceError> {
        let mut state = self.state();
        if let Some(list) = state.users.get_mut(&session.user) {
            list.retain(|s| s.session != session.session);
            if list.is_empty() {
                state.users.remove(&session.user);
            }
        }
        Ok(())
    }

    async fn sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, PresenceError> {
        Ok(self.state().users.get(user).cloned().unwrap_or_default())
    }

    async fn session_counts(&self, users: &[UserId]) -> Result<Vec<usize>, PresenceError> {
        let state = self.state();
        Ok(users.iter().map(|u| state.users.get(u).map_or(0, Vec::len)).collect())
    }

    async fn join(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        let mut state = self.state();
        let sessions = state.rooms.entry(room.clone()).or_default().entry(user.clone()).or_default();
        let entered = sessions.is_empty();
        sessions.insert(session);
        Ok(entered)
    }

    async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<bool, PresenceError> {
        let mut state = self.state();
        let Some(members) = state.rooms.get_mut(room) else { return Ok(false) };
        let Some(sessions) = members.get_mut(user) else { return Ok(false) };
        let removed = sessions.remove(&session);
        let left = removed && sessions.is_empty();
        if sessions.is_empty() {
            members.remove(user);
        }
        if members.is_empty() {
            state.rooms.remove(room);
        }
        Ok(left)
    }

    async fn room(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), PresenceError> {
        let state = self.state();
        Ok(state
            .rooms
            .get(room)
            .map_or((0, Vec::new()), |members| (members.len(), members.keys().take(limit).cloned().collect())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn info(user: &str, id: u64) -> SessionInfo {
        SessionInfo {
            session: SessionId(id),
            user: UserId::parse(user).unwrap(),
            node: Arc::from("n1"),
            device: None,
            connected_at: 0,
        }
    }

    #[tokio::test]
    async fn a_user_is_in_a_room_once() {
        let p = MemoryPresence::new();
        let room = RoomName::parse("lobby").unwrap();
        let alice = UserId::parse("alice").unwrap();
        assert!(p.join(&room, &alice, SessionId(1)).await.unwrap());
        assert!(!p.join(&room, &alice, SessionId(2)).await.unwrap());
        assert_eq!(p.room(&room, 10).await.unwrap().0, 1);
        assert!(!p.leave(&room, &alice, SessionId(1)).await.unwrap());
        assert!(p.leave(&room, &alice, SessionId(2)).await.unwrap());
        assert!(!p.leave(&room, &alice, SessionId(2)).await.unwrap(), "leaving twice is not a second leave");
        assert_eq!(p.room(&room, 10).await.unwrap().0, 0);
    }

    #[tokio::test]
    async fn sessions_are_counted_per_user() {
        let p = MemoryPresence::new();
        p.connect(&info("alice", 1)).await.unwrap();
        p.connect(&info("alice", 2)).await.unwrap();
        p.connect(&info("bob", 3)).await.unwrap();
        let users = [UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap(), UserId::parse("carol").unwrap()];
        assert_eq!(p.session_counts(&users).await.unwrap(), vec![2, 1, 0]);
        p.disconnect(&info("alice", 1)).await.unwrap();
        assert_eq!(p.sessions(&users[0]).await.unwrap().len(), 1);
    }
}
