//! The half of a SQL store that is the same in every database: reading streams, read cursors,
//! readiness, and the background clock samples and sweeps, over the four tables every SQL store
//! keeps, written once for any sqlx database. Each backend keeps its statements' text and its
//! appends (a PostgreSQL function called in batches, a MySQL procedure), behind [`Appends`].

use std::sync::Arc;

use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, SqlStr, Type};

use super::{Calls, Maintained, MessageRow, READY_TIMEOUT, Repeat, SWEEP_BATCH, ServerClock, bigint, expiry_cutoff};
use crate::backend::redact;
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{AppendRequest, Appended, Retention, Slice, Store, StoreError};

/// The statements [`Tables`] runs, in the database's own dialect, with their parameters.
pub(crate) struct Statements {
    /// The database's clock in ms; no parameter.
    pub(crate) server_ms: &'static str,
    /// Answers the stream's last seq and the messages that follow a seq (ascending) or precede
    /// it (descending), from one snapshot: `(stream, stream, seq, ts cutoff, limit)`, one row per
    /// message, or one row of NULLs after the last seq when none matched.
    pub(crate) read_ascending: SqlStr,
    pub(crate) read_descending: SqlStr,
    /// A user's cursor: `(user)`.
    pub(crate) cursor: SqlStr,
    /// Moves a user's cursor forward only: `(user, seq)`.
    pub(crate) ack: SqlStr,
    /// Deletes at most `limit` messages older than the cutoff: `(ts cutoff, limit)`.
    pub(crate) sweep_messages: SqlStr,
    /// Deletes at most `limit` expired idempotency keys: `(limit)`.
    pub(crate) sweep_keys: SqlStr,
}

/// What differs between databases beyond their statements' text.
pub(crate) trait Dialect: Database {
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

impl Dialect for sqlx::Postgres {
    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl Dialect for sqlx::MySql {
    fn rows_affected(result: &sqlx::mysql::MySqlQueryResult) -> u64 {
        result.rows_affected()
    }
}

/// How a SQL store appends: the part each database does its own way (a PostgreSQL function
/// called in batches, a MySQL procedure called once per append).
#[async_trait::async_trait]
pub(crate) trait Appends: Send + Sync + 'static {
    type Database: Dialect;
    /// Appends a request whose entries and reply entry were checked.
    async fn append(&self, tables: &Tables<Self::Database>, request: AppendRequest) -> Result<Appended, StoreError>;

    /// Appends checked requests in their order (see [`Store::append_all`]); by default one after
    /// the other.
    async fn append_all(
        &self,
        tables: &Tables<Self::Database>,
        requests: Vec<AppendRequest>,
    ) -> Vec<Result<Appended, StoreError>> {
        crate::store::one_by_one(requests, |request| self.append(tables, request)).await
    }
}

/// Refuses a request without entries or whose reply entry is not one of them.
fn check(request: &AppendRequest) -> Result<(), StoreError> {
    if request.entries.is_empty() {
        return Err(StoreError::Internal("append without entries".into()));
    }
    if request.reply_entry >= request.entries.len() {
        return Err(StoreError::Internal("the reply entry is not an entry".into()));
    }
    Ok(())
}

/// A SQL store: its tables, and its way of appending.
pub(crate) struct TableStore<A: Appends> {
    tables: Arc<Tables<A::Database>>,
    appends: A,
}

impl<A: Appends> TableStore<A> {
    pub(crate) fn new(tables: Arc<Tables<A::Database>>, appends: A) -> Self {
        Self { tables, appends }
    }

    /// The store's pool, which the outbox shares.
    pub(crate) fn pool(&self) -> &Pool<A::Database> {
        &self.tables.pool
    }

    #[cfg(test)]
    pub(crate) fn tables(&self) -> &Tables<A::Database> {
        &self.tables
    }
}

#[async_trait::async_trait]
impl<A: Appends> Store for TableStore<A>
where
    for<'c> &'c mut <A::Database as Database>::Connection: Executor<'c, Database = A::Database>,
    <A::Database as Database>::Arguments: IntoArguments<A::Database>,
    usize: ColumnIndex<<A::Database as Database>::Row>,
    i64: for<'q> Encode<'q, A::Database> + for<'r> Decode<'r, A::Database> + Type<A::Database>,
    String: for<'r> Decode<'r, A::Database> + Type<A::Database>,
    for<'q> &'q str: Encode<'q, A::Database> + Type<A::Database>,
{
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        check(&request)?;
        self.appends.append(&self.tables, request).await
    }

    async fn append_all(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        if let Some(Err(e)) = requests.iter().map(check).find(Result::is_err) {
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
        self.appends.append_all(&self.tables, requests).await
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        self.tables.read(stream, query).await
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        self.tables.cursor(user).await
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        self.tables.ack(user, seq).await
    }

    async fn ready(&self) -> bool {
        self.tables.ready().await
    }

    async fn close(&self) {
        self.tables.pool.close().await;
    }
}

/// A SQL store's pool and everything but its appends.
pub(crate) struct Tables<DB: Database> {
    pub(crate) pool: Pool<DB>,
    pub(crate) clock: ServerClock,
    pub(crate) retention: Retention,
    pub(crate) calls: Calls,
    pub(crate) prefix: String,
    database: &'static str,
    statements: Statements,
    /// What each call is named in errors: `"<database> read"` and so on.
    names: [String; 3],
}

impl<DB> Tables<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    i64: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>,
    String: for<'r> Decode<'r, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    /// Samples the database's clock, and starts the periodic clock samples and sweeps of expired
    /// rows, which stop when the tables are dropped or the pool closed. `url` names the database
    /// in errors, its credentials hidden.
    pub(crate) async fn open(
        database: &'static str,
        (url, pool): (&str, Pool<DB>),
        prefix: &str,
        retention: Retention,
        calls: Calls,
        statements: Statements,
    ) -> anyhow::Result<Arc<Self>> {
        let names = ["read", "cursor", "ack"].map(|call| format!("{database} {call}"));
        let tables = Arc::new(Self {
            pool,
            clock: ServerClock::default(),
            retention,
            calls,
            prefix: prefix.to_owned(),
            database,
            statements,
            names,
        });
        tables
            .sample(3)
            .await
            .map_err(|e| anyhow::anyhow!("--store {}: reading the database's clock: {e}", redact(url)))?;
        tokio::spawn(super::maintain(Arc::downgrade(&tables)));
        Ok(tables)
    }

    /// Takes `tries` timed samples of the database's clock on one connection.
    async fn sample(&self, tries: usize) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut samples = Vec::with_capacity(tries);
        for _ in 0..tries {
            let sent = now_ms() as i64;
            let server: i64 = sqlx::query_scalar(self.statements.server_ms).fetch_one(&mut *conn).await?;
            samples.push((sent, server, now_ms() as i64));
        }
        self.clock.record(&samples);
        Ok(())
    }

    /// Deletes expired messages and idempotency keys, a bounded number per statement.
    pub(crate) async fn sweep(&self) -> Result<(), sqlx::Error> {
        let cutoff = expiry_cutoff(&self.retention);
        loop {
            let statement = sqlx::query(self.statements.sweep_messages.clone()).bind(cutoff).bind(SWEEP_BATCH);
            if DB::rows_affected(&statement.execute(&self.pool).await?) < SWEEP_BATCH as u64 {
                break;
            }
        }
        loop {
            let statement = sqlx::query(self.statements.sweep_keys.clone()).bind(SWEEP_BATCH);
            if DB::rows_affected(&statement.execute(&self.pool).await?) < SWEEP_BATCH as u64 {
                return Ok(());
            }
        }
    }

    /// The kept messages that `query` selects, and the stream's last seq.
    pub(crate) async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let (statement, bound, limit) = match query {
            HistoryQuery::After { since, limit } => (&self.statements.read_ascending, bigint(since), limit),
            HistoryQuery::Before { before, limit } => (&self.statements.read_descending, bigint(before), limit),
            HistoryQuery::Last { limit } => (&self.statements.read_descending, i64::MAX, limit),
        };
        let key = stream.key();
        let cutoff = expiry_cutoff(&self.retention);
        let rows = self
            .calls
            .run(&self.names[0], Repeat::Safe, || {
                sqlx::query(statement.clone())
                    .bind(key.as_str())
                    .bind(key.as_str())
                    .bind(bound)
                    .bind(cutoff)
                    .bind(bigint(limit as u64))
                    .fetch_all(&self.pool)
            })
            .await?;
        let mut slice = Slice::default();
        for row in &rows {
            let (last_seq, message) = read_row(row).map_err(|e| super::malformed(&e.to_string()))?;
            slice.last_seq = last_seq.max(0) as u64;
            if let Some(message) = message {
                slice.messages.push(message.into_stored()?);
            }
        }
        Ok(slice)
    }

    /// The user's read cursor, 0 if none.
    pub(crate) async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .calls
            .run(&self.names[1], Repeat::Safe, || {
                sqlx::query_scalar(self.statements.cursor.clone()).bind(user.as_str()).fetch_optional(&self.pool)
            })
            .await?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    /// Moves the user's read cursor forward to `seq`.
    pub(crate) async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        self.calls
            .run(&self.names[2], Repeat::Safe, || {
                sqlx::query(self.statements.ack.clone()).bind(user.as_str()).bind(bigint(seq)).execute(&self.pool)
            })
            .await?;
        Ok(())
    }

    /// Whether `SELECT 1` answers within [`READY_TIMEOUT`].
    pub(crate) async fn ready(&self) -> bool {
        let probe = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(READY_TIMEOUT, probe).await, Ok(Ok(_)))
    }
}

#[async_trait::async_trait]
impl<DB> Maintained for Tables<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    i64: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>,
    String: for<'r> Decode<'r, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    fn database(&self) -> &'static str {
        self.database
    }

    fn closed(&self) -> bool {
        self.pool.is_closed()
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn sample_clock(&self) -> Result<(), sqlx::Error> {
        self.sample(1).await
    }

    async fn sweep(&self) -> Result<(), sqlx::Error> {
        Tables::sweep(self).await
    }
}

/// A read's row: the stream's last seq, then a message's columns, NULL when none matched.
fn read_row<R: Row>(row: &R) -> Result<(i64, Option<MessageRow>), sqlx::Error>
where
    usize: ColumnIndex<R>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
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
