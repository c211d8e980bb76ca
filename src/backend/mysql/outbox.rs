//! The outbox in MySQL (8.0.1+) or MariaDB (10.6+): `<prefix>_outbox` and `<prefix>_outbox_dead`,
//! created by the store's migration runner (with a version table of their own, under the same
//! `GET_LOCK`); rows claimed with `FOR UPDATE SKIP LOCKED` and polled, every [`POLL_MIN`] while
//! rows flow, backing off to [`POLL_MAX`] while idle.
//!
//! A claim's transaction runs at READ COMMITTED: at InnoDB's default REPEATABLE READ the claim
//! would also take gap locks, which would make the applications' inserts into the outbox wait for
//! a batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::mysql::{MySqlPool, MySqlRow};
use sqlx::{MySql, Row, SqlStr, Transaction};

use super::migrate;
use crate::backend::sql::claim_outbox;
use crate::outbox::{Claim, ClaimTxn, Older, Outbox, OutboxError, OutboxRow};

const POLL_MIN: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(1);
/// Opens a claim's transaction at READ COMMITTED (`SET TRANSACTION` applies to the next one
/// only). A node that stops talking (frozen, or its host gone without closing the socket) loses
/// its connection, and so its transaction and locks, after 120 s of silence; the setting stays
/// on that pooled connection, whose idle spells the pool checks with a ping anyway.
pub(crate) const BEGIN: &str =
    "SET SESSION wait_timeout = 120; SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// The outbox's schema changes, version by version, statement by statement, recorded in
/// `<prefix>_outbox_schema_version` beside the store's own. `{p}` stands for the prefix. MySQL
/// commits each DDL statement by itself, so every statement is harmless when repeated after a
/// crash between two of them.
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

/// The statements of one prefix, built once.
struct Statements {
    claim: SqlStr,
    older: SqlStr,
    delete: SqlStr,
    copy_dead: SqlStr,
}

impl Statements {
    fn new(prefix: &str) -> Self {
        let statement = crate::backend::sql::statement;
        let (t, dead) = (format!("`{prefix}_outbox`"), format!("`{prefix}_outbox_dead`"));
        Self {
            claim: statement(format!(
                "SELECT id, to_user, to_room, body, sender, `key` FROM {t} ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
            )),
            older: statement(format!("SELECT id, to_user, to_room FROM {t} WHERE id < ?")),
            delete: statement(format!("DELETE FROM {t} WHERE id = ?")),
            copy_dead: statement(format!(
                "INSERT INTO {dead} (id, to_user, to_room, body, sender, `key`, created_at, reason)
                 SELECT id, to_user, to_room, body, sender, `key`, created_at, ? FROM {t} WHERE id = ?
                 ON DUPLICATE KEY UPDATE
                     to_user = VALUES(to_user), to_room = VALUES(to_room), body = VALUES(body),
                     sender = VALUES(sender), `key` = VALUES(`key`), created_at = VALUES(created_at),
                     reason = VALUES(reason), failed_at = CURRENT_TIMESTAMP(6)"
            )),
        }
    }
}

/// The outbox of the MySQL store, on the store's pool: a claim's transaction is one of its
/// connections while the appends it makes take others.
pub(crate) struct MysqlOutbox {
    pool: MySqlPool,
    sql: Arc<Statements>,
    /// The current polling period in milliseconds: [`POLL_MIN`] after rows, doubling while idle.
    poll_ms: AtomicU64,
}

fn unavailable(e: sqlx::Error) -> OutboxError {
    OutboxError::Unavailable(e.to_string())
}

impl MysqlOutbox {
    /// Creates or upgrades the `prefix`-named outbox tables (the prefix the store validated).
    pub(crate) async fn start(pool: MySqlPool, prefix: &str) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await.context("migrating the outbox tables")?;
        migrate(&mut conn, prefix, "outbox_schema_version", MIGRATIONS).await.context("migrating the outbox tables")?;
        drop(conn);
        let sql = Arc::new(Statements::new(prefix));
        Ok(Self { pool, sql, poll_ms: AtomicU64::new(POLL_MIN.as_millis() as u64) })
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &MySqlPool {
        &self.pool
    }
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

fn older_row(row: &MySqlRow) -> Result<Older, sqlx::Error> {
    Ok(Older { id: row.try_get("id")?, to_user: text(row, "to_user")?, to_room: text(row, "to_room")? })
}

#[async_trait]
impl Outbox for MysqlOutbox {
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError> {
        let statements = (&self.sql.claim, &self.sql.older);
        let (txn, rows, older) =
            claim_outbox(&self.pool, BEGIN, statements, limit, (outbox_row, older_row)).await.map_err(unavailable)?;
        if !rows.is_empty() {
            self.poll_ms.store(POLL_MIN.as_millis() as u64, Ordering::Relaxed);
        }
        Ok(Claim { rows, older, txn: Box::new(MysqlClaim { txn, sql: self.sql.clone() }) })
    }

    async fn wait(&self) {
        let ms = self.poll_ms.load(Ordering::Relaxed);
        self.poll_ms.store((ms * 2).min(POLL_MAX.as_millis() as u64), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct MysqlClaim {
    txn: Transaction<'static, MySql>,
    sql: Arc<Statements>,
}

#[async_trait]
impl ClaimTxn for MysqlClaim {
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError> {
        sqlx::query(self.sql.delete.clone()).bind(id).execute(&mut *self.txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError> {
        let copy = sqlx::query(self.sql.copy_dead.clone()).bind(reason).bind(id);
        copy.execute(&mut *self.txn).await.map_err(unavailable)?;
        self.delete(id).await
    }

    async fn commit(self: Box<Self>) -> Result<(), OutboxError> {
        self.txn.commit().await.map_err(unavailable)
    }
}
