//! The outbox in PostgreSQL: `"<prefix>".outbox` and `"<prefix>".outbox_dead`, created by a
//! versioned migration under an advisory lock; rows claimed with `FOR UPDATE SKIP LOCKED`; a
//! statement trigger sends `NOTIFY` on insert, and a [`PgListener`] wakes the consumer, with a
//! fallback poll for notifications lost while the listener reconnected.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, PgConnection, Postgres, Row, Transaction};
use tokio::sync::Mutex;

use crate::outbox::{Claim, ClaimTxn, Older, Outbox, OutboxError, OutboxRow, check_prefix, redact_url, scrub};

/// How often the consumer looks for rows when no notification came.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// A node that stops talking inside a transaction (frozen, or its host gone without closing the
/// socket) loses it after this long, which unlocks its rows for the other nodes. Longer than the
/// consumer's own timeouts between two statements.
const IDLE_IN_TRANSACTION: &str = "60s";
/// Longest a node waits for a first connection at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections: the listener's, the consumer's transaction, one spare.
const POOL_SIZE: u32 = 3;

/// Every schema change of the outbox, in order; the version table records the last one applied.
/// `{s}` is the quoted schema, `{chan}` the notification channel as a string literal.
const MIGRATIONS: &[&[&str]] = &[&[
    r#"CREATE TABLE {s}.outbox (
        id bigserial PRIMARY KEY,
        to_user text,
        to_room text,
        body text NOT NULL,
        sender text,
        "key" text,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT outbox_one_destination CHECK ((to_user IS NULL) <> (to_room IS NULL))
    )"#,
    r#"CREATE TABLE {s}.outbox_dead (
        id bigint PRIMARY KEY,
        to_user text,
        to_room text,
        body text NOT NULL,
        sender text,
        "key" text,
        created_at timestamptz NOT NULL,
        reason text NOT NULL,
        failed_at timestamptz NOT NULL DEFAULT now()
    )"#,
    r#"CREATE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM pg_notify({chan}, '');
        RETURN NULL;
    END
    $fn$"#,
    r#"CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_notify()"#,
]];

/// The SQL of one prefix, built once.
struct Statements {
    claim: String,
    older: String,
    delete: String,
    dead_letter: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let (t, dead) = (format!("{schema}.outbox"), format!("{schema}.outbox_dead"));
        Self {
            claim: format!(
                r#"SELECT id, to_user, to_room, body, sender, "key" FROM {t}
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"#
            ),
            older: format!("SELECT id, to_user, to_room FROM {t} WHERE id < $1"),
            delete: format!("DELETE FROM {t} WHERE id = $1"),
            dead_letter: format!(
                r#"WITH moved AS (
                       DELETE FROM {t} WHERE id = $1
                       RETURNING id, to_user, to_room, body, sender, "key", created_at
                   )
                   INSERT INTO {dead} (id, to_user, to_room, body, sender, "key", created_at, reason)
                   SELECT id, to_user, to_room, body, sender, "key", created_at, $2 FROM moved
                   ON CONFLICT (id) DO UPDATE SET
                       to_user = excluded.to_user, to_room = excluded.to_room, body = excluded.body,
                       sender = excluded.sender, "key" = excluded."key",
                       created_at = excluded.created_at, reason = excluded.reason, failed_at = now()"#
            ),
        }
    }
}

pub(crate) struct PostgresOutbox {
    pool: PgPool,
    sql: Statements,
    listener: Mutex<PgListener>,
    fallback: Duration,
}

/// `"name"` with inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The notification channel of a prefix.
fn channel(prefix: &str) -> String {
    format!("{prefix}.outbox")
}

fn unavailable(e: sqlx::Error) -> OutboxError {
    OutboxError::Unavailable(e.to_string())
}

impl PostgresOutbox {
    /// Connects to `url`, creates or upgrades the outbox tables in schema `prefix` and starts
    /// listening for inserts. Errors name `--store` and never show the URL's password.
    pub(crate) async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        check_prefix(prefix)?;
        let shown = redact_url(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("--store {shown}: not a PostgreSQL URL: {}", scrub(e, url)))?
            .application_name("switchyard-outbox");
        // First, on a connection of its own: a failure to connect says why, where a pool only times out.
        migrate(&options, prefix)
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: {}", scrub(format!("{e:#}"), url)))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(60))
            // A SET rather than a startup option, which connection poolers may refuse.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    let set = format!("SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}'");
                    conn.execute(set.as_str()).await.map(drop)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: cannot connect: {}", scrub(e, url)))?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: cannot listen: {}", scrub(e, url)))?;
        listener
            .listen(&channel(prefix))
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: cannot listen: {}", scrub(e, url)))?;
        Ok(Self {
            pool,
            sql: Statements::new(&quote_ident(prefix)),
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

/// Applies the migrations this schema lacks. Several nodes may start at once: an advisory lock
/// (held by this connection's session, so released when it closes, whatever happens) lets one
/// migrate while the others wait, then find nothing left to do.
async fn migrate(options: &PgConnectOptions, prefix: &str) -> anyhow::Result<()> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options));
    let mut conn = connect
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect: no answer within {CONNECT_TIMEOUT:?}"))?
        .context("cannot connect")?;
    let schema = quote_ident(prefix);
    let lock_key = format!("switchyard outbox migration {prefix}");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&lock_key)
        .execute(&mut conn)
        .await
        .context("taking the migration lock")?;
    let applied = async {
        // The store may create the same schema without our lock: tolerate losing that race.
        if let Err(e) = conn.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str()).await {
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(prefix)
                .fetch_one(&mut conn)
                .await?;
            if !exists {
                return Err(e);
            }
        }
        conn.execute(
            format!("CREATE TABLE IF NOT EXISTS {schema}.outbox_schema_version (version integer NOT NULL)").as_str(),
        )
        .await?;
        let current: i32 =
            sqlx::query_scalar(&format!("SELECT COALESCE(max(version), 0) FROM {schema}.outbox_schema_version"))
                .fetch_one(&mut conn)
                .await?;
        for (version, statements) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let mut txn = conn.begin().await?;
            for statement in *statements {
                let sql = statement.replace("{s}", &schema).replace("{chan}", &quote_literal(&channel(prefix)));
                (&mut *txn).execute(sql.as_str()).await?;
            }
            sqlx::query(&format!("INSERT INTO {schema}.outbox_schema_version (version) VALUES ($1)"))
                .bind(version as i32 + 1)
                .execute(&mut *txn)
                .await?;
            txn.commit().await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    let _ = conn.close().await;
    applied.context("migrating the outbox tables")
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

#[async_trait]
impl Outbox for PostgresOutbox {
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError> {
        let mut txn = self.pool.begin().await.map_err(unavailable)?;
        let rows = sqlx::query(&self.sql.claim)
            .bind(limit as i64)
            .fetch_all(&mut *txn)
            .await
            .map_err(unavailable)?
            .iter()
            .map(outbox_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        let older = match rows.last() {
            None => Vec::new(),
            Some(last) => sqlx::query(&self.sql.older)
                .bind(last.id)
                .fetch_all(&mut *txn)
                .await
                .map_err(unavailable)?
                .iter()
                .map(|r| {
                    Ok(Older { id: r.try_get("id")?, to_user: r.try_get("to_user")?, to_room: r.try_get("to_room")? })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(unavailable)?,
        };
        let txn = PgClaim { txn, delete: self.sql.delete.clone(), dead_letter: self.sql.dead_letter.clone() };
        Ok(Claim { rows, older, txn: Box::new(txn) })
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
    delete: String,
    dead_letter: String,
}

#[async_trait]
impl ClaimTxn for PgClaim {
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError> {
        sqlx::query(&self.delete).bind(id).execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError> {
        sqlx::query(&self.dead_letter).bind(id).bind(reason).execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), OutboxError> {
        self.txn.commit().await.map_err(unavailable)
    }
}
