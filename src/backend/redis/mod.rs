//! Redis as store, bus, presence and node registry of a cluster (every key and channel is named
//! in `keys.rs`), and the plumbing they share: one RESP3 client, connection managers that fail
//! fast (so a stopped Redis turns into `unavailable` answers, not hanging requests) and reconnect
//! on their own, an estimate of Redis's clock for write deadlines, and the liveness rule that
//! presence and the registry share. Every write script checks its deadline.

pub(crate) mod bus;
pub(crate) mod conn;
pub(crate) mod keys;
pub(crate) mod presence;
pub(crate) mod registry;
pub(crate) mod sharded;
mod split;
pub(crate) mod store;
mod subscriber;

pub(crate) use bus::RedisBus;
pub(crate) use conn::Conn;
pub(crate) use keys::{Instance, Keys};
pub(crate) use presence::RedisPresence;
pub(crate) use registry::RedisRegistry;
pub(crate) use sharded::RedisShardedBus;
pub(crate) use store::{Publish, RedisStore};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, ProtocolVersion, RedisResult, Script, ServerErrorKind,
};

/// Longest wait for one Redis reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a node sent a write Redis may still carry it out: a write script that Redis
/// reaches later (it was paused, say) does nothing, so a command the node answered `unavailable`
/// after [`RESPONSE_TIMEOUT`] is not applied when Redis wakes up. Deadlines are in Redis's own
/// clock (see [`RedisClock`]); the margin below the response timeout covers the error of that
/// estimate and the way back of the reply.
pub const WRITE_DEADLINE: Duration = Duration::from_millis(1500);

/// An instance whose last heartbeat (by the Redis clock) is older than this is dead: presence
/// stops counting its sessions at once and the next reap removes them. Nodes heart-beat well
/// within it.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

/// The first lines of a presence or registry write script, as the store's append starts: `now`
/// is Redis's time in ms, and a script that Redis runs after the deadline in `ARGV[1]` (see
/// [`RedisClock::write_deadline`]) writes nothing and answers a `LATE` error, which
/// [`is_late`] recognises. The script's own arguments start at `ARGV[2]`.
macro_rules! write_script {
    ($body:expr) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
            "if now > tonumber(ARGV[1]) then return redis.error_reply('LATE redis ran the write after its deadline: nothing was written') end\n",
            $body
        )
    };
}
pub(crate) use write_script;

/// Whether `e` is the answer of a write script that Redis ran after its deadline.
pub fn is_late(e: &redis::RedisError) -> bool {
    e.code() == Some("LATE")
}

/// This node's estimate of Redis's clock, so that write deadlines do not depend on the clocks of
/// the node and the Redis host agreeing. Sampled with `TIME` at start and every 10 s (and by
/// the bus at every health check of its Redis).
#[derive(Default)]
pub struct RedisClock {
    /// Redis time minus local time, in ms.
    offset_ms: AtomicI64,
}

impl RedisClock {
    /// Takes one sample: the offset seen at the midpoint of a `TIME` round trip.
    pub async fn sample(&self, conn: &mut impl ConnectionLike) -> redis::RedisResult<()> {
        let sent = crate::protocol::now_ms() as i64;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
        let received = crate::protocol::now_ms() as i64;
        let redis_ms = secs * 1000 + micros / 1000;
        self.offset_ms.store(redis_ms - (sent + received) / 2, Ordering::Relaxed);
        Ok(())
    }

    /// A clock that believes Redis is `ms` behind where it is, so that every write deadline has
    /// passed when Redis runs the write (tests of late writes).
    #[cfg(test)]
    pub fn late_by(ms: i64) -> Self {
        Self { offset_ms: AtomicI64::new(-ms) }
    }

    /// The Redis time by which a write sent now must have run, or be dropped.
    pub fn write_deadline(&self) -> u64 {
        let redis_now = crate::protocol::now_ms() as i64 + self.offset_ms.load(Ordering::Relaxed);
        redis_now.max(0) as u64 + WRITE_DEADLINE.as_millis() as u64
    }
}

/// A client for `url` that speaks RESP3 (pub/sub pushes share the connection with commands).
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    let shown = super::redact(url);
    let info = url.into_connection_info().map_err(|_| anyhow::anyhow!("{shown}: not a valid Redis URL"))?;
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    Ok(redis::Client::open(info.set_redis_settings(settings))?)
}

/// Timeouts and reconnection for every connection manager of a node.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(1))
}

/// Where a role's Redis is: one server (its client, for the bus's subscriber), or a Redis
/// Cluster (its seed nodes, for the sharded bus's subscribers).
#[derive(Clone)]
pub(crate) enum Server {
    Single(redis::Client),
    Cluster(Vec<redis::ConnectionInfo>),
}

/// One Redis or Redis Cluster as the roles on it share it: where it is, a command connection and
/// the estimate of its clock.
#[derive(Clone)]
pub(crate) struct Connected {
    pub server: Server,
    pub conn: Conn,
    pub clock: Arc<RedisClock>,
}

/// The connections of a node's roles, by URL, so that roles on one Redis share a connection and
/// a clock.
#[derive(Default)]
pub(crate) struct Shared {
    by_url: HashMap<String, Connected>,
}

impl Shared {
    /// The server, command connection and clock for `url` (`redis://…` or
    /// `redis+cluster://…`), connecting on first use.
    pub(crate) async fn connect(&mut self, url: &str) -> anyhow::Result<Connected> {
        if let Some(found) = self.by_url.get(url) {
            return Ok(found.clone());
        }
        let (server, mut conn) = if is_cluster_url(url) {
            let seeds = conn::seeds(url)?
                .iter()
                .map(|seed| {
                    seed.as_str()
                        .into_connection_info()
                        .map_err(|_| anyhow::anyhow!("{}: not a valid Redis Cluster URL", super::redact(url)))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (Server::Cluster(seeds), Conn::cluster(url).await?)
        } else {
            let client = client(url)?;
            let commands = commands(&client, url).await?;
            (Server::Single(client), Conn::Single(commands))
        };
        let clock = Arc::new(RedisClock::default());
        clock.sample(&mut conn).await.with_context(|| format!("{}: reading the Redis clock", super::redact(url)))?;
        tokio::spawn(resample(Arc::downgrade(&clock), conn.clone(), CLOCK_EVERY));
        let connected = Connected { server, conn, clock };
        self.by_url.insert(url.to_owned(), connected.clone());
        Ok(connected)
    }
}

/// Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
pub(crate) fn is_cluster_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().ends_with("+cluster"))
}

/// How often every Redis a node uses has its clock sampled again (the bus's health check
/// samples its own Redis every second besides), so that a store or presence on another Redis
/// than the bus follows that server's clock too.
const CLOCK_EVERY: Duration = Duration::from_secs(10);

/// Samples `clock` every `every` on `conn`, for as long as some role holds the clock.
async fn resample(clock: std::sync::Weak<RedisClock>, mut conn: Conn, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(clock) = clock.upgrade() else { return };
        if let Ok(Err(e)) = tokio::time::timeout(every, clock.sample(&mut conn)).await {
            tracing::debug!(error = %e, "sampling the redis clock failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that went wrong (or a Redis host whose clock moved) is put right by the next
    /// sample, and the sampling stops once no role holds the clock.
    #[tokio::test]
    async fn clocks_are_sampled_again() {
        let url = crate::testing::redis_url();
        let client = client(&url).unwrap();
        let conn = match tokio::time::timeout(Duration::from_secs(3), commands(&client, &url)).await {
            Ok(Ok(conn)) => conn,
            other => {
                return crate::testing::absent("redis clock", &format!("{:?}", other.map(|r| r.err()))).unwrap_or(());
            }
        };
        let clock = Arc::new(RedisClock::late_by(60_000));
        let deadline_now = || crate::protocol::now_ms() + WRITE_DEADLINE.as_millis() as u64;
        assert!(clock.write_deadline() + 30_000 < deadline_now(), "starts a minute wrong");
        let sampler = tokio::spawn(resample(Arc::downgrade(&clock), Conn::Single(conn), Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let error = clock.write_deadline().abs_diff(deadline_now());
        assert!(error < 1_000, "after a sample the estimate is off by {error} ms");
        drop(clock);
        tokio::time::timeout(Duration::from_secs(1), sampler).await.expect("sampling stops").unwrap();
    }
}

/// A command connection; fails at start with a clear message when Redis is not there.
pub async fn commands(client: &redis::Client, url: &str) -> anyhow::Result<ConnectionManager> {
    ConnectionManager::new_with_config(client.clone(), manager_config())
        .await
        .with_context(|| format!("{}: cannot reach Redis", super::redact(url)))
}

/// The start of an `EVALSHA` of `script` with `keys` keys: add the keys, then the arguments, and
/// run it with [`eval`]. The arguments go straight into the command's one buffer, where
/// `Script::key`/`arg` would allocate each of them and copy them all again (about a fifth of an
/// append's cost on the node). `args` (keys included) and `bytes` size that buffer up front.
pub fn evalsha(script: &Script, keys: usize, args: usize, bytes: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(3 + args, 64 + bytes);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs `script` with `keys` and `args` (loading it when Redis does not know it yet).
pub(crate) async fn invoke<T: FromRedisValue>(
    conn: &mut Conn,
    script: &Script,
    keys: &[&str],
    args: &[&str],
) -> RedisResult<T> {
    let mut invocation = script.prepare_invoke();
    keys.iter().for_each(|key| {
        invocation.key(*key);
    });
    args.iter().for_each(|arg| {
        invocation.arg(*arg);
    });
    invocation.invoke_async(conn).await
}

/// Runs `cmd`, built by [`evalsha`] for `script`; loads the script and runs it again when Redis
/// does not know it (it restarted, or its scripts were flushed).
pub async fn eval<T: FromRedisValue>(conn: &mut impl ConnectionLike, script: &Script, cmd: &Cmd) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        result => result,
    }
}
