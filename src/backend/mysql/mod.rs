//! MySQL and MariaDB: the connection pool, the tables and their migrations, and how their errors
//! map onto the store's.
//!
//! A database holds several clusters (and tests) side by side: every table and routine of one is
//! named `<prefix>_…`. MySQL cannot run DDL in a transaction, so migrations are numbered, each
//! statement can run again after a half-done attempt (`IF NOT EXISTS`, drop then create), and a
//! node runs the missing ones while holding `GET_LOCK` on the prefix, so nodes starting together
//! migrate once, one after the other.

mod outbox;
mod store;

use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, MySql};

use super::sql::{self, Failure, Suspicion};

#[cfg(test)]
pub(crate) use outbox::BEGIN as OUTBOX_BEGIN;
pub(crate) use outbox::MysqlOutbox;
pub(crate) use store::MysqlStore;

/// The schema, version by version, statement by statement. `{p}` stands for the prefix.
const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE IF NOT EXISTS `{p}_streams` (
        stream VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        last_seq BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS `{p}_messages` (
        stream VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        seq BIGINT NOT NULL,
        mid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        sender VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
        recipient VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NULL,
        room VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NULL,
        body LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (stream, seq),
        KEY messages_ts (ts)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS `{p}_cursors` (
        user_id VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        seq BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS `{p}_idempotency` (
        scope VARBINARY(512) NOT NULL,
        idem_key VARBINARY(512) NOT NULL,
        mid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        seq BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (scope, idem_key),
        KEY idempotency_expires (expires_at)
    ) ENGINE=InnoDB",
    "DROP PROCEDURE IF EXISTS `{p}_append`",
    // One append, all or nothing, in one CALL: the COMMIT runs inside it, right after the
    // deadline check, with no round trip in between in which a late COMMIT could arrive.
    // p_streams holds the stream names, sorted (the order their rows are locked in) and separated
    // by spaces, which names never contain; seqs come back in that order, the same way.
    "CREATE PROCEDURE `{p}_append`(
        IN p_deadline BIGINT, IN p_streams TEXT CHARACTER SET ascii, IN p_reply INT,
        IN p_mid VARCHAR(64) CHARACTER SET ascii, IN p_sender VARCHAR(255) CHARACTER SET utf8mb4,
        IN p_recipient VARCHAR(140) CHARACTER SET ascii, IN p_room VARCHAR(140) CHARACTER SET ascii,
        IN p_body LONGTEXT CHARACTER SET utf8mb4, IN p_ts BIGINT, IN p_keep BIGINT,
        IN p_scope VARBINARY(512), IN p_key VARBINARY(512), IN p_window BIGINT)
    MODIFIES SQL DATA
    proc: BEGIN
        DECLARE v_now BIGINT;
        DECLARE v_rest TEXT CHARACTER SET ascii DEFAULT p_streams;
        DECLARE v_stream VARCHAR(140) CHARACTER SET ascii;
        DECLARE v_i INT DEFAULT 0;
        DECLARE v_seq BIGINT;
        DECLARE v_reply BIGINT DEFAULT 0;
        DECLARE v_seqs TEXT CHARACTER SET ascii DEFAULT '';
        DECLARE v_mid VARCHAR(64) CHARACTER SET ascii;
        DECLARE v_expires BIGINT DEFAULT NULL;
        DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;
        -- Whatever fails, nothing stays behind on the pooled connection.
        DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
        SET v_now = FLOOR(UNIX_TIMESTAMP(SYSDATE(6)) * 1000);
        IF v_now > p_deadline THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'switchyard: the append reached the database after its deadline';
        END IF;
        SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
        START TRANSACTION;
        IF p_key IS NOT NULL THEN
            -- A racing append with the same key waits on this row, or loses the insert below
            -- with a duplicate key, rolls back and is called again: then it finds this row.
            SELECT mid, seq, expires_at INTO v_mid, v_seq, v_expires FROM `{p}_idempotency`
                WHERE scope = p_scope AND idem_key = p_key FOR UPDATE;
            IF v_expires > v_now THEN
                COMMIT;
                SELECT CAST(1 AS SIGNED) AS duplicate, v_mid AS mid, CAST(v_seq AS CHAR) AS seqs;
                LEAVE proc;
            END IF;
            IF v_expires IS NULL THEN
                INSERT INTO `{p}_idempotency` (scope, idem_key, mid, seq, expires_at)
                    VALUES (p_scope, p_key, p_mid, 0, v_now + p_window);
            ELSE
                -- Expired, and locked by the SELECT above: take it over.
                UPDATE `{p}_idempotency` SET mid = p_mid, seq = 0, expires_at = v_now + p_window
                    WHERE scope = p_scope AND idem_key = p_key;
            END IF;
        END IF;
        WHILE v_rest <> '' DO
            SET v_stream = SUBSTRING_INDEX(v_rest, ' ', 1);
            SET v_rest = SUBSTRING(v_rest, CHAR_LENGTH(v_stream) + 2);
            SET v_i = v_i + 1;
            INSERT INTO `{p}_streams` (stream, last_seq) VALUES (v_stream, 1)
                ON DUPLICATE KEY UPDATE last_seq = last_seq + 1;
            SELECT last_seq INTO v_seq FROM `{p}_streams` WHERE stream = v_stream;
            INSERT INTO `{p}_messages` (stream, seq, mid, sender, recipient, room, body, ts)
                VALUES (v_stream, v_seq, p_mid, p_sender, p_recipient, p_room, p_body, p_ts);
            IF v_seq > p_keep THEN
                DELETE FROM `{p}_messages` WHERE stream = v_stream AND seq <= v_seq - p_keep;
            END IF;
            SET v_seqs = IF(v_i = 1, CAST(v_seq AS CHAR), CONCAT(v_seqs, ' ', v_seq));
            IF v_i = p_reply THEN
                SET v_reply = v_seq;
            END IF;
        END WHILE;
        IF p_key IS NOT NULL THEN
            UPDATE `{p}_idempotency` SET seq = v_reply WHERE scope = p_scope AND idem_key = p_key;
        END IF;
        -- Checked last, after every lock wait: past this point only the commit remains.
        IF FLOOR(UNIX_TIMESTAMP(SYSDATE(6)) * 1000) > p_deadline THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'switchyard: the append reached the database after its deadline';
        END IF;
        COMMIT;
        SELECT CAST(0 AS SIGNED) AS duplicate, p_mid AS mid, v_seqs AS seqs;
    END",
]];

/// The database's clock in ms.
const SERVER_MS: &str = "SELECT CAST(FLOOR(UNIX_TIMESTAMP(SYSDATE(6)) * 1000) AS SIGNED)";

/// Opens a bounded pool on `url` and migrates the tables of `prefix`.
pub(crate) async fn connect(url: &str, prefix: &str, suspicion: Arc<Suspicion>) -> anyhow::Result<MySqlPool> {
    sql::validate_prefix(prefix)?;
    let shown = super::redact(url);
    let options = MySqlConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("--store {shown}: not a valid MySQL URL ({e})"))?
        .charset("utf8mb4")
        .timezone(Some("+00:00".to_owned()));
    sql::probe::<sqlx::MySqlConnection>(&options)
        .await
        .map_err(|e| anyhow::anyhow!("--store {shown}: cannot reach MySQL ({e})"))?;
    // The server gives up on a lock wait on its own too, freeing the connection.
    let pool = sql::open_pool(options, sql::MAX_CONNECTIONS, "SET SESSION innodb_lock_wait_timeout = 2", suspicion)
        .await
        .map_err(|e| anyhow::anyhow!("--store {shown}: cannot reach MySQL ({e})"))?;
    let mut conn = pool.acquire().await.with_context(|| format!("--store {shown}: cannot reach MySQL"))?;
    migrate(&mut conn, prefix, "schema_version", MIGRATIONS)
        .await
        .with_context(|| format!("--store {shown}: migrating tables {prefix}_*"))?;
    Ok(pool)
}

/// Runs the `migrations` this database lacks, recording them in `<prefix>_<versions>`, once
/// across nodes that start together (the store's and the outbox's take the same lock).
async fn migrate(
    conn: &mut PoolConnection<MySql>,
    prefix: &str,
    versions: &str,
    migrations: &[&[&str]],
) -> anyhow::Result<()> {
    let lock = format!("switchyard-migrate:{prefix}");
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)").bind(&lock).fetch_one(&mut **conn).await?;
    anyhow::ensure!(locked == Some(1), "another node held the migration lock {lock:?} for 60 s");
    let outcome = migrate_locked(conn, prefix, versions, migrations).await;
    let released = sqlx::query("SELECT RELEASE_LOCK(?)").bind(&lock).execute(&mut **conn).await;
    outcome?;
    released?;
    Ok(())
}

async fn migrate_locked(
    conn: &mut PoolConnection<MySql>,
    prefix: &str,
    versions: &str,
    migrations: &[&[&str]],
) -> anyhow::Result<()> {
    let versions = format!("`{prefix}_{versions}`");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {versions} (version INT NOT NULL PRIMARY KEY, \
         applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
    )))
    .execute(&mut **conn)
    .await?;
    let current: i64 =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM {versions}")))
            .fetch_one(&mut **conn)
            .await?;
    let latest = migrations.len() as i64;
    anyhow::ensure!(
        current <= latest,
        "the tables are at version {current}, newer than this node knows ({latest}): upgrade the node"
    );
    for (version, statements) in (1..).zip(migrations).skip(current as usize) {
        for statement in *statements {
            sqlx::raw_sql(AssertSqlSafe(statement.replace("{p}", prefix))).execute(&mut **conn).await?;
        }
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {versions} (version) VALUES (?)")))
            .bind(version)
            .execute(&mut **conn)
            .await?;
    }
    Ok(())
}

/// Sorts a failure: conflicts that rolled everything back are tried again, a database that is
/// away or overloaded is `unavailable`, anything else is a defect.
fn classify(e: &sqlx::Error) -> Failure {
    let sqlx::Error::Database(db) = e else { return sql::transport_failure(e) };
    let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>() else {
        return Failure::Internal(format!("mysql: {}", db.message()));
    };
    match (my.number(), my.code()) {
        // Deadlock (the transaction was rolled back), a racing first insert of a key.
        (1213 | 1062, _) => Failure::Retry,
        (_, Some("45000")) if my.message().starts_with("switchyard:") => {
            Failure::Unavailable("the database reached the append after its deadline: nothing was stored".into())
        }
        // The server is shutting down, or killed this connection.
        (1053 | 1927, _) => Failure::Lost(format!("mysql: {}", my.message())),
        // Lock wait timeout, too many connections, interrupted, statement timeouts.
        (1205 | 1040 | 1317 | 1969 | 3024, _) => Failure::Unavailable(format!("mysql: {}", my.message())),
        (number, _) => Failure::Internal(format!("mysql: {} ({number})", my.message())),
    }
}
