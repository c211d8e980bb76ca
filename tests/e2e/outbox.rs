//! The outbox end to end (docs/outbox.md): an application commits rows into the outbox table of
//! the store's database in its own transaction, nodes started with `--outbox` deliver them, and
//! WebSocket clients see each row once, in order, whichever node they are on and whichever node
//! consumed it, also when a consuming node is SIGKILLed mid-stream.
//!
//! Every test uses a prefix of its own and drops its schema or tables at the end. Without
//! PostgreSQL, MySQL or Redis (outside CI) a test prints SKIP and passes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};

use crate::procs::Cluster;
use crate::sql_server::{mysql_available, mysql_url, postgres_available, postgres_url};
use crate::support::{Client, Mode, TestNode};

const DELIVERED: &str = "switchyard_outbox_delivered_total";

/// Runs `sql` (no parameters; several statements are fine).
async fn exec<'c, E: Executor<'c>>(db: E, sql: String) {
    db.execute(AssertSqlSafe(sql.clone())).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Reads `count` message frames and answers their bodies, asserting that their seqs follow each
/// other: a row appended twice would take a seq of its own.
async fn bodies(client: &mut Client, count: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(count);
    let mut last_seq = None;
    for _ in 0..count {
        let m = client.next_message().await;
        let seq = m["seq"].as_u64().expect("seq");
        if let Some(last) = last_seq {
            assert_eq!(seq, last + 1, "seqs follow each other: {m}");
        }
        last_seq = Some(seq);
        out.push(m["body"].clone());
    }
    out
}

/// Waits until `sql` (a count) answers 0.
async fn until_zero(db: &PgPool, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(sql.to_owned())).fetch_one(db).await.expect("count");
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} rows still in the outbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes over Redis with their store in PostgreSQL, all consuming. One application
/// transaction writes its own table and 30 outbox rows; a rolled-back one sends nothing. Two
/// devices of alice on nodes 0 and 1 and room members on nodes 0 and 2 each receive every row
/// once, in id order, as from the row's sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_delivers_committed_rows_once_in_order() {
    if !(crate::redis_server::available() && postgres_available()) {
        return;
    }
    let node = TestNode::start_mode(Mode::ClusterPostgres, &["--outbox"]).await;
    let db = PgPool::connect(&postgres_url()).await.expect("test database");
    let s = format!("\"{}\"", node.prefix());
    let mut alice0 = node.on(0).connect("alice").await;
    let mut alice1 = node.on(1).connect("alice").await;
    let mut carol0 = node.on(0).connect("carol").await;
    let mut bob2 = node.on(2).connect("bob").await;
    for member in [&mut carol0, &mut bob2] {
        member.ok(json!({"type":"join","room":"ops"})).await;
    }

    exec(&db, format!("CREATE TABLE {s}.orders (id int PRIMARY KEY, status text NOT NULL)")).await;
    let mut txn = db.begin().await.expect("begin");
    for n in 0..20 {
        exec(&mut *txn, format!("INSERT INTO {s}.orders VALUES ({n}, 'shipped')")).await;
        let body = json!({"order": n}).to_string();
        exec(&mut *txn, format!("INSERT INTO {s}.outbox (to_user, body, sender) VALUES ('alice', '{body}', 'shop')"))
            .await;
        if n % 2 == 0 {
            exec(&mut *txn, format!("INSERT INTO {s}.outbox (to_room, body) VALUES ('ops', '{n}')")).await;
        }
    }
    txn.commit().await.expect("commit");
    let mut rolled_back = db.begin().await.expect("begin");
    exec(&mut *rolled_back, format!("INSERT INTO {s}.outbox (to_user, body) VALUES ('alice', '\"rolled back\"')"))
        .await;
    rolled_back.rollback().await.expect("rollback");
    exec(&db, format!("INSERT INTO {s}.outbox (to_user, body) VALUES ('alice', '\"last\"')")).await;

    let mut want: Vec<Value> = (0..20).map(|n| json!({"order": n})).collect();
    want.push(json!("last"));
    for alice in [&mut alice0, &mut alice1] {
        assert_eq!(bodies(alice, 21).await, want, "every device, in order, without the rolled-back row");
    }
    let room: Vec<Value> = (0..20).step_by(2).map(|n| json!(n)).collect();
    for member in [&mut carol0, &mut bob2] {
        assert_eq!(bodies(member, 10).await, room);
    }
    for client in [&mut alice0, &mut alice1, &mut carol0, &mut bob2] {
        client.expect_silence(300).await;
    }
    until_zero(&db, &format!("SELECT count(*) FROM {s}.outbox")).await;
    let dead: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {s}.outbox_dead")))
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(dead, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metric_total(DELIVERED).await < 31.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.metric_total(DELIVERED).await, 31.0, "rows consumed, summed over the nodes");

    drop((alice0, alice1, carol0, bob2));
    node.shutdown().await;
    exec(&db, format!("DROP SCHEMA {s} CASCADE")).await;
}

/// Two node processes consume a stream of rows for alice, who is connected to a third node
/// (same store, no `--outbox`), so that every row reaches her over the bus; once she has a
/// third of them, the consumer that delivered more is SIGKILLed, whatever batch it holds. Alice
/// gets every row once and in order, and her stream holds exactly one message per row (seq =
/// row number + 1): a row appended again by the survivor is answered by its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_and_duplicates_nothing() {
    const TOTAL: usize = 600;
    const KILL_AT: usize = 200;
    if !postgres_available() {
        return;
    }
    let Some(cluster) = Cluster::start("outboxkill") else { return };
    let cluster = cluster.with_sql_prefix();
    let url = postgres_url();
    let consumer = ["--store", url.as_str(), "--outbox"];
    let mut consumers = [cluster.node_with("n1", &consumer).await, cluster.node_with("n2", &consumer).await];
    let n3 = cluster.node_with("n3", &["--store", url.as_str()]).await;
    let db = PgPool::connect(&url).await.expect("test database");
    let s = format!("\"{}\"", cluster.prefix);
    let mut alice = n3.connect("alice").await;

    let writer = {
        let (db, s) = (db.clone(), s.clone());
        tokio::spawn(async move {
            for batch in 0..TOTAL / 10 {
                let mut txn = db.begin().await.expect("begin");
                for n in batch * 10..batch * 10 + 10 {
                    let insert = format!("INSERT INTO {s}.outbox (to_user, body) VALUES ('alice', '{n}')");
                    sqlx::query(AssertSqlSafe(insert)).execute(&mut *txn).await.expect("insert");
                }
                txn.commit().await.expect("commit");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut got = Vec::with_capacity(TOTAL);
    let mut seqs = Vec::with_capacity(TOTAL);
    let mut survivor = None;
    while got.len() < TOTAL {
        let m = alice.next_message().await;
        seqs.push(m["seq"].as_u64().expect("seq"));
        got.push(m["body"].as_u64().expect("a number"));
        if got.len() == KILL_AT {
            let counts = [consumers[0].metric(DELIVERED).await, consumers[1].metric(DELIVERED).await];
            let victim = usize::from(counts[1] > counts[0]);
            assert!(counts[victim] > 0.0, "the node to kill has been consuming: {counts:?}");
            consumers[victim].kill();
            println!("TIMING: {} killed after consuming {} rows", consumers[victim].id, counts[victim]);
            survivor = Some(1 - victim);
        }
    }
    writer.await.expect("writer");
    assert_eq!(got, (0..TOTAL as u64).collect::<Vec<_>>(), "every row once, in order");
    assert_eq!(seqs, (1..=TOTAL as u64).collect::<Vec<_>>(), "one append per row");
    alice.expect_silence(500).await;
    until_zero(&db, &format!("SELECT count(*) FROM {s}.outbox")).await;
    let survivor = &consumers[survivor.expect("a node was killed")];
    println!("TIMING: {} consumed {} rows in all", survivor.id, survivor.metric(DELIVERED).await);

    drop(alice);
    drop((consumers, n3));
    exec(&db, format!("DROP SCHEMA {s} CASCADE")).await;
}

/// One node with its store in MySQL or MariaDB: committed rows arrive in order, a row that can
/// never be delivered goes to the dead-letter table without holding up the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_node_delivers_rows() {
    if !mysql_available() {
        return;
    }
    let p = format!("e2e_{:016x}", fastrand::u64(..));
    let url = mysql_url();
    let node = TestNode::start(&["--store", &url, "--prefix", &p, "--outbox"]).await;
    let db = MySqlPool::connect(&url).await.expect("test database");
    let mut alice = node.connect("alice").await;

    let mut txn = db.begin().await.expect("begin");
    for n in 0..5 {
        exec(&mut *txn, format!("INSERT INTO `{p}_outbox` (to_user, body, `key`) VALUES ('alice', '{n}', 'k{n}')"))
            .await;
        if n == 2 {
            exec(&mut *txn, format!("INSERT INTO `{p}_outbox` (to_user, body) VALUES ('alice', 'not json')")).await;
        }
    }
    txn.commit().await.expect("commit");
    assert_eq!(bodies(&mut alice, 5).await, (0..5).map(|n| json!(n)).collect::<Vec<_>>());
    alice.expect_silence(300).await;
    let dead: Vec<(i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!("SELECT id, reason FROM `{p}_outbox_dead`")))
        .fetch_all(&db)
        .await
        .expect("dead");
    assert_eq!(dead.len(), 1, "the row that is not JSON");
    assert!(String::from_utf8_lossy(&dead[0].1).starts_with("body is not JSON"), "{dead:?}");
    let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM `{p}_outbox`")))
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(left, 0);

    drop(alice);
    node.shutdown().await;
    exec(
        &db,
        format!(
            "DROP PROCEDURE IF EXISTS `{p}_append`; DROP TABLE IF EXISTS `{p}_outbox`, `{p}_outbox_dead`, \
             `{p}_outbox_schema_version`, `{p}_streams`, `{p}_messages`, `{p}_cursors`, `{p}_idempotency`, \
             `{p}_schema_version`"
        ),
    )
    .await;
}
