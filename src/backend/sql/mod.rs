//! What the PostgreSQL and MySQL stores share: limits and timeouts, the prefix rule, the estimate
//! of the database's clock that write deadlines are written in, the canonical order in which an
//! append locks its streams, retries, and rows back into messages; and how their outboxes claim
//! rows.
//!
//! Both stores keep the same four tables (streams, messages, cursors, idempotency keys) and do a
//! whole append in one server-side routine called in one round trip, so that the routine can
//! refuse to commit once its deadline, in the database's own clock, has passed: an append this
//! node answered `unavailable` is never committed afterwards, however late a paused network
//! delivers it.

mod tables;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::SqlStr;

pub(crate) use tables::{Appends, Statements, TableStore, Tables};

use crate::message::{Message, StoredMessage};
use crate::outbox::{Older, OutboxRow};
use crate::protocol::{RoomName, StreamId, UserId, now_ms};
use crate::store::{Retention, StoreError};

/// Most connections a store opens.
pub(crate) const MAX_CONNECTIONS: u32 = 16;
/// Longest wait for the first connection at start-up.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a pooled connection: a dead database turns into `unavailable` this fast.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one operation, retries included (the Redis store's response timeout).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after the node sent an append the database may still commit it, in the database's
/// clock. The margin below [`CALL_TIMEOUT`] covers the error of the clock estimate and the way
/// back of the reply, as `cluster::WRITE_DEADLINE` does for Redis.
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_millis(1500);
/// How long `ready` waits for `SELECT 1`.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// A pooled connection idle this long is pinged before use; busier ones are not, and a
/// connection that failed is closed when it is released (sqlx pings on release).
pub(crate) const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How often the clock offset is sampled again.
pub(crate) const CLOCK_EVERY: Duration = Duration::from_secs(10);

/// What a SQL store does in the background: sample the database's clock and sweep expired rows.
#[async_trait::async_trait]
pub(crate) trait Maintained: Send + Sync + 'static {
    /// Which database, for the log.
    fn database(&self) -> &'static str;
    fn closed(&self) -> bool;
    fn prefix(&self) -> &str;
    async fn sample_clock(&self) -> Result<(), sqlx::Error>;
    async fn sweep(&self) -> Result<(), sqlx::Error>;
}

/// Samples the clock every [`CLOCK_EVERY`] and sweeps every [`SWEEP_EVERY`], for as long as the
/// store lives and its pool is open.
pub(crate) async fn maintain<M: Maintained>(store: std::sync::Weak<M>) {
    let mut clock = tokio::time::interval(CLOCK_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    clock.tick().await;
    sweep.tick().await;
    loop {
        let sweeping = tokio::select! {
            _ = clock.tick() => false,
            _ = sweep.tick() => true,
        };
        let Some(store) = store.upgrade() else { return };
        if store.closed() {
            return;
        }
        let outcome = if sweeping { store.sweep().await } else { store.sample_clock().await };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, prefix = %store.prefix(), sweeping, "{} store maintenance failed", store.database());
        }
    }
}
/// How often expired messages and idempotency keys are deleted.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Rows one sweep statement deletes, so that a large backlog never holds locks for long.
pub(crate) const SWEEP_BATCH: i64 = 5000;
/// Longest prefix: it names a schema, or starts table names, and identifiers are short.
const MAX_PREFIX_LEN: usize = 32;

/// Checks that `prefix` can name a schema or start a table name anywhere: lower-case letters,
/// digits and `_`, starting with a letter or `_` (MySQL folds table names' case on some systems).
pub(crate) fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    let mut bytes = prefix.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if first_ok
        && prefix.len() <= MAX_PREFIX_LEN
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        anyhow::bail!(
            "--prefix {prefix:?}: a SQL store needs 1-{MAX_PREFIX_LEN} characters of a-z 0-9 _, starting with a letter or _"
        )
    }
}

/// Opens and closes one connection, so that a database that cannot be reached says why
/// (refused, unknown host, access denied) where a pool would only say that it timed out.
pub(crate) async fn probe<C: sqlx::Connection>(options: &C::Options) -> Result<(), String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, C::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// A statement whose text was built from a validated prefix, kept for the store's lifetime.
pub(crate) fn statement(text: String) -> SqlStr {
    sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(Arc::<str>::from(text)))
}

/// Opens a pool of at most `max` connections on `options`: each runs `setup` once connected,
/// and is pinged before use when it was idle or its pool is suspect (see [`Suspicion`]).
pub(crate) async fn open_pool<DB: sqlx::Database>(
    options: <DB::Connection as sqlx::Connection>::Options,
    max: u32,
    setup: &'static str,
    suspicion: Arc<Suspicion>,
) -> Result<sqlx::Pool<DB>, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(setup).execute(conn).await?;
                Ok(())
            })
        })
        .before_acquire(move |conn, meta| {
            let ping = suspicion.ping_first(meta.idle_for);
            Box::pin(async move {
                if ping {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
}

/// A number naming `prefix`'s migration lock, the same on every node (FNV-1a).
pub(crate) fn lock_key(prefix: &str) -> i64 {
    fnv1a(format!("switchyard-migrate:{prefix}").as_bytes()) as i64
}

/// The FNV-1a hash of `bytes`: small, and the same on every node and every build.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// This node's estimate of the database's clock, so that write deadlines do not depend on the
/// clocks of the node and the database host agreeing (like `cluster::RedisClock`).
#[derive(Default)]
pub(crate) struct ServerClock {
    /// Database time minus local time, in ms.
    offset_ms: AtomicI64,
}

impl ServerClock {
    /// Takes the offset from timed samples `(sent, server, received)` of the database's clock
    /// (all in ms): the shortest round trip's, read at its midpoint.
    pub(crate) fn record(&self, samples: &[(i64, i64, i64)]) {
        if let Some((sent, server, received)) = samples.iter().min_by_key(|(sent, _, received)| received - sent) {
            self.offset_ms.store(server - (sent + received) / 2, Ordering::Relaxed);
        }
    }

    /// Moves the estimate by `ms`, as a wrong sample would.
    #[cfg(test)]
    pub(crate) fn skew(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The database's time now, as estimated.
    pub(crate) fn now(&self) -> i64 {
        now_ms() as i64 + self.offset_ms.load(Ordering::Relaxed)
    }

    /// The database time by which an append sent now must commit, or write nothing.
    pub(crate) fn write_deadline(&self) -> i64 {
        self.now() + WRITE_DEADLINE.as_millis() as i64
    }
}

/// The streams of an append in the order they are locked: sorted by name, so that two appends
/// to the same pair of streams (alice→bob and bob→alice) lock them in the same order and never
/// deadlock each other.
pub(crate) struct LockOrder {
    /// Stream names, sorted.
    pub(crate) streams: Vec<String>,
    /// For each entry, in entry order, its position in `streams`.
    pub(crate) positions: Vec<usize>,
}

impl LockOrder {
    pub(crate) fn new<'a>(streams: impl IntoIterator<Item = &'a StreamId>) -> Self {
        let mut named: Vec<(String, usize)> = streams.into_iter().enumerate().map(|(i, s)| (s.key(), i)).collect();
        named.sort();
        let mut positions = vec![0; named.len()];
        for (position, (_, entry)) in named.iter().enumerate() {
            positions[*entry] = position;
        }
        Self { streams: named.into_iter().map(|(name, _)| name).collect(), positions }
    }

    /// The seqs answered in lock order, put back in entry order.
    pub(crate) fn entry_order(&self, sorted: &[i64]) -> Result<Vec<u64>, StoreError> {
        self.positions
            .iter()
            .map(|&p| sorted.get(p).map(|&s| s as u64).ok_or_else(|| malformed("fewer seqs than entries")))
            .collect()
    }
}

/// What to do about a failed attempt.
pub(crate) enum Failure {
    /// Nothing was written (deadlock, serialization failure, lost race on a unique key): try again.
    Retry,
    /// The connection died (the server closed it, or the network dropped it): whatever was sent
    /// on it may or may not have run.
    Lost(String),
    Unavailable(String),
    Internal(String),
}

/// The failures every backend shares: the database could not be reached or answered nothing
/// usable. Database errors are for each backend to sort.
pub(crate) fn transport_failure(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Io(_) => Failure::Lost(e.to_string()),
        sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Failure::Unavailable(e.to_string()),
        other => Failure::Internal(other.to_string()),
    }
}

/// Whether an operation may run twice: a read, or a write that repeats harmlessly (a cursor only
/// moves forward). Such an operation is tried again on another connection when its connection
/// turns out to be dead; an append is not, since the lost connection may have committed it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    Safe,
    Unsafe,
}

/// Whether the pool's connections are suspect. After a connection was found dead, every
/// connection is pinged before use for [`SUSPECT_FOR`] (otherwise only those idle for
/// [`PING_IDLE_AFTER`]), so that a database restart costs one failed append, not one per pooled
/// connection.
#[derive(Default)]
pub(crate) struct Suspicion {
    until_ms: AtomicU64,
}

/// How long connections stay suspect after one was found dead.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

impl Suspicion {
    fn raise(&self) {
        self.until_ms.store(now_ms() + SUSPECT_FOR.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether a pooled connection idle for `idle_for` is pinged before use.
    pub(crate) fn ping_first(&self, idle_for: Duration) -> bool {
        idle_for >= PING_IDLE_AFTER || now_ms() < self.until_ms.load(Ordering::Relaxed)
    }
}

/// How a store runs its calls: which failures are worth another attempt, and what tells the pool
/// that its connections are suspect.
pub(crate) struct Calls {
    pub(crate) classify: fn(&sqlx::Error) -> Failure,
    pub(crate) suspicion: Arc<Suspicion>,
}

impl Calls {
    /// Runs `attempt` until it succeeds or fails for good, within [`CALL_TIMEOUT`]. A timeout is
    /// `Unavailable`: an append that ran out of time is also past its write deadline, so it can
    /// no longer commit.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, repeat: Repeat, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let work = async {
            let mut backoff = Duration::from_millis(2);
            loop {
                let failure = match attempt().await {
                    Ok(value) => return Ok(value),
                    Err(e) => (self.classify)(&e),
                };
                match failure {
                    Failure::Lost(m) => {
                        self.suspicion.raise();
                        if repeat == Repeat::Unsafe {
                            return Err(StoreError::Unavailable(format!("{what}: {m}")));
                        }
                    }
                    Failure::Retry => {}
                    Failure::Unavailable(m) => return Err(StoreError::Unavailable(format!("{what}: {m}"))),
                    Failure::Internal(m) => return Err(StoreError::Internal(format!("{what}: {m}"))),
                }
                let jitter = Duration::from_micros(fastrand::u64(..backoff.as_micros() as u64));
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("{what}: no answer within {} ms", CALL_TIMEOUT.as_millis()))),
        }
    }
}

/// Begins an outbox claim with `begin` (which sets the transaction's timeouts or isolation) and
/// runs the backend's `claim` (the oldest `limit` rows, `FOR UPDATE SKIP LOCKED`, `$1`/`?` the
/// limit), then `older` (every row below the last claimed id, its only parameter). Answers the
/// open transaction, the claimed rows and the older rows, read by `row` and `older_row`.
pub(crate) async fn claim_outbox<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    begin: &'static str,
    (claim, older): (&SqlStr, &SqlStr),
    limit: usize,
    (row, older_row): (RowReader<DB, OutboxRow>, RowReader<DB, Older>),
) -> Result<(sqlx::Transaction<'static, DB>, Vec<OutboxRow>, Vec<Older>), sqlx::Error>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut txn = pool.begin_with(begin).await?;
    let claimed = sqlx::query(claim.clone()).bind(limit as i64).fetch_all(&mut *txn).await?;
    let rows = claimed.iter().map(row).collect::<Result<Vec<_>, _>>()?;
    let older = match rows.last() {
        None => Vec::new(),
        Some(last) => {
            let found = sqlx::query(older.clone()).bind(last.id).fetch_all(&mut *txn).await?;
            found.iter().map(older_row).collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok((txn, rows, older))
}

/// Reads one row of a backend's answer.
pub(crate) type RowReader<DB, T> = fn(&<DB as sqlx::Database>::Row) -> Result<T, sqlx::Error>;

pub(crate) fn malformed(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected answer from the database: {what}"))
}

/// `n` for a BIGINT column.
pub(crate) fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Messages accepted before this time (ms) have expired.
pub(crate) fn expiry_cutoff(retention: &Retention) -> i64 {
    bigint(now_ms().saturating_sub(retention.ttl_ms))
}

/// One row of the messages table.
pub(crate) struct MessageRow {
    pub(crate) seq: i64,
    pub(crate) mid: String,
    pub(crate) sender: String,
    pub(crate) recipient: Option<String>,
    pub(crate) room: Option<String>,
    pub(crate) body: String,
    pub(crate) ts: i64,
}

impl MessageRow {
    /// The stored message, as it was appended.
    pub(crate) fn into_stored(self) -> Result<StoredMessage, StoreError> {
        let recipient = self.recipient.map(|r| UserId::parse(&r)).transpose().map_err(|_| malformed("recipient"))?;
        let room = self.room.map(|r| RoomName::parse(&r)).transpose().map_err(|_| malformed("room"))?;
        let message = Message {
            mid: Arc::from(self.mid),
            from: Arc::from(self.sender),
            to: recipient,
            room,
            body: Arc::from(self.body),
            ts: self.ts.max(0) as u64,
        };
        Ok(StoredMessage { seq: self.seq.max(0) as u64, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_identifier_safe() {
        for ok in ["switchyard", "t_0123abcd", "_x", "a"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "Switchyard", "a-b", "a;drop", "a\"b", "a`b", &"x".repeat(33)] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn streams_lock_in_name_order_and_seqs_come_back_in_entry_order() {
        let bob = StreamId::parse("user:bob").unwrap();
        let alice = StreamId::parse("user:alice").unwrap();
        let order = LockOrder::new([&bob, &alice]);
        assert_eq!(order.streams, ["user:alice", "user:bob"]);
        assert_eq!(order.entry_order(&[7, 3]).unwrap(), [3, 7], "bob's seq is the second in lock order");
        assert!(order.entry_order(&[7]).is_err());
    }

    #[test]
    fn lock_keys_differ_by_prefix() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}
