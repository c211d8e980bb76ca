//! The cluster bus on core NATS: one subject per topic (layout in `subjects.rs`).
//!
//! A node subscribes to a user's subject while it holds a session of that user, to a room's
//! subject while it holds a member of that room, and always to the broadcast subject, so a
//! message reaches only the nodes that have recipients. Interest is counted per session
//! ([`Interests`]); one task turns changes of interest into subscriptions, in order and in
//! batches, and `subscribe` returns only once a round trip shows the server has them, which is
//! what makes a catch-up read after it gapless.
//!
//! Each subscription has a reader task that hands what arrived to the sink at once (the sink
//! never blocks), a topic's messages of one wake-up together (see [`Bursts`]). async-nats holds
//! what a reader has not taken yet in a bounded buffer and drops what finds it full.
//!
//! Losses are never silent. A supervision task watches the connection: while it is down or the
//! server does not answer a round trip within a second, the bus is not ready; once the server
//! answers again after a reconnect (async-nats subscribes again by itself; the round trip shows
//! it done) or after a subscription dropped messages (a `SlowConsumer` event), every session is
//! asked to catch up from the store ([`Event::Resync`]), since what the bus lost is only there.
//!
//! The payload of a published message is its [`envelope`](crate::bus::envelope).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::Subscriber;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Nats, Subjects};
use crate::bus::interest::Interests;
use crate::bus::{Bursts, Bus, BusError, Event, MAX_BURST, Sink, Topic, envelope};
use crate::metrics::Metrics;

/// How long `subscribe` waits for the server to have the subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the subscription task waits for one round trip before it tries again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the supervision task asks the server for a round trip, and how long it waits.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for a publish to be written out.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most subjects subscribed or unsubscribed in one batch.
const BATCH: usize = 1000;
/// Least time between two resyncs: a flood of drops asks every session to catch up once per
/// period, not once per dropped message.
const RESYNC_GAP: Duration = Duration::from_millis(500);
/// The wait before a failed batch of subscriptions is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// State shared with the background tasks.
struct Shared {
    nats: Nats,
    subjects: Subjects,
    interests: Interests,
    sink: OnceLock<Arc<dyn Sink>>,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

pub(crate) struct NatsBus {
    shared: Arc<Shared>,
}

impl NatsBus {
    /// Starts the subscription and supervision tasks on `nats` and subscribes to broadcasts.
    pub(crate) async fn connect(nats: Nats, subjects: Subjects, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            nats: nats.clone(),
            subjects,
            interests: Interests::default(),
            sink: OnceLock::new(),
            ready: AtomicBool::new(true),
            metrics,
        });
        tokio::spawn(manage_subscriptions(Arc::downgrade(&shared), nats.clone(), shared.interests.changed()));
        tokio::spawn(supervise(Arc::downgrade(&shared), nats));
        let bus = Self { shared };
        bus.subscribe(&Topic::All).await.map_err(|e| anyhow::anyhow!("subscribing to broadcasts: {e}"))?;
        Ok(bus)
    }

    /// Connects the bus to the node's sink.
    pub(crate) fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.shared.sink.set(sink);
    }
}

impl Shared {
    /// Delivers messages of `topic` that arrived together: as they are when alone, else its
    /// stream messages as bursts, any other event after the messages before it.
    fn on_messages(&self, topic: &Topic, messages: Vec<async_nats::Message>) {
        self.metrics.bus_received.inc_by(messages.len() as u64);
        let Some(sink) = self.sink.get() else { return };
        if let [one] = &messages[..] {
            if let Some(event) = decode(topic, one.payload.clone()) {
                sink.deliver(topic, &event);
            }
            return;
        }
        let events = messages.into_iter().filter_map(|message| Some((topic.clone(), decode(topic, message.payload)?)));
        Bursts::deliver_read(&**sink, events);
    }

    /// Asks every session to catch up from the store.
    fn resync(&self) {
        if let Some(sink) = self.sink.get() {
            self.metrics.bus_resyncs.inc();
            sink.deliver(&Topic::All, &Event::Resync);
        }
    }

    /// Records readiness; `why` says what failed when not ready.
    fn set_ready(&self, ready: bool, why: &str) {
        if self.ready.swap(ready, Ordering::AcqRel) != ready {
            match ready {
                true => tracing::info!(server = %self.nats.url(), "nats answers again: ready"),
                false => tracing::warn!(server = %self.nats.url(), error = why, "nats cannot route: not ready"),
            }
        }
    }
}

/// One envelope's event; `None` (logged) when it is malformed.
fn decode(topic: &Topic, payload: Bytes) -> Option<Event> {
    let event = envelope::decode(topic, payload);
    if event.is_none() {
        tracing::warn!("malformed bus message dropped");
    }
    event
}

/// A subscription's reader, which the subscription task stops when interest is gone.
struct Reader {
    stop: oneshot::Sender<()>,
    done: JoinHandle<()>,
}

/// Hands what arrives on `subscriber` to the sink until stopped (or the reader is dropped), then
/// unsubscribes.
async fn read(shared: Weak<Shared>, topic: Topic, subscriber: Subscriber, mut stop: oneshot::Receiver<()>) {
    let mut chunks = subscriber.ready_chunks(MAX_BURST);
    loop {
        let chunk = tokio::select! {
            biased;
            _ = &mut stop => break,
            chunk = chunks.next() => chunk,
        };
        // `None`: the client is gone.
        let Some(messages) = chunk else { return };
        let Some(shared) = shared.upgrade() else { break };
        shared.on_messages(&topic, messages);
    }
    let _ = chunks.get_mut().unsubscribe().await;
}

/// Applies changes of interest, in order, in batches: a subject is unsubscribed once no local
/// session wants it, and subscribed, then confirmed by a round trip, when one does.
async fn manage_subscriptions(shared: Weak<Shared>, nats: Nats, changed: Arc<Notify>) {
    // Subscribed on the client; confirmed in `Interests` once a round trip showed it.
    let mut readers: HashMap<String, Reader> = HashMap::new();
    // Subscribed, but not confirmed yet: `Interests` forgets such a name when its last session
    // goes, so its reader is stopped here.
    let mut unconfirmed: Vec<String> = Vec::new();
    // Whether the last batch failed, so that an outage is logged once, not at every retry.
    let mut failing = false;
    loop {
        let notified = changed.notified();
        let Some(strong) = shared.upgrade() else { return };
        for name in std::mem::take(&mut unconfirmed) {
            if strong.interests.wanted(&name) {
                unconfirmed.push(name);
            } else if let Some(reader) = readers.remove(&name) {
                let _ = reader.stop.send(());
                let _ = reader.done.await;
            }
        }
        let (subscribe, unsubscribe) = strong.interests.pending(BATCH);
        if subscribe.is_empty() && unsubscribe.is_empty() {
            drop(strong);
            notified.await;
            continue;
        }
        for name in &unsubscribe {
            if let Some(reader) = readers.remove(name) {
                // Before any new subscription of the batch, so that the server sees them in order.
                let _ = reader.stop.send(());
                let _ = reader.done.await;
            }
        }
        strong.interests.confirm(&unsubscribe, false);
        let mut failed = None;
        for name in &subscribe {
            if readers.contains_key(name) {
                continue;
            }
            let Some(topic) = strong.subjects.topic(name) else {
                tracing::error!(subject = %name, "not a topic subject; not subscribed");
                continue;
            };
            match nats.client().subscribe(name.clone()).await {
                Ok(subscriber) => {
                    let (stop, stopped) = oneshot::channel();
                    let done = tokio::spawn(read(shared.clone(), topic, subscriber, stopped));
                    readers.insert(name.clone(), Reader { stop, done });
                }
                Err(e) => {
                    failed = Some(format!("nats: {e}"));
                    break;
                }
            }
        }
        drop(strong);
        let confirmed = match failed {
            Some(e) => Err(e),
            None => nats.round_trip(CONFIRM_TIMEOUT).await,
        };
        let Some(strong) = shared.upgrade() else { return };
        match confirmed {
            Ok(()) => {
                // The round trip shows every subscription made before it on the server.
                strong.interests.confirm(&subscribe, true);
                strong.interests.confirm(&std::mem::take(&mut unconfirmed), true);
                if std::mem::take(&mut failing) {
                    tracing::info!("nats subscriptions confirmed again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "nats subscriptions not confirmed; retrying");
                }
                unconfirmed.extend(subscribe.into_iter().filter(|name| readers.contains_key(name)));
                unconfirmed.sort_unstable();
                unconfirmed.dedup();
                drop(strong);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Watches the connection: readiness from its state and a round trip every [`HEALTH_EVERY`];
/// after a reconnect or a slow-consumer drop, once the server answers, a resync.
async fn supervise(shared: Weak<Shared>, nats: Nats) {
    let mut events = nats.events();
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = nats.status();
    // Whether messages may have been lost since the last resync.
    let mut lost = false;
    let mut last_resync: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = events.changed() => if changed.is_err() { return },
        }
        let now = nats.status();
        if now.connects != seen.connects || now.slow_consumers != seen.slow_consumers || !now.connected {
            if !lost {
                tracing::warn!(
                    server = %nats.url(),
                    connected = now.connected,
                    reconnects = now.connects - seen.connects,
                    dropped = now.slow_consumers - seen.slow_consumers,
                    "nats may have lost messages; sessions catch up from the store once it answers"
                );
            }
            lost = true;
        }
        seen = now;
        let answered = match now.connected {
            true => nats.round_trip(HEALTH_EVERY).await,
            false => Err("nats is disconnected".to_owned()),
        };
        let Some(shared) = shared.upgrade() else { return };
        match answered {
            Ok(()) => shared.set_ready(true, ""),
            Err(e) => {
                shared.set_ready(false, &e);
                continue;
            }
        }
        if lost {
            if let Some(at) = last_resync {
                tokio::time::sleep_until(at + RESYNC_GAP).await;
            }
            lost = false;
            last_resync = Some(Instant::now());
            shared.resync();
        }
    }
}

/// The payloads `event` travels as: one, or, for frames too many for one message of at most
/// `max` bytes, several in order.
fn payloads(event: &Event, max: usize) -> Result<Vec<Vec<u8>>, BusError> {
    let Some(whole) = envelope::encode(event) else { return Ok(Vec::new()) };
    if whole.len() <= max {
        return Ok(vec![whole]);
    }
    match event {
        Event::Frames(notices) if notices.len() > 1 => {
            let (first, second) = notices.split_at(notices.len() / 2);
            let mut out = payloads(&Event::Frames(first.to_vec()), max)?;
            out.extend(payloads(&Event::Frames(second.to_vec()), max)?);
            Ok(out)
        }
        _ => Err(unavailable(format!("a message of {} bytes is over the server's max_payload ({max})", whole.len()))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("nats: {e}"))
}

impl Drop for NatsBus {
    /// Wakes the subscription task so that it sees the bus is gone and ends.
    fn drop(&mut self) {
        self.shared.interests.changed().notify_one();
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError> {
        let subject = self.shared.subjects.topic_subject(topic);
        self.shared.interests.add(subject, SUBSCRIBE_TIMEOUT, "nats").await
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.remove(&self.shared.subjects.topic_subject(topic));
        Ok(())
    }

    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        let nats = &self.shared.nats;
        if !nats.status().connected {
            return Err(unavailable("not connected"));
        }
        let client = nats.client();
        let payloads = payloads(&event, client.max_payload())?;
        if payloads.is_empty() {
            return Ok(());
        }
        let subject = self.shared.subjects.topic_subject(&topic);
        let publishing = async {
            for payload in payloads {
                client.publish(subject.clone(), payload.into()).await.map_err(unavailable)?;
            }
            client.flush().await.map_err(unavailable)
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, publishing).await {
            Ok(result) => result,
            Err(_) => {
                Err(unavailable(format!("the message was not written out within {} ms", PUBLISH_TIMEOUT.as_millis())))
            }
        }
    }

    async fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire) && self.shared.nats.status().connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Notice;

    fn frames(sizes: &[usize]) -> Event {
        Event::Frames(sizes.iter().map(|n| Notice { frame: Bytes::from(vec![b'x'; *n]), exclude: None }).collect())
    }

    #[test]
    fn frames_too_many_for_one_message_go_as_several_in_order() {
        let event = frames(&[100, 200, 300, 400]);
        let whole = envelope::encode(&event).unwrap();
        assert_eq!(payloads(&event, whole.len()).unwrap(), vec![whole]);
        let parts = payloads(&event, 500).unwrap();
        assert!(parts.len() > 1 && parts.iter().all(|p| p.len() <= 500), "{:?}", parts.iter().map(Vec::len));
        let topic = Topic::All;
        let sizes: Vec<usize> = parts
            .into_iter()
            .flat_map(|p| match envelope::decode(&topic, Bytes::from(p)) {
                Some(Event::Frames(notices)) => notices.into_iter().map(|n| n.frame.len()).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [100, 200, 300, 400]);
        let e = payloads(&frames(&[600]), 500).unwrap_err();
        assert!(e.to_string().contains("over the server's max_payload (500)"), "{e}");
        assert!(payloads(&Event::Resync, 500).unwrap().is_empty());
    }
}
