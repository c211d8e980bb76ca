//! Prometheus metrics (`GET /metrics`).
//!
//! Counters handed to hot paths are resolved once at start-up (a prometheus-client counter is a
//! shared atomic), so counting a delivery takes no lock. The latency histogram is observed once
//! per socket write batch, not per message.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Room,
    Broadcast,
}

impl Kind {
    /// The kind of the messages of `stream`.
    pub fn of(stream: &crate::protocol::StreamId) -> Self {
        match stream {
            crate::protocol::StreamId::User(_) => Kind::Direct,
            crate::protocol::StreamId::Room(_) => Kind::Room,
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Direct => "direct",
            Self::Room => "room",
            Self::Broadcast => "broadcast",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Rejection {
    Unauthorized,
    BadRequest,
    Capacity,
    /// `--allowed-origin` refused the browser's Origin.
    Origin,
    /// `--max-connections-per-ip` reached.
    PerIp,
}

impl EncodeLabelValue for Rejection {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Unauthorized => "unauthorized",
            Self::BadRequest => "bad_request",
            Self::Capacity => "capacity",
            Self::Origin => "origin",
            Self::PerIp => "per_ip",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Rejection,
}

/// Counters for one message kind.
#[derive(Clone, Default)]
pub struct ByKind {
    pub direct: Counter,
    pub room: Counter,
    pub broadcast: Counter,
}

impl ByKind {
    fn register(family: &Family<KindLabel, Counter>) -> Self {
        let get = |kind| family.get_or_create(&KindLabel { kind }).clone();
        Self { direct: get(Kind::Direct), room: get(Kind::Room), broadcast: get(Kind::Broadcast) }
    }

    pub fn get(&self, kind: Kind) -> &Counter {
        match kind {
            Kind::Direct => &self.direct,
            Kind::Room => &self.room,
            Kind::Broadcast => &self.broadcast,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub sessions: Gauge,
    pub users: Gauge,
    pub rooms: Gauge,
    pub connections: Counter,
    /// Messages accepted by this node (sent by its clients or pushed through its API).
    pub messages_in: ByKind,
    /// Message frames written to this node's sockets.
    pub messages_out: ByKind,
    /// Seconds from acceptance to the socket write, per write batch.
    pub delivery_latency: Histogram,
    /// Sessions closed because their outbound queue was full.
    pub outbound_dropped: Counter,
    /// Messages this node received from the cluster bus (Redis pub/sub, NATS, a RabbitMQ queue).
    pub bus_received: Counter,
    /// Gaps in a session's live delivery read from the store (the bus lost or delayed a message).
    pub repairs: Counter,
    /// Times the bus may have lost messages (a reconnect, a full subscription buffer) and asked
    /// every session to catch up from the store.
    pub bus_resyncs: Counter,
    /// Outbox rows this node consumed: appended (or found already appended) and deleted.
    pub outbox_delivered: Counter,
    /// Outbox rows this node moved to the dead-letter table because they can never be delivered.
    pub outbox_dead_letters: Counter,
    rejected: Family<ReasonLabel, Counter>,
    /// Where a stopping node is in its drain: 0 serving, 1 unready, 2 closing sessions.
    pub drain_phase: Gauge,
    /// Sessions this node asked to close (1001) while draining.
    pub drain_closed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let sessions = Gauge::default();
        let users = Gauge::default();
        let rooms = Gauge::default();
        let connections = Counter::default();
        let messages_in = Family::<KindLabel, Counter>::default();
        let messages_out = Family::<KindLabel, Counter>::default();
        let delivery_latency =
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        let outbound_dropped = Counter::default();
        let bus_received = Counter::default();
        let repairs = Counter::default();
        let bus_resyncs = Counter::default();
        let outbox_delivered = Counter::default();
        let outbox_dead_letters = Counter::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let drain_phase = Gauge::default();
        let drain_closed = Counter::default();
        registry.register(
            "drain_phase",
            "Where a stopping node is in its drain: 0 serving, 1 unready (/readyz 503), 2 closing sessions",
            drain_phase.clone(),
        );
        registry.register("drain_closed_sessions", "Sessions asked to close (1001) by a drain", drain_closed.clone());
        registry.register("sessions", "WebSocket sessions on this node", sessions.clone());
        registry.register("users", "Distinct users with a session on this node", users.clone());
        registry.register("rooms", "Rooms with a member on this node", rooms.clone());
        registry.register("connections", "WebSocket sessions opened", connections.clone());
        registry.register("messages_in", "Messages accepted by this node", messages_in.clone());
        registry.register("messages_out", "Message frames written to sockets", messages_out.clone());
        registry.register(
            "delivery_latency_seconds",
            "Time from acceptance to the socket write of a batch",
            delivery_latency.clone(),
        );
        registry.register(
            "outbound_queue_drops",
            "Sessions closed with 4003 because their outbound queue was full",
            outbound_dropped.clone(),
        );
        registry.register("rejected_connections", "Upgrades refused", rejected.clone());
        registry.register(
            "bus_messages_received",
            "Messages this node received from the cluster bus",
            bus_received.clone(),
        );
        registry.register(
            "delivery_repairs",
            "Gaps in a session's live delivery read from the store because the bus lost or delayed a message",
            repairs.clone(),
        );
        registry.register(
            "bus_resyncs",
            "Times the bus may have lost messages (a reconnect, a full subscription buffer) and every session caught up from the store",
            bus_resyncs.clone(),
        );
        registry.register(
            "outbox_delivered",
            "Outbox rows this node delivered and deleted (docs/outbox.md)",
            outbox_delivered.clone(),
        );
        registry.register(
            "outbox_dead_letters",
            "Outbox rows this node moved to the dead-letter table (docs/outbox.md)",
            outbox_dead_letters.clone(),
        );
        Self {
            registry,
            sessions,
            users,
            rooms,
            connections,
            messages_in: ByKind::register(&messages_in),
            messages_out: ByKind::register(&messages_out),
            delivery_latency,
            outbound_dropped,
            bus_received,
            repairs,
            bus_resyncs,
            outbox_delivered,
            outbox_dead_letters,
            rejected,
            drain_phase,
            drain_closed,
        }
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
