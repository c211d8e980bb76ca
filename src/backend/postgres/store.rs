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

use super::batch::Batcher;
use super::{SERVER_MS, classify, schema};
use crate::backend::sql::{Calls, Statements, Suspicion, TableStore, Tables, statement};
use crate::store::Retention;

/// The PostgreSQL store: the shared tables, appending in batches.
pub(crate) type PostgresStore = TableStore<Batcher>;

/// The statements of [`Tables`] on the schema `s` (quoted).
fn statements(s: &str) -> Statements {
    let read = |condition: &str, direction: &str| {
        statement(format!(
            "SELECT s.last_seq, m.seq, m.mid, m.sender, m.recipient, m.room, m.body, m.ts \
             FROM (SELECT coalesce(max(last_seq), 0) AS last_seq FROM {s}.streams WHERE stream = $1) s \
             LEFT JOIN (SELECT seq, mid, sender, recipient, room, body, ts FROM {s}.messages \
                        WHERE stream = $2 AND {condition} AND ts >= $4 ORDER BY seq {direction} LIMIT $5) m \
             ON true ORDER BY m.seq"
        ))
    };
    Statements {
        server_ms: SERVER_MS,
        read_ascending: read("seq > $3", "ASC"),
        read_descending: read("seq < $3", "DESC"),
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

impl TableStore<Batcher> {
    /// Connects to `url` (credentials never appear in errors), migrates the schema named
    /// `prefix`, samples the database's clock, and starts the periodic clock samples and sweeps
    /// of expired rows, which stop when the store is dropped or closed, and the append lanes.
    pub(crate) async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self> {
        let suspicion = Arc::new(Suspicion::default());
        let pool = super::connect(url, prefix, suspicion.clone()).await?;
        let calls = Calls { classify, suspicion };
        let s = schema(prefix);
        let tables = Tables::open("postgres", (url, pool), prefix, retention, calls, statements(&s)).await?;
        let append_batch = statement(format!(
            "SELECT o_message, o_duplicate, o_mid, o_seqs \
             FROM {s}.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ));
        let appends = Batcher::start(tables.clone(), append_batch);
        Ok(Self::new(tables, appends))
    }

    /// Drops the store's schema and everything in it.
    #[cfg(test)]
    pub(crate) async fn drop_schema(&self) -> Result<(), sqlx::Error> {
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", schema(&self.tables().prefix));
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(self.pool()).await.map(|_| ())
    }
}
