//! The cluster bus on RabbitMQ: one topic exchange per cluster, one queue per node (names in
//! `mod.rs`).
//!
//! A node binds its queue to a user's key while it holds a session of that user, to a room's key
//! while it holds a member of that room, and always to the broadcast key, so a message reaches
//! only the nodes that have recipients. Interest is counted per session ([`Interests`]); one task
//! turns its changes into `queue.bind` and `queue.unbind`, in order and in batches, and
//! `subscribe` returns only once RabbitMQ answered `bind-ok`, which is what makes a catch-up read
//! after it gapless.
//!
//! A publish returns once the broker confirmed it (publisher confirms, on a channel of its own);
//! a nack, an error or no confirm within [`PUBLISH_TIMEOUT`] is `unavailable`. The queue is
//! consumed without acks; what one read brings is decoded on the consumer's task and handed to the
//! sink, a topic's messages together ([`Bursts`]). The queue holds at most [`QUEUE_LIMIT`]
//! messages that a node has not taken (the oldest go first), so a node that stalls cannot fill
//! the broker.
//!
//! A connection with its channels, queue and consumer is a *link*. Any error on it (a channel the
//! broker closed, a failed bind or publish, the end of the consumer or of the connection) ends the
//! link, and the supervisor task makes a new one: it connects again (after 100 ms, doubling to
//! 1 s while that fails), declares the exchange and a new queue, binds every key with interest
//! again, and then asks every session to catch up from the store ([`Event::Resync`]), since what
//! was published meanwhile is only there. (lapin's own recovery is not used: it does not come back
//! reliably after a broker restart.) A health task publishes an empty, unroutable message every
//! second and waits for its confirm: a broker that does not confirm within a second makes the node
//! not ready and publishes fail at once instead of waiting; once it confirms again, sessions
//! catch up as after a new link, because a publish that timed out is not retried.
//!
//! The payload of a published message is its [`envelope`](crate::bus::envelope).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer, ExchangeKind};
use tokio::sync::{Notify, watch};

use super::{CONNECT_TIMEOUT, ENVELOPE_ROOM, Names};
use crate::backend::redact;
use crate::bus::interest::Interests;
use crate::bus::{Bursts, Bus, BusError, Event, MAX_BURST, Sink, Topic, envelope};
use crate::metrics::Metrics;

/// How long `subscribe` waits for RabbitMQ to confirm a binding.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish waits for the broker's confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the health task probes the broker, and how long it waits for an answer.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Most keys bound or unbound at once.
const BATCH: usize = 1000;
/// The first and the longest wait between attempts to connect again.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Most messages a node's queue holds before the broker drops its oldest.
const QUEUE_LIMIT: i64 = 100_000;
/// How often start-up opens a new link when the exchange vanished under the first.
const START_TRIES: usize = 5;
/// AMQP reply codes: an exchange that does not exist; a message over the broker's size limit.
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;
/// The routing key of health probes: bound by no queue (keys of topics have a `.` or are `all`).
const PROBE_KEY: &str = "probe";

/// State shared with the background tasks.
struct Shared {
    url: String,
    /// How the connection is named on the broker (the node id).
    node: String,
    names: Names,
    interests: Interests,
    sink: OnceLock<Arc<dyn Sink>>,
    /// The link in use; `None` while the supervisor makes a new one. Cloned out, never held
    /// across an `.await`.
    link: Mutex<Option<Arc<Link>>>,
    /// Set when the bus may have missed messages; cleared by the catch-up it triggers.
    lost: AtomicBool,
    metrics: Arc<Metrics>,
}

pub struct AmqpBus {
    shared: Arc<Shared>,
}

/// One connection to RabbitMQ and everything on it; useless once `broken`.
struct Link {
    /// Held for the link's life: dropping the last handle closes the connection.
    _connection: Connection,
    /// Declares, binds, and carries the consumer.
    control: Channel,
    /// In confirm mode: every publish, probes included.
    publisher: Channel,
    /// The node's queue, named by the broker.
    queue: ShortString,
    exchange: ShortString,
    /// Whether every key with interest was bound once; a new link is not ready before.
    bound: AtomicBool,
    /// Whether the broker confirmed the last health probe.
    answering: AtomicBool,
    /// Set once, when anything on the link failed.
    broken: watch::Sender<bool>,
}

/// A link just opened, with what its consumer task reads.
struct Opened {
    link: Arc<Link>,
    consumer: Consumer,
    events: futures_util::stream::BoxStream<'static, lapin::Event>,
}

/// Why a publish was not confirmed.
enum Refused {
    /// The broker answered with a nack.
    Nack,
    /// No confirm in time.
    Late,
    /// The link failed (and is now broken).
    Failed(lapin::Error),
}

impl Link {
    /// Connects, opens the channels, declares the exchange and a queue of this node's, and starts
    /// consuming it.
    async fn open(url: &str, node: &str, names: &Names) -> Result<Opened, lapin::Error> {
        let connection = super::connect(url, node).await?;
        let events = connection.events_listener().boxed();
        let opening = async {
            let control = connection.create_channel().await?;
            let publisher = connection.create_channel().await?;
            publisher.confirm_select(ConfirmSelectOptions::default()).await?;
            let exchange = ShortString::from(names.exchange());
            let options = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
            control.exchange_declare(exchange.clone(), ExchangeKind::Topic, options, FieldTable::default()).await?;
            let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
            let mut arguments = FieldTable::default();
            arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(QUEUE_LIMIT));
            let queue = control.queue_declare(ShortString::default(), options, arguments).await?;
            let queue = queue.name().clone();
            let options = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
            let consumer =
                control.basic_consume(queue.clone(), ShortString::default(), options, FieldTable::default()).await?;
            Ok::<_, lapin::Error>((control, publisher, queue, exchange, consumer))
        };
        let (control, publisher, queue, exchange, consumer) =
            tokio::time::timeout(CONNECT_TIMEOUT, opening)
                .await
                .map_err(|_| timed_out("opening the channels and queue"))??;
        let link = Arc::new(Link {
            _connection: connection,
            control,
            publisher,
            queue,
            exchange,
            bound: AtomicBool::new(false),
            answering: AtomicBool::new(true),
            broken: watch::Sender::new(false),
        });
        Ok(Opened { link, consumer, events })
    }

    /// Ends the link (once): its tasks stop and the supervisor makes a new one.
    fn fail(&self, why: &str) {
        if !self.broken.send_replace(true) {
            tracing::warn!(error = why, "rabbitmq connection lost; reconnecting");
        }
    }

    fn is_broken(&self) -> bool {
        *self.broken.borrow()
    }

    /// Waits until the link is broken.
    async fn broken(&self) {
        let _ = self.broken.subscribe().wait_for(|broken| *broken).await;
    }

    /// Whether the bus can route over this link.
    fn ready(&self) -> bool {
        !self.is_broken() && self.bound.load(Ordering::Acquire) && self.answering.load(Ordering::Acquire)
    }

    /// Publishes `payload` with `key` and waits up to `wait` for the broker's confirm. An error
    /// breaks the link: the channel is gone with it.
    async fn publish(&self, key: &str, payload: &[u8], wait: Duration) -> Result<(), Refused> {
        let confirmed = async {
            let options = BasicPublishOptions::default();
            let exchange = self.exchange.clone();
            let key = ShortString::from(key);
            self.publisher.basic_publish(exchange, key, options, payload, BasicProperties::default()).await?.await
        };
        match tokio::time::timeout(wait, confirmed).await {
            Ok(Ok(Confirmation::Ack(_))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(Refused::Nack),
            Ok(Err(e)) => {
                self.fail(&e.to_string());
                Err(Refused::Failed(e))
            }
            Err(_) => Err(Refused::Late),
        }
    }

    /// Removes the bindings of `unbind`, then adds those of `bind`, each confirmed by the broker.
    async fn apply(&self, bind: &[String], unbind: &[String]) -> Result<(), lapin::Error> {
        let (queue, exchange) = (&self.queue, &self.exchange);
        let removing = unbind.iter().map(|key| {
            self.control.queue_unbind(queue.clone(), exchange.clone(), key.as_str().into(), FieldTable::default())
        });
        futures_util::future::try_join_all(removing).await?;
        let adding = bind.iter().map(|key| {
            let options = QueueBindOptions::default();
            self.control.queue_bind(
                queue.clone(),
                exchange.clone(),
                key.as_str().into(),
                options,
                FieldTable::default(),
            )
        });
        futures_util::future::try_join_all(adding).await?;
        Ok(())
    }
}

fn timed_out(what: &str) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out")))
}

impl Shared {
    fn link(&self) -> Option<Arc<Link>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Arc<Link>>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Decodes the deliveries of one read and hands them to the sink: a topic's messages
    /// together (see [`Bursts`]), any other event after the messages before it. Answers the
    /// consumer's error, if the read ended with one.
    fn on_deliveries(&self, mut read: Vec<lapin::Result<lapin::message::Delivery>>) -> Result<(), lapin::Error> {
        let Some(sink) = self.sink.get() else {
            return read.into_iter().find_map(Result::err).map_or(Ok(()), Err);
        };
        if read.len() == 1 {
            // Alone, the common case while traffic is light: no grouping.
            if let Some((topic, event)) = self.decode(read.pop().expect("one")?) {
                sink.deliver(&topic, &event);
            }
            return Ok(());
        }
        let mut failed = None;
        let deliveries = read.into_iter().map_while(|delivery| delivery.map_err(|e| failed = Some(e)).ok());
        Bursts::deliver_read(&**sink, deliveries.filter_map(|delivery| self.decode(delivery)));
        failed.map_or(Ok(()), Err)
    }

    /// One delivery's topic and event; `None` (logged) when it is malformed.
    fn decode(&self, delivery: lapin::message::Delivery) -> Option<(Topic, Event)> {
        self.metrics.bus_received.inc();
        let event = self
            .names
            .topic(delivery.routing_key.as_str())
            .and_then(|topic| Some((topic.clone(), envelope::decode(&topic, Bytes::from(delivery.data))?)));
        if event.is_none() {
            tracing::warn!(key = delivery.routing_key.as_str(), "malformed bus message dropped");
        }
        event
    }

    /// After a link is fully bound and the broker answers: asks every session to catch up if
    /// messages may have been missed.
    fn catch_up_if_lost(&self, link: &Link) {
        if link.ready()
            && self.lost.swap(false, Ordering::AcqRel)
            && let Some(sink) = self.sink.get()
        {
            tracing::info!("rabbitmq bus back: sessions catch up from the store");
            sink.deliver(&Topic::All, &Event::Resync);
        }
    }
}

impl AmqpBus {
    /// Connects to the RabbitMQ at `url` (as node `node`), checks that it takes a message of
    /// `max_message_size` in its envelope, and starts the supervisor and health tasks.
    pub async fn connect(
        url: &str,
        names: Names,
        node: &str,
        max_message_size: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let shown = redact(url);
        let mut tries = 0;
        let opened = loop {
            let opened = Link::open(url, node, &names).await.map_err(|e| anyhow::anyhow!("--bus {shown}: {e}"))?;
            match check_size(&opened.link, max_message_size).await {
                Ok(()) => break opened,
                // The nodes that held the exchange stopped as this one declared it (a cluster
                // restarted at once): declared again, it stays while this node's queue is bound.
                Err(Refused::Failed(ref e)) if code(e) == Some(NOT_FOUND) && tries < START_TRIES => {
                    tries += 1;
                    tokio::time::sleep(RECONNECT_MIN).await;
                }
                Err(e) => anyhow::bail!("--bus {shown}: {}", size_refusal(e, max_message_size)),
            }
        };
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            node: node.to_owned(),
            names,
            interests: Interests::default(),
            sink: OnceLock::new(),
            link: Mutex::new(None),
            lost: AtomicBool::new(false),
            metrics,
        });
        tokio::spawn(supervise(Arc::downgrade(&shared), shared.interests.changed(), Some(opened)));
        tokio::spawn(watch_health(Arc::downgrade(&shared)));
        let bus = Self { shared };
        bus.subscribe(&Topic::All)
            .await
            .map_err(|e| anyhow::anyhow!("--bus {shown}: subscribing to broadcasts: {e}"))?;
        Ok(bus)
    }

    /// Connects the bus to the node's sink.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.shared.sink.set(sink);
    }
}

/// Publishes one message as large as the largest a node sends, to learn whether the broker takes
/// it: RabbitMQ's `max_message_size` may be set below its default, and no AMQP method reads it.
async fn check_size(link: &Link, max_message_size: usize) -> Result<(), Refused> {
    let size = max_message_size + ENVELOPE_ROOM;
    let wait = PUBLISH_TIMEOUT + Duration::from_secs((size >> 24) as u64);
    link.publish(PROBE_KEY, &vec![0; size], wait).await
}

/// Why the broker did not take the message of [`check_size`], for the start-up error.
fn size_refusal(refused: Refused, max_message_size: usize) -> String {
    let size = max_message_size + ENVELOPE_ROOM;
    match refused {
        Refused::Failed(e) if code(&e) == Some(PRECONDITION_FAILED) => format!(
            "RabbitMQ refused a bus message of {size} bytes, the largest that --max-message-size {max_message_size} \
             makes ({e}): raise RabbitMQ's max_message_size or lower --max-message-size"
        ),
        Refused::Failed(e) => format!("publishing a test message of {size} bytes failed: {e}"),
        Refused::Nack => "RabbitMQ did not take a test message (nack)".to_owned(),
        Refused::Late => "RabbitMQ did not confirm a test message in time".to_owned(),
    }
}

/// The AMQP reply code with which the broker closed a channel or the connection.
fn code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(error) => Some(error.get_id()),
        _ => None,
    }
}

/// Makes a link whenever there is none, and applies changes of interest to it.
async fn supervise(shared: Weak<Shared>, changed: Arc<Notify>, mut opened: Option<Opened>) {
    let mut delay = RECONNECT_MIN;
    loop {
        let Opened { link, consumer, events } = match opened.take() {
            Some(opened) => opened,
            None => {
                let Some((url, node, names)) =
                    shared.upgrade().map(|s| (s.url.clone(), s.node.clone(), s.names.clone()))
                else {
                    return;
                };
                match Link::open(&url, &node, &names).await {
                    Ok(opened) => {
                        delay = RECONNECT_MIN;
                        opened
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "connecting to rabbitmq failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RECONNECT_MAX);
                        continue;
                    }
                }
            }
        };
        {
            let Some(shared) = shared.upgrade() else { return };
            // Nothing is bound on the new queue yet: every key with interest is pending again.
            shared.interests.reset();
            shared.set_link(Some(link.clone()));
        }
        tokio::spawn(consume(shared.clone(), link.clone(), consumer, events));
        manage(&shared, &link, &changed).await;
        // Broken already, and logged where it broke, unless the bus was dropped: stop its consumer.
        let _ = link.broken.send_replace(true);
        let Some(shared) = shared.upgrade() else { return };
        shared.set_link(None);
        shared.lost.store(true, Ordering::Release);
        drop(shared);
        tokio::time::sleep(RECONNECT_MIN).await;
    }
}

/// Applies changes of interest to `link`, in order, in batches, until it breaks or the bus is
/// dropped; asks sessions to catch up once all is bound after messages may have been missed.
async fn manage(shared: &Weak<Shared>, link: &Link, changed: &Notify) {
    loop {
        let notified = changed.notified();
        if link.is_broken() {
            return;
        }
        let Some(strong) = shared.upgrade() else { return };
        let (bind, unbind) = strong.interests.pending(BATCH);
        if bind.is_empty() && unbind.is_empty() {
            if !link.bound.swap(true, Ordering::AcqRel) {
                tracing::info!("rabbitmq bus connected");
            }
            strong.catch_up_if_lost(link);
            drop(strong);
            tokio::select! {
                () = notified => {}
                () = link.broken() => return,
            }
            continue;
        }
        drop(strong);
        let applied = tokio::select! {
            applied = link.apply(&bind, &unbind) => applied,
            () = link.broken() => return,
        };
        if let Err(e) = applied {
            link.fail(&format!("binding: {e}"));
            return;
        }
        let Some(strong) = shared.upgrade() else { return };
        strong.interests.confirm(&unbind, false);
        strong.interests.confirm(&bind, true);
    }
}

/// Reads the link's queue until the link breaks; breaks it when the consumer or the connection
/// fails.
async fn consume(
    shared: Weak<Shared>,
    link: Arc<Link>,
    consumer: Consumer,
    mut events: futures_util::stream::BoxStream<'static, lapin::Event>,
) {
    let mut reads = consumer.ready_chunks(MAX_BURST);
    let why = loop {
        tokio::select! {
            read = reads.next() => {
                let Some(read) = read else { break "the consumer ended".to_owned() };
                let Some(shared) = shared.upgrade() else { return };
                if let Err(e) = shared.on_deliveries(read) {
                    break format!("consumer: {e}");
                }
            }
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) => break format!("connection: {e}"),
                Some(_) => {}
                None => break "the connection ended".to_owned(),
            },
            () = link.broken() => return,
        }
    };
    link.fail(&why);
}

/// Probes the broker every second through the link in use: readiness follows its answers, an
/// error breaks the link, and once it answers after a silence, sessions catch up.
async fn watch_health(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(link) = shared.upgrade().map(|shared| shared.link()) else { return };
        let Some(link) = link else { continue };
        let answered = link.publish(PROBE_KEY, &[], HEALTH_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        match answered {
            Ok(()) => {
                if !link.answering.swap(true, Ordering::AcqRel) {
                    tracing::info!("rabbitmq answers again: ready");
                    shared.interests.changed().notify_one();
                }
            }
            Err(Refused::Late | Refused::Nack) => {
                shared.lost.store(true, Ordering::Release);
                if link.answering.swap(false, Ordering::AcqRel) {
                    tracing::warn!("rabbitmq is not answering: not ready");
                }
            }
            // The link is broken: the supervisor makes a new one.
            Err(Refused::Failed(_)) => {}
        }
    }
}

fn unavailable(why: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("rabbitmq: {why}"))
}

impl Drop for AmqpBus {
    /// Ends the link, so that every task of the bus sees it is gone and ends, and the connection
    /// closes.
    fn drop(&mut self) {
        if let Some(link) = self.shared.link() {
            let _ = link.broken.send_replace(true);
        }
        self.shared.interests.changed().notify_one();
    }
}

#[async_trait]
impl Bus for AmqpBus {
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError> {
        let key = self.shared.names.routing_key(topic);
        self.shared.interests.add(key, SUBSCRIBE_TIMEOUT, "rabbitmq").await
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.remove(&self.shared.names.routing_key(topic));
        Ok(())
    }

    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        let Some(payload) = envelope::encode(&event) else { return Ok(()) };
        let link = match self.shared.link() {
            Some(link) if !link.is_broken() && link.answering.load(Ordering::Acquire) => link,
            Some(_) => return Err(unavailable("the broker is not answering")),
            None => return Err(unavailable("not connected; reconnecting")),
        };
        let key = self.shared.names.routing_key(&topic);
        match link.publish(&key, &payload, PUBLISH_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(Refused::Nack) => Err(unavailable("the broker did not take the message (nack)")),
            Err(Refused::Late) => Err(unavailable("the broker did not confirm the message in time")),
            Err(Refused::Failed(e)) => Err(unavailable(e)),
        }
    }

    async fn ready(&self) -> bool {
        self.shared.link().is_some_and(|link| link.ready())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::amqp::RABBITMQ_MAX_MESSAGE;
    use crate::bus::Notice;
    use crate::protocol::UserId;
    use crate::testing::{absent, amqp_url, unique_prefix};

    /// Records the frames and the catch-ups it is handed.
    #[derive(Default)]
    struct Seen {
        frames: Mutex<Vec<Bytes>>,
        resyncs: std::sync::atomic::AtomicUsize,
    }

    impl Sink for Seen {
        fn deliver(&self, _: &Topic, event: &Event) {
            match event {
                Event::Frames(notices) => self.frames.lock().unwrap().extend(notices.iter().map(|n| n.frame.clone())),
                Event::Resync => {
                    self.resyncs.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exchange deleted under a live bus (by an operator, or by the last node of a cluster
    /// leaving): the next probe fails, and the supervisor makes a new link that declares it and
    /// binds every key with interest again, then asks sessions to catch up.
    #[tokio::test]
    async fn a_bus_whose_exchange_vanished_declares_it_again_and_catches_up() {
        let (url, prefix) = (amqp_url(), unique_prefix());
        let bus = match AmqpBus::connect(&url, Names::new(&prefix), "vanish", 65_536, Arc::new(Metrics::new())).await {
            Ok(bus) => bus,
            Err(e) => {
                return absent("rabbitmq bus", &format!("no RabbitMQ at {}: {e:#}", redact(&url))).unwrap_or_default();
            }
        };
        let seen = Arc::new(Seen::default());
        bus.attach(seen.clone());
        let alice = Topic::User(UserId::parse("alice").unwrap());
        bus.subscribe(&alice).await.unwrap();
        assert!(bus.ready().await);

        let operator = crate::backend::amqp::connect(&url, "operator").await.unwrap();
        let channel = operator.create_channel().await.unwrap();
        let exchange = ShortString::from(Names::new(&prefix).exchange());
        channel.exchange_delete(exchange, lapin::options::ExchangeDeleteOptions::default()).await.unwrap();
        eventually("the bus caught up after its new link", || seen.resyncs.load(Ordering::SeqCst) == 1).await;
        assert!(bus.ready().await);
        let frame = Bytes::from_static(b"after");
        bus.publish(alice.clone(), Event::Frames(vec![Notice { frame: frame.clone(), exclude: None }])).await.unwrap();
        eventually("alice's key is bound again", || seen.frames.lock().unwrap().contains(&frame)).await;
    }

    /// RabbitMQ's own limit, read by publishing: one byte over it is refused at start-up with a
    /// message naming both limits (start-up checks keep `--max-message-size` below it, so this is
    /// the case of a broker whose limit was set lower).
    #[tokio::test]
    async fn a_broker_that_refuses_the_largest_message_refuses_the_start() {
        let (url, prefix) = (amqp_url(), unique_prefix());
        let metrics = || Arc::new(Metrics::new());
        // A node of the cluster that holds the exchange (auto-delete) until the test ends.
        let _holder = match AmqpBus::connect(&url, Names::new(&prefix), "holder", 65_536, metrics()).await {
            Ok(bus) => bus,
            Err(e) => {
                return absent("rabbitmq size check", &format!("no RabbitMQ at {}: {e:#}", redact(&url)))
                    .unwrap_or_default();
            }
        };
        let over = RABBITMQ_MAX_MESSAGE - ENVELOPE_ROOM + 1;
        let e = AmqpBus::connect(&url, Names::new(&prefix), "probe", over, metrics()).await.err().expect("refused");
        let e = e.to_string();
        assert!(e.contains("RabbitMQ refused a bus message of 134217729 bytes"), "{e}");
        assert!(e.contains("raise RabbitMQ's max_message_size or lower --max-message-size"), "{e}");
        assert!(!e.contains("guest:guest"), "credentials printed: {e}");
    }
}
