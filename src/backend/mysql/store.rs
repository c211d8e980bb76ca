//! The store in MySQL or MariaDB (tables in `mod.rs`).
//!
//! An append is one `CALL` of the prefix's `append` procedure: it claims the idempotency key,
//! bumps each stream's `last_seq` with an upsert that holds the stream's row lock until the
//! commit (appends to one stream wait for each other, so seqs are assigned once across every
//! node, and a rolled-back append gives its seq back), inserts the rows, deletes what
//! `--history-size` no longer keeps, and rolls back rather than commit once its deadline in the
//! database's clock has passed. A direct message locks its two streams in name order, so
//! alice→bob and bob→alice cannot deadlock; InnoDB's other deadlocks (concurrent first inserts
//! of one key) and lost races on an idempotency key are retried.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::mysql::{MySqlPool, MySqlRow};
use sqlx::{AssertSqlSafe, Row, SqlStr};

use super::{SERVER_MS, classify};
use crate::backend::redact;
use crate::backend::sql::{self, Calls, Maintained as _, LockOrder, MessageRow, Repeat, ServerClock, Suspicion};
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, Slice, Store, StoreError};

/// The statements, built once with the prefix.
struct Statements {
    append: SqlStr,
    read_ascending: SqlStr,
    read_descending: SqlStr,
    cursor: SqlStr,
    ack: SqlStr,
    sweep_messages: SqlStr,
    sweep_keys: SqlStr,
}

impl Statements {
    fn new(prefix: &str) -> Self {
        let statement = |text: String| sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(Arc::<str>::from(text)));
        // One statement answers both the messages and the stream's last seq, from one snapshot.
        let read = |condition: &str, direction: &str| {
            statement(format!(
                "SELECT s.last_seq, m.seq, m.mid, m.sender, m.recipient, m.room, m.body, m.ts \
                 FROM (SELECT CAST(COALESCE(MAX(last_seq), 0) AS SIGNED) AS last_seq \
                       FROM `{prefix}_streams` WHERE stream = ?) s \
                 LEFT JOIN (SELECT seq, mid, sender, recipient, room, body, ts FROM `{prefix}_messages` \
                            WHERE stream = ? AND {condition} AND ts >= ? ORDER BY seq {direction} LIMIT ?) m \
                 ON TRUE ORDER BY m.seq"
            ))
        };
        Self {
            append: statement(format!("CALL `{prefix}_append`(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")),
            read_ascending: read("seq > ?", "ASC"),
            read_descending: read("seq < ?", "DESC"),
            cursor: statement(format!("SELECT seq FROM `{prefix}_cursors` WHERE user_id = ?")),
            ack: statement(format!(
                "INSERT INTO `{prefix}_cursors` (user_id, seq) VALUES (?, ?) \
                 ON DUPLICATE KEY UPDATE seq = GREATEST(seq, VALUES(seq))"
            )),
            sweep_messages: statement(format!("DELETE FROM `{prefix}_messages` WHERE ts < ? LIMIT ?")),
            sweep_keys: statement(format!(
                "DELETE FROM `{prefix}_idempotency` WHERE expires_at <= FLOOR(UNIX_TIMESTAMP(SYSDATE(6)) * 1000) LIMIT ?"
            )),
        }
    }
}

pub(crate) struct MysqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    clock: ServerClock,
    retention: Retention,
    statements: Statements,
    calls: Calls,
    prefix: String,
}

impl MysqlStore {
    /// Connects to `url` (credentials never appear in errors), migrates the tables named
    /// `<prefix>_…`, samples the database's clock, and starts the periodic clock samples and sweeps
    /// of expired rows, which stop when the store is dropped or closed.
    pub(crate) async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self> {
        let suspicion = Arc::new(Suspicion::default());
        let pool = super::connect(url, prefix, suspicion.clone()).await?;
        let inner = Arc::new(Inner {
            pool,
            clock: ServerClock::default(),
            retention,
            calls: Calls { classify, suspicion },
            statements: Statements::new(prefix),
            prefix: prefix.to_owned(),
        });
        inner
            .sample_clock(3)
            .await
            .map_err(|e| anyhow::anyhow!("--store {}: reading the database's clock: {e}", redact(url)))?;
        tokio::spawn(sql::maintain(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The store's pool, which the outbox shares.
    pub(crate) fn pool(&self) -> &MySqlPool {
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

    /// Drops the store's tables and procedure.
    #[cfg(test)]
    pub(crate) async fn drop_schema(&self) -> Result<(), sqlx::Error> {
        let p = &self.inner.prefix;
        let drop = format!(
            "DROP PROCEDURE IF EXISTS `{p}_append`; DROP TABLE IF EXISTS `{p}_streams`, `{p}_messages`, \
             `{p}_cursors`, `{p}_idempotency`, `{p}_schema_version`"
        );
        sqlx::raw_sql(AssertSqlSafe(drop)).execute(&self.inner.pool).await.map(|_| ())
    }
}

#[async_trait]
impl sql::Maintained for Inner {
    const DATABASE: &'static str = "mysql";

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
fn read_row(row: &MySqlRow) -> Result<(i64, Option<MessageRow>), sqlx::Error> {
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
impl Store for MysqlStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        let inner = &*self.inner;
        if request.entries.is_empty() {
            return Err(StoreError::Internal("append without entries".into()));
        }
        let message = &request.message;
        let order = LockOrder::new(request.entries.iter().map(|e| &e.stream));
        let Some(&reply_position) = order.positions.get(request.reply_entry) else {
            return Err(StoreError::Internal("the reply entry is not an entry".into()));
        };
        let (scope, key) = match &request.idempotency {
            Some((scope, key)) => (Some(scope.as_str()), Some(key.as_str())),
            None => (None, None),
        };
        let deadline = inner.clock.write_deadline();
        let streams = order.streams.join(" ");
        let (duplicate, mid, seqs): (i64, String, String) = inner
            .calls
            .run("mysql append", Repeat::Unsafe, || {
                sqlx::query_as(inner.statements.append.clone())
                    .bind(deadline)
                    .bind(&streams)
                    .bind(reply_position as i32 + 1)
                    .bind(&*message.mid)
                    .bind(&*message.from)
                    .bind(message.to.as_ref().map(UserId::as_str))
                    .bind(message.room.as_ref().map(|r| r.as_str()))
                    .bind(&*message.body)
                    .bind(sql::bigint(message.ts))
                    .bind(sql::bigint(inner.retention.max_messages))
                    .bind(scope)
                    .bind(key)
                    .bind(IDEMPOTENCY_WINDOW_MS as i64)
                    .fetch_one(&inner.pool)
            })
            .await?;
        let duplicate = duplicate == 1;
        let seqs = seqs
            .split(' ')
            .map(|s| s.parse::<i64>().map_err(|_| sql::malformed("append seqs")))
            .collect::<Result<Vec<_>, _>>()?;
        if duplicate {
            let seq = seqs.first().map(|&s| s as u64).ok_or_else(|| sql::malformed("duplicate without seq"))?;
            return Ok(Appended { mid: Arc::from(mid), seq, duplicate, seqs: Vec::new(), published: false });
        }
        let seqs = order.entry_order(&seqs)?;
        let seq = seqs[request.reply_entry];
        Ok(Appended { mid: Arc::from(mid), seq, duplicate, seqs, published: false })
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
            .run("mysql read", Repeat::Safe, || {
                sqlx::query(statement.clone())
                    .bind(&key)
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
            .run("mysql cursor", Repeat::Safe, || {
                sqlx::query_scalar(inner.statements.cursor.clone()).bind(user.as_str()).fetch_optional(&inner.pool)
            })
            .await?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner
            .calls
            .run("mysql ack", Repeat::Safe, || {
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
