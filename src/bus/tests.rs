//! One bus suite for every backend, each check its own test per backend (see `bus_suite!`): the
//! memory bus (one node), the Redis bus (`SWITCHYARD_TEST_REDIS`, default 127.0.0.1:6379) and the
//! NATS bus (`SWITCHYARD_TEST_NATS`, default nats://127.0.0.1:4222), two instances on one server
//! with a unique prefix per test being two nodes, and the RabbitMQ bus
//! (`SWITCHYARD_TEST_AMQP`, default guest on 127.0.0.1:5672), likewise. Without a reachable server
//! a backend's tests are skipped with a printed reason, except under `CI=true`, where they fail.
//!
//! Each node's sink records what it receives. That a node did *not* receive an event is shown by
//! a fence: a broadcast published after it by the same node, which every node receives; a bus
//! that delivers one publisher's events to a node in publish order (the memory bus calls the sink
//! at once; Redis keeps one publisher's order on a subscriber connection; NATS on one connection,
//! and the reader tasks of a node's subscriptions are woken in that order on the tests'
//! one-thread runtime; RabbitMQ one channel's order into each queue) can no longer deliver the earlier event once the fence arrived.
//! On a Redis Cluster (`SWITCHYARD_TEST_REDIS_CLUSTER`, default the one `scripts/redis-cluster.sh
//! start` runs) the fence travels through the master of the broadcast channel and an event through
//! its own topic's, on other connections, so there a fence shows less: an event still on its way
//! on another master's connection could arrive after it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::*;
use crate::backend::amqp::AmqpBus;
use crate::backend::memory::MemoryBus;
use crate::backend::nats::{Nats, NatsBus, NatsOptions, Subjects};
use crate::backend::redact;
use crate::backend::redis::{Keys, RedisBus, RedisClock};
use crate::metrics::Metrics;
use crate::testing::{absent, amqp_url, nats_url, redis_cluster_url, redis_url, unique_prefix};

pub(crate) mod checks;

/// Longest wait for an event that should arrive.
const WAIT: Duration = Duration::from_secs(5);

/// A sink that records the label of every event it receives, by topic.
#[derive(Default)]
pub(crate) struct Recorder {
    got: Mutex<Vec<(Topic, String)>>,
    changed: Notify,
}

impl Sink for Recorder {
    fn deliver(&self, topic: &Topic, event: &Event) {
        let label = match event {
            Event::Frames(notices) => notices.iter().map(|n| String::from_utf8_lossy(&n.frame)).collect(),
            Event::Message(delivery) => {
                let frame: serde_json::Value = serde_json::from_slice(delivery.json()).expect("a JSON frame");
                frame["body"].to_string()
            }
            Event::Disconnect { reason, .. } => reason.to_string(),
            Event::Resync => return,
        };
        self.got.lock().unwrap().push((topic.clone(), label));
        self.changed.notify_waiters();
    }
}

impl Recorder {
    /// The labels received for `topic`, in arrival order.
    pub(crate) fn labels(&self, topic: &Topic) -> Vec<String> {
        self.got.lock().unwrap().iter().filter(|(t, _)| t == topic).map(|(_, label)| label.clone()).collect()
    }

    /// Waits up to [`WAIT`] until `label` was received for `topic`; answers whether it was.
    pub(crate) async fn received(&self, topic: &Topic, label: &str) -> bool {
        self.until(|| self.labels(topic).iter().any(|l| l == label)).await
    }

    /// Waits up to [`WAIT`] until `done` holds; answers whether it does.
    pub(crate) async fn until(&self, done: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done();
            }
        }
    }
}

/// One node: its bus and what its sink received.
pub(crate) struct BusNode {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) sink: Arc<Recorder>,
}

/// An event labelled `label`: a presence-like frame, which every bus carries as is.
pub(crate) fn event(label: &str) -> Event {
    Event::Frames(vec![Notice { frame: Bytes::from(label.to_owned()), exclude: None }])
}

pub(crate) fn user_topic(name: &str) -> Topic {
    Topic::User(UserId::parse(name).unwrap())
}

pub(crate) fn room_topic(name: &str) -> Topic {
    Topic::Room(RoomName::parse(name).unwrap())
}

/// Publishes a broadcast from `from` and waits until every node received it, after which no node
/// receives anything `from` published before (see the module docs).
pub(crate) async fn fence(nodes: &[BusNode], from: &BusNode) {
    let label = format!("fence-{:x}", fastrand::u64(..));
    from.bus.publish(Topic::All, event(&label)).await.unwrap();
    for (i, node) in nodes.iter().enumerate() {
        assert!(node.sink.received(&Topic::All, &label).await, "node {i} never received the fence");
    }
}

/// The single node of the memory bus.
pub(crate) async fn open_memory(_prefix: String) -> Option<Vec<BusNode>> {
    let bus = MemoryBus::new();
    let sink = Arc::new(Recorder::default());
    bus.attach(sink.clone());
    Some(vec![BusNode { bus: Arc::new(bus), sink }])
}

/// Two nodes: two Redis buses, each with its own connections and clock, under one prefix.
pub(crate) async fn open_redis(prefix: String) -> Option<Vec<BusNode>> {
    let url = redis_url();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let client = crate::backend::redis::client(&url).unwrap();
        let connecting = crate::backend::redis::commands(&client, &url);
        let mut commands = match tokio::time::timeout(Duration::from_secs(3), connecting).await {
            Ok(Ok(commands)) => commands,
            other => return absent("redis bus", &format!("no Redis at {url}: {:?}", other.map(|r| r.err()))),
        };
        let clock = Arc::new(RedisClock::default());
        clock.sample(&mut commands).await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let commands = crate::backend::redis::Conn::Single(commands);
        let bus = RedisBus::connect(client, commands, clock, Keys::new(&prefix), metrics).await.unwrap();
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        nodes.push(BusNode { bus: Arc::new(bus), sink });
    }
    Some(nodes)
}

/// Two nodes: two sharded Redis buses on the Redis Cluster (`SWITCHYARD_TEST_REDIS_CLUSTER`,
/// default the one `scripts/redis-cluster.sh start` runs), each with its own connections, under
/// one prefix.
pub(crate) async fn open_redis_cluster(prefix: String) -> Option<Vec<BusNode>> {
    use crate::backend::redis::conn::{Conn, seeds};
    use crate::backend::redis::sharded::RedisShardedBus;
    use ::redis::IntoConnectionInfo;
    let url = redis_cluster_url();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let conn = match tokio::time::timeout(Duration::from_secs(5), Conn::cluster(&url)).await {
            Ok(Ok(conn)) => conn,
            other => {
                return absent(
                    "redis cluster bus",
                    &format!("no Redis Cluster at {url}: {:?}", other.map(|r| r.err())),
                );
            }
        };
        let seeds = seeds(&url).unwrap().iter().map(|s| s.as_str().into_connection_info().unwrap()).collect();
        let clock = Arc::new(RedisClock::default());
        let metrics = Arc::new(Metrics::new());
        let bus = RedisShardedBus::connect(seeds, conn, clock, Keys::cluster(&prefix), metrics).await.unwrap();
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        nodes.push(BusNode { bus: Arc::new(bus), sink });
    }
    Some(nodes)
}

/// Two nodes: two NATS buses, each with its own client, under one prefix.
pub(crate) async fn open_nats(prefix: String) -> Option<Vec<BusNode>> {
    let url = nats_url();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let options = NatsOptions { name: format!("bus-suite {prefix} {i}"), subscription_capacity: None };
        let connecting = Nats::connect(&url, &prefix, &options);
        let nats = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(nats)) => nats,
            other => return absent("nats bus", &format!("no NATS at {url}: {:?}", other.map(|r| r.err()))),
        };
        let bus = NatsBus::connect(nats, Subjects::new(&prefix), Arc::new(Metrics::new())).await.unwrap();
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        nodes.push(BusNode { bus: Arc::new(bus), sink });
    }
    Some(nodes)
}

/// Two nodes: two RabbitMQ buses, each with its own connection and queue, under one prefix.
pub(crate) async fn open_amqp(prefix: String) -> Option<Vec<BusNode>> {
    let url = amqp_url();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let names = crate::backend::amqp::Names::new(&prefix);
        let metrics = Arc::new(Metrics::new());
        let bus = match AmqpBus::connect(&url, names, &format!("{prefix}-{i}"), 65_536, metrics).await {
            Ok(bus) => bus,
            Err(e) => return absent("rabbitmq bus", &format!("no RabbitMQ at {}: {e:#}", redact(&url))),
        };
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        nodes.push(BusNode { bus: Arc::new(bus), sink });
    }
    Some(nodes)
}

/// One test per check of [`checks`] for the backend that `$open` (an async
/// `fn(prefix) -> Option<Vec<BusNode>>`, the nodes of one cluster) opens.
macro_rules! bus_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            // One thread: a subscription that returned before Redis confirmed it then loses the
            // race with the publish that follows it (see the first check), every time.
            macro_rules! check {
                ($check:ident) => {
                    #[tokio::test]
                    async fn $check() {
                        let Some(nodes) = ($open)(unique_prefix()).await else { return };
                        checks::$check(&nodes).await;
                    }
                };
            }

            check!(subscribe_returns_once_events_of_the_topic_are_received);
            check!(an_event_reaches_every_subscribed_node_and_only_those);
            check!(unsubscribe_stops_delivery_when_the_last_local_interest_goes);
            check!(a_publish_to_all_reaches_every_node);
            check!(events_of_one_topic_arrive_in_publish_order);
        }
    };
}

bus_suite!(memory, open_memory);
bus_suite!(redis, open_redis);
bus_suite!(redis_cluster, open_redis_cluster);
bus_suite!(nats, open_nats);
bus_suite!(amqp, open_amqp);
