//! The cluster bus on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`, Redis 7), so
//! that a message is published on the master that stored it and reaches only nodes with
//! recipients (channel names carry their stream's hash tag, see `keys.rs`).
//!
//! The contract is [`RedisBus`](super::RedisBus)'s: interest counted per session, `subscribe`
//! returns once Redis confirmed, changes applied in order by one task, messages decoded on the
//! subscriber connection's task and handed straight to the sink. What changes is where a channel
//! lives: each master serves some slots, and a channel is subscribed on the master of its slot.
//! This bus keeps one subscriber connection per master (never one per channel), a slot map from
//! `CLUSTER SLOTS`, and where each subscribed channel is subscribed. The subscription task groups
//! pending changes by master and, within a master, by slot (Redis refuses one `SSUBSCRIBE` across
//! slots), and writes each master's commands in one write; each slot's command is confirmed on
//! its own.
//!
//! The slots move: a `-MOVED` answer, a `sunsubscribe` Redis sends when a channel's slot moved
//! away, a master connection that drops (a failover), or a `CLUSTER SLOTS` that changed (read
//! every second by the health task) make the channels concerned pending again; the slot map is
//! read again and they are subscribed where they live now. Messages published meanwhile are only
//! in the streams, so once the bus is ready again with every channel subscribed, the sink gets
//! one [`Event::Resync`].
//!
//! Ready means: every slot has a master, and every master's subscriber connection answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::{ConnectionAddr, ConnectionInfo, Script};
use tokio::sync::Notify;

use super::RESPONSE_TIMEOUT;
use super::conn::{Conn, SlotRange, covers_every_slot, slot};
use super::subscriber::{Batch, Published, Receiver, Subscriber};
use crate::backend::redis::RedisClock;
use crate::backend::redis::keys::Keys;
use crate::bus::interest::Interests;
use crate::bus::{Bus, BusError, Event, Sink, Topic};
use crate::metrics::Metrics;

#[cfg(test)]
mod tests;

/// How long `subscribe` waits for Redis to confirm (a failover takes a few seconds longer; a
/// session that subscribes meanwhile is answered `unavailable` and retries).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the health task reads `CLUSTER SLOTS` and pings every master.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Most channels subscribed and unsubscribed in one round of the subscription task.
const BATCH: usize = 1000;
/// The first and the longest wait before trying again what failed (reading the slot map,
/// connecting to a master, a refused command).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// KEYS: the channel (so that the cluster connection sends it to the channel's master). ARGV:
/// payload, deadline (ms, see [`crate::backend::redis::WRITE_DEADLINE`]). Publishes, or
/// answers -1 and publishes nothing when Redis runs it after the deadline.
const PUBLISH: &str = r"
local t = redis.call('TIME')
if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[2]) then return -1 end
return redis.call('SPUBLISH', KEYS[1], ARGV[1])
";

/// A master's address, as `CLUSTER SLOTS` names it.
type Addr = (String, u16);

/// A subscriber connection to one master. The id tells a connection from the one that replaced
/// it at the same address.
struct Link {
    id: u64,
    subscriber: Subscriber,
}

/// Where the bus's channels live. Locked briefly, never across an `.await`; taken before the
/// lock of [`Interests`] when both are needed, so that a channel confirmed as subscribed is
/// always recorded on a live link (and reset when that link goes).
#[derive(Default)]
struct Topology {
    /// `CLUSTER SLOTS` as last read, by first slot.
    ranges: Vec<SlotRange>,
    /// The subscriber connection of each master that has one.
    links: HashMap<Addr, Link>,
    /// Each subscribed channel's link id.
    placed: HashMap<String, u64>,
    next_id: u64,
}

impl Topology {
    /// The link with `id` and its address.
    fn link(&self, id: u64) -> Option<(&Addr, &Link)> {
        self.links.iter().find(|(_, link)| link.id == id)
    }

    /// Forgets where the channels of link `id` are subscribed (they are not, any more), and
    /// answers them.
    fn unplace_link(&mut self, id: u64) -> Vec<String> {
        let mut gone = Vec::new();
        self.placed.retain(|channel, link| {
            let keep = *link != id;
            if !keep {
                gone.push(channel.clone());
            }
            keep
        });
        gone
    }
}

/// State shared with the connections' callbacks and the background tasks.
struct Shared {
    keys: Keys,
    interests: Interests,
    sink: OnceLock<Arc<dyn Sink>>,
    ready: AtomicBool,
    /// Set when a subscription was lost and messages may have been missed; cleared by the
    /// [`Event::Resync`] it triggers once every wanted channel is subscribed again.
    lost: AtomicBool,
    /// Set when the slot map may be out of date: the subscription task reads it again first.
    stale: AtomicBool,
    topology: Mutex<Topology>,
    /// The seed's settings (credentials), for connections to the masters.
    seed: ConnectionInfo,
    metrics: Arc<Metrics>,
}

/// The bus on a Redis Cluster.
pub struct RedisShardedBus {
    shared: Arc<Shared>,
    conn: Conn,
    clock: Arc<RedisClock>,
    publish: Script,
}

impl Shared {
    fn topology(&self) -> MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes the messages of one read and delivers them locally, a topic's together.
    fn on_messages(&self, read: &[Published]) {
        if let Some(sink) = self.sink.get() {
            super::bus::deliver_read(&**sink, &self.keys, &self.metrics, read);
        }
    }

    /// Link `id` ended: its channels are pending again, and the slot map is read again (its
    /// master may have failed over).
    fn on_closed(&self, id: u64) {
        let mut topology = self.topology();
        let Some(addr) = topology.link(id).map(|(addr, _)| addr.clone()) else { return };
        topology.links.remove(&addr);
        let gone = topology.unplace_link(id);
        self.interests.reset_names(&gone);
        drop(topology);
        self.lost.store(true, Ordering::Release);
        self.stale.store(true, Ordering::Release);
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::warn!(master = %format_addr(&addr), "redis cluster pub/sub connection lost; not ready");
        }
        self.interests.changed().notify_one();
    }

    /// Redis said link `id` no longer has `channel`: the answer to our `SUNSUBSCRIBE` (the
    /// channel is no longer recorded there by then) or a slot that moved away.
    fn on_unsubscribed(&self, id: u64, channel: &[u8]) {
        let Ok(channel) = std::str::from_utf8(channel) else { return };
        let mut topology = self.topology();
        if topology.placed.get(channel) != Some(&id) {
            return;
        }
        topology.placed.remove(channel);
        self.interests.reset_names([channel]);
        drop(topology);
        tracing::debug!(channel, "redis moved a subscribed channel away");
        self.lost.store(true, Ordering::Release);
        self.stale.store(true, Ordering::Release);
        self.interests.changed().notify_one();
    }

    /// The subscriber connection to `addr`, connecting when there is none.
    async fn link(self: &Arc<Self>, addr: &Addr) -> std::io::Result<(u64, Subscriber)> {
        if let Some(link) = self.topology().links.get(addr) {
            return Ok((link.id, link.subscriber.clone()));
        }
        let id = {
            let mut topology = self.topology();
            topology.next_id += 1;
            topology.next_id
        };
        let info = self.seed.clone().set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1));
        let incoming: Arc<dyn Receiver> = Arc::new(Incoming { shared: Arc::downgrade(self), id });
        let subscriber = Subscriber::connect(&info, RESPONSE_TIMEOUT, incoming).await?;
        let mut topology = self.topology();
        // Another task may have connected meanwhile: keep one link per master.
        let link = topology.links.entry(addr.clone()).or_insert(Link { id, subscriber });
        Ok((link.id, link.subscriber.clone()))
    }

    /// Reads `CLUSTER SLOTS` again. When the map changed, every channel no longer subscribed on
    /// its slot's master is pending again, and links to nodes that are no longer masters are
    /// dropped.
    async fn refresh(&self, conn: &mut Conn) -> Result<(), String> {
        let ranges = match tokio::time::timeout(RESPONSE_TIMEOUT, conn.slots()).await {
            Ok(Ok(ranges)) => ranges,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("CLUSTER SLOTS timed out".into()),
        };
        let mut ranges: Vec<SlotRange> = ranges.into_iter().filter(|r| r.master.is_some()).collect();
        if ranges.is_empty() {
            return Err("CLUSTER SLOTS named no master".into());
        }
        ranges.sort_by_key(|r| r.first);
        let mut topology = self.topology();
        if topology.ranges == ranges {
            return Ok(());
        }
        let first = topology.ranges.is_empty();
        let Topology { ranges: known, links, placed, .. } = &mut *topology;
        *known = ranges;
        links.retain(|addr, _| known.iter().any(|r| r.master.as_ref() == Some(addr)));
        let mut moved = Vec::new();
        placed.retain(|channel, id| {
            let owner = master_of(known, slot(channel.as_bytes())).and_then(|addr| links.get(addr));
            let here = owner.is_some_and(|link| link.id == *id);
            if !here {
                moved.push(channel.clone());
            }
            here
        });
        self.interests.reset_names(&moved);
        drop(topology);
        if !moved.is_empty() {
            self.lost.store(true, Ordering::Release);
            tracing::warn!(channels = moved.len(), "redis cluster slots moved: subscribing again where they are now");
        } else if !first {
            tracing::info!("redis cluster slot map changed");
        }
        Ok(())
    }

    /// Whether every slot has a master and every master's subscriber connection answers a PING
    /// (connecting to masters that have none yet).
    async fn check(self: &Arc<Self>, conn: &mut Conn) -> bool {
        if let Err(e) = self.refresh(conn).await {
            tracing::debug!(error = %e, "reading the redis cluster slots failed");
            return false;
        }
        let masters: Vec<Addr> = {
            let topology = self.topology();
            if !covers_every_slot(&topology.ranges) {
                return false;
            }
            let mut masters: Vec<Addr> = topology.ranges.iter().filter_map(|r| r.master.clone()).collect();
            masters.sort();
            masters.dedup();
            masters
        };
        let pings = masters.iter().map(|addr| async move {
            let (_, subscriber) = self.link(addr).await?;
            subscriber.ping().await
        });
        let answers = tokio::time::timeout(HEALTH_EVERY, futures_util::future::join_all(pings)).await;
        matches!(answers, Ok(answers) if answers.iter().all(Result::is_ok))
    }

    /// Records the outcome of a health check.
    fn set_ready(&self, ok: bool) {
        if !ok {
            if self.ready.swap(false, Ordering::AcqRel) {
                tracing::warn!("redis cluster: a slot has no master or a master does not answer; not ready");
            }
            return;
        }
        if !self.ready.swap(true, Ordering::AcqRel) {
            tracing::info!("redis cluster answers again: ready");
        }
        self.resync_if_recovered();
    }

    /// After a lost subscription, once the bus is ready and every wanted channel is subscribed
    /// again, asks every session to catch up from the store: what was published meanwhile is
    /// only there.
    fn resync_if_recovered(&self) {
        if self.ready.load(Ordering::Acquire)
            && self.lost.load(Ordering::Acquire)
            && self.interests.settled()
            && self.lost.swap(false, Ordering::AcqRel)
            && let Some(sink) = self.sink.get()
        {
            self.metrics.bus_resyncs.inc();
            sink.deliver(&Topic::All, &Event::Resync);
        }
    }
}

/// The master that serves `slot` in `ranges` (sorted by first slot).
fn master_of(ranges: &[SlotRange], slot: u16) -> Option<&Addr> {
    let at = ranges.partition_point(|r| r.last < slot);
    ranges.get(at).filter(|r| r.first <= slot).and_then(|r| r.master.as_ref())
}

/// Where each channel of the bus's traffic goes, for one link.
struct Incoming {
    shared: Weak<Shared>,
    id: u64,
}

impl Receiver for Incoming {
    fn messages(&self, read: &[Published]) {
        if let Some(shared) = self.shared.upgrade() {
            shared.on_messages(read);
        }
    }

    fn closed(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.on_closed(self.id);
        }
    }

    fn unsubscribed(&self, channel: &[u8]) {
        if let Some(shared) = self.shared.upgrade() {
            shared.on_unsubscribed(self.id, channel);
        }
    }
}

fn format_addr(addr: &Addr) -> String {
    format!("{}:{}", addr.0, addr.1)
}

impl RedisShardedBus {
    /// Reads the slot map, connects a subscriber to every master, starts the subscription and
    /// health tasks and subscribes to broadcasts. `seeds` give the credentials for the masters'
    /// connections; `conn` (shared with the store) publishes and reads `CLUSTER SLOTS`; `clock`
    /// is sampled every second besides.
    pub async fn connect(
        seeds: Vec<ConnectionInfo>,
        conn: Conn,
        clock: Arc<RedisClock>,
        keys: Keys,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(conn.clustered(), "the sharded bus needs a Redis Cluster");
        let seed = seeds.into_iter().next().ok_or_else(|| anyhow::anyhow!("no Redis Cluster node to start from"))?;
        // The masters' addresses come from CLUSTER SLOTS; the seed gives them its way in.
        anyhow::ensure!(
            matches!(seed.addr(), ConnectionAddr::Tcp(..)),
            "the Redis Cluster bus connects to the masters over plain TCP only (no TLS, no socket)"
        );
        let shared = Arc::new(Shared {
            keys,
            interests: Interests::default(),
            sink: OnceLock::new(),
            ready: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            topology: Mutex::new(Topology::default()),
            seed,
            metrics,
        });
        let mut reader = conn.clone();
        shared.refresh(&mut reader).await.map_err(|e| anyhow::anyhow!("reading the Redis Cluster's slots: {e}"))?;
        let ok = shared.check(&mut reader).await;
        shared.ready.store(ok, Ordering::Release);
        let changed = shared.interests.changed();
        tokio::spawn(manage_subscriptions(Arc::downgrade(&shared), changed, reader.clone()));
        tokio::spawn(watch_health(Arc::downgrade(&shared), reader, clock.clone()));
        let bus = Self { shared, conn, clock, publish: Script::new(PUBLISH) };
        bus.subscribe(&Topic::All).await.map_err(|e| anyhow::anyhow!("subscribing to broadcasts: {e}"))?;
        Ok(bus)
    }

    /// Connects the bus to the node's sink.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.shared.sink.set(sink);
    }
}

/// What one master is sent in a round, by slot.
#[derive(Default)]
struct Plan {
    subscribe: BTreeMap<u16, Vec<String>>,
    unsubscribe: BTreeMap<u16, Vec<String>>,
}

/// How a round of the subscription task went.
enum Round {
    /// Nothing to do.
    Idle,
    Done,
    /// Something is left to try again after a pause.
    Failed(Failure),
}

/// Why something is left to try again.
#[derive(PartialEq)]
enum Failure {
    /// A slot moved (a `MOVED` answer, a slot map that changed meanwhile): expected while slots
    /// migrate, and not worth a warning.
    Moved,
    Error(String),
}

/// Applies changes of interest in rounds: reads the slot map when it may be out of date, then
/// writes each master its commands at once, every master at the same time.
async fn manage_subscriptions(shared: Weak<Shared>, changed: Arc<Notify>, mut conn: Conn) {
    let mut delay = RETRY_MIN;
    let mut last_failure: Option<Failure> = None;
    loop {
        let notified = changed.notified();
        let Some(strong) = shared.upgrade() else { return };
        let round = apply_pending(&strong, &mut conn).await;
        drop(strong);
        match round {
            Round::Idle => notified.await,
            Round::Done => {
                delay = RETRY_MIN;
                last_failure = None;
            }
            Round::Failed(failure) => {
                // Once per kind of failure, not per retry: a failover fails every round for
                // seconds, and the health task already says the bus is not ready.
                if let Failure::Error(why) = &failure
                    && last_failure.as_ref() != Some(&failure)
                {
                    tracing::warn!(error = %why, "redis cluster subscription change failed; retrying");
                }
                last_failure = Some(failure);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// One round of [`manage_subscriptions`].
async fn apply_pending(shared: &Arc<Shared>, conn: &mut Conn) -> Round {
    if shared.stale.swap(false, Ordering::AcqRel)
        && let Err(e) = shared.refresh(conn).await
    {
        shared.stale.store(true, Ordering::Release);
        return Round::Failed(Failure::Error(format!("reading the slot map: {e}")));
    }
    let (subscribe, unsubscribe) = shared.interests.pending(BATCH);
    if subscribe.is_empty() && unsubscribe.is_empty() {
        return Round::Idle;
    }
    let mut plans: BTreeMap<Addr, Plan> = BTreeMap::new();
    let mut gone = Vec::new();
    let mut homeless = false;
    {
        let mut topology = shared.topology();
        for channel in unsubscribe {
            // No longer recorded as subscribed from here on, so that Redis's answer is not
            // taken for a slot that moved.
            let at = topology.placed.remove(&channel).and_then(|id| topology.link(id)).map(|(addr, _)| addr.clone());
            match at {
                Some(addr) => plans
                    .entry(addr)
                    .or_default()
                    .unsubscribe
                    .entry(slot(channel.as_bytes()))
                    .or_default()
                    .push(channel),
                // Its connection is gone, and the subscription with it.
                None => gone.push(channel),
            }
        }
        for channel in subscribe {
            let slot = slot(channel.as_bytes());
            match master_of(&topology.ranges, slot) {
                Some(addr) => plans.entry(addr.clone()).or_default().subscribe.entry(slot).or_default().push(channel),
                None => homeless = true,
            }
        }
    }
    shared.interests.confirm(&gone, false);
    let rounds = plans.into_iter().map(|(addr, plan)| send_plan(shared, addr, plan));
    let mut failures: Vec<Failure> = futures_util::future::join_all(rounds).await.into_iter().flatten().collect();
    // An error is worth telling; a moved slot only worth retrying.
    failures.sort_by_key(|failure| *failure == Failure::Moved);
    shared.resync_if_recovered();
    if homeless {
        shared.stale.store(true, Ordering::Release);
        return Round::Failed(Failure::Error("a slot has no master".into()));
    }
    match failures.into_iter().next() {
        Some(why) => Round::Failed(why),
        None => Round::Done,
    }
}

/// Sends one master its plan in one write and records the outcome of each slot's command;
/// answers the first failure.
async fn send_plan(shared: &Arc<Shared>, addr: Addr, plan: Plan) -> Option<Failure> {
    let unsubscribed: Vec<String> = plan.unsubscribe.values().flatten().cloned().collect();
    let (id, subscriber) = match shared.link(&addr).await {
        Ok(link) => link,
        Err(e) => {
            // Its channels stay pending; the unsubscribed ones went with the old connection.
            shared.interests.confirm(&unsubscribed, false);
            shared.stale.store(true, Ordering::Release);
            return Some(Failure::Error(format!("connecting to {}: {e}", format_addr(&addr))));
        }
    };
    let mut batch = Batch::default();
    for channels in plan.unsubscribe.values() {
        batch.sunsubscribe(channels);
    }
    let subscribes: Vec<(usize, u16, Vec<String>)> =
        plan.subscribe.into_iter().map(|(slot, channels)| (batch.ssubscribe(&channels), slot, channels)).collect();
    let outcomes = subscriber.send_batch(batch).await;
    // Answered or not, Redis has them no longer or soon not: an error means the slot moved
    // away, which dropped them, or the connection is gone.
    shared.interests.confirm(&unsubscribed, false);
    let mut failure = None;
    for (at, slot, channels) in subscribes {
        match &outcomes[at] {
            Ok(()) => {
                let mut topology = shared.topology();
                let live = topology.links.get(&addr).is_some_and(|link| link.id == id);
                if live && master_of(&topology.ranges, slot) == Some(&addr) {
                    for channel in &channels {
                        topology.placed.insert(channel.clone(), id);
                    }
                    shared.interests.confirm(&channels, true);
                } else {
                    // The connection dropped or the slot moved meanwhile: subscribe again.
                    shared.stale.store(true, Ordering::Release);
                    failure.get_or_insert(Failure::Moved);
                }
            }
            Err(e) => {
                if e.to_string().starts_with("redis: MOVED ") {
                    tracing::debug!(slot, error = %e, "redis moved a slot: reading the slot map again");
                    shared.stale.store(true, Ordering::Release);
                    failure.get_or_insert(Failure::Moved);
                } else {
                    failure.get_or_insert_with(|| Failure::Error(format!("{}: {e}", format_addr(&addr))));
                }
            }
        }
    }
    failure
}

/// Reads the slot map and pings every master every second; flips readiness and, after a lost
/// subscription, asks sessions to catch up. Samples the clock too, as the bus on one Redis does,
/// so that publish deadlines follow the cluster's clock closely.
async fn watch_health(shared: Weak<Shared>, mut conn: Conn, clock: Arc<RedisClock>) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(strong) = shared.upgrade() else { return };
        let ok = strong.check(&mut conn).await;
        strong.set_ready(ok);
        drop(strong);
        if ok && let Ok(Err(e)) = tokio::time::timeout(HEALTH_EVERY, clock.sample(&mut conn)).await {
            tracing::debug!(error = %e, "sampling the redis cluster clock failed");
        }
    }
}

impl Drop for RedisShardedBus {
    /// Wakes the subscription task so that it sees the bus is gone and ends.
    fn drop(&mut self) {
        self.shared.interests.changed().notify_one();
    }
}

#[async_trait]
impl Bus for RedisShardedBus {
    async fn subscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.add(self.shared.keys.channel(topic), SUBSCRIBE_TIMEOUT, "redis cluster").await
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<(), BusError> {
        self.shared.interests.remove(&self.shared.keys.channel(topic));
        Ok(())
    }

    async fn publish(&self, topic: Topic, event: Event) -> Result<(), BusError> {
        let channel = self.shared.keys.channel(&topic);
        let (conn, clock) = (&mut self.conn.clone(), &self.clock);
        super::bus::publish_by_script(conn, &self.publish, true, channel, &event, clock, "redis cluster").await
    }

    async fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }
}
