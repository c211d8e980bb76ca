//! Routing between nodes: who gets a message, not how it is stored.
//!
//! A [`Topic`] names the audience of an [`Event`]: a user's sessions, a room's members, or every
//! session. A node tells its bus which topics it has local interest in; the bus hands every
//! event for those topics to the node's [`Sink`], which fans it out to local sessions. Stream
//! messages enter the bus from the node, right after the store committed them, so nothing is
//! delivered that a reader could not find in the store; a bus may still delay, reorder, duplicate
//! or drop them, which sessions repair (see `store` and `session`). Presence events go through a
//! [`Batcher`], which publishes those raised together as one event. The in-memory bus is the
//! reference: one node, every topic local.

mod batch;
pub(crate) mod chaos;
pub(crate) mod envelope;
pub(crate) mod interest;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::message::{Layout, Message, Record};
use crate::protocol::{RoomName, StreamId, UserId, encode_message, encode_view};

pub use batch::Batcher;

/// A session id, unique across the cluster (64 random bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn random() -> Self {
        Self(fastrand::u64(1..))
    }

    /// The id as `Display` writes it (16 hex digits), for the envelope of every message.
    pub fn hex(self) -> [u8; 16] {
        let mut out = [0; 16];
        crate::protocol::write_hex(&mut out, self.0);
        out
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The audience of an event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every session of one user.
    User(UserId),
    /// Every session joined to one room.
    Room(RoomName),
    /// Every session on every node.
    All,
}

/// A message on its way to sessions, with its stream position, encoded by each wire protocol at
/// most once per node and shared by every session that takes it.
#[derive(Debug)]
pub struct Delivery {
    /// The stream and seq, or `None` for a broadcast.
    pub position: Option<(StreamId, u64)>,
    /// The session that sent it and got a reply instead of an echo.
    pub exclude: Option<SessionId>,
    /// When the message was accepted, in ms since the epoch.
    ts: u64,
    content: Content,
    json: OnceLock<Bytes>,
    /// The STOMP `MESSAGE`'s shared tail (see [`crate::stomp::encode`]), on first use.
    stomp: OnceLock<Bytes>,
}

/// What a delivery carries: the message a node accepted, or the record bytes a bus brought,
/// which are encoded straight from those bytes rather than decoded into a [`Message`] first.
#[derive(Debug)]
enum Content {
    Message(Message),
    /// A record, checked on receipt.
    Record(Bytes, Layout),
}

impl Delivery {
    pub fn new(position: Option<(StreamId, u64)>, message: Message, exclude: Option<SessionId>) -> Self {
        Self {
            position,
            exclude,
            ts: message.ts,
            content: Content::Message(message),
            json: OnceLock::new(),
            stomp: OnceLock::new(),
        }
    }

    /// A delivery of a [`Record`] received from a bus; `None` when the bytes are not one. Its
    /// frame is encoded when a session first needs it: a node often receives a message only for
    /// the session that sent it (the sender's copy of a direct message), which never needs it.
    pub fn from_record(position: Option<(StreamId, u64)>, record: Bytes, exclude: Option<SessionId>) -> Option<Self> {
        let layout = Record::check(&record)?;
        Some(Self {
            position,
            exclude,
            ts: layout.ts(),
            content: Content::Record(record, layout),
            json: OnceLock::new(),
            stomp: OnceLock::new(),
        })
    }

    /// The JSON `message` frame (PROTOCOL.md §4), encoded on first use. The hub asks for it
    /// before handing the delivery to the first session, so sessions only share it.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let position = self.position.as_ref().map(|(stream, seq)| (stream, *seq));
            match &self.content {
                Content::Message(message) => encode_message(position, message),
                Content::Record(record, layout) => {
                    let view = Record::view_checked(position.map(|(stream, _)| stream), record, *layout);
                    encode_view(position, view.expect("checked when received"))
                }
            }
        })
    }

    /// The STOMP `MESSAGE` after its `subscription` header (PROTOCOL.md §7), encoded by the first
    /// STOMP session that takes it and shared by the others.
    pub fn stomp(&self) -> &Bytes {
        self.stomp.get_or_init(|| {
            let position = self.position.as_ref().map(|(stream, seq)| (stream, *seq));
            match &self.content {
                Content::Message(message) => crate::stomp::encode::message_tail(position, message.view()),
                Content::Record(record, layout) => {
                    let view = Record::view_checked(position.map(|(stream, _)| stream), record, *layout);
                    crate::stomp::encode::message_tail(position, view.expect("checked when received"))
                }
            }
        })
    }

    /// Appends the message's [`Record`] to `out`, for a bus that carries bytes.
    pub fn write_record(&self, out: &mut Vec<u8>) {
        match &self.content {
            Content::Message(message) => Record::write(out, message),
            Content::Record(record, _) => out.extend_from_slice(record),
        }
    }

    /// When the message was accepted, in ms since the epoch (for the latency histogram).
    pub fn ts(&self) -> u64 {
        self.ts
    }
}

/// A pre-encoded frame with no seq (a presence event), for every session of a topic but one.
#[derive(Clone, Debug)]
pub struct Notice {
    pub frame: Bytes,
    /// The session that caused it and is not told.
    pub exclude: Option<SessionId>,
}

/// What travels from node to node.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message of a stream, or a broadcast.
    Message(Arc<Delivery>),
    /// Pre-encoded frames with no seq (presence events), in order. A burst travels as one event
    /// (see [`Batcher`]), so that every session takes it in one wake-up and one socket write.
    Frames(Vec<Notice>),
    /// Close the user's sessions (the disconnect API, the single-session policy).
    Disconnect { code: u16, reason: Arc<str>, except: Option<SessionId> },
    /// Local only, never published: the bus may have missed messages (its connection was
    /// down), so every session catches up its streams from the store.
    Resync,
}

/// Where a node receives the events of the topics it subscribed to.
pub trait Sink: Send + Sync {
    /// Hands `event` to the local sessions of `topic`. Never blocks: a session whose queue is
    /// full is closed as too slow rather than waited for.
    fn deliver(&self, topic: &Topic, event: &Event);

    /// Hands messages of `topic` that arrived together to its local sessions, in order: a sink
    /// that can gives each session all of them in one wake-up and one socket write. By default,
    /// one by one.
    fn deliver_messages(&self, topic: &Topic, deliveries: &[Arc<Delivery>]) {
        for delivery in deliveries {
            self.deliver(topic, &Event::Message(delivery.clone()));
        }
    }
}

/// Most messages of one topic handed on as one burst.
pub const MAX_BURST: usize = 64;

/// The messages a bus received together (in one read from its connection), grouped by topic in
/// their order, until [`Bursts::flush`] hands each group to the sink at once. Order between
/// topics is not kept, and need not be: it is kept per stream, and a stream has one topic.
#[derive(Default)]
pub struct Bursts {
    groups: Vec<(Topic, Vec<Arc<Delivery>>)>,
}

impl Bursts {
    /// Adds a message; a group that reaches [`MAX_BURST`] goes to `sink` at once.
    pub fn push(&mut self, topic: &Topic, delivery: Arc<Delivery>, sink: &dyn Sink) {
        let at = match self.groups.iter().position(|(t, _)| t == topic) {
            Some(at) => at,
            None => {
                self.groups.push((topic.clone(), Vec::new()));
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[at].1;
        group.push(delivery);
        if group.len() >= MAX_BURST {
            sink.deliver_messages(topic, group);
            group.clear();
        }
    }

    /// Hands the events a bus received together (in one read) to `sink`, in order: a topic's
    /// messages as one burst, any other event after the messages before it.
    pub fn deliver_read(sink: &dyn Sink, events: impl IntoIterator<Item = (Topic, Event)>) {
        let mut bursts = Bursts::default();
        for (topic, event) in events {
            match event {
                Event::Message(delivery) => bursts.push(&topic, delivery, sink),
                event => {
                    bursts.flush(sink);
                    sink.deliver(&topic, &event);
                }
            }
        }
        bursts.flush(sink);
    }

    /// Hands every group to `sink`.
    pub fn flush(&mut self, sink: &dyn Sink) {
        for (topic, group) in self.groups.drain(..) {
            if !group.is_empty() {
                sink.deliver_messages(&topic, &group);
            }
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Routes events between the nodes of a cluster.
#[async_trait]
pub trait Bus: Send + Sync {
    /// Adds one local interest in `topic` (a session of the user, a member of the room). Returns
    /// once this node receives the topic's events, so that a store read made afterwards cannot
    /// miss a message that is not delivered live.
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError>;
    /// Removes one local interest in `topic`; the node stops receiving its events when none is
    /// left. Subscriptions and unsubscriptions of one topic take effect in call order.
    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError>;
    /// Sends an event that is not part of a stream (broadcast, presence, control) to every node
    /// subscribed to `topic`, this one included. Returns once the bus accepted it.
    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError>;
    /// Whether the bus can route right now (for `/readyz`).
    async fn ready(&self) -> bool;
}
