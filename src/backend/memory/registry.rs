//! The single-node registry: the node itself, with the live counts of the in-process presence.
//! No node dies without this one, so nothing is ever reaped and nothing is ever forgotten.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::MemoryPresence;
use crate::protocol::{RoomName, UserId, now_ms};
use crate::registry::{NodeInfo, Registry, RegistryError, Standing};

pub struct MemoryRegistry {
    presence: Arc<MemoryPresence>,
    node: Mutex<Option<NodeInfo>>,
}

impl MemoryRegistry {
    /// The registry of the node whose sessions `presence` holds.
    pub fn new(presence: Arc<MemoryPresence>) -> Self {
        Self { presence, node: Mutex::new(None) }
    }

    fn node(&self) -> std::sync::MutexGuard<'_, Option<NodeInfo>> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<Standing, RegistryError> {
        *self.node() = Some(node.clone());
        Ok(Standing::Known)
    }

    /// Counts sessions and users now, not as of the last heartbeat.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, RegistryError> {
        let Some(mut node) = self.node().clone() else { return Ok(Vec::new()) };
        (node.sessions, node.users) = self.presence.counts();
        node.last_seen = now_ms();
        Ok(vec![node])
    }

    async fn reap(&self) -> Result<Vec<(RoomName, UserId)>, RegistryError> {
        Ok(Vec::new())
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        let mut own = self.node();
        if own.as_ref().is_some_and(|own| &*own.id != node) {
            tracing::warn!(node, "a node can only deregister itself");
            return Ok(());
        }
        *own = None;
        self.presence.clear();
        Ok(())
    }
}
