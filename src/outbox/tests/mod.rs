//! The outbox against real databases: every test runs once on PostgreSQL and once on MySQL
//! (MariaDB), with a real node (embedded store, port 0) consuming, and checks what a client sees:
//! each row once, in order, in its destination's stream.
//!
//! `SWITCHYARD_TEST_POSTGRES` (default postgres://postgres@127.0.0.1:5432/test) and
//! `SWITCHYARD_TEST_MYSQL` (default mysql://root@127.0.0.1:3306/test) name the servers; each test
//! uses its own prefix and drops its tables at the end. A server that is unreachable skips its
//! tests with a printed reason, except under `CI=true`, where they fail.

#[macro_use]
mod harness;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{AssertSqlSafe, Executor};

use crate::backend::{mysql, postgres};
use crate::protocol::{StreamId, UserId};
use harness::*;

on_both! {
    /// Rows arrive once each, in id order per destination, with their body verbatim and their
    /// sender as `from`, live at a connected client and in the stream; the consumer stops with
    /// the node.
    async fn committed_rows_arrive_in_id_order_per_destination(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        let mut alice = Client::connect(h.addr(), "alice").await;
        let consumer = h.consume(h.source().await);
        // One transaction of 30 rows over three destinations, then three of 10.
        let mut expected = (Vec::new(), Vec::new(), Vec::new());
        let mut batch = Vec::new();
        for n in 0..60 {
            let row = match n % 3 {
                0 => { expected.0.push(compact(n)); NewRow { sender: Some("shop".into()), ..to_user("alice", numbered(n)) } }
                1 => { expected.1.push(compact(n)); to_user("bob", numbered(n)) }
                _ => { expected.2.push(compact(n)); to_room("lobby", numbered(n)) }
            };
            batch.push(row);
            if n == 29 || (n > 29 && n % 10 == 9) {
                h.insert(&std::mem::take(&mut batch), true).await.expect("insert");
            }
        }
        for want in &expected.0 {
            let (text, frame) = alice.next_message().await;
            assert_eq!(frame["body"].to_string(), *want, "alice's live messages in id order");
            assert_eq!(frame["from"], "shop");
            let n: Value = serde_json::from_str(want).unwrap();
            assert!(text.contains(&format!("\"body\":{{\"n\": {}}}", n["n"])), "body verbatim: {text}");
        }
        h.drained().await;
        assert_eq!(h.user_bodies("alice").await, expected.0);
        assert_eq!(h.user_bodies("bob").await, expected.1);
        assert_eq!(h.room_bodies("lobby").await, expected.2);
        assert_eq!(h.stream(StreamId::User(UserId::parse("bob").unwrap())).await[0].1, "system", "no sender: system");
        h.metric_reaches("switchyard_outbox_delivered_total", 60).await;
        assert_eq!(h.count("outbox_dead").await, 0);

        let mut h = h;
        drop(alice);
        h.server.take().expect("running").shutdown().await;
        tokio::time::timeout(Duration::from_secs(10), consumer).await.expect("the consumer stops with the node").unwrap();
        h.finish().await;
    }
}

on_both! {
    /// Rows of a transaction that rolled back never reach anyone.
    async fn rolled_back_rows_are_never_delivered(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        let _consumer = h.consume(h.source().await);
        let ghosts: Vec<NewRow> = (0..5).map(|n| to_user("alice", format!("\"ghost {n}\""))).collect();
        h.insert(&ghosts, false).await.expect("insert, then roll back");
        h.insert(&[to_user("alice", "\"real\"")], true).await.expect("insert");
        h.drained().await;
        // The committed row came after the ghosts: had they been seen, they would be there too.
        assert_eq!(h.user_bodies("alice").await, ["\"real\""]);
        h.finish().await;
    }
}

on_both! {
    /// Two consumers race on 500 rows over 60 destinations. While the first holds its first
    /// batch open (stalled after one append), the second delivers the rows of the destinations
    /// that batch does not touch and leaves the others for later; released, the first finishes.
    /// Each row arrives exactly once, and each destination's rows in id order.
    async fn two_consumers_deliver_500_rows_exactly_once(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        let mut rng = fastrand::Rng::with_seed(7);
        let names: Vec<String> = (0..60).map(|i| if i < 40 { format!("u{i}") } else { format!("r{i}") }).collect();
        let mut expected = vec![Vec::new(); names.len()];
        let mut rows = Vec::new();
        for n in 0..500 {
            let d = rng.usize(..names.len());
            expected[d].push(compact(n));
            rows.push(if d < 40 { to_user(&names[d], numbered(n)) } else { to_room(&names[d], numbered(n)) });
        }
        for chunk in rows.chunks(50) {
            h.insert(chunk, true).await.expect("insert");
        }
        let (a, b) = (Probe::new(h.source().await, Some(1)), Probe::new(h.source().await, None));
        let _first = h.consume(a.clone());
        tokio::time::timeout(WAIT, a.stalled.notified()).await.expect("the first consumer holds a batch");
        let _second = h.consume(b.clone());
        let deadline = Instant::now() + WAIT;
        while b.deletes() == 0 {
            assert!(Instant::now() < deadline, "the second consumer delivers around the first one's batch");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.release.notify_one();
        h.drained().await;
        for (d, name) in names.iter().enumerate() {
            let got = if d < 40 { h.user_bodies(name).await } else { h.room_bodies(name).await };
            assert_eq!(got, expected[d], "{name}: every row once, in id order");
        }
        assert!(a.deletes() > 1, "the first consumer finished its batch");
        assert_eq!(a.deletes() + b.deletes(), 500, "no row deleted twice");
        h.metric_reaches("switchyard_outbox_delivered_total", 500).await;
        h.finish().await;
    }
}

on_both! {
    /// A consumer killed in the middle of a batch (rows appended, their deletes not committed)
    /// leaves its rows to another, which delivers every row; the ones appended twice are no-ops.
    async fn a_consumer_killed_mid_batch_loses_and_duplicates_nothing(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        let mut expected = (Vec::new(), Vec::new());
        let rows: Vec<NewRow> = (0..40)
            .map(|n| if n % 2 == 0 {
                expected.0.push(compact(n));
                to_user("alice", numbered(n))
            } else {
                expected.1.push(compact(n));
                to_room("lobby", numbered(n))
            })
            .collect();
        h.insert(&rows, true).await.expect("insert");

        let doomed = Probe::new(h.source().await, Some(7));
        let stalled = doomed.stalled.clone();
        let first = h.consume(doomed);
        tokio::time::timeout(WAIT, stalled.notified()).await.expect("the first consumer reaches its 7th delete");
        let appended = h.user_bodies("alice").await.len() + h.room_bodies("lobby").await.len();
        assert_eq!(appended, 7, "seven rows appended before the stall");
        assert_eq!(h.count("outbox").await, 40, "nothing committed yet");
        // The open batch holds its rows only: the application's inserts do not wait for it
        // (MySQL: no gap locks, as at READ COMMITTED).
        let late = [to_user("alice", numbered(40))];
        let insert = h.insert(&late, true);
        tokio::time::timeout(Duration::from_secs(5), insert).await.expect("an insert beside a batch").expect("insert");
        expected.0.push(compact(40));

        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        let _second = h.consume(h.source().await);
        h.drained().await;
        assert_eq!(h.user_bodies("alice").await, expected.0, "alice: each row once, in order");
        assert_eq!(h.room_bodies("lobby").await, expected.1, "lobby: each row once, in order");
        assert_eq!(h.count("outbox_dead").await, 0);
        h.finish().await;
    }
}

on_both! {
    /// Every kind of row that can never be delivered goes to the dead-letter table with its
    /// reason, is counted in /metrics, and the good rows around it still arrive in order.
    async fn bad_rows_go_to_the_dead_letter_table(kind) {
        let Some(h) = Harness::start(kind, &["--max-message-size", "256"]).await else { return };
        // The CHECK constraint refuses rows with both or no destination at insert time...
        let both = NewRow { to_user: Some("alice".into()), to_room: Some("lobby".into()), body: "1".into(), ..NewRow::default() };
        let neither = NewRow { body: "1".into(), ..NewRow::default() };
        assert!(h.insert(std::slice::from_ref(&both), true).await.is_err(), "CHECK refuses both destinations");
        assert!(h.insert(std::slice::from_ref(&neither), true).await.is_err(), "CHECK refuses no destination");
        // ...and a table without it (a database that ignores CHECK, an altered table) dead-letters them.
        let drop_check = match kind {
            Kind::Postgres => format!("ALTER TABLE {} DROP CONSTRAINT outbox_one_destination", h.table("outbox")),
            Kind::Mysql => format!("ALTER TABLE {} DROP CONSTRAINT `{}_outbox_one_destination`", h.table("outbox"), h.prefix),
        };
        h.exec(&drop_check).await.expect("drop the CHECK");

        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let bad = [
            (to_user("bad user", "1"), "to_user is not a valid user id"),
            (to_room(&"r".repeat(129), "1"), "to_room is not a valid room name"),
            (to_user("alice", "{\"unclosed\": "), "body is not JSON"),
            (to_user("alice", deep.as_str()), "nested more than 64 levels"),
            (to_user("alice", format!("\"{}\"", "x".repeat(300))), "over --max-message-size (256)"),
            (NewRow { sender: Some("no spaces".into()), ..to_user("alice", "1") }, "sender is not a valid name"),
            (NewRow { key: Some(String::new()), ..to_user("alice", "1") }, "key must be 1-256 bytes"),
            (both, "both to_user and to_room"),
            (neither, "neither to_user nor to_room"),
        ];
        let mut rows = Vec::new();
        let mut good = Vec::new();
        for (n, (row, _)) in bad.iter().enumerate() {
            rows.push(to_user("alice", numbered(n)));
            good.push(compact(n));
            rows.push(row.clone());
        }
        rows.push(to_user("alice", numbered(99)));
        good.push(compact(99));
        let ids = h.insert(&rows, true).await.expect("insert");
        assert_eq!(h.metric("switchyard_outbox_dead_letters_total").await, 0);

        let _consumer = h.consume(h.source().await);
        h.drained().await;
        assert_eq!(h.user_bodies("alice").await, good, "the good rows behind bad ones arrive, in order");
        let dead = h.dead().await;
        assert_eq!(dead.len(), bad.len(), "{dead:?}");
        for ((id, reason, body), (i, (row, want))) in dead.iter().zip(bad.iter().enumerate()) {
            assert_eq!(*id, ids[2 * i + 1]);
            assert!(reason.contains(want), "row {id}: {reason:?} should say {want:?}");
            assert_eq!(*body, row.body, "the dead row keeps its body");
        }
        h.metric_reaches("switchyard_outbox_dead_letters_total", bad.len() as u64).await;
        h.metric_reaches("switchyard_outbox_delivered_total", good.len() as u64).await;
        h.finish().await;
    }
}

on_both! {
    /// When the node cannot append (its store is out), rows stay in the outbox, are not
    /// dead-lettered, and are retried; another node delivers them.
    async fn a_failing_append_leaves_rows_for_a_retry(kind) {
        let Some(broken) = Harness::start(kind, &[]).await else { return };
        broken.server().node.close_store().await;
        let rows: Vec<NewRow> = (0..5).map(|n| to_user("alice", numbered(n))).collect();
        broken.insert(&rows, true).await.expect("insert");
        let probe = Probe::new(broken.source().await, None);
        let consumer = broken.consume(probe.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(probe.claims.load(Ordering::SeqCst) >= 3, "retried, after a back-off");
        assert!(probe.claims.load(Ordering::SeqCst) <= 12, "with a back-off");
        assert_eq!(broken.count("outbox").await, 5, "rows stay");
        assert_eq!(broken.count("outbox_dead").await, 0, "not dead-lettered");
        consumer.abort();

        // A healthy node on the same tables delivers them.
        let healthy = Harness::start_on(kind, &[], broken.prefix.clone()).await.expect("the database is up");
        let _consumer = healthy.consume(healthy.source().await);
        healthy.drained().await;
        assert_eq!(healthy.user_bodies("alice").await, (0..5).map(compact).collect::<Vec<_>>());
        healthy.finish().await;
        broken.finish().await;
    }
}

on_both! {
    /// A consumer that has been idle for a while still finds a new row within seconds, without
    /// a notification (PostgreSQL: the trigger is disabled, so only the fallback poll can).
    async fn an_idle_consumer_finds_rows_without_a_notification(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        if kind == Kind::Postgres {
            h.exec(&format!("ALTER TABLE {} DISABLE TRIGGER outbox_notify", h.table("outbox"))).await.expect("disable");
        }
        let _consumer = h.consume(h.source().await);
        tokio::time::sleep(Duration::from_secs(3)).await;
        h.insert(&[to_user("alice", "1")], true).await.expect("insert");
        let started = Instant::now();
        h.drained().await;
        assert!(started.elapsed() < Duration::from_secs(5), "found after {:?}", started.elapsed());
        assert_eq!(h.user_bodies("alice").await, ["1"]);
        h.finish().await;
    }
}

/// NOTIFY wakes a PostgreSQL consumer whose fallback poll would take a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_postgres_consumer() {
    let Some(h) = Harness::start(Kind::Postgres, &[]).await else { return };
    let source = pg_source(&h.url, &h.prefix).await.expect("starts");
    let _consumer = h.consume(Arc::new(source.with_fallback(Duration::from_secs(60))));
    // Let it find the outbox empty and wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..3 {
        h.insert(&[to_user("alice", numbered(n))], true).await.expect("insert");
        let started = Instant::now();
        h.drained().await;
        assert!(started.elapsed() < Duration::from_secs(5), "woken after {:?}", started.elapsed());
    }
    assert_eq!(h.user_bodies("alice").await, (0..3).map(compact).collect::<Vec<_>>());
    h.finish().await;
}

on_both! {
    /// The consumer's sessions end a transaction that a frozen node leaves open, so that its
    /// rows go to the other nodes: PostgreSQL after 60 s idle in it, MySQL after 120 s silent.
    async fn silent_sessions_lose_their_transaction(kind) {
        let Some(h) = Harness::start(kind, &[]).await else { return };
        match kind {
            Kind::Postgres => {
                let source = pg_source(&h.url, &h.prefix).await.expect("starts");
                let mut txn = source.pool().begin_with(postgres::OUTBOX_BEGIN).await.expect("begin");
                let timeout: String =
                    sqlx::query_scalar("SHOW idle_in_transaction_session_timeout").fetch_one(&mut *txn).await.expect("show");
                assert_eq!(timeout, "1min");
                txn.rollback().await.expect("rollback");
                let outside: String =
                    sqlx::query_scalar("SHOW idle_in_transaction_session_timeout").fetch_one(source.pool()).await.expect("show");
                assert_eq!(outside, "0", "the store's transactions keep the default");
            }
            Kind::Mysql => {
                let source = my_source(&h.url, &h.prefix).await.expect("starts");
                let mut txn = source.pool().begin_with(mysql::OUTBOX_BEGIN).await.expect("begin");
                let timeout: u64 =
                    sqlx::query_scalar("SELECT @@SESSION.wait_timeout").fetch_one(&mut *txn).await.expect("select");
                assert_eq!(timeout, 120);
                txn.rollback().await.expect("rollback");
            }
        }
        h.finish().await;
    }
}

on_both! {
    /// Nodes that start together migrate once: every one connects, the version is recorded
    /// once, and a restart finds nothing to do.
    async fn nodes_starting_together_migrate_once(kind) {
        let Some((url, db)) = database(kind).await else { return };
        let prefix = format!("sy_outbox_{:012x}", fastrand::u64(..) >> 16);
        let connect = || async {
            match kind {
                Kind::Postgres => pg_source(&url, &prefix).await.map(drop),
                Kind::Mysql => my_source(&url, &prefix).await.map(drop),
            }
        };
        let results = futures_util::future::join_all((0..6).map(|_| connect())).await;
        for r in results {
            r.expect("every node starts");
        }
        connect().await.expect("a restart");
        let versions = match kind {
            Kind::Postgres => format!("SELECT version FROM \"{prefix}\".outbox_schema_version"),
            Kind::Mysql => format!("SELECT version FROM `{prefix}_outbox_schema_version`"),
        };
        let cleanup = drop_tables(kind, &prefix);
        let found: Vec<i64> = match &db {
            Db::Pg(pool) => sqlx::query_scalar::<_, i32>(AssertSqlSafe(versions.as_str())).fetch_all(pool).await.unwrap().into_iter().map(i64::from).collect(),
            Db::My(pool) => sqlx::query_scalar::<_, i32>(AssertSqlSafe(versions.as_str())).fetch_all(pool).await.unwrap().into_iter().map(i64::from).collect(),
        };
        assert_eq!(found, [1], "one migration, recorded once");
        match &db {
            Db::Pg(pool) => pool.execute(AssertSqlSafe(cleanup.as_str())).await.map(drop),
            Db::My(pool) => pool.execute(AssertSqlSafe(cleanup.as_str())).await.map(drop),
        }
        .expect("cleanup");
    }
}

/// Connection errors name `--store` and never show the password; needs no database.
#[tokio::test]
async fn connection_errors_hide_the_password() {
    let pg = pg_source("postgres://app:pg-s3cret-pw@127.0.0.1:1/app", "switchyard").await;
    let my = my_source("mysql://app:my-s3cret-pw@127.0.0.1:1/app", "switchyard").await;
    for (err, password) in
        [(pg.err().expect("port 1 refuses"), "pg-s3cret-pw"), (my.err().expect("refused"), "my-s3cret-pw")]
    {
        let text = format!("{err:#}");
        assert!(text.contains("--store") && text.contains("cannot reach"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "says why: {text}");
        assert!(!text.contains(password), "{text}");
    }
    let bad = pg_source("postgres://app:pg-s3cret-pw@127.0.0.1:1/app", "bad prefix").await;
    assert!(format!("{:#}", bad.err().unwrap()).contains("--prefix"));
}
