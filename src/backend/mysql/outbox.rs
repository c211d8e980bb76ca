//! The outbox in MySQL (8.0.1+) or MariaDB (10.6+): `<prefix>_outbox` and `<prefix>_outbox_dead`,
//! created by a versioned migration under `GET_LOCK`; rows claimed with `FOR UPDATE SKIP LOCKED`
//! and polled, every [`POLL_MIN`] while rows flow, backing off to [`POLL_MAX`] while idle.
//!
//! Sessions run at READ COMMITTED: at InnoDB's default REPEATABLE READ the claim would also take
//! gap locks, which would make the applications' inserts into the outbox wait for a batch.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{Connection, Executor, MySql, MySqlConnection, Row, Transaction};

use crate::outbox::{Claim, ClaimTxn, Older, Outbox, OutboxError, OutboxRow, check_prefix, redact_url, scrub};

const POLL_MIN: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(1);
/// A node that stops talking (frozen, or its host gone without closing the socket) loses its
/// connection, and so its transaction and locks, after this many seconds.
const WAIT_TIMEOUT_SECS: u32 = 120;
/// Longest a node waits for a first connection at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections: the consumer's transaction and one spare.
const POOL_SIZE: u32 = 2;

/// Every schema change of the outbox, in order; the version table records the last one applied.
/// `{p}` is the table prefix. MySQL commits each DDL statement by itself, so every statement is
/// written to be harmless when repeated after a crash between two of them.
const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE IF NOT EXISTS `{p}_outbox` (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        to_user TEXT NULL,
        to_room TEXT NULL,
        body MEDIUMTEXT NOT NULL,
        sender TEXT NULL,
        `key` TEXT NULL,
        created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        CONSTRAINT `{p}_outbox_one_destination` CHECK ((to_user IS NULL) <> (to_room IS NULL))
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS `{p}_outbox_dead` (
        id BIGINT NOT NULL PRIMARY KEY,
        to_user TEXT NULL,
        to_room TEXT NULL,
        body MEDIUMTEXT NOT NULL,
        sender TEXT NULL,
        `key` TEXT NULL,
        created_at DATETIME(6) NOT NULL,
        reason TEXT NOT NULL,
        failed_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
]];

/// The SQL of one prefix, built once.
struct Statements {
    claim: String,
    older: String,
    delete: String,
    copy_dead: String,
}

impl Statements {
    fn new(prefix: &str) -> Self {
        let (t, dead) = (format!("`{prefix}_outbox`"), format!("`{prefix}_outbox_dead`"));
        Self {
            claim: format!(
                "SELECT id, to_user, to_room, body, sender, `key` FROM {t} ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
            ),
            older: format!("SELECT id, to_user, to_room FROM {t} WHERE id < ?"),
            delete: format!("DELETE FROM {t} WHERE id = ?"),
            copy_dead: format!(
                "INSERT INTO {dead} (id, to_user, to_room, body, sender, `key`, created_at, reason)
                 SELECT id, to_user, to_room, body, sender, `key`, created_at, ? FROM {t} WHERE id = ?
                 ON DUPLICATE KEY UPDATE
                     to_user = VALUES(to_user), to_room = VALUES(to_room), body = VALUES(body),
                     sender = VALUES(sender), `key` = VALUES(`key`), created_at = VALUES(created_at),
                     reason = VALUES(reason), failed_at = CURRENT_TIMESTAMP(6)"
            ),
        }
    }
}

pub(crate) struct MysqlOutbox {
    pool: MySqlPool,
    sql: Statements,
    /// The current polling period in milliseconds: [`POLL_MIN`] after rows, doubling while idle.
    poll_ms: AtomicU64,
}

fn unavailable(e: sqlx::Error) -> OutboxError {
    OutboxError::Unavailable(e.to_string())
}

impl MysqlOutbox {
    /// Connects to `url`, creates or upgrades the `prefix`-named outbox tables. Errors name
    /// `--store` and never show the URL's password.
    pub(crate) async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        check_prefix(prefix)?;
        let shown = redact_url(url);
        let options = MySqlConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("--store {shown}: not a MySQL URL: {}", scrub(e, url)))?;
        // First, on a connection of its own: a failure to connect says why, where a pool only times out.
        migrate(&options, prefix)
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: {}", scrub(format!("{e:#}"), url)))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(60))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                    conn.execute(format!("SET SESSION wait_timeout = {WAIT_TIMEOUT_SECS}").as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("--store {shown}: cannot connect: {}", scrub(e, url)))?;
        Ok(Self { pool, sql: Statements::new(prefix), poll_ms: AtomicU64::new(POLL_MIN.as_millis() as u64) })
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

/// Applies the migrations these tables lack. Several nodes may start at once: a named lock (held
/// by this connection, so released when it closes, whatever happens) lets one migrate while the
/// others wait, then find nothing left to do.
async fn migrate(options: &MySqlConnectOptions, prefix: &str) -> anyhow::Result<()> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, MySqlConnection::connect_with(options));
    let mut conn = connect
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect: no answer within {CONNECT_TIMEOUT:?}"))?
        .context("cannot connect")?;
    let lock = format!("{prefix}_outbox_migration");
    let applied = async {
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)").bind(&lock).fetch_one(&mut conn).await?;
        if locked != Some(1) {
            anyhow::bail!("another node held the outbox migration lock for 60 s");
        }
        let versions = format!("`{prefix}_outbox_schema_version`");
        conn.execute(format!("CREATE TABLE IF NOT EXISTS {versions} (version INT NOT NULL) ENGINE = InnoDB").as_str())
            .await?;
        let current: i64 =
            sqlx::query_scalar(&format!("SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM {versions}"))
                .fetch_one(&mut conn)
                .await?;
        for (version, statements) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            for statement in *statements {
                conn.execute(statement.replace("{p}", prefix).as_str()).await?;
            }
            sqlx::query(&format!("INSERT INTO {versions} (version) VALUES (?)"))
                .bind(version as i64 + 1)
                .execute(&mut conn)
                .await?;
        }
        Ok(())
    }
    .await;
    // Closing the session releases the lock too; releasing first lets a waiting node go at once.
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)").bind(&lock).execute(&mut conn).await;
    let _ = conn.close().await;
    applied.context("migrating the outbox tables")
}

/// A text column read as bytes: MySQL marks columns with a binary collation as binary, which
/// sqlx will not decode as a string. The tables are utf8mb4, so the bytes are UTF-8.
fn text(row: &MySqlRow, column: &str) -> Result<Option<String>, sqlx::Error> {
    let bytes: Option<Vec<u8>> = row.try_get(column)?;
    Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn outbox_row(row: &MySqlRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        to_user: text(row, "to_user")?,
        to_room: text(row, "to_room")?,
        body: text(row, "body")?.unwrap_or_default(),
        sender: text(row, "sender")?,
        key: text(row, "key")?,
    })
}

#[async_trait]
impl Outbox for MysqlOutbox {
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError> {
        let mut txn = self.pool.begin().await.map_err(unavailable)?;
        let rows = sqlx::query(&self.sql.claim)
            .bind(limit as u64)
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
                .map(|r| Ok(Older { id: r.try_get("id")?, to_user: text(r, "to_user")?, to_room: text(r, "to_room")? }))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(unavailable)?,
        };
        if !rows.is_empty() {
            self.poll_ms.store(POLL_MIN.as_millis() as u64, Ordering::Relaxed);
        }
        let sql = &self.sql;
        let txn = MysqlClaim { txn, delete: sql.delete.clone(), copy_dead: sql.copy_dead.clone() };
        Ok(Claim { rows, older, txn: Box::new(txn) })
    }

    async fn wait(&self) {
        let ms = self.poll_ms.load(Ordering::Relaxed);
        self.poll_ms.store((ms * 2).min(POLL_MAX.as_millis() as u64), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct MysqlClaim {
    txn: Transaction<'static, MySql>,
    delete: String,
    copy_dead: String,
}

#[async_trait]
impl ClaimTxn for MysqlClaim {
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError> {
        sqlx::query(&self.delete).bind(id).execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError> {
        sqlx::query(&self.copy_dead).bind(reason).bind(id).execute(&mut *self.txn).await.map_err(unavailable)?;
        self.delete(id).await
    }

    async fn commit(self: Box<Self>) -> Result<(), OutboxError> {
        self.txn.commit().await.map_err(unavailable)
    }
}
