//! PostgreSQL: the connection pool, the schema and its migrations, and how its errors map onto
//! the store's.
//!
//! Everything a cluster keeps lives in one schema named by the prefix, so several clusters (and
//! tests) share one database. Migrations are numbered; each node runs the missing ones at start
//! inside one transaction that holds an advisory lock on the prefix, so nodes starting together
//! migrate once, one after the other, and a failed migration leaves nothing behind.

mod batch;
mod outbox;
mod store;

use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool};

use super::sql::{self, Failure, Suspicion};

#[cfg(test)]
pub(crate) use outbox::BEGIN as OUTBOX_BEGIN;
pub(crate) use outbox::PostgresOutbox;
pub(crate) use store::PostgresStore;

/// SQLSTATE the append function raises when it runs after its deadline.
const LATE: &str = "SY001";

/// The schema, version by version. `{s}` stands for the quoted schema name.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.streams (
    stream text COLLATE "C" PRIMARY KEY,
    last_seq bigint NOT NULL
);
CREATE TABLE {s}.messages (
    stream text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    mid text NOT NULL,
    sender text NOT NULL,
    recipient text,
    room text,
    body text NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (stream, seq)
);
CREATE INDEX messages_ts ON {s}.messages (ts);
CREATE TABLE {s}.cursors (
    user_id text COLLATE "C" PRIMARY KEY,
    seq bigint NOT NULL
);
CREATE TABLE {s}.idempotency (
    scope text COLLATE "C" NOT NULL,
    idem_key text COLLATE "C" NOT NULL,
    mid text NOT NULL,
    seq bigint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
CREATE INDEX idempotency_expires ON {s}.idempotency (expires_at);

-- One append, all or nothing, in one statement (so in one implicit transaction that commits as
-- the statement ends, with no round trip left in which a late COMMIT could arrive). p_streams are
-- sorted, the order the streams rows are locked in; seqs come back in that order.
CREATE FUNCTION {s}.append(
    p_deadline bigint, p_streams text[], p_reply int, p_mid text, p_sender text, p_recipient text,
    p_room text, p_body text, p_ts bigint, p_keep bigint, p_scope text, p_key text, p_window bigint)
RETURNS TABLE (o_duplicate boolean, o_mid text, o_seqs bigint[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    v_stream text;
    v_seq bigint;
    v_seqs bigint[] := '{}';
BEGIN
    IF v_now > p_deadline THEN
        RAISE EXCEPTION 'the append reached the database after its deadline' USING ERRCODE = 'SY001';
    END IF;
    IF p_key IS NOT NULL THEN
        -- Claim the key first: a racing append with the same key waits here for this one's
        -- transaction, then finds the key taken and answers the first append.
        INSERT INTO {s}.idempotency AS i (scope, idem_key, mid, seq, expires_at)
            VALUES (p_scope, p_key, p_mid, 0, v_now + p_window)
            ON CONFLICT (scope, idem_key) DO UPDATE
                SET mid = excluded.mid, seq = 0, expires_at = excluded.expires_at
                WHERE i.expires_at <= v_now;
        IF NOT FOUND THEN
            RETURN QUERY SELECT true, i.mid, ARRAY[i.seq] FROM {s}.idempotency i
                WHERE i.scope = p_scope AND i.idem_key = p_key;
            RETURN;
        END IF;
    END IF;
    FOREACH v_stream IN ARRAY p_streams LOOP
        INSERT INTO {s}.streams AS st (stream, last_seq) VALUES (v_stream, 1)
            ON CONFLICT (stream) DO UPDATE SET last_seq = st.last_seq + 1
            RETURNING st.last_seq INTO v_seq;
        INSERT INTO {s}.messages (stream, seq, mid, sender, recipient, room, body, ts)
            VALUES (v_stream, v_seq, p_mid, p_sender, p_recipient, p_room, p_body, p_ts);
        IF v_seq > p_keep THEN
            DELETE FROM {s}.messages m WHERE m.stream = v_stream AND m.seq <= v_seq - p_keep;
        END IF;
        v_seqs := v_seqs || v_seq;
    END LOOP;
    IF p_key IS NOT NULL THEN
        UPDATE {s}.idempotency i SET seq = v_seqs[p_reply] WHERE i.scope = p_scope AND i.idem_key = p_key;
    END IF;
    -- Checked last, after every lock wait: past this point only the commit remains.
    IF (extract(epoch FROM clock_timestamp()) * 1000)::bigint > p_deadline THEN
        RAISE EXCEPTION 'the append reached the database after its deadline' USING ERRCODE = 'SY001';
    END IF;
    RETURN QUERY SELECT false, p_mid, v_seqs;
END
$fn$;
"#,
    r#"
-- Many appends in one statement and one transaction (group commit: one commit and one lock
-- hold per stream for a whole batch). Message i is (p_mids[i], p_senders[i], …); its entries are
-- the positions e of p_entry_messages holding i, in the order its seqs come back, and
-- p_replies[i] is the entry whose seq its idempotency key remembers. Locks are taken keys first,
-- then streams, each in byte order, so that batches from several nodes never deadlock; the
-- single `append` above stays for nodes not yet upgraded and takes its locks the same way.
CREATE FUNCTION {s}.append_batch(
    p_deadline bigint, p_keep bigint, p_window bigint,
    p_mids text[], p_senders text[], p_recipients text[], p_rooms text[], p_bodies text[],
    p_ts bigint[], p_scopes text[], p_keys text[], p_replies int[],
    p_entry_messages int[], p_entry_streams text[])
RETURNS TABLE (o_message int, o_duplicate boolean, o_mid text, o_seqs bigint[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    v_duplicate boolean[] := array_fill(false, ARRAY[cardinality(p_mids)]);
    v_message int;
    v_stream text;
    v_count bigint;
    v_last bigint;
    v_at int;
    -- The batch's streams, in lock order, and the next seq of each.
    v_streams text[] := '{}';
    v_next bigint[] := '{}';
    -- The rows to insert: stream, seq and message of each entry not answered as a duplicate.
    v_row_streams text[] := '{}';
    v_row_seqs bigint[] := '{}';
    v_row_messages int[] := '{}';
    v_keyed boolean := false;
BEGIN
    IF v_now > p_deadline THEN
        RAISE EXCEPTION 'the append reached the database after its deadline' USING ERRCODE = 'SY001';
    END IF;
    FOR v_message IN
        SELECT k.i::int FROM unnest(p_scopes, p_keys) WITH ORDINALITY AS k(scope, idem_key, i)
        WHERE k.idem_key IS NOT NULL ORDER BY k.scope COLLATE "C", k.idem_key COLLATE "C"
    LOOP
        INSERT INTO {s}.idempotency AS i (scope, idem_key, mid, seq, expires_at)
            VALUES (p_scopes[v_message], p_keys[v_message], p_mids[v_message], 0, v_now + p_window)
            ON CONFLICT (scope, idem_key) DO UPDATE
                SET mid = excluded.mid, seq = 0, expires_at = excluded.expires_at
                WHERE i.expires_at <= v_now;
        IF FOUND THEN
            v_keyed := true;
        ELSE
            v_duplicate[v_message] := true;
            RETURN QUERY SELECT v_message, true, i.mid, ARRAY[i.seq] FROM {s}.idempotency i
                WHERE i.scope = p_scopes[v_message] AND i.idem_key = p_keys[v_message];
        END IF;
    END LOOP;
    FOR v_stream, v_count IN
        SELECT e.stream, count(*) FROM unnest(p_entry_streams, p_entry_messages) AS e(stream, message)
        WHERE NOT v_duplicate[e.message] GROUP BY e.stream ORDER BY e.stream COLLATE "C"
    LOOP
        INSERT INTO {s}.streams AS st (stream, last_seq) VALUES (v_stream, v_count)
            ON CONFLICT (stream) DO UPDATE SET last_seq = st.last_seq + v_count
            RETURNING st.last_seq INTO v_last;
        v_streams := v_streams || v_stream;
        v_next := v_next || (v_last - v_count + 1);
    END LOOP;
    FOR v_at IN 1 .. coalesce(cardinality(p_entry_messages), 0) LOOP
        v_message := p_entry_messages[v_at];
        CONTINUE WHEN v_duplicate[v_message];
        v_row_streams := v_row_streams || p_entry_streams[v_at];
        v_row_messages := v_row_messages || v_message;
        v_row_seqs := v_row_seqs || v_next[array_position(v_streams, p_entry_streams[v_at])];
        v_next[array_position(v_streams, p_entry_streams[v_at])] :=
            v_next[array_position(v_streams, p_entry_streams[v_at])] + 1;
    END LOOP;
    INSERT INTO {s}.messages (stream, seq, mid, sender, recipient, room, body, ts)
        SELECT r.stream, r.seq, p_mids[r.message], p_senders[r.message], p_recipients[r.message],
               p_rooms[r.message], p_bodies[r.message], p_ts[r.message]
        FROM unnest(v_row_streams, v_row_seqs, v_row_messages) AS r(stream, seq, message);
    FOR v_at IN 1 .. coalesce(cardinality(v_streams), 0) LOOP
        IF v_next[v_at] - 1 > p_keep THEN
            DELETE FROM {s}.messages m WHERE m.stream = v_streams[v_at] AND m.seq <= v_next[v_at] - 1 - p_keep;
        END IF;
    END LOOP;
    IF v_keyed THEN
        UPDATE {s}.idempotency i SET seq = a.seqs[p_replies[a.message]]
            FROM (SELECT r.message, array_agg(r.seq ORDER BY r.entry) AS seqs
                  FROM unnest(v_row_messages, v_row_seqs) WITH ORDINALITY AS r(message, seq, entry)
                  GROUP BY r.message) a
            WHERE p_keys[a.message] IS NOT NULL AND i.scope = p_scopes[a.message] AND i.idem_key = p_keys[a.message];
    END IF;
    -- Checked last, after every lock wait: past this point only the commit remains.
    IF (extract(epoch FROM clock_timestamp()) * 1000)::bigint > p_deadline THEN
        RAISE EXCEPTION 'the append reached the database after its deadline' USING ERRCODE = 'SY001';
    END IF;
    RETURN QUERY SELECT r.message, false, p_mids[r.message], array_agg(r.seq ORDER BY r.entry)
        FROM unnest(v_row_messages, v_row_seqs) WITH ORDINALITY AS r(message, seq, entry)
        GROUP BY r.message;
END
$fn$;
"#,
];

/// What every connection sets once connected.
const SESSION_TIMEOUTS: &str = "SET lock_timeout = 2000; SET statement_timeout = 5000";

/// The database's clock in ms.
const SERVER_MS: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// Opens a bounded pool on `url` and migrates the schema `prefix`.
pub(crate) async fn connect(url: &str, prefix: &str, suspicion: Arc<Suspicion>) -> anyhow::Result<PgPool> {
    sql::validate_prefix(prefix)?;
    let shown = super::redact(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("--store {shown}: not a valid PostgreSQL URL ({e})"))?
        .application_name(&format!("switchyard:{prefix}"));
    sql::probe::<sqlx::PgConnection>(&options)
        .await
        .map_err(|e| anyhow::anyhow!("--store {shown}: cannot reach PostgreSQL ({e})"))?;
    // The server gives up on its own too: a stuck statement frees its connection and locks. Set
    // once connected rather than as startup options, which connection poolers such as PgBouncer
    // refuse.
    let pool = sql::open_pool(options, sql::MAX_CONNECTIONS, SESSION_TIMEOUTS, suspicion)
        .await
        .map_err(|e| anyhow::anyhow!("--store {shown}: cannot reach PostgreSQL ({e})"))?;
    migrate(&pool, prefix, "schema_version", MIGRATIONS)
        .await
        .with_context(|| format!("--store {shown}: migrating schema {prefix:?}"))?;
    Ok(pool)
}

/// `prefix` as a quoted identifier (the prefix is validated, so it holds no quote).
fn schema(prefix: &str) -> String {
    format!("\"{prefix}\"")
}

/// Runs the `migrations` this database lacks, recording them in `{schema}.{versions}`, once
/// across nodes that start together (the store's and the outbox's take the same lock).
async fn migrate(pool: &PgPool, prefix: &str, versions: &str, migrations: &[&str]) -> anyhow::Result<()> {
    let s = schema(prefix);
    let mut tx = pool.begin().await?;
    sqlx::raw_sql("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0").execute(&mut *tx).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(sql::lock_key(prefix)).execute(&mut *tx).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {s}; CREATE TABLE IF NOT EXISTS {s}.{versions} \
         (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )))
    .execute(&mut *tx)
    .await?;
    let current: i32 =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT coalesce(max(version), 0) FROM {s}.{versions}")))
            .fetch_one(&mut *tx)
            .await?;
    let latest = migrations.len() as i32;
    anyhow::ensure!(
        current <= latest,
        "the schema is at version {current}, newer than this node knows ({latest}): upgrade the node"
    );
    for (version, ddl) in (1..).zip(migrations).skip(current as usize) {
        sqlx::raw_sql(AssertSqlSafe(ddl.replace("{s}", &s))).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {s}.{versions} (version) VALUES ($1)")))
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Sorts a failure: conflicts that rolled everything back are tried again, a database that is
/// away or overloaded is `unavailable`, anything else is a defect.
fn classify(e: &sqlx::Error) -> Failure {
    let sqlx::Error::Database(db) = e else { return sql::transport_failure(e) };
    let code = db.code().unwrap_or_default();
    match &*code {
        // serialization_failure, deadlock_detected, unique_violation (a racing first insert).
        "40001" | "40P01" | "23505" => Failure::Retry,
        LATE => Failure::Unavailable("the database reached the append after its deadline: nothing was stored".into()),
        // The server ended the session (shutdown, terminated backend), or the connection failed.
        c if c.starts_with("08") || c.starts_with("57P") => Failure::Lost(format!("postgres: {}", db.message())),
        // lock_not_available (lock_timeout), query_canceled (statement_timeout), insufficient
        // resources, other operator intervention, system errors.
        c if c == "55P03" || ["53", "57", "58"].iter().any(|class| c.starts_with(class)) => {
            Failure::Unavailable(format!("postgres: {}", db.message()))
        }
        _ => Failure::Internal(format!("postgres: {} ({code})", db.message())),
    }
}
