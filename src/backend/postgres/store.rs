//! The store in PostgreSQL (schema in `mod.rs`).
//!
//! Appends go in batches (`batch.rs`), each one call of the schema's `append_batch` function: it
//! claims the idempotency keys, bumps each stream's `last_seq` once for the whole batch with an
//! upsert that holds the stream's row lock until the commit (appends to one stream wait for each
//! other, so seqs are assigned once across every node, and a rolled-back batch gives its seqs
//! back), inserts the rows, deletes what `--history-size` no longer keeps, and raises rather than
//! commit once its deadline in the database's clock has passed. Keys and then streams are locked
//! in byte order, so alice→bob and bob→alice cannot deadlock; deadlocks and serialization
//! failures are retried anyway.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row, SqlStr};

use super::batch::Batcher;
use super::{SERVER_MS, classify, schema};
use crate::backend::redact;
use crate::backend::sql::{self, Calls, Maintained as _, MessageRow, Repeat, ServerClock, Suspicion};
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{AppendRequest, Appended, Retention, Slice, Store, StoreError};

/// The statements, built once with the schema's name.
pub(super) struct Statements {
    pub(super) append_batch: SqlStr,
    read_ascending: SqlStr,
    read_descending: SqlStr,
    cursor: SqlStr,
    ack: SqlStr,
    sweep_messages: SqlStr,
    sweep_keys: SqlStr,
}

impl Statements {
    fn new(s: &str) -> Self {
        let statement = |text: String| sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(Arc::<str>::from(text)));
        // One statement answers both the messages and the stream's last seq, from one snapshot.
        let read = |condition: &str, direction: &str| {
            statement(format!(
                "SELECT s.last_seq, m.seq, m.mid, m.sender, m.recipient, m.room, m.body, m.ts \
                 FROM (SELECT coalesce(max(last_seq), 0) AS last_seq FROM {s}.streams WHERE stream = $1) s \
                 LEFT JOIN (SELECT seq, mid, sender, recipient, room, body, ts FROM {s}.messages \
                            WHERE stream = $1 AND {condition} AND ts >= $3 ORDER BY seq {direction} LIMIT $4) m \
                 ON true ORDER BY m.seq"
            ))
        };
        Self {
            append_batch: statement(format!(
                "SELECT o_message, o_duplicate, o_mid, o_seqs \
                 FROM {s}.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            )),
            read_ascending: read("seq > $2", "ASC"),
            read_descending: read("seq < $2", "DESC"),
            cursor: statement(format!("SELECT seq FROM {s}.cursors WHERE user_id = $1")),
            ack: statement(format!(
                "INSERT INTO {s}.cursors AS c (user_id, seq) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET seq = GREATEST(c.seq, excluded.seq)"
            )),
            sweep_messages: statement(format!(
                "DELETE FROM {s}.messages WHERE (stream, seq) IN \
                 (SELECT stream, seq FROM {s}.messages WHERE ts < $1 LIMIT $2)"
            )),
            sweep_keys: statement(format!(
                "DELETE FROM {s}.idempotency WHERE (scope, idem_key) IN \
                 (SELECT scope, idem_key FROM {s}.idempotency WHERE expires_at <= ({SERVER_MS}) LIMIT $1)"
            )),
        }
    }
}

pub(crate) struct PostgresStore {
    inner: Arc<Inner>,
    appends: Batcher,
}

pub(super) struct Inner {
    pub(super) pool: PgPool,
    pub(super) clock: ServerClock,
    pub(super) retention: Retention,
    pub(super) statements: Statements,
    pub(super) calls: Calls,
    prefix: String,
}

impl PostgresStore {
    /// Connects to `url` (credentials never appear in errors), migrates the schema named
    /// `prefix`, samples the database's clock, and starts the periodic clock samples and sweeps
    /// of expired rows, which stop when the store is dropped or closed.
    pub(crate) async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self> {
        let suspicion = Arc::new(Suspicion::default());
        let pool = super::connect(url, prefix, suspicion.clone()).await?;
        let inner = Arc::new(Inner {
            pool,
            clock: ServerClock::default(),
            retention,
            calls: Calls { classify, suspicion },
            statements: Statements::new(&schema(prefix)),
            prefix: prefix.to_owned(),
        });
        inner
            .sample_clock(3)
            .await
            .map_err(|e| anyhow::anyhow!("--store {}: reading the database's clock: {e}", redact(url)))?;
        tokio::spawn(sql::maintain(Arc::downgrade(&inner)));
        let appends = Batcher::start(inner.clone());
        Ok(Self { inner, appends })
    }

    /// The store's pool, which the outbox shares.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    #[cfg(test)]
    pub(crate) fn clock(&self) -> &ServerClock {
        &self.inner.clock
    }

    #[cfg(test)]
    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Deletes expired messages and idempotency keys now, as the periodic sweep does.
    #[cfg(test)]
    pub(crate) async fn sweep(&self) -> Result<(), sqlx::Error> {
        self.inner.sweep().await
    }

    /// Drops the store's schema and everything in it.
    #[cfg(test)]
    pub(crate) async fn drop_schema(&self) -> Result<(), sqlx::Error> {
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", schema(&self.inner.prefix));
        sqlx::raw_sql(AssertSqlSafe(drop)).execute(&self.inner.pool).await.map(|_| ())
    }
}

#[async_trait]
impl sql::Maintained for Inner {
    const DATABASE: &'static str = "postgres";

    fn closed(&self) -> bool {
        self.pool.is_closed()
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn sample_clock(&self, tries: usize) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut samples = Vec::with_capacity(tries);
        for _ in 0..tries {
            let sent = now_ms() as i64;
            let server: i64 = sqlx::query_scalar(SERVER_MS).fetch_one(&mut *conn).await?;
            samples.push((sent, server, now_ms() as i64));
        }
        self.clock.record(&samples);
        Ok(())
    }

    async fn sweep(&self) -> Result<(), sqlx::Error> {
        let cutoff = sql::expiry_cutoff(&self.retention);
        loop {
            let done = sqlx::query(self.statements.sweep_messages.clone())
                .bind(cutoff)
                .bind(sql::SWEEP_BATCH)
                .execute(&self.pool)
                .await?;
            if done.rows_affected() < sql::SWEEP_BATCH as u64 {
                break;
            }
        }
        loop {
            let done =
                sqlx::query(self.statements.sweep_keys.clone()).bind(sql::SWEEP_BATCH).execute(&self.pool).await?;
            if done.rows_affected() < sql::SWEEP_BATCH as u64 {
                return Ok(());
            }
        }
    }
}

/// A read's row: the stream's last seq, then a message's columns, NULL when none matched.
fn read_row(row: &PgRow) -> Result<(i64, Option<MessageRow>), sqlx::Error> {
    let last_seq: i64 = row.try_get(0)?;
    let Some(seq) = row.try_get::<Option<i64>, _>(1)? else { return Ok((last_seq, None)) };
    let message = MessageRow {
        seq,
        mid: row.try_get(2)?,
        sender: row.try_get(3)?,
        recipient: row.try_get(4)?,
        room: row.try_get(5)?,
        body: row.try_get(6)?,
        ts: row.try_get(7)?,
    };
    Ok((last_seq, Some(message)))
}

#[async_trait]
impl Store for PostgresStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        if request.entries.is_empty() {
            return Err(StoreError::Internal("append without entries".into()));
        }
        if request.reply_entry >= request.entries.len() {
            return Err(StoreError::Internal("the reply entry is not an entry".into()));
        }
        self.appends.append(request, self.inner.clock.write_deadline()).await
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let inner = &*self.inner;
        let (statement, bound, limit) = match query {
            HistoryQuery::After { since, limit } => (&inner.statements.read_ascending, sql::bigint(since), limit),
            HistoryQuery::Before { before, limit } => (&inner.statements.read_descending, sql::bigint(before), limit),
            HistoryQuery::Last { limit } => (&inner.statements.read_descending, i64::MAX, limit),
        };
        let key = stream.key();
        let cutoff = sql::expiry_cutoff(&inner.retention);
        let rows = inner
            .calls
            .run("postgres read", Repeat::Safe, || {
                sqlx::query(statement.clone())
                    .bind(&key)
                    .bind(bound)
                    .bind(cutoff)
                    .bind(sql::bigint(limit as u64))
                    .fetch_all(&inner.pool)
            })
            .await?;
        let mut slice = Slice::default();
        for row in &rows {
            let (last_seq, message) = read_row(row).map_err(|e| sql::malformed(&e.to_string()))?;
            slice.last_seq = last_seq.max(0) as u64;
            if let Some(message) = message {
                slice.messages.push(message.into_stored()?);
            }
        }
        Ok(slice)
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let inner = &*self.inner;
        let seq: Option<i64> = inner
            .calls
            .run("postgres cursor", Repeat::Safe, || {
                sqlx::query_scalar(inner.statements.cursor.clone()).bind(user.as_str()).fetch_optional(&inner.pool)
            })
            .await?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner
            .calls
            .run("postgres ack", Repeat::Safe, || {
                sqlx::query(inner.statements.ack.clone())
                    .bind(user.as_str())
                    .bind(sql::bigint(seq))
                    .execute(&inner.pool)
            })
            .await?;
        Ok(())
    }

    async fn ready(&self) -> bool {
        let probe = sqlx::query("SELECT 1").execute(&self.inner.pool);
        matches!(tokio::time::timeout(sql::READY_TIMEOUT, probe).await, Ok(Ok(_)))
    }

    async fn close(&self) {
        self.inner.pool.close().await;
    }
}
