//! The single-node bus: every topic is local, so publishing is handing the event to the sink,
//! for the topics this node has interest in (and [`Topic::All`], always), as a cluster bus would.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;

use crate::bus::{Bus, BusError, Event, Sink, Topic};

#[derive(Default)]
pub struct MemoryBus {
    sink: OnceLock<Arc<dyn Sink>>,
    /// Local interest per topic. Read on every publish, written on subscribe and unsubscribe.
    interest: RwLock<HashMap<Topic, usize>>,
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

    fn interested(&self, topic: &Topic) -> bool {
        *topic == Topic::All || self.interest.read().unwrap_or_else(|p| p.into_inner()).contains_key(topic)
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError> {
        *self.interest.write().unwrap_or_else(|p| p.into_inner()).entry(topic.clone()).or_default() += 1;
        Ok(())
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError> {
        let mut interest = self.interest.write().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = interest.get_mut(topic) {
            *count -= 1;
            if *count == 0 {
                interest.remove(topic);
            }
        }
        Ok(())
    }

    /// Delivers synchronously, in call order.
    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        if let Some(sink) = self.sink.get()
            && self.interested(&topic)
        {
            sink.deliver(&topic, &event);
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        true
    }
}
