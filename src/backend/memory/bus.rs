//! The single-node bus: every topic is local, so publishing is handing the event to the sink.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;

use crate::bus::{Bus, BusError, Event, Sink, Topic};

#[derive(Default)]
pub struct MemoryBus {
    sink: OnceLock<Arc<dyn Sink>>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the bus to the node's sink; events published before are dropped, which only
    /// happens during start-up when no session exists yet.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    /// Delivers synchronously, in call order.
    fn deliver_now(&self, topic: &Topic, event: &Event) {
        if let Some(sink) = self.sink.get() {
            sink.deliver(topic, event);
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn subscribe(&self, _topic: &Topic) -> Result<(), BusError> {
        Ok(())
    }

    async fn unsubscribe(&self, _topic: &Topic) -> Result<(), BusError> {
        Ok(())
    }

    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        self.deliver_now(&topic, &event);
        Ok(())
    }

    async fn ready(&self) -> bool {
        true
    }
}
