//! What the SQL stores promise beyond the store suite (`store::tests`), checked against the real
//! servers (`SWITCHYARD_TEST_POSTGRES`, `SWITCHYARD_TEST_MYSQL`; skipped when absent unless
//! `CI=true`): an append that comes late (a paused network, a lock held past the deadline, a
//! wrong clock estimate) is refused and never commits afterwards; retention deletes rows; dead
//! pooled connections are replaced; credentials never appear in errors; prefixes are checked.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::mysql::MysqlStore;
use crate::backend::postgres::PostgresStore;
use crate::backend::sql::{PING_IDLE_AFTER, ServerClock};
use crate::protocol::{HistoryQuery, StreamId};
use crate::store::tests::{KEEP_ALL, absent, mysql_url, postgres_url, room, seqs, to_room, unique_prefix};
use crate::store::{Retention, Store, StoreError};

/// A SQL store with the handles these tests need.
trait SqlStore: Store + Sized + 'static {
    const NAME: &'static str;
    fn url() -> String;
    async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self>;
    fn clock(&self) -> &ServerClock;
    async fn sweep(&self);
    async fn drop_schema(&self);
    /// The full name of one of the store's tables.
    fn table(&self, name: &str) -> String;
    async fn count(&self, table: &str, filter: &str) -> i64;
    async fn execute(&self, statement: String);
    /// Locks `stream`'s row from a transaction of its own, released after `hold`.
    async fn hold_stream(&self, stream: &str, hold: Duration) -> JoinHandle<()>;
    /// Has the server kill every connection of the store's pool.
    async fn kill_connections(&self);
}

/// The handles that every SQL store's tests implement the same way (the store's own `connect`
/// and `drop_schema`, its tables' clock and sweep, counting rows and running a statement).
macro_rules! handles_alike {
    ($name:literal, $url:path) => {
        const NAME: &'static str = $name;
        fn url() -> String {
            $url()
        }
        async fn connect(url: &str, prefix: &str, retention: Retention) -> anyhow::Result<Self> {
            Self::connect(url, prefix, retention).await
        }
        fn clock(&self) -> &ServerClock {
            &self.tables().clock
        }
        async fn sweep(&self) {
            self.tables().sweep().await.unwrap()
        }
        async fn drop_schema(&self) {
            Self::drop_schema(self).await.unwrap()
        }
        async fn count(&self, table: &str, filter: &str) -> i64 {
            let query = format!("SELECT COUNT(*) FROM {} {filter}", self.table(table));
            sqlx::query_scalar(AssertSqlSafe(query)).fetch_one(self.pool()).await.unwrap()
        }
        async fn execute(&self, statement: String) {
            sqlx::raw_sql(AssertSqlSafe(statement)).execute(self.pool()).await.unwrap();
        }
    };
}

impl SqlStore for PostgresStore {
    handles_alike!("postgres", postgres_url);
    fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.tables().prefix)
    }
    async fn hold_stream(&self, stream: &str, hold: Duration) -> JoinHandle<()> {
        let mut tx = self.pool().begin().await.unwrap();
        let lock = format!("SELECT last_seq FROM {} WHERE stream = $1 FOR UPDATE", self.table("streams"));
        sqlx::query(AssertSqlSafe(lock)).bind(stream).execute(&mut *tx).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            tx.rollback().await.unwrap();
        })
    }
    async fn kill_connections(&self) {
        let held = futures_util::future::join_all(
            (0..self.pool().options().get_max_connections()).map(|_| self.pool().acquire()),
        )
        .await;
        let mut pids = Vec::new();
        for mut conn in held.into_iter().flatten() {
            pids.push(sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap());
        }
        let mut killer = sqlx::PgConnection::connect(&Self::url()).await.unwrap();
        for pid in pids {
            sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&mut killer).await.unwrap();
        }
    }
}

impl SqlStore for MysqlStore {
    handles_alike!("mysql", mysql_url);
    fn table(&self, name: &str) -> String {
        format!("`{}_{name}`", self.tables().prefix)
    }
    async fn hold_stream(&self, stream: &str, hold: Duration) -> JoinHandle<()> {
        let mut tx = self.pool().begin().await.unwrap();
        let lock = format!("SELECT last_seq FROM {} WHERE stream = ? FOR UPDATE", self.table("streams"));
        sqlx::query(AssertSqlSafe(lock)).bind(stream).execute(&mut *tx).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            tx.rollback().await.unwrap();
        })
    }
    async fn kill_connections(&self) {
        let held = futures_util::future::join_all(
            (0..self.pool().options().get_max_connections()).map(|_| self.pool().acquire()),
        )
        .await;
        let mut ids = Vec::new();
        for mut conn in held.into_iter().flatten() {
            ids.push(sqlx::query_scalar::<_, u64>("SELECT CONNECTION_ID()").fetch_one(&mut *conn).await.unwrap());
        }
        let mut killer = sqlx::MySqlConnection::connect(&Self::url()).await.unwrap();
        for id in ids {
            sqlx::raw_sql(AssertSqlSafe(format!("KILL {id}"))).execute(&mut killer).await.unwrap();
        }
    }
}

async fn open<S: SqlStore>(prefix: &str, retention: Retention) -> Option<S> {
    match S::connect(&S::url(), prefix, retention).await {
        Ok(store) => Some(store),
        Err(e) => absent(S::NAME, &format!("{e:#}")),
    }
}

/// The seqs kept in `stream`, and its last seq, as the store reads them.
async fn kept(store: &impl Store, stream: &StreamId) -> (Vec<u64>, u64) {
    let slice = store.read(stream, HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    (seqs(&slice), slice.last_seq)
}

/// A TCP proxy that can stall both directions: bytes read while it is paused are held and
/// delivered when it resumes, as a network that stopped for a while delivers them late.
struct StallingProxy {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
}

impl StallingProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (paused, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let ((client_in, client_out), (server_in, server_out)) = (client.into_split(), server.into_split());
                tokio::spawn(Self::pipe(client_in, server_out, watching.clone()));
                tokio::spawn(Self::pipe(server_in, client_out, watching.clone()));
            }
        });
        Self { addr, paused }
    }

    async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut paused: watch::Receiver<bool>) {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    fn route(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
        format!("{scheme}://{user}{}{tail}", self.addr)
    }

    fn upstream(url: &str) -> String {
        let rest = url.split_once("://").unwrap().1;
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        authority[authority.rfind('@').map_or(0, |at| at + 1)..].to_owned()
    }
}

/// The network stalls while an append is on its way: the node answers `unavailable` after its
/// timeout, and when the stalled statement reaches the database later it commits nothing.
async fn a_stalled_append_never_commits_late<S: SqlStore>() {
    let prefix = unique_prefix();
    let Some(direct) = open::<S>(&prefix, KEEP_ALL).await else { return };
    let proxy = StallingProxy::start(StallingProxy::upstream(&S::url())).await;
    let store = S::connect(&proxy.route(&S::url()), &prefix, KEEP_ALL).await.unwrap();
    assert_eq!(store.append(to_room("stall", "1")).await.unwrap().seq, 1);
    proxy.paused.send(true).unwrap();
    let sent = Instant::now();
    let refused = store.append(to_room("stall", "2")).await;
    let waited = sent.elapsed();
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    assert!(waited < Duration::from_millis(2800), "answered after {waited:?}");
    // Well past the write deadline, the held statement reaches the database.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(sent.elapsed())).await;
    proxy.paused.send(false).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(kept(&direct, &room("stall")).await, (vec![1], 1), "the refused append was committed late");
    assert_eq!(store.append(to_room("stall", "3")).await.unwrap().seq, 2, "and burned no seq");
    store.close().await;
    direct.drop_schema().await;
}

/// A lock held past the deadline delays the append inside the database: the routine gets the
/// lock after its deadline and rolls back rather than commit.
async fn an_append_that_waited_past_its_deadline_rolls_back<S: SqlStore>() {
    let Some(store) = open::<S>(&unique_prefix(), KEEP_ALL).await else { return };
    store.append(to_room("late", "1")).await.unwrap();
    let holder = store.hold_stream("room:late", Duration::from_millis(1700)).await;
    let refused = store.append(to_room("late", "2")).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    eprintln!("{}: refused with {refused:?}", S::NAME);
    holder.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kept(&store, &room("late")).await, (vec![1], 1));
    assert_eq!(store.append(to_room("late", "3")).await.unwrap().seq, 2);
    store.drop_schema().await;
}

/// A deadline already past in the database's clock (a wrong estimate of it) is refused at once.
async fn a_deadline_already_past_is_refused<S: SqlStore>() {
    let Some(store) = open::<S>(&unique_prefix(), KEEP_ALL).await else { return };
    store.clock().skew(-10_000);
    let refused = store.append(to_room("skew", "1")).await;
    assert!(matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("deadline")), "{refused:?}");
    store.clock().skew(10_000);
    assert_eq!(store.append(to_room("skew", "2")).await.unwrap().seq, 1);
    store.drop_schema().await;
}

/// `--history-size` deletes the rows themselves; the sweep deletes expired messages and
/// idempotency keys and keeps the rest.
async fn retention_deletes_rows<S: SqlStore>() {
    let Some(store) = open::<S>(&unique_prefix(), Retention { max_messages: 5, ttl_ms: 1000 }).await else { return };
    for i in 1..=8 {
        store.append(to_room("size", &i.to_string())).await.unwrap();
    }
    assert_eq!(store.count("messages", "WHERE stream = 'room:size'").await, 5);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.append(to_room("fresh", "1")).await.unwrap();
    let mut keyed = to_room("fresh", "2");
    keyed.idempotency = Some(("u:alice".into(), "live".into()));
    store.append(keyed).await.unwrap();
    let stale = format!("INSERT INTO {} VALUES ('u:alice', 'stale', 'm', 1, 0)", store.table("idempotency"));
    store.execute(stale).await;
    store.sweep().await;
    assert_eq!(store.count("messages", "").await, 2, "only the fresh messages are left");
    assert_eq!(store.count("idempotency", "").await, 1, "only the live key is left");
    assert_eq!(kept(&store, &room("size")).await, (vec![], 8), "seqs outlive their messages");
    store.drop_schema().await;
}

/// The server drops every pooled connection (a restart, a failover): one append fails, on the
/// first dead connection it meets (it may have run, so it is not tried again), and the pool then
/// checks every connection before use for a while, so the next append succeeds; a read is tried
/// again on another connection and does not fail at all; and after a second of idleness even the
/// first append finds its connection checked.
async fn dead_connections_are_replaced<S: SqlStore>() {
    let Some(store) = open::<S>(&unique_prefix(), KEEP_ALL).await else { return };
    store.append(to_room("alive", "1")).await.unwrap();
    store.kill_connections().await;
    let mut failures = 0;
    while let Err(e) = store.append(to_room("alive", "2")).await {
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        failures += 1;
        assert!(failures <= 1, "still failing after {failures} appends: {e}");
    }
    eprintln!("{}: {failures} appends failed on dead connections", S::NAME);
    for _ in 0..20 {
        store.append(to_room("alive", "3")).await.unwrap();
    }
    store.kill_connections().await;
    assert_eq!(kept(&store, &room("alive")).await.1, 22, "a read is tried again on another connection");
    store.kill_connections().await;
    tokio::time::sleep(PING_IDLE_AFTER + Duration::from_millis(200)).await;
    store.append(to_room("alive", "4")).await.unwrap();
    let (kept_seqs, last) = kept(&store, &room("alive")).await;
    assert_eq!(kept_seqs, (1..=last).collect::<Vec<_>>(), "no gap");
    store.drop_schema().await;
}

/// Neither a refused password nor an unreachable server prints the URL's credentials.
async fn credentials_never_appear_in_errors<S: SqlStore>() {
    if open::<S>(&unique_prefix(), KEEP_ALL).await.is_none() {
        return;
    }
    let wrong = StallingProxy::upstream(&S::url());
    let scheme = S::url().split_once("://").unwrap().0.to_owned();
    // A user the server does not know (PostgreSQL here trusts any password of a known one).
    for url in
        [format!("{scheme}://sy_nobody:hunter2@{wrong}/test"), format!("{scheme}://sy_nobody:hunter2@127.0.0.1:1/test")]
    {
        let error = format!("{:#}", S::connect(&url, &unique_prefix(), KEEP_ALL).await.err().unwrap());
        assert!(!error.contains("hunter2") && error.contains("***@"), "{error}");
    }
    let error = S::connect(&S::url(), "Bad-Prefix", KEEP_ALL).await.err().unwrap().to_string();
    assert!(error.contains("--prefix"), "{error}");
}

/// A closed store answers `unavailable` and is not ready.
async fn a_closed_store_is_unavailable<S: SqlStore>() {
    let prefix = unique_prefix();
    let Some(store) = open::<S>(&prefix, KEEP_ALL).await else { return };
    store.append(to_room("closed", "1")).await.unwrap();
    store.close().await;
    let refused = store.append(to_room("closed", "2")).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    let unread = store.read(&room("closed"), HistoryQuery::Last { limit: 1 }).await;
    assert!(matches!(unread, Err(StoreError::Unavailable(_))), "{unread:?}");
    assert!(!store.ready().await);
    open::<S>(&prefix, KEEP_ALL).await.unwrap().drop_schema().await;
}

/// A node older than the schema refuses to start rather than write in a layout it does not know.
async fn a_schema_newer_than_the_node_is_refused<S: SqlStore>() {
    let prefix = unique_prefix();
    let Some(store) = open::<S>(&prefix, KEEP_ALL).await else { return };
    store.execute(format!("INSERT INTO {} (version) VALUES (99)", store.table("schema_version"))).await;
    let error = format!("{:#}", S::connect(&S::url(), &prefix, KEEP_ALL).await.err().unwrap());
    assert!(error.contains("version 99") && error.contains("upgrade the node"), "{error}");
    store.drop_schema().await;
}

/// Appends per second through the store (not a check: `cargo test --lib -- --ignored
/// append_throughput --nocapture`).
async fn append_throughput<S: SqlStore>() {
    let Some(store) = open::<S>(&unique_prefix(), KEEP_ALL).await else { return };
    let store = std::sync::Arc::new(store);
    const APPENDS: usize = 2000;
    for (label, appenders, rooms, direct) in [
        ("1 appender, 1 room", 1, 1, false),
        ("16 appenders, 1 room", 16, 1, false),
        ("16 appenders, 16 rooms", 16, 16, false),
        ("16 appenders, direct messages among 32 users", 16, 0, true),
    ] {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..appenders {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..APPENDS / appenders {
                    let request = if direct {
                        let (from, to) = (fastrand::usize(..32), fastrand::usize(..32));
                        crate::store::tests::direct(&format!("u{from}"), &format!("v{to}"), "{\"text\":\"hello\"}")
                    } else {
                        to_room(&format!("r{}", (task + i) % rooms), "{\"text\":\"hello\"}")
                    };
                    store.append(request).await.unwrap();
                }
            });
        }
        tasks.join_all().await;
        let rate = APPENDS as f64 / started.elapsed().as_secs_f64();
        eprintln!("{} append throughput, {label}: {rate:.0}/s", S::NAME);
    }
    store.drop_schema().await;
}

macro_rules! sql_suite {
    ($backend:ident, $store:ty) => {
        mod $backend {
            use super::*;

            macro_rules! test {
                ($check:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        super::$check::<$store>().await;
                    }
                };
            }

            test!(a_stalled_append_never_commits_late);
            test!(an_append_that_waited_past_its_deadline_rolls_back);
            test!(a_deadline_already_past_is_refused);
            test!(retention_deletes_rows);
            test!(dead_connections_are_replaced);
            test!(credentials_never_appear_in_errors);
            test!(a_closed_store_is_unavailable);
            test!(a_schema_newer_than_the_node_is_refused);

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "a measurement, not a check"]
            async fn append_throughput() {
                super::append_throughput::<$store>().await;
            }
        }
    };
}

sql_suite!(postgres, PostgresStore);
sql_suite!(mysql, MysqlStore);

/// PostgreSQL connections get their lock and statement timeouts with `SET` once connected (not
/// as startup options, which poolers refuse), every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_carry_their_timeouts() {
    let Some(store) = open::<PostgresStore>(&unique_prefix(), KEEP_ALL).await else { return };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = store.pool().acquire().await.unwrap();
        let lock: String = sqlx::query_scalar("SHOW lock_timeout").fetch_one(&mut *conn).await.unwrap();
        let statement: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(&mut *conn).await.unwrap();
        assert_eq!((lock.as_str(), statement.as_str()), ("2s", "5s"));
        held.push(conn);
    }
    drop(held);
    store.drop_schema().await.unwrap();
}
