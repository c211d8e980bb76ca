//! The test harness of the outbox: a database with a fresh prefix, a real node, a WebSocket
//! client, and a source wrapper that counts and stalls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Connection, Executor, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, WebSocketStream};

use crate::Server;
use crate::backend::mysql::{self, MysqlOutbox};
use crate::backend::postgres::{self, PostgresOutbox};
use crate::backend::redact;
use crate::outbox::{Claim, ClaimTxn, Outbox, OutboxError, spawn};
use crate::protocol::{HistoryQuery, RoomName, StreamId, UserId};

/// How long a test waits for what must happen.
pub(super) const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Postgres,
    Mysql,
}

pub(super) enum Db {
    Pg(PgPool),
    My(MySqlPool),
}

/// A row to insert, as an application would.
#[derive(Clone, Default)]
pub(super) struct NewRow {
    pub(super) to_user: Option<String>,
    pub(super) to_room: Option<String>,
    pub(super) body: String,
    pub(super) sender: Option<String>,
    pub(super) key: Option<String>,
}

pub(super) fn to_user(user: &str, body: impl Into<String>) -> NewRow {
    NewRow { to_user: Some(user.into()), body: body.into(), ..NewRow::default() }
}

pub(super) fn to_room(room: &str, body: impl Into<String>) -> NewRow {
    NewRow { to_room: Some(room.into()), body: body.into(), ..NewRow::default() }
}

/// A database with a fresh prefix and a node to deliver into.
pub(super) struct Harness {
    pub(super) kind: Kind,
    pub(super) url: String,
    pub(super) prefix: String,
    db: Db,
    pub(super) server: Option<Server>,
    _dir: tempfile::TempDir,
}

fn url_of(kind: Kind) -> String {
    match kind {
        Kind::Postgres => std::env::var("SWITCHYARD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        Kind::Mysql => {
            std::env::var("SWITCHYARD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
        }
    }
}

/// The outbox of a node whose SQL store is at `url` under `prefix`, as `backend::build` makes it.
pub(super) async fn pg_source(url: &str, prefix: &str) -> anyhow::Result<PostgresOutbox> {
    PostgresOutbox::start(postgres::connect(url, prefix, Default::default()).await?, prefix).await
}

pub(super) async fn my_source(url: &str, prefix: &str) -> anyhow::Result<MysqlOutbox> {
    MysqlOutbox::start(mysql::connect(url, prefix, Default::default()).await?, prefix).await
}

/// SQL that drops everything the store and the outbox create under `prefix`.
pub(super) fn drop_tables(kind: Kind, p: &str) -> String {
    match kind {
        Kind::Postgres => format!("DROP SCHEMA IF EXISTS \"{p}\" CASCADE"),
        Kind::Mysql => format!(
            "DROP PROCEDURE IF EXISTS `{p}_append`; DROP TABLE IF EXISTS `{p}_outbox`, `{p}_outbox_dead`, \
             `{p}_outbox_schema_version`, `{p}_streams`, `{p}_messages`, `{p}_cursors`, `{p}_idempotency`, \
             `{p}_schema_version`"
        ),
    }
}

/// Connects to the test database of `kind`, or answers `None` (after saying why) when it is
/// unreachable outside CI.
pub(super) async fn database(kind: Kind) -> Option<(String, Db)> {
    let url = url_of(kind);
    let connect = async {
        match kind {
            Kind::Postgres => PgPool::connect(&url).await.map(Db::Pg),
            Kind::Mysql => MySqlPool::connect(&url).await.map(Db::My),
        }
    };
    let why = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(db)) => return Some((url, db)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_owned(),
    };
    let shown = redact(&url);
    crate::testing::absent(
        &format!("outbox on {kind:?}"),
        &format!(
            "the test database {shown} is unreachable ({why}); set SWITCHYARD_TEST_POSTGRES / SWITCHYARD_TEST_MYSQL"
        ),
    )
}

impl Harness {
    /// A node with `extra` serve flags and the outbox tables under a fresh prefix.
    pub(super) async fn start(kind: Kind, extra: &[&str]) -> Option<Self> {
        Self::start_on(kind, extra, format!("sy_outbox_{:012x}", fastrand::u64(..) >> 16)).await
    }

    /// Like [`Harness::start`], on the tables of `prefix` (those of another harness).
    pub(super) async fn start_on(kind: Kind, extra: &[&str], prefix: String) -> Option<Self> {
        let (url, db) = database(kind).await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut argv =
            vec!["switchyard", "serve", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().expect("utf-8 path")];
        argv.extend(extra);
        let cli = crate::config::parse(argv).expect("valid test config");
        let crate::config::CliCommand::Serve(config) = cli.command;
        let server = Server::start(*config).await.expect("node starts");
        let harness = Self { kind, url, prefix, db, server: Some(server), _dir: dir };
        // Creates the tables, so that a test may insert before it starts a consumer.
        drop(harness.source().await);
        Some(harness)
    }

    pub(super) fn server(&self) -> &Server {
        self.server.as_ref().expect("node running")
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.server().addr
    }

    /// A new source on the test's tables, with a store pool of its own (another node's).
    pub(super) async fn source(&self) -> Arc<dyn Outbox> {
        match self.kind {
            Kind::Postgres => Arc::new(pg_source(&self.url, &self.prefix).await.expect("outbox starts")),
            Kind::Mysql => Arc::new(my_source(&self.url, &self.prefix).await.expect("outbox starts")),
        }
    }

    /// Starts a consumer on `source` for the test's node.
    pub(super) fn consume(&self, source: Arc<dyn Outbox>) -> tokio::task::JoinHandle<()> {
        spawn(self.server().node.clone(), source)
    }

    pub(super) fn table(&self, name: &str) -> String {
        match self.kind {
            Kind::Postgres => format!("\"{}\".{name}", self.prefix),
            Kind::Mysql => format!("`{}_{name}`", self.prefix),
        }
    }

    pub(super) async fn exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        match &self.db {
            Db::Pg(pool) => pool.execute(AssertSqlSafe(sql)).await.map(drop),
            Db::My(pool) => pool.execute(AssertSqlSafe(sql)).await.map(drop),
        }
    }

    /// Inserts `rows` in one transaction, committed or rolled back; answers their ids.
    pub(super) async fn insert(&self, rows: &[NewRow], commit: bool) -> Result<Vec<i64>, sqlx::Error> {
        let t = self.table("outbox");
        let mut ids = Vec::new();
        match &self.db {
            Db::Pg(pool) => {
                let mut conn = pool.acquire().await?;
                let mut txn = conn.begin().await?;
                let sql = format!(
                    r#"INSERT INTO {t} (to_user, to_room, body, sender, "key") VALUES ($1, $2, $3, $4, $5) RETURNING id"#
                );
                for r in rows {
                    let id: i64 = sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
                        .bind(&r.to_user)
                        .bind(&r.to_room)
                        .bind(&r.body)
                        .bind(&r.sender)
                        .bind(&r.key)
                        .fetch_one(&mut *txn)
                        .await?;
                    ids.push(id);
                }
                if commit { txn.commit().await? } else { txn.rollback().await? }
            }
            Db::My(pool) => {
                let mut conn = pool.acquire().await?;
                let mut txn = conn.begin().await?;
                let sql = format!("INSERT INTO {t} (to_user, to_room, body, sender, `key`) VALUES (?, ?, ?, ?, ?)");
                for r in rows {
                    let done = sqlx::query(AssertSqlSafe(sql.as_str()))
                        .bind(&r.to_user)
                        .bind(&r.to_room)
                        .bind(&r.body)
                        .bind(&r.sender)
                        .bind(&r.key)
                        .execute(&mut *txn)
                        .await?;
                    ids.push(done.last_insert_id() as i64);
                }
                if commit { txn.commit().await? } else { txn.rollback().await? }
            }
        }
        Ok(ids)
    }

    pub(super) async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {}", self.table(table));
        match &self.db {
            Db::Pg(pool) => sqlx::query_scalar(AssertSqlSafe(sql.as_str())).fetch_one(pool).await,
            Db::My(pool) => sqlx::query_scalar(AssertSqlSafe(sql.as_str())).fetch_one(pool).await,
        }
        .expect("count")
    }

    /// `(id, reason, body)` of every dead-lettered row, by id.
    pub(super) async fn dead(&self) -> Vec<(i64, String, String)> {
        let sql = format!("SELECT id, reason, body FROM {} ORDER BY id", self.table("outbox_dead"));
        match &self.db {
            Db::Pg(pool) => sqlx::query(AssertSqlSafe(sql.as_str()))
                .fetch_all(pool)
                .await
                .expect("dead rows")
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            Db::My(pool) => {
                let text = |r: &sqlx::mysql::MySqlRow, i| String::from_utf8(r.get::<Vec<u8>, _>(i)).expect("utf-8");
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .fetch_all(pool)
                    .await
                    .expect("dead rows")
                    .iter()
                    .map(|r| (r.get(0), text(r, 1), text(r, 2)))
                    .collect()
            }
        }
    }

    /// The bodies stored in a stream, in seq order, as JSON text; and their `from`s.
    pub(super) async fn stream(&self, stream: StreamId) -> Vec<(String, String)> {
        let slice =
            self.server().node.history(&stream, HistoryQuery::After { since: 0, limit: 1000 }).await.expect("history");
        slice
            .messages
            .iter()
            .map(|m| {
                let body: Value = serde_json::from_str(&m.message.body).expect("stored bodies are JSON");
                (body.to_string(), m.message.from.to_string())
            })
            .collect()
    }

    pub(super) async fn user_bodies(&self, user: &str) -> Vec<String> {
        self.stream(StreamId::User(UserId::parse(user).unwrap())).await.into_iter().map(|(b, _)| b).collect()
    }

    pub(super) async fn room_bodies(&self, room: &str) -> Vec<String> {
        self.stream(StreamId::Room(RoomName::parse(room).unwrap())).await.into_iter().map(|(b, _)| b).collect()
    }

    /// Waits until the outbox table is empty.
    pub(super) async fn drained(&self) {
        let deadline = Instant::now() + WAIT;
        while self.count("outbox").await > 0 {
            assert!(Instant::now() < deadline, "the outbox still holds {} rows", self.count("outbox").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A counter from `GET /metrics`, read over HTTP as a scraper would.
    pub(super) async fn metric(&self, name: &str) -> u64 {
        let text = http_get(self.addr(), "/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .trim()
            .parse()
            .expect("a number")
    }

    /// Waits until a counter of `/metrics` shows `want`: a consumer counts a batch just after
    /// its commit, which the test may see first.
    pub(super) async fn metric_reaches(&self, name: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.metric(name).await;
            if got == want || Instant::now() > deadline {
                assert_eq!(got, want, "{name}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the node, and so its consumers; drops the test's tables.
    pub(super) async fn finish(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let drop = drop_tables(self.kind, &self.prefix);
        self.exec(&drop).await.expect("dropping the test's tables");
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// A WebSocket client of the node, in dev mode.
pub(super) struct Client {
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
}

impl Client {
    pub(super) async fn connect(addr: SocketAddr, user: &str) -> Self {
        let uri = format!("ws://{addr}/ws?user={user}");
        let (ws, _) = ClientBuilder::new().uri(&uri).expect("uri").connect().await.expect("upgrade");
        let mut client = Self { ws };
        let welcome = client.next_text().await;
        assert!(welcome.contains("\"welcome\""), "{welcome}");
        client
    }

    pub(super) async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("valid frame");
            if let Some(text) = message.as_text() {
                return text.to_owned();
            }
        }
    }

    /// The next `message` frame, raw and parsed.
    pub(super) async fn next_message(&mut self) -> (String, Value) {
        loop {
            let text = self.next_text().await;
            let frame: Value = serde_json::from_str(&text).expect("JSON frame");
            if frame["type"] == "message" {
                return (text, frame);
            }
        }
    }
}

/// A source that counts its claims and deletes and, when told to, stops inside the
/// `stall_at`-th delete of its life (the row is appended, its delete not yet sent) until
/// `release` is notified: a consumer frozen in the middle of a batch with its transaction open,
/// for a test to kill or to race.
pub(super) struct Probe {
    inner: Arc<dyn Outbox>,
    pub(super) claims: AtomicUsize,
    deletes: Arc<AtomicUsize>,
    stall_at: Option<usize>,
    pub(super) stalled: Arc<Notify>,
    pub(super) release: Arc<Notify>,
}

impl Probe {
    pub(super) fn new(inner: Arc<dyn Outbox>, stall_at: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            claims: AtomicUsize::new(0),
            deletes: Arc::new(AtomicUsize::new(0)),
            stall_at,
            stalled: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        })
    }

    pub(super) fn deletes(&self) -> usize {
        self.deletes.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Outbox for Probe {
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let mut claim = self.inner.claim(limit).await?;
        claim.txn = Box::new(ProbeTxn {
            inner: claim.txn,
            deletes: self.deletes.clone(),
            stall_at: self.stall_at,
            stalled: self.stalled.clone(),
            release: self.release.clone(),
        });
        Ok(claim)
    }

    async fn wait(&self) {
        self.inner.wait().await
    }
}

struct ProbeTxn {
    inner: Box<dyn ClaimTxn>,
    deletes: Arc<AtomicUsize>,
    stall_at: Option<usize>,
    stalled: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait::async_trait]
impl ClaimTxn for ProbeTxn {
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError> {
        let n = self.deletes.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(n) == self.stall_at {
            self.stalled.notify_one();
            self.release.notified().await;
        }
        self.inner.delete(id).await
    }

    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError> {
        self.inner.dead_letter(id, reason).await
    }

    async fn commit(self: Box<Self>) -> Result<(), OutboxError> {
        self.inner.commit().await
    }
}

/// Writes a test once and runs it against both databases: `name::postgres` and `name::mysql`.
macro_rules! on_both {
    ($(#[doc = $doc:literal])* async fn $name:ident($kind:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            use super::*;

            async fn body($kind: Kind) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                body(Kind::Postgres).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                body(Kind::Mysql).await;
            }
        }
    };
}

pub(super) fn numbered(n: usize) -> String {
    format!("{{\"n\": {n}}}")
}

/// The JSON text of `numbered(n)` as history gives it back (re-serialized by serde_json).
pub(super) fn compact(n: usize) -> String {
    format!("{{\"n\":{n}}}")
}
