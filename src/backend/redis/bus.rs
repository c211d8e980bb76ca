//! The cluster bus: Redis pub/sub, one channel per topic (layout in `keys.rs`).
//!
//! A node subscribes to a user's channel while it holds a session of that user, to a room's
//! channel while it holds a member of that room, and always to the broadcast channel, so a
//! message reaches only the nodes that have recipients. Interest is counted per session; one task
//! turns changes of interest into batched `SUBSCRIBE`/`UNSUBSCRIBE` commands, in order, and
//! `subscribe` returns only once Redis confirmed, which is what makes a catch-up read after it
//! gapless.
//!
//! Incoming messages are decoded on the subscriber connection's own task (see `subscriber.rs`)
//! and handed straight to the sink, which never blocks: there is no intermediate queue that could
//! drop a burst, and no second task to wake per message. The subscription task connects the
//! subscriber again when it drops, and subscribes again to every channel with local interest. A
//! health task pings Redis every second and reports readiness, and once Redis answers again after
//! the subscriber connection was dropped, asks every session to catch up from the store, since
//! messages published while the subscription was down are only in the streams.
//!
//! The payload of a published message is its [`envelope`](crate::bus::envelope).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use tokio::sync::Notify;

use super::RESPONSE_TIMEOUT;
use super::subscriber::{Published, Receiver, Subscriber};
use crate::backend::redis::keys::Keys;
use crate::backend::redis::{Conn, RedisClock};
use crate::bus::interest::Interests;
use crate::bus::{Bursts, Bus, BusError, Event, Sink, Topic, envelope};
use crate::metrics::Metrics;

/// How long `subscribe` waits for Redis to confirm.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the health task pings Redis.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Most channels in one SUBSCRIBE or UNSUBSCRIBE.
const BATCH: usize = 1000;
/// The first and the longest wait between attempts to connect the subscriber again.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// ARGV: channel, payload, deadline (ms, see [`crate::backend::redis::WRITE_DEADLINE`]). Publishes, or answers -1 and
/// publishes nothing when Redis runs it after the deadline.
const PUBLISH: &str = r"
local t = redis.call('TIME')
if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[3]) then return -1 end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
";

/// State shared with the push callback and the background tasks.
struct Shared {
    keys: Keys,
    interests: Interests,
    sink: OnceLock<Arc<dyn Sink>>,
    ready: AtomicBool,
    /// Set when the subscription may have missed messages; cleared by the catch-up it triggers.
    lost: AtomicBool,
    /// The subscriber connection; `None` once it dropped, until the subscription task has
    /// connected again. Cloned out, never held across an `.await`.
    subscriber: Mutex<Option<Subscriber>>,
    metrics: Arc<Metrics>,
}

pub struct RedisBus {
    shared: Arc<Shared>,
    publisher: Conn,
    clock: Arc<RedisClock>,
    publish: Script,
}

impl Shared {
    /// Decodes the pub/sub messages of one read and delivers them locally.
    fn on_messages(&self, read: &[Published]) {
        if let Some(sink) = self.sink.get() {
            deliver_read(&**sink, &self.keys, &self.metrics, read);
        }
    }

    /// The subscriber connection ended: the subscription task connects anew.
    fn on_closed(&self) {
        self.lost.store(true, Ordering::Release);
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::warn!("redis pub/sub connection lost; reconnecting");
        }
        self.subscriber.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.interests.changed().notify_one();
    }

    fn subscriber(&self) -> Option<Subscriber> {
        self.subscriber.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a new subscriber connection, on which nothing is subscribed yet: every channel with
    /// interest is pending again, and `subscribe` waits for it as for a new one.
    fn reconnected(&self, conn: Subscriber) {
        self.interests.reset();
        *self.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
    }
}

/// The subscriber's traffic, for the bus while it exists.
struct Incoming(std::sync::Weak<Shared>);

impl Receiver for Incoming {
    fn messages(&self, read: &[Published]) {
        if let Some(shared) = self.0.upgrade() {
            shared.on_messages(read);
        }
    }

    fn closed(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.on_closed();
        }
    }
}

impl RedisBus {
    /// Connects the subscriber (RESP3) and starts the subscription and health tasks. `publisher`
    /// is shared with the store.
    pub async fn connect(
        client: redis::Client,
        publisher: Conn,
        clock: Arc<RedisClock>,
        keys: Keys,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            keys,
            interests: Interests::default(),
            sink: OnceLock::new(),
            ready: AtomicBool::new(true),
            lost: AtomicBool::new(false),
            subscriber: Mutex::new(None),
            metrics,
        });
        let incoming: Arc<dyn Receiver> = Arc::new(Incoming(Arc::downgrade(&shared)));
        let info = client.get_connection_info().clone();
        shared.reconnected(Subscriber::connect(&info, RESPONSE_TIMEOUT, incoming.clone()).await?);
        let bus = Self { shared: shared.clone(), publisher, clock, publish: Script::new(PUBLISH) };
        tokio::spawn(manage_subscriptions(Arc::downgrade(&shared), shared.interests.changed(), info, incoming));
        tokio::spawn(watch_health(Arc::downgrade(&shared), bus.publisher.clone(), bus.clock.clone()));
        bus.subscribe(&Topic::All).await.map_err(|e| anyhow::anyhow!("subscribing to broadcasts: {e}"))?;
        Ok(bus)
    }

    /// Connects the bus to the node's sink.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.shared.sink.set(sink);
    }
}

/// Applies changes of interest, in order, in batches; connects the subscriber again when it
/// dropped.
async fn manage_subscriptions(
    shared: std::sync::Weak<Shared>,
    changed: Arc<Notify>,
    info: redis::ConnectionInfo,
    incoming: Arc<dyn Receiver>,
) {
    let mut delay = RECONNECT_MIN;
    loop {
        let notified = changed.notified();
        let Some(strong) = shared.upgrade() else { return };
        let Some(subscriber) = strong.subscriber() else {
            drop(strong);
            match Subscriber::connect(&info, RESPONSE_TIMEOUT, incoming.clone()).await {
                Ok(conn) => {
                    let Some(strong) = shared.upgrade() else { return };
                    strong.reconnected(conn);
                    delay = RECONNECT_MIN;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "connecting the redis subscriber failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
            }
            continue;
        };
        let (subscribe, unsubscribe) = strong.interests.pending(BATCH);
        drop(strong);
        if subscribe.is_empty() && unsubscribe.is_empty() {
            notified.await;
            continue;
        }
        let result = async {
            if !unsubscribe.is_empty() {
                subscriber.unsubscribe(&unsubscribe).await?;
            }
            if !subscribe.is_empty() {
                subscriber.subscribe(&subscribe).await?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        let Some(strong) = shared.upgrade() else { return };
        match result {
            Ok(()) => {
                strong.interests.confirm(&unsubscribe, false);
                strong.interests.confirm(&subscribe, true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis subscription change failed; retrying");
                drop(strong);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Pings Redis every second; flips readiness and, after an outage, asks sessions to catch up.
async fn watch_health(shared: std::sync::Weak<Shared>, mut publisher: Conn, clock: Arc<RedisClock>) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    loop {
        tick.tick().await;
        let sampled = matches!(tokio::time::timeout(HEALTH_EVERY, clock.sample(&mut publisher)).await, Ok(Ok(())));
        let Some(subscriber) = shared.upgrade().map(|shared| shared.subscriber()) else { return };
        let ok = sampled
            && match subscriber {
                Some(conn) => matches!(tokio::time::timeout(HEALTH_EVERY, conn.ping()).await, Ok(Ok(()))),
                None => false,
            };
        let Some(shared) = shared.upgrade() else { return };
        if !ok {
            // No `lost` here: a Redis that is only slow or frozen keeps the subscription, and
            // delivers what it holds once it answers again. A dropped connection says so itself.
            if shared.ready.swap(false, Ordering::AcqRel) {
                tracing::warn!("redis is not answering: not ready");
            }
            continue;
        }
        if !shared.ready.swap(true, Ordering::AcqRel) {
            tracing::info!("redis answers again: ready");
        }
        if shared.lost.swap(false, Ordering::AcqRel)
            && let Some(sink) = shared.sink.get()
        {
            shared.metrics.bus_resyncs.inc();
            sink.deliver(&Topic::All, &Event::Resync);
        }
    }
}

/// Decodes the pub/sub messages of one read and hands them to `sink`: a topic's messages together
/// (see [`Bursts`]), any other event after the messages before it. Shared with the sharded bus.
pub(super) fn deliver_read(sink: &dyn Sink, keys: &Keys, metrics: &Metrics, read: &[Published]) {
    if let [one] = read {
        // Alone, the common case while traffic is light: no grouping.
        if let Some((topic, event)) = decode(keys, metrics, one) {
            sink.deliver(&topic, &event);
        }
        return;
    }
    Bursts::deliver_read(sink, read.iter().filter_map(|published| decode(keys, metrics, published)));
}

/// One pub/sub message's topic and event; `None` (logged) when it is malformed.
fn decode(keys: &Keys, metrics: &Metrics, published: &Published) -> Option<(Topic, Event)> {
    metrics.bus_received.inc();
    let topic = std::str::from_utf8(published.channel()).ok().and_then(|c| keys.topic(c))?;
    let event = envelope::decode(&topic, published.payload());
    if event.is_none() {
        tracing::warn!("malformed bus message dropped");
    }
    Some((topic, event?))
}

/// Publishes `event` on `topic`'s channel with `script` ([`PUBLISH`] or the sharded bus's), which
/// takes the channel as its one key when `keyed` (a Redis Cluster routes the script by it) and
/// publishes nothing when Redis runs it after the deadline. `server` names the backend in errors.
pub(super) async fn publish_by_script(
    conn: &mut Conn,
    script: &Script,
    keyed: bool,
    channel: String,
    event: &Event,
    clock: &RedisClock,
    server: &str,
) -> Result<(), BusError> {
    let Some(payload) = envelope::encode(event) else { return Ok(()) };
    let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(format!("{server}: {e}"));
    let deadline = clock.write_deadline();
    let keys = usize::from(keyed);
    let mut cmd = crate::backend::redis::evalsha(script, keys, 3, channel.len() + payload.len() + 16);
    cmd.arg(channel).arg(payload).arg(deadline);
    let receivers: i64 = crate::backend::redis::eval(conn, script, &cmd).await.map_err(|e| unavailable(&e))?;
    if receivers < 0 {
        return Err(unavailable(&"redis reached the publish after its deadline: nothing was published"));
    }
    Ok(())
}

impl Drop for RedisBus {
    /// Wakes the subscription task so that it sees the bus is gone and ends.
    fn drop(&mut self) {
        self.shared.interests.changed().notify_one();
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.add(self.shared.keys.channel(topic), SUBSCRIBE_TIMEOUT, "redis").await
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.remove(&self.shared.keys.channel(topic));
        Ok(())
    }

    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        let channel = self.shared.keys.channel(&topic);
        publish_by_script(&mut self.publisher.clone(), &self.publish, false, channel, &event, &self.clock, "redis")
            .await
    }

    async fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }
}
