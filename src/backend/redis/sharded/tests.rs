//! The sharded bus against real Redis Clusters. The one `scripts/redis-cluster.sh start` runs
//! (`SWITCHYARD_TEST_REDIS_CLUSTER`, ports 7000-7005) serves the tests that leave its topology
//! alone; a test that moves a slot or kills a master starts a cluster of its own with the same
//! script (ports 7100-7105, 7110-7115 and 7120-7125) and stops it at the end. Without a cluster (or
//! `redis-server`) the tests are skipped with a printed reason, except under `CI=true`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

use redis::{IntoConnectionInfo, Value};

use super::*;
use crate::backend::redis::conn;
use crate::bus::tests::{Recorder, event, room_topic, user_topic};
use crate::testing::{absent, redis_cluster_url, unique_prefix};

/// Longest wait for something that should happen soon.
const WAIT: Duration = Duration::from_secs(10);
/// Longest wait for a failover (cluster-node-timeout is 2 s in `redis-cluster.sh`).
const FAILOVER: Duration = Duration::from_secs(30);

/// A sink that records events as the bus suite's [`Recorder`] does, and counts resyncs.
#[derive(Default)]
struct Seen {
    events: Recorder,
    resyncs: AtomicUsize,
}

impl Sink for Seen {
    fn deliver(&self, topic: &Topic, event: &Event) {
        if matches!(event, Event::Resync) {
            self.resyncs.fetch_add(1, Ordering::SeqCst);
        }
        self.events.deliver(topic, event);
    }
}

/// One node's bus on a cluster, and a connection of the test's own to look at the cluster.
struct Node {
    bus: RedisShardedBus,
    seen: Arc<Seen>,
    conn: Conn,
    keys: Keys,
    prefix: String,
}

impl Node {
    async fn open(url: &str, test: &str) -> Option<Self> {
        let conn = match tokio::time::timeout(Duration::from_secs(5), Conn::cluster(url)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return absent(test, &format!("no Redis Cluster at {url}: {e:#}")),
            Err(_) => return absent(test, &format!("no Redis Cluster at {url}: timed out")),
        };
        let seeds = conn::seeds(url).unwrap().iter().map(|s| s.as_str().into_connection_info().unwrap()).collect();
        let prefix = unique_prefix();
        let keys = Keys::cluster(&prefix);
        let clock = Arc::new(RedisClock::default());
        let metrics = Arc::new(Metrics::new());
        let bus = RedisShardedBus::connect(seeds, conn.clone(), clock, keys.clone(), metrics).await.unwrap();
        let seen = Arc::new(Seen::default());
        bus.attach(seen.clone());
        Some(Self { bus, seen, conn, keys, prefix })
    }

    /// The masters, by `CLUSTER SLOTS`.
    async fn masters(&self) -> Vec<Addr> {
        let mut masters: Vec<Addr> =
            self.conn.clone().slots().await.unwrap().into_iter().filter_map(|r| r.master).collect();
        masters.sort();
        masters.dedup();
        masters
    }

    /// The master that serves `channel`'s slot now.
    async fn owner(&self, channel: &str) -> Addr {
        master_of(&self.ranges().await, slot(channel.as_bytes())).unwrap().clone()
    }

    /// This test's channels that `master` has subscribers for.
    async fn channels_on(&self, master: &Addr) -> Vec<String> {
        let cmd = redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg(format!("{}:*", self.prefix)).to_owned();
        let value = self.conn.clone().on_node(master, cmd).await.unwrap();
        let mut channels: Vec<String> = redis::from_redis_value(value).unwrap();
        channels.sort();
        channels
    }

    /// Each node's answer to a command sent to `master`.
    async fn on(&self, master: &Addr, cmd: redis::Cmd) -> Value {
        self.conn.clone().on_node(master, cmd).await.unwrap()
    }

    /// Moves `slot` (holding no keys) from master `from` to master `to`, as `redis-cli
    /// --cluster reshard` does, and tells every master.
    async fn migrate(&self, slot: u16, from: &Addr, to: &Addr) {
        let id = |value| redis::from_redis_value::<String>(value).unwrap();
        let from_id = id(self.on(from, redis::cmd("CLUSTER").arg("MYID").to_owned()).await);
        let to_id = id(self.on(to, redis::cmd("CLUSTER").arg("MYID").to_owned()).await);
        let setslot =
            |state: &str, id: &str| redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg(state).arg(id).to_owned();
        self.on(to, setslot("IMPORTING", &from_id)).await;
        self.on(from, setslot("MIGRATING", &to_id)).await;
        let others: Vec<Addr> = self.masters().await.into_iter().filter(|m| m != from && m != to).collect();
        for master in [to, from].into_iter().chain(&others) {
            self.on(master, setslot("NODE", &to_id)).await;
        }
        assert_eq!(master_of(&self.ranges().await, slot), Some(to));
    }

    /// `CLUSTER SLOTS` now, by first slot.
    async fn ranges(&self) -> Vec<SlotRange> {
        let mut ranges = self.conn.clone().slots().await.unwrap();
        ranges.sort_by_key(|r| r.first);
        ranges
    }

    /// Publishes `label` to each topic, retrying for a while what the cluster refuses (a
    /// failover moves slots under the command connection too).
    async fn publish_all(&self, topics: &[Topic], label: &str) {
        for topic in topics {
            let deadline = tokio::time::Instant::now() + WAIT;
            while let Err(e) = self.bus.publish(topic.clone(), event(label)).await {
                assert!(tokio::time::Instant::now() < deadline, "publishing to {topic:?}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Whether every topic received `label` exactly once.
    fn each_once(&self, topics: &[Topic], label: &str) -> bool {
        topics.iter().all(|topic| self.seen.events.labels(topic).iter().filter(|l| *l == label).count() == 1)
    }

    fn channels(&self, topics: &[Topic]) -> Vec<String> {
        let mut channels: Vec<String> = topics.iter().map(|t| self.keys.channel(t)).collect();
        channels.sort();
        channels
    }
}

/// Checks `check` every 50 ms until it holds or `within` passed; answers whether it held.
async fn eventually<F: Future<Output = bool>>(within: Duration, mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` user topics and `n` room topics.
fn topics(n: usize) -> Vec<Topic> {
    (0..n).flat_map(|i| [user_topic(&format!("u{i}")), room_topic(&format!("r{i}"))]).collect()
}

async fn subscribe_all(bus: &RedisShardedBus, topics: &[Topic]) {
    let subscribing = topics.iter().map(|topic| bus.subscribe(topic));
    for result in futures_util::future::join_all(subscribing).await {
        result.unwrap();
    }
}

/// Where each channel is subscribed, checked from the cluster's side: every master has exactly
/// the test's channels of its slots (`all` included), and each channel one subscriber.
async fn assert_placed(node: &Node, topics: &[Topic]) {
    let mut expected: BTreeMap<Addr, Vec<String>> = BTreeMap::new();
    for channel in node.channels(topics).into_iter().chain([node.keys.channel(&Topic::All)]) {
        expected.entry(node.owner(&channel).await).or_default().push(channel);
    }
    let masters = node.masters().await;
    assert!(expected.keys().all(|m| masters.contains(m)));
    for master in &masters {
        let mut want = expected.get(master).cloned().unwrap_or_default();
        want.sort();
        let placed = eventually(WAIT, || async { node.channels_on(master).await == want }).await;
        assert!(placed, "{master:?} has {:?}, not its own {want:?}", node.channels_on(master).await);
        if want.is_empty() {
            continue;
        }
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("SHARDNUMSUB").arg(&want);
        let counts: Vec<(String, i64)> = match node.on(master, cmd).await {
            Value::Array(items) => items
                .chunks(2)
                .map(|pair| {
                    (
                        redis::from_redis_value(pair[0].clone()).unwrap(),
                        redis::from_redis_value(pair[1].clone()).unwrap(),
                    )
                })
                .collect(),
            other => panic!("SHARDNUMSUB answered {other:?}"),
        };
        assert!(counts.iter().all(|(_, n)| *n == 1), "one subscription each: {counts:?}");
    }
}

/// The `ssub=` count of every pub/sub connection `master` has, in `CLIENT LIST` (own clusters
/// only: there, every subscriber is the test's bus).
async fn sharded_subscribers(node: &Node, master: &Addr) -> Vec<usize> {
    let cmd = redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").to_owned();
    let list: String = redis::from_redis_value(node.on(master, cmd).await).unwrap();
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("ssub=")).and_then(|n| n.parse().ok()))
        .filter(|&n| n > 0)
        .collect()
}

/// Exactly one pub/sub connection per master, holding that master's channels.
async fn assert_one_connection_per_master(node: &Node) {
    for master in node.masters().await {
        let mine = node.channels_on(&master).await.len();
        let ok = eventually(WAIT, || async { sharded_subscribers(node, &master).await == [mine] }).await;
        assert!(ok, "{master:?}: subscribers {:?}, {mine} channels", sharded_subscribers(node, &master).await);
    }
}

/// A Redis Cluster of the test's own (3 masters, 3 replicas), stopped when dropped.
struct OwnCluster {
    base: u16,
    dir: PathBuf,
    url: String,
}

impl OwnCluster {
    fn script(base: u16, dir: &PathBuf, action: &str) -> std::io::Result<std::process::Output> {
        std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh"))
            .arg(action)
            .env("BASE", base.to_string())
            .env("DIR", dir)
            .output()
    }

    fn start(test: &str, base: u16) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("switchyard-sharded-test-{base}"));
        match Self::script(base, &dir, "start") {
            Ok(out) if out.status.success() => {
                let url = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
                Some(Self { base, dir, url })
            }
            Ok(out) => absent(test, &format!("no Redis Cluster on {base}: {}", String::from_utf8_lossy(&out.stderr))),
            Err(e) => absent(test, &format!("no Redis Cluster on {base}: {e}")),
        }
    }

    /// Kills the server on `port` with SIGKILL.
    fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.pid")).unwrap();
        let status = std::process::Command::new("kill").arg("-KILL").arg(pid.trim()).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Self::script(self.base, &self.dir, "stop");
    }
}

#[test]
fn a_slot_is_found_in_its_range_and_nowhere_else() {
    let range = |first, last, port| SlotRange { first, last, master: Some(("h".to_owned(), port)) };
    let ranges = [range(0, 99, 1), range(100, 100, 2), range(200, 16383, 3)];
    let port = |slot| master_of(&ranges, slot).map(|addr| addr.1);
    assert_eq!([port(0), port(99), port(100), port(200), port(16383)], [Some(1), Some(1), Some(2), Some(3), Some(3)]);
    assert_eq!(port(101), None, "a slot with no master");
    assert_eq!(port(199), None);
    assert_eq!(master_of(&[], 0), None);
}

/// (a) one connection per master holding only that master's channels, (b) a message to every
/// channel arrives once, (c) unsubscribing drops them all.
#[tokio::test]
async fn channels_are_subscribed_on_their_masters_and_carry_each_message_once() {
    let Some(node) = Node::open(&redis_cluster_url(), "sharded bus").await else { return };
    let topics = topics(100);
    subscribe_all(&node.bus, &topics).await;
    let masters = node.masters().await;
    let mut used = 0;
    for master in &masters {
        used += usize::from(!node.channels_on(master).await.is_empty());
    }
    assert_eq!(used, masters.len(), "200 channels spread over every master");
    assert_placed(&node, &topics).await;
    assert!(node.bus.ready().await);

    node.publish_all(&topics, "a").await;
    node.publish_all(&topics, "b").await;
    // A channel's messages come in publish order, so once every "b" is in, any second "a" is too.
    assert!(node.seen.events.until(|| node.each_once(&topics, "b")).await, "every channel's message arrived");
    assert!(node.each_once(&topics, "a"), "each message arrived once");

    for topic in &topics {
        node.bus.unsubscribe(topic).await.unwrap();
    }
    let all = node.keys.channel(&Topic::All);
    for master in &masters {
        let left = eventually(WAIT, || async { node.channels_on(master).await.iter().all(|c| *c == all) }).await;
        assert!(left, "{master:?} still has {:?}", node.channels_on(master).await);
    }
    for channel in node.channels(&topics) {
        let mut conn = node.conn.clone();
        let receivers: i64 = redis::cmd("SPUBLISH").arg(&channel).arg("c").query_async(&mut conn).await.unwrap();
        assert_eq!(receivers, 0, "{channel}: nobody receives it any more");
    }
    assert_eq!(node.seen.resyncs.load(Ordering::SeqCst), 0, "nothing was lost");
}

/// (d) a slot migrated to another master: the bus subscribes its channels there, messages
/// still arrive, and sessions are asked to catch up once.
#[tokio::test]
async fn a_migrated_slot_is_subscribed_on_its_new_master() {
    let Some(cluster) = OwnCluster::start("sharded bus, slot migration", 7100) else { return };
    let node = Node::open(&cluster.url, "sharded bus, slot migration").await.unwrap();
    let topics = topics(30);
    subscribe_all(&node.bus, &topics).await;
    assert_placed(&node, &topics).await;
    assert_one_connection_per_master(&node).await;

    let moving = node.keys.channel(&topics[1]);
    let from = node.owner(&moving).await;
    let to = node.masters().await.into_iter().find(|m| *m != from).unwrap();
    node.migrate(slot(moving.as_bytes()), &from, &to).await;

    let moved = eventually(WAIT, || async { node.channels_on(&to).await.contains(&moving) }).await;
    assert!(moved, "subscribed again on the slot's new master");
    assert!(!node.channels_on(&from).await.contains(&moving));
    assert_placed(&node, &topics).await;
    assert_one_connection_per_master(&node).await;
    let resynced = eventually(WAIT, || async { node.seen.resyncs.load(Ordering::SeqCst) > 0 }).await;
    assert!(resynced, "sessions are asked to catch up");
    assert!(node.bus.ready().await);
    node.publish_all(&topics, "after").await;
    assert!(node.seen.events.until(|| node.each_once(&topics, "after")).await, "messages arrive after the move");
    assert_eq!(node.seen.resyncs.load(Ordering::SeqCst), 1, "one catch-up");

    // A channel nobody subscribed to yet, whose slot moves just before it is subscribed: the
    // bus's slot map is likely still the old one (it reads it every second), so the SSUBSCRIBE
    // goes to the old master, which answers MOVED.
    let mut fresh = Vec::new();
    for i in 0.. {
        let topic = room_topic(&format!("fresh{i}"));
        let channel = node.keys.channel(&topic);
        let slot = slot(channel.as_bytes());
        if node.owner(&channel).await == from && fresh.iter().all(|(_, s)| *s != slot) {
            fresh.push((topic, slot));
        }
        if fresh.len() == 3 {
            break;
        }
    }
    for (_, slot) in &fresh {
        node.migrate(*slot, &from, &to).await;
    }
    let fresh: Vec<Topic> = fresh.into_iter().map(|(topic, _)| topic).collect();
    subscribe_all(&node.bus, &fresh).await;
    node.publish_all(&fresh, "fresh").await;
    assert!(node.seen.events.until(|| node.each_once(&fresh, "fresh")).await, "subscribed where the slot is now");
    let all: Vec<Topic> = topics.iter().chain(&fresh).cloned().collect();
    assert_placed(&node, &all).await;
    assert_eq!(node.seen.resyncs.load(Ordering::SeqCst), 1, "nothing subscribed was lost");
}

/// A subscriber connection that Redis closes (the master stays): the bus connects again,
/// subscribes its channels again and asks sessions to catch up.
#[tokio::test]
async fn a_closed_connection_is_replaced_and_its_channels_subscribed_again() {
    let Some(cluster) = OwnCluster::start("sharded bus, closed connection", 7120) else { return };
    let node = Node::open(&cluster.url, "sharded bus, closed connection").await.unwrap();
    let topics = topics(30);
    subscribe_all(&node.bus, &topics).await;
    let master = node.owner(&node.keys.channel(&topics[0])).await;
    let kill = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").to_owned();
    let killed: i64 = redis::from_redis_value(node.on(&master, kill).await).unwrap();
    assert_eq!(killed, 1, "one pub/sub connection on the master");
    let resynced = eventually(WAIT, || async { node.seen.resyncs.load(Ordering::SeqCst) > 0 }).await;
    assert!(resynced, "sessions are asked to catch up");
    assert_placed(&node, &topics).await;
    assert_one_connection_per_master(&node).await;
    assert!(node.bus.ready().await);
    node.publish_all(&topics, "after").await;
    assert!(node.seen.events.until(|| node.each_once(&topics, "after")).await, "messages arrive again");
    assert_eq!(node.seen.resyncs.load(Ordering::SeqCst), 1, "one catch-up");
}

/// (e) a master killed: not ready, then, once its replica took over, ready again, subscribed
/// on the new master and delivering, without a restart.
#[tokio::test]
async fn a_failover_is_followed_without_a_restart() {
    let Some(cluster) = OwnCluster::start("sharded bus, failover", 7110) else { return };
    let node = Node::open(&cluster.url, "sharded bus, failover").await.unwrap();
    let topics = topics(30);
    subscribe_all(&node.bus, &topics).await;
    assert_placed(&node, &topics).await;
    assert!(node.bus.ready().await);

    let victim_channel = node.keys.channel(&topics[0]);
    let victim = node.owner(&victim_channel).await;
    cluster.kill(victim.1);
    let down = eventually(WAIT, || async { !node.bus.ready().await }).await;
    assert!(down, "not ready while a master is gone");
    let promoted = eventually(FAILOVER, || async {
        node.conn.clone().slots().await.is_ok_and(|ranges| {
            let owner = ranges.iter().find(|r| (r.first..=r.last).contains(&slot(victim_channel.as_bytes())));
            owner.is_some_and(|r| r.master.as_ref() != Some(&victim)) && covers_every_slot(&ranges)
        })
    })
    .await;
    assert!(promoted, "the replica took over");
    let up = eventually(FAILOVER, || async { node.bus.ready().await }).await;
    assert!(up, "ready again");
    let resynced = eventually(WAIT, || async { node.seen.resyncs.load(Ordering::SeqCst) > 0 }).await;
    assert!(resynced, "sessions are asked to catch up");
    let new_owner = node.owner(&victim_channel).await;
    let moved = eventually(WAIT, || async { node.channels_on(&new_owner).await.contains(&victim_channel) }).await;
    assert!(moved, "subscribed on the promoted replica");
    assert_placed(&node, &topics).await;
    node.publish_all(&topics, "after").await;
    assert!(node.seen.events.until(|| node.each_once(&topics, "after")).await, "messages arrive after the failover");
    let late = user_topic("late");
    node.bus.subscribe(&late).await.unwrap();
    node.publish_all(std::slice::from_ref(&late), "late").await;
    assert!(node.seen.events.received(&late, "late").await, "a new subscription works");
}
