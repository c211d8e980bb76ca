//! A command connection to one Redis or to a Redis Cluster (`redis+cluster://`), behind one type,
//! so that the store, presence and the registry send the same commands to either.
//!
//! On a cluster, redis-rs's cluster connection routes each command by its first key (a script by
//! its first declared key), follows `MOVED`/`ASK`, reconnects, and reads `CLUSTER SLOTS` again
//! when the topology changed. Every script this node sends to a cluster declares its keys and
//! keeps them in one slot (the hash tags of `keys.rs`), and every pipeline stays in one slot.
//!
//! What the crate does not do is tell whether the cluster can serve every slot right now:
//! [`Conn::ready_with_replicas`] checks that every slot has a master and that every master answers. Nor does it
//! notice a failover: a request to a master that died is refused, and the crate retries the same
//! address for ever, never reading the topology again (only a `MOVED` makes it do that, and a dead
//! master sends none). So a [`Cluster`] builds a new cluster connection (which reads `CLUSTER
//! SLOTS` afresh) whenever a request fails for want of a connection, at most every
//! [`REBUILD_EVERY`], from the seed nodes and every node it has seen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, ProtocolVersion, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

/// How many slots a Redis Cluster has.
pub const SLOTS: u16 = 16384;

/// The shortest time between two rebuilds of a cluster connection.
const REBUILD_EVERY: Duration = Duration::from_millis(500);

/// A command connection: cheap to clone, multiplexed.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A Redis Cluster's command connection, rebuilt when it loses a master (see the module docs).
pub struct Cluster {
    /// What the connection is built from: the URL's seed nodes as URLs (credentials and options
    /// included), then every node `CLUSTER SLOTS` named since.
    nodes: Mutex<Vec<String>>,
    current: RwLock<ClusterConnection>,
    rebuilding: AtomicBool,
    /// The URL, redacted, for messages.
    shown: String,
}

impl Cluster {
    fn current(&self) -> ClusterConnection {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Builds a new connection in the background when `e` says a node could not be reached.
    fn failed(self: &Arc<Self>, e: &RedisError) {
        let unreachable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::Server(ServerErrorKind::ClusterDown)
                    | ErrorKind::Server(ServerErrorKind::TryAgain)
                    | ErrorKind::Server(ServerErrorKind::MasterDown)
                    // A redirection that reached us: the crate's own retries followed it to no avail.
                    | ErrorKind::Server(ServerErrorKind::Moved)
                    | ErrorKind::Server(ServerErrorKind::Ask)
            );
        if unreachable && !self.rebuilding.swap(true, Ordering::AcqRel) {
            let cluster = self.clone();
            tokio::spawn(async move {
                let nodes = cluster.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match connect(&nodes, &cluster.shown).await {
                    Ok(conn) => {
                        *cluster.current.write().unwrap_or_else(|p| p.into_inner()) = conn;
                        tracing::info!(cluster = %cluster.shown, "reconnected to the redis cluster, its topology read again");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rebuilding the redis cluster connection failed; retrying on the next error")
                    }
                }
                tokio::time::sleep(REBUILD_EVERY).await;
                cluster.rebuilding.store(false, Ordering::Release);
            });
        }
    }

    /// Remembers the nodes of a `CLUSTER SLOTS` answer as places to rebuild from.
    fn saw(&self, ranges: &[SlotRange], replicas: &[(String, u16)]) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(template) = nodes.first().cloned() else { return };
        for (host, port) in ranges.iter().filter_map(|r| r.master.as_ref()).chain(replicas) {
            let url = with_host(&template, host, *port);
            if !nodes.contains(&url) && nodes.len() < MAX_NODES {
                nodes.push(url);
            }
        }
    }
}

/// Most nodes a [`Cluster`] remembers to rebuild from.
const MAX_NODES: usize = 256;

/// `url` (`redis://creds@host:port/rest`) with another host and port.
fn with_host(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let credentials = authority.rfind('@').map(|at| &authority[..=at]).unwrap_or("");
    format!("{scheme}://{credentials}{host}:{port}{tail}")
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(cluster) => {
                let cluster = cluster.clone();
                async move {
                    let answer = cluster.current().req_packed_command(cmd).await;
                    if let Err(e) = &answer {
                        cluster.failed(e);
                    }
                    answer
                }
                .boxed()
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(cluster) => {
                let cluster = cluster.clone();
                async move {
                    let answer = cluster.current().req_packed_commands(pipeline, offset, count).await;
                    if let Err(e) = &answer {
                        cluster.failed(e);
                    }
                    answer
                }
                .boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

impl Conn {
    /// Whether this is a Redis Cluster.
    pub fn clustered(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Runs `cmd` on the master at `address` (`host:port`); on one Redis, on that Redis.
    pub async fn on_node(&mut self, address: &(String, u16), cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(conn) => cmd.query_async(conn).await,
            Conn::Cluster(cluster) => {
                let (host, port) = address.clone();
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let answer = cluster.current().route_command(cmd, routing).await;
                if let Err(e) = &answer {
                    cluster.failed(e);
                }
                answer
            }
        }
    }

    /// The masters and the slot ranges each serves, from `CLUSTER SLOTS` on any node.
    pub async fn slots(&mut self) -> RedisResult<Vec<SlotRange>> {
        let Conn::Cluster(cluster) = self else {
            return Ok(vec![SlotRange { first: 0, last: SLOTS - 1, master: None }]);
        };
        let cmd = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let answer = cluster.current().route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random)).await;
        let value = answer.inspect_err(|e| cluster.failed(e))?;
        let replicas = replicas(&value);
        let ranges = parse_slots(value);
        cluster.saw(&ranges, &replicas);
        Ok(ranges)
    }

    /// Whether every slot has a master, every master answers within `timeout` (on one Redis:
    /// whether it answers), and every master has at least `replicas` replicas connected (`ROLE`),
    /// so that an append waiting for them (`--redis-wait-replicas`) can be acknowledged.
    pub async fn ready_with_replicas(&mut self, timeout: Duration, replicas: usize) -> bool {
        let check = async {
            let ranges = self.slots().await.ok()?;
            if !covers_every_slot(&ranges) {
                return None;
            }
            let mut masters: Vec<Option<(String, u16)>> = ranges.into_iter().map(|r| r.master).collect();
            masters.sort();
            masters.dedup();
            let probes = masters.iter().map(|master| {
                let mut conn = self.clone();
                let cmd = redis::cmd(if replicas == 0 { "PING" } else { "ROLE" });
                async move {
                    let answer = match master {
                        Some(master) => conn.on_node(master, cmd).await,
                        None => cmd.query_async(&mut conn).await,
                    };
                    answer.ok().is_some_and(|role| replicas == 0 || replicas_of(&role) >= replicas)
                }
            });
            futures_util::future::join_all(probes).await.into_iter().all(|ok| ok).then_some(())
        };
        matches!(tokio::time::timeout(timeout, check).await, Ok(Some(())))
    }

    /// A connection to the Redis Cluster of `url`, from its seed nodes.
    pub async fn cluster(url: &str) -> anyhow::Result<Conn> {
        let shown = super::super::redact(url);
        let nodes = seeds(url)?;
        let current = RwLock::new(connect(&nodes, &shown).await?);
        Ok(Conn::Cluster(Arc::new(Cluster {
            nodes: Mutex::new(nodes),
            current,
            rebuilding: AtomicBool::new(false),
            shown,
        })))
    }
}

/// How many replicas a master's `ROLE` answer lists (`["master", offset, [replica, …]]`).
fn replicas_of(role: &Value) -> usize {
    match role {
        Value::Array(items) => match items.get(2) {
            Some(Value::Array(replicas)) => replicas.len(),
            _ => 0,
        },
        _ => 0,
    }
}

/// The replicas named in a `CLUSTER SLOTS` answer (the fourth item of a range on).
fn replicas(value: &Value) -> Vec<(String, u16)> {
    let Value::Array(ranges) = value else { return Vec::new() };
    ranges
        .iter()
        .filter_map(|range| match range {
            Value::Array(items) => Some(items.iter().skip(3)),
            _ => None,
        })
        .flatten()
        .filter_map(|node| {
            let Value::Array(node) = node else { return None };
            let host: String = redis::from_redis_value(node.first()?.clone()).ok()?;
            let port: u16 = redis::from_redis_value(node.get(1)?.clone()).ok()?;
            Some((host, port))
        })
        .collect()
}

/// Slots `first..=last` and their master's address (`None` on one Redis).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub master: Option<(String, u16)>,
}

/// The ranges of a `CLUSTER SLOTS` reply: `[first, last, [host, port, id, …], replicas…]` each.
pub fn parse_slots(value: Value) -> Vec<SlotRange> {
    let Value::Array(ranges) = value else { return Vec::new() };
    ranges
        .into_iter()
        .filter_map(|range| {
            let Value::Array(mut items) = range else { return None };
            if items.len() < 3 {
                return None;
            }
            let master = items.swap_remove(2);
            let first: u16 = redis::from_redis_value(items[0].clone()).ok()?;
            let last: u16 = redis::from_redis_value(items[1].clone()).ok()?;
            let Value::Array(master) = master else { return None };
            let host: String = redis::from_redis_value(master.first()?.clone()).ok()?;
            let port: u16 = redis::from_redis_value(master.get(1)?.clone()).ok()?;
            Some(SlotRange { first, last, master: Some((host, port)) })
        })
        .collect()
}

/// Whether `ranges` give every slot a master.
pub fn covers_every_slot(ranges: &[SlotRange]) -> bool {
    let mut sorted: Vec<(u16, u16)> = ranges.iter().map(|r| (r.first, r.last)).collect();
    sorted.sort();
    let mut next: u32 = 0;
    for (first, last) in sorted {
        if u32::from(first) > next {
            return false;
        }
        next = next.max(u32::from(last) + 1);
    }
    next >= u32::from(SLOTS)
}

/// The seed nodes of a `redis+cluster://` (or `rediss+cluster://`) URL, as plain Redis URLs that
/// carry its credentials: `redis+cluster://u:p@a:1,b:2/?x` → `redis://u:p@a:1/?x`, `redis://u:p@b:2/?x`.
pub fn seeds(url: &str) -> anyhow::Result<Vec<String>> {
    let shown = super::super::redact(url);
    let (scheme, rest) = url.split_once("://").ok_or_else(|| anyhow::anyhow!("{shown}: not a URL"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        other => anyhow::bail!("{shown}: `{other}` is not a Redis Cluster scheme"),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (credentials, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if tail.trim_start_matches('/').split(['?', '#']).next().is_some_and(|db| !db.is_empty() && db != "0") {
        anyhow::bail!("{shown}: a Redis Cluster has database 0 only");
    }
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| format!("{scheme}://{credentials}{host}{tail}"))
        .collect();
    if seeds.is_empty() {
        anyhow::bail!("{shown}: no HOST:PORT to start from");
    }
    Ok(seeds)
}

/// A cluster command connection from `nodes` (RESP2: replies are plain values, and the bus has
/// its own pub/sub connections); `shown` names the cluster in errors.
async fn connect(nodes: &[String], shown: &str) -> anyhow::Result<ClusterConnection> {
    let client = ClusterClientBuilder::new(nodes.to_vec())
        .use_protocol(ProtocolVersion::RESP2)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .build()
        .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let conn = tokio::time::timeout(RESPONSE_TIMEOUT * 2, client.get_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("{shown}: the Redis Cluster did not answer in time"))?
        .map_err(|e| anyhow::anyhow!("{shown}: cannot reach the Redis Cluster: {e}"))?;
    Ok(conn)
}

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{` and the
/// next `}`, when not empty) or of the whole key, modulo [`SLOTS`].
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-XMODEM (polynomial 0x1021, initial 0), as Redis Cluster hashes keys.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn seeds_keep_credentials_and_options() {
        assert_eq!(
            seeds("redis+cluster://u:pw@a:7000,b:7001/?protocol=2").unwrap(),
            ["redis://u:pw@a:7000/?protocol=2", "redis://u:pw@b:7001/?protocol=2"]
        );
        assert_eq!(seeds("rediss+cluster://a:1").unwrap(), ["rediss://a:1"]);
        let e = seeds("redis+cluster://:secret@a:1/3").unwrap_err().to_string();
        assert!(e.contains("database 0 only") && !e.contains("secret"), "{e}");
        assert!(seeds("redis+cluster://").is_err());
    }

    #[test]
    fn coverage_needs_every_slot() {
        let range = |first, last| SlotRange { first, last, master: Some(("h".into(), 1)) };
        assert!(covers_every_slot(&[range(5461, 10922), range(0, 5460), range(10923, 16383)]));
        assert!(!covers_every_slot(&[range(0, 5460), range(10923, 16383)]));
        assert!(!covers_every_slot(&[range(0, 16382)]));
        assert!(!covers_every_slot(&[]));
    }
}
