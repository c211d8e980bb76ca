//! The outbox in PostgreSQL: `"<prefix>".outbox` and `"<prefix>".outbox_dead` in the store's
//! schema, created by the store's migration runner (with a version table of their own, under the
//! same lock); rows claimed with `FOR UPDATE SKIP LOCKED`; a statement trigger sends `NOTIFY` on
//! insert, and a [`PgListener`] wakes the consumer, with a fallback poll for notifications lost
//! while the listener reconnected.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{Postgres, Row, SqlStr, Transaction};
use tokio::sync::Mutex;

use super::{migrate, schema};
use crate::backend::sql::claim_outbox;
use crate::outbox::{Claim, ClaimTxn, Older, Outbox, OutboxError, OutboxRow};

/// How often the consumer looks for rows when no notification came.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// Opens a claim's transaction. A node that stops talking inside it (frozen, or its host gone
/// without closing the socket) loses it after 60 s, which unlocks its rows for the other nodes:
/// longer than the consumer's own timeouts between two statements. `SET LOCAL` ends with the
/// transaction, so the store's statements on the same pooled connection keep the defaults.
pub(crate) const BEGIN: &str = "BEGIN; SET LOCAL idle_in_transaction_session_timeout = '60s'";

/// The outbox's schema changes, version by version, recorded in `outbox_schema_version` beside
/// the store's own. `{s}` stands for the quoted schema name. The trigger notifies the channel
/// `<prefix>.outbox` ([`channel`]); the prefix is the schema's name.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE {s}.outbox (
    id bigserial PRIMARY KEY,
    to_user text,
    to_room text,
    body text NOT NULL,
    sender text,
    "key" text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_one_destination CHECK ((to_user IS NULL) <> (to_room IS NULL))
);
CREATE TABLE {s}.outbox_dead (
    id bigint PRIMARY KEY,
    to_user text,
    to_room text,
    body text NOT NULL,
    sender text,
    "key" text,
    created_at timestamptz NOT NULL,
    reason text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$fn$;
CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_notify();
"#];

/// The statements of one prefix, built once.
struct Statements {
    claim: SqlStr,
    older: SqlStr,
    delete: SqlStr,
    dead_letter: SqlStr,
}

impl Statements {
    fn new(s: &str) -> Self {
        let statement = crate::backend::sql::statement;
        Self {
            claim: statement(format!(
                r#"SELECT id, to_user, to_room, body, sender, "key" FROM {s}.outbox
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"#
            )),
            older: statement(format!("SELECT id, to_user, to_room FROM {s}.outbox WHERE id < $1")),
            delete: statement(format!("DELETE FROM {s}.outbox WHERE id = $1")),
            dead_letter: statement(format!(
                r#"WITH moved AS (
                       DELETE FROM {s}.outbox WHERE id = $1
                       RETURNING id, to_user, to_room, body, sender, "key", created_at
                   )
                   INSERT INTO {s}.outbox_dead (id, to_user, to_room, body, sender, "key", created_at, reason)
                   SELECT id, to_user, to_room, body, sender, "key", created_at, $2 FROM moved
                   ON CONFLICT (id) DO UPDATE SET
                       to_user = excluded.to_user, to_room = excluded.to_room, body = excluded.body,
                       sender = excluded.sender, "key" = excluded."key",
                       created_at = excluded.created_at, reason = excluded.reason, failed_at = now()"#
            )),
        }
    }
}

/// The outbox of the PostgreSQL store, on the store's pool: a claim's transaction is one of its
/// connections while the appends it makes take others, and the listener keeps one for itself.
pub(crate) struct PostgresOutbox {
    pool: PgPool,
    sql: Arc<Statements>,
    listener: Mutex<PgListener>,
    fallback: Duration,
}

/// The notification channel of a prefix.
fn channel(prefix: &str) -> String {
    format!("{prefix}.outbox")
}

fn unavailable(e: sqlx::Error) -> OutboxError {
    OutboxError::Unavailable(e.to_string())
}

impl PostgresOutbox {
    /// Creates or upgrades the outbox tables in the store's schema `prefix` (already validated
    /// and created by the store) and starts listening for inserts.
    pub(crate) async fn start(pool: PgPool, prefix: &str) -> anyhow::Result<Self> {
        migrate(&pool, prefix, "outbox_schema_version", MIGRATIONS).await.context("migrating the outbox tables")?;
        let mut listener = PgListener::connect_with(&pool).await.context("listening for outbox rows")?;
        listener.listen(&channel(prefix)).await.context("listening for outbox rows")?;
        Ok(Self {
            pool,
            sql: Arc::new(Statements::new(&schema(prefix))),
            listener: Mutex::new(listener),
            fallback: FALLBACK_POLL,
        })
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Polls only this often without a notification (tests prove that notifications wake it).
    #[cfg(test)]
    pub(crate) fn with_fallback(mut self, fallback: Duration) -> Self {
        self.fallback = fallback;
        self
    }
}

fn outbox_row(row: &PgRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        to_user: row.try_get("to_user")?,
        to_room: row.try_get("to_room")?,
        body: row.try_get("body")?,
        sender: row.try_get("sender")?,
        key: row.try_get("key")?,
    })
}

fn older_row(row: &PgRow) -> Result<Older, sqlx::Error> {
    Ok(Older { id: row.try_get("id")?, to_user: row.try_get("to_user")?, to_room: row.try_get("to_room")? })
}

#[async_trait]
impl Outbox for PostgresOutbox {
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError> {
        let statements = (&self.sql.claim, &self.sql.older);
        let (txn, rows, older) =
            claim_outbox(&self.pool, BEGIN, statements, limit, (outbox_row, older_row)).await.map_err(unavailable)?;
        Ok(Claim { rows, older, txn: Box::new(PgClaim { txn, sql: self.sql.clone() }) })
    }

    async fn wait(&self) {
        let mut listener = self.listener.lock().await;
        let woken = tokio::time::timeout(self.fallback, async {
            match listener.try_recv().await {
                // A notification, or the connection was lost (and is back): rows may be there.
                Ok(_) => {}
                // The claims fail too and say so; until the listener is back, poll.
                Err(e) => {
                    tracing::debug!(error = %e, "outbox: the notification listener failed; polling");
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if woken.is_ok() {
            // One wake-up for a burst of inserts.
            while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::ZERO, listener.try_recv()).await {}
        }
    }
}

struct PgClaim {
    txn: Transaction<'static, Postgres>,
    sql: Arc<Statements>,
}

#[async_trait]
impl ClaimTxn for PgClaim {
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError> {
        sqlx::query(self.sql.delete.clone()).bind(id).execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError> {
        let moved = sqlx::query(self.sql.dead_letter.clone()).bind(id).bind(reason);
        moved.execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), OutboxError> {
        self.txn.commit().await.map_err(unavailable)
    }
}
