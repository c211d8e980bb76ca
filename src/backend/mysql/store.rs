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
use sqlx::{MySql, SqlStr};

use super::{SERVER_MS, classify};
use crate::backend::sql::{
    self, Appends, Calls, LockOrder, Repeat, Statements, Suspicion, TableStore, Tables, statement,
};
use crate::protocol::UserId;
use crate::store::{AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, StoreError};

/// The MySQL store: the shared tables, appending one `CALL` at a time.
pub(crate) type MysqlStore = TableStore<Procedure>;

/// Appends through the prefix's `append` procedure.
pub(crate) struct Procedure {
    /// The `CALL` of the procedure.
    call: SqlStr,
}

/// The statements of [`Tables`] on the tables named `<prefix>_…`.
fn statements(prefix: &str) -> Statements {
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
    Statements {
        server_ms: SERVER_MS,
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

impl TableStore<Procedure> {
    /// Connects to `url` (credentials never appear in errors), migrates the tables named
    /// `<prefix>_…`, samples the database's clock, and starts the periodic clock samples and sweeps
    /// of expired rows, which stop when the store is dropped or closed.
    pub(crate) async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self> {
        let suspicion = Arc::new(Suspicion::default());
        let pool = super::connect(url, prefix, suspicion.clone()).await?;
        let calls = Calls { classify, suspicion };
        let tables = Tables::open("mysql", (url, pool), prefix, retention, calls, statements(prefix)).await?;
        let call = statement(format!("CALL `{prefix}_append`(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"));
        Ok(Self::new(tables, Procedure { call }))
    }

    /// Drops the store's tables and procedure.
    #[cfg(test)]
    pub(crate) async fn drop_schema(&self) -> Result<(), sqlx::Error> {
        let p = &self.tables().prefix;
        let drop = format!(
            "DROP PROCEDURE IF EXISTS `{p}_append`; DROP TABLE IF EXISTS `{p}_streams`, `{p}_messages`, \
             `{p}_cursors`, `{p}_idempotency`, `{p}_schema_version`"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(self.pool()).await.map(|_| ())
    }
}

#[async_trait]
impl Appends for Procedure {
    type Database = MySql;

    async fn append(&self, tables: &Tables<MySql>, request: AppendRequest) -> Result<Appended, StoreError> {
        let message = &request.message;
        let order = LockOrder::new(request.entries.iter().map(|e| &e.stream));
        let Some(&reply_position) = order.positions.get(request.reply_entry) else {
            return Err(StoreError::Internal("the reply entry is not an entry".into()));
        };
        let (scope, key) = match &request.idempotency {
            Some((scope, key)) => (Some(scope.as_str()), Some(key.as_str())),
            None => (None, None),
        };
        let deadline = tables.clock.write_deadline();
        let streams = order.streams.join(" ");
        let (duplicate, mid, seqs): (i64, String, String) = tables
            .calls
            .run("mysql append", Repeat::Unsafe, || {
                sqlx::query_as(self.call.clone())
                    .bind(deadline)
                    .bind(&streams)
                    .bind(reply_position as i32 + 1)
                    .bind(&*message.mid)
                    .bind(&*message.from)
                    .bind(message.to.as_ref().map(UserId::as_str))
                    .bind(message.room.as_ref().map(|r| r.as_str()))
                    .bind(&*message.body)
                    .bind(sql::bigint(message.ts))
                    .bind(sql::bigint(tables.retention.max_messages))
                    .bind(scope)
                    .bind(key)
                    .bind(IDEMPOTENCY_WINDOW_MS as i64)
                    .fetch_one(&tables.pool)
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
}
