//! Test harness: real nodes on port 0, real WebSocket clients, raw HTTP.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchyard::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

use crate::nats_server::NatsServer;
use crate::redis_server::RedisServer;

/// How long a test waits for a frame that must come.
pub const WAIT: Duration = Duration::from_secs(5);

/// How many nodes a cluster deployment runs.
pub const CLUSTER_SIZE: usize = 3;

/// The deployment a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One node with its embedded store.
    Single,
    /// [`CLUSTER_SIZE`] in-process nodes over a private `redis-server`.
    Cluster,
    /// A [`Mode::Cluster`] whose bus drops, duplicates and delays stream messages on purpose
    /// ([`BUS_FAULTS`]): what clients see must not change, because sessions repair from the store.
    Faulty,
    /// One node keeping its streams in PostgreSQL (`--store postgres://…` alone).
    Postgres,
    /// A [`Mode::Cluster`] whose store is PostgreSQL: messages in the database, routed through
    /// Redis (the "write to the database first, then publish" design).
    ClusterPostgres,
    /// A [`Mode::Cluster`] whose bus is a private `nats-server` (`--bus nats://…`); store and
    /// presence stay on the private Redis.
    ClusterNatsBus,
    /// [`CLUSTER_SIZE`] nodes on a private `nats-server` alone (`--nats nats://…`): history in
    /// JetStream, the bus on core NATS, presence and the registry in key-value buckets.
    ClusterNats,
    /// A [`Mode::Cluster`] whose bus is the machine's RabbitMQ (see `amqp_server.rs`); store and
    /// presence stay on the private Redis.
    ClusterAmqp,
    /// [`CLUSTER_SIZE`] in-process nodes on a Redis Cluster of 3 masters without replicas
    /// (`--redis redis+cluster://…`): store, bus and presence sharded over the masters. The
    /// cluster is shared by every test of the process ([`crate::redis_server::shared_cluster`]);
    /// the test's `--prefix` keeps its keys and channels apart.
    ClusterRedisCluster,
}

/// The faults of [`Mode::Faulty`].
pub const BUS_FAULTS: &str = "drop=0.05,dup=0.1,delay=0.3,max-delay=40";

impl Mode {
    /// Whether the deployment has several nodes.
    pub fn clustered(self) -> bool {
        !matches!(self, Mode::Single | Mode::Postgres)
    }
}

/// Writes one end-to-end test once and runs it in every deployment: the body becomes
/// `name::single`, `name::cluster`, `name::faulty_bus`, `name::postgres`,
/// `name::cluster_postgres`, `name::cluster_nats_bus`, `name::cluster_nats`, `name::cluster_amqp`
/// and `name::cluster_redis_cluster`, each called with its [`Mode`].
/// Optional, in this order: doc comments, `#[tokio::test(...)]` arguments for every variant, and
/// `#[cluster_ignore = "cluster: why"]`, which ignores the cluster variants only (a known server
/// bug, named in the reason). Without Redis (or `redis-cli`, for the Redis Cluster), PostgreSQL,
/// NATS or RabbitMQ (outside CI) a variant that needs it prints SKIP and passes.
macro_rules! both_modes {
    (
        $(#[doc = $doc:literal])*
        $(#[tokio::test($($flavor:tt)*)])?
        $(#[cluster_ignore = $reason:literal])?
        async fn $name:ident($mode:ident) $body:block
    ) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($mode: $crate::support::Mode) $body

            #[tokio::test($($($flavor)*)?)]
            async fn single() {
                body($crate::support::Mode::Single).await;
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster() {
                if $crate::redis_server::available() {
                    body($crate::support::Mode::Cluster).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn faulty_bus() {
                if $crate::redis_server::available() {
                    body($crate::support::Mode::Faulty).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            async fn postgres() {
                if $crate::sql_server::postgres_available() {
                    body($crate::support::Mode::Postgres).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster_postgres() {
                if $crate::redis_server::available() && $crate::sql_server::postgres_available() {
                    body($crate::support::Mode::ClusterPostgres).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster_nats_bus() {
                if $crate::redis_server::available() && $crate::nats_server::available() {
                    body($crate::support::Mode::ClusterNatsBus).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster_nats() {
                if $crate::nats_server::available() {
                    body($crate::support::Mode::ClusterNats).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster_amqp() {
                if $crate::redis_server::available() && $crate::amqp_server::available() {
                    body($crate::support::Mode::ClusterAmqp).await;
                }
            }

            #[tokio::test($($($flavor)*)?)]
            $(#[ignore = $reason])?
            async fn cluster_redis_cluster() {
                if $crate::redis_server::cluster_available() {
                    body($crate::support::Mode::ClusterRedisCluster).await;
                }
            }
        }
    };
}
pub(crate) use both_modes;

/// One deployment under test: a single node, or a cluster of [`CLUSTER_SIZE`] nodes sharing a
/// private Redis (kept alive as long as this value). Clients and HTTP requests made through it
/// spread over the nodes round-robin, so consecutive clients of a test land on different nodes;
/// [`TestNode::on`] picks one node.
pub struct TestNode {
    pub mode: Mode,
    /// The first node's address (the only one in single mode).
    pub addr: std::net::SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
    servers: Vec<Option<Server>>,
    args: Vec<String>,
    next_client: AtomicUsize,
    next_request: AtomicUsize,
    /// The private Redis and NATS of a cluster, kept alive for the test; declared last, so
    /// dropped (and killed) after the nodes that use them.
    _redis: Option<RedisServer>,
    _nats: Option<NatsServer>,
}

impl TestNode {
    /// A dev-mode single node with a fresh data dir; `extra` are more `serve` flags.
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_mode(Mode::Single, extra).await
    }

    /// A dev-mode deployment in `mode`; `extra` are more `serve` flags, given to every node. In
    /// cluster mode a `--node-id X` becomes `X-0`, `X-1`, ... (ids are unique in a cluster), and
    /// Redis must be installed (the `both_modes!` cluster variant checks before it calls this).
    pub async fn start_mode(mode: Mode, extra: &[&str]) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let prefix = format!("e2e_{:016x}", fastrand::u64(..));
        if matches!(mode, Mode::Postgres | Mode::ClusterPostgres) {
            args.extend(["--store".into(), crate::sql_server::postgres_url()]);
        }
        let redis = match mode {
            Mode::Single | Mode::ClusterNats => None,
            Mode::Postgres => {
                args.extend(["--prefix".into(), prefix.clone()]);
                None
            }
            Mode::Cluster | Mode::Faulty | Mode::ClusterPostgres | Mode::ClusterNatsBus | Mode::ClusterAmqp => {
                let redis = RedisServer::start_checked().expect("redis-server for a cluster test");
                args.extend(["--redis".into(), redis.url(), "--prefix".into(), prefix.clone()]);
                if mode == Mode::Faulty {
                    args.extend(["--test-bus-faults".into(), BUS_FAULTS.into()]);
                }
                if mode == Mode::ClusterAmqp {
                    args.extend(["--bus".into(), crate::amqp_server::amqp_url()]);
                }
                Some(redis)
            }
            Mode::ClusterRedisCluster => {
                let cluster = crate::redis_server::shared_cluster().expect("the shared Redis Cluster");
                args.extend(["--redis".into(), cluster.url(), "--prefix".into(), prefix.clone()]);
                None
            }
        };
        let nats = match mode {
            Mode::ClusterNatsBus => {
                let nats = NatsServer::start().expect("nats-server for a NATS bus test");
                args.extend(["--bus".into(), nats.url()]);
                Some(nats)
            }
            Mode::ClusterNats => {
                let nats = NatsServer::start().expect("nats-server for a NATS test");
                args.extend(["--nats".into(), nats.url(), "--prefix".into(), prefix]);
                Some(nats)
            }
            _ => None,
        };
        let servers = Self::start_servers(mode, &dir, &args).await;
        Self {
            mode,
            addr: servers[0].addr,
            dir,
            servers: servers.into_iter().map(Some).collect(),
            args,
            next_client: AtomicUsize::new(0),
            next_request: AtomicUsize::new(0),
            _redis: redis,
            _nats: nats,
        }
    }

    async fn start_servers(mode: Mode, dir: &tempfile::TempDir, args: &[String]) -> Vec<Server> {
        let count = match mode {
            _ if !mode.clustered() => 1,
            _ => CLUSTER_SIZE,
        };
        let starts = (0..count).map(|i| {
            let data: PathBuf = dir.path().join(format!("data-{i}"));
            let mut argv = vec![
                "switchyard".to_string(),
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                data.to_string_lossy().into_owned(),
            ];
            let mut rest = args.iter();
            while let Some(arg) = rest.next() {
                argv.push(arg.clone());
                if arg == "--node-id" && mode.clustered() {
                    let id = rest.next().expect("--node-id has a value");
                    argv.push(format!("{id}-{i}"));
                }
            }
            async move {
                let cli = switchyard::config::parse(argv).expect("valid test config");
                let switchyard::config::CliCommand::Serve(config) = cli.command;
                Server::start(*config).await.expect("node starts")
            }
        });
        futures_util::future::join_all(starts).await
    }

    /// Shuts every node down gracefully and starts new ones on the same data dirs (single) or
    /// the same Redis (cluster), which keeps its data.
    pub async fn restart(mut self) -> Self {
        self.stop_all().await;
        let servers = Self::start_servers(self.mode, &self.dir, &self.args).await;
        self.addr = servers[0].addr;
        self.servers = servers.into_iter().map(Some).collect();
        self
    }

    /// Shuts every node down gracefully. Drop the test's clients first: a node waits up to a
    /// second for each session's close reply, which a client nobody reads never sends.
    pub async fn shutdown(mut self) {
        self.stop_all().await;
    }

    async fn stop_all(&mut self) {
        let running = self.servers.iter_mut().filter_map(Option::take).map(Server::shutdown);
        futures_util::future::join_all(running).await;
    }

    /// The `--prefix` of this deployment's keys, schema or tables.
    pub fn prefix(&self) -> &str {
        let at = self.args.iter().position(|a| a == "--prefix");
        at.and_then(|i| self.args.get(i + 1)).map_or("switchyard", String::as_str)
    }

    /// How many nodes this deployment runs.
    pub fn size(&self) -> usize {
        self.servers.len()
    }

    /// Node `index`, to talk to it alone.
    pub fn on(&self, index: usize) -> Member {
        let server = self.server(index);
        Member { index, addr: server.addr }
    }

    /// Every node, in order.
    pub fn members(&self) -> Vec<Member> {
        (0..self.size()).map(|i| self.on(i)).collect()
    }

    /// The running server of node `index`, for tests that reach inside it.
    pub fn server(&self, index: usize) -> &Server {
        self.servers[index].as_ref().expect("node is running")
    }

    /// Takes node `index` out of the deployment, e.g. to shut it down by hand; later calls that
    /// pick that node panic.
    pub fn take_server(&mut self, index: usize) -> Server {
        self.servers[index].take().expect("node is running")
    }

    /// The id node `index` gave itself.
    pub fn node_id(&self, index: usize) -> String {
        self.server(index).node.id.to_string()
    }

    fn round_robin(&self, counter: &AtomicUsize) -> Member {
        self.on(counter.fetch_add(1, Ordering::Relaxed) % self.size())
    }

    /// The node the next client connects to.
    pub fn next_member(&self) -> Member {
        self.round_robin(&self.next_client)
    }

    /// The WebSocket URL of the next node, for a test that builds its own client.
    #[allow(dead_code)]
    pub fn ws_url(&self, query: &str) -> String {
        self.next_member().ws_url(query)
    }

    /// Connects a dev-mode client as `user` and reads its welcome.
    pub async fn connect(&self, user: &str) -> Client {
        self.next_member().connect(user).await
    }

    pub async fn connect_query(&self, query: &str) -> Client {
        self.next_member().connect_query(query).await
    }

    pub async fn connect_bearer(&self, token: &str) -> Client {
        self.next_member().connect_bearer(token).await
    }

    /// A plain HTTP/1.1 request; answers the status and the body parsed as JSON (or a string).
    pub async fn http(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, Value) {
        self.round_robin(&self.next_request).http(method, path, body, key).await
    }

    /// An upgrade request that is expected to be refused: answers the status and JSON body.
    pub async fn refused_upgrade(&self, path_and_query: &str, extra_headers: &str) -> (u16, Value) {
        self.round_robin(&self.next_request).refused_upgrade(path_and_query, extra_headers).await
    }

    /// The first node's metrics; see [`Member::metrics`] and [`TestNode::metric_total`].
    pub async fn metrics(&self) -> String {
        self.on(0).metrics().await
    }

    /// A metric summed over every node.
    pub async fn metric_total(&self, name_and_labels: &str) -> f64 {
        let mut total = 0.0;
        for member in self.members() {
            total += metric(&member.metrics().await, name_and_labels);
        }
        total
    }
}

/// One node of a [`TestNode`], by index and address.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub index: usize,
    pub addr: std::net::SocketAddr,
}

impl Member {
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Connects a dev-mode client as `user` and reads its welcome.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_query(&format!("user={user}")).await
    }

    pub async fn connect_query(&self, query: &str) -> Client {
        let builder = ClientBuilder::new().uri(&self.ws_url(query)).expect("uri");
        let (ws, _) = builder.connect().await.expect("upgrade accepted");
        Client::new(ws, self.index).await
    }

    pub async fn connect_bearer(&self, token: &str) -> Client {
        let builder = ClientBuilder::new()
            .uri(&self.ws_url(""))
            .expect("uri")
            .add_header(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            )
            .expect("header");
        let (ws, _) = builder.connect().await.expect("upgrade accepted");
        Client::new(ws, self.index).await
    }

    /// A plain HTTP/1.1 request; answers the status and the body parsed as JSON (or a string).
    pub async fn http(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, Value) {
        let mut headers = String::new();
        if let Some(key) = key {
            headers.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        let (status, text) = raw_http(self.addr, method, path, &headers, body.unwrap_or("")).await;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// An upgrade request that is expected to be refused: answers the status and JSON body.
    pub async fn refused_upgrade(&self, path_and_query: &str, extra_headers: &str) -> (u16, Value) {
        let headers = format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}"
        );
        let (status, text) = raw_http(self.addr, "GET", path_and_query, &headers, "").await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// This node's metrics text.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.http("GET", "/metrics", None, None).await;
        assert_eq!(status, 200);
        body.as_str().expect("metrics are text").to_owned()
    }
}

/// Where a raw connection goes: a deployment (its next node, round-robin) or one node.
pub trait Target {
    fn member(&self) -> Member;
}

impl Target for TestNode {
    fn member(&self) -> Member {
        self.next_member()
    }
}

impl Target for Member {
    fn member(&self) -> Member {
        *self
    }
}

/// The value of a metric line `name{labels} value` (first match), or 0.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

pub async fn raw_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.expect("response in time").expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    (status, body)
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// The index of the node of its [`TestNode`] this client is connected to (`usize::MAX` when
    /// it connected by URL).
    pub node: usize,
    buffered: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    pub async fn new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, node: usize) -> Self {
        let mut client = Self { ws, welcome: Value::Null, node, buffered: VecDeque::new(), next_id: 0 };
        client.welcome = client.next_frame().await;
        assert_eq!(client.welcome["type"], "welcome", "first frame is the welcome");
        client
    }

    /// Like [`Client::new`], for a node that may refuse: `None` when the first frame is not a
    /// welcome or nothing came within `wait`.
    pub async fn try_new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, node: usize, wait: Duration) -> Option<Self> {
        let mut client = Self { ws, welcome: Value::Null, node, buffered: VecDeque::new(), next_id: 0 };
        loop {
            let message = tokio::time::timeout(wait, client.ws.next()).await.ok()??.ok()?;
            if let Some(text) = message.as_text() {
                let frame: Value = serde_json::from_str(text).ok()?;
                if frame["type"] != "welcome" {
                    return None;
                }
                client.welcome = frame;
                return Some(client);
            }
            if message.is_close() {
                return None;
            }
        }
    }

    pub fn session(&self) -> String {
        self.welcome["session"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends `values` as frames back to back, flushed once, so that they reach the server
    /// together (in one TCP write while they fit).
    pub async fn send_together(&mut self, values: &[Value]) {
        for value in values {
            self.ws.feed(Message::text(value.to_string())).await.expect("send");
        }
        self.ws.flush().await.expect("flush");
    }

    /// Sends `command` with a fresh id and waits for its reply or error; other frames that
    /// arrive meanwhile are kept for `next_frame`.
    pub async fn request(&mut self, mut command: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        command["id"] = json!(id);
        self.send_json(command).await;
        let mut skipped = VecDeque::new();
        let answer = loop {
            let frame = self.read_socket().await;
            if frame["id"] == json!(id) && (frame["type"] == "reply" || frame["type"] == "error") {
                break frame;
            }
            skipped.push_back(frame);
        };
        self.buffered.extend(skipped);
        answer
    }

    /// Like `request`, and asserts it was a reply (not an error).
    pub async fn ok(&mut self, command: Value) -> Value {
        let answer = self.request(command.clone()).await;
        assert_eq!(answer["type"], "reply", "{command} answered {answer}");
        answer
    }

    async fn read_socket(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("valid frame");
            if let Some(text) = message.as_text() {
                return serde_json::from_str(text).expect("server frames are JSON");
            }
            if message.is_close() {
                panic!("closed unexpectedly: {:?}", message.as_close());
            }
        }
    }

    /// The next frame of any type.
    pub async fn next_frame(&mut self) -> Value {
        match self.buffered.pop_front() {
            Some(frame) => frame,
            None => self.read_socket().await,
        }
    }

    /// The next `message` frame, skipping presence events.
    pub async fn next_message(&mut self) -> Value {
        loop {
            let frame = self.next_frame().await;
            if frame["type"] == "message" {
                return frame;
            }
            assert_eq!(frame["type"], "presence", "unexpected frame {frame}");
        }
    }

    /// Asserts nothing but pings arrives for `ms` milliseconds.
    pub async fn expect_silence(&mut self, ms: u64) {
        assert!(self.buffered.is_empty(), "unexpected buffered frames {:?}", self.buffered);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(next) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            let message = next.expect("socket open").expect("valid frame");
            assert!(!message.is_text() && !message.is_close(), "unexpected frame {:?}", message.as_text());
        }
    }

    /// Reads until the server closes; answers the close code and the `disconnect` frame's code
    /// if one came first.
    pub async fn closed(&mut self) -> (u16, Option<u16>) {
        self.closed_within(Duration::from_secs(15)).await
    }

    /// Like [`Client::closed`], waiting up to `wait` (virtual time in paused-clock tests).
    pub async fn closed_within(&mut self, wait: Duration) -> (u16, Option<u16>) {
        let mut announced = self.buffered.iter().find(|f| f["type"] == "disconnect").and_then(|f| f["code"].as_u64());
        loop {
            let next = tokio::time::timeout(wait, self.ws.next()).await.expect("closed in time");
            match next {
                Some(Ok(message)) => {
                    if let Some((code, _)) = message.as_close() {
                        return (u16::from(code), announced.map(|c| c as u16));
                    }
                    if let Some(text) = message.as_text() {
                        let v: Value = serde_json::from_str(text).unwrap_or_default();
                        if v["type"] == "disconnect" {
                            announced = v["code"].as_u64();
                        }
                    }
                }
                Some(Err(e)) => panic!("socket error before close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }
}

/// Connects over raw TCP, performs the upgrade and hands back the stream, for tests that
/// write frames no client library would.
pub async fn raw_upgrade(target: &impl Target, query: &str) -> TcpStream {
    let (status, stream) = raw_upgrade_status(target.member().addr, query, "").await;
    assert_eq!(status, 101, "upgrade accepted");
    stream
}

/// Sends an upgrade request with `extra_headers` (each ending in CRLF) over raw TCP and reads the
/// response head: its status and the stream after it.
pub async fn raw_upgrade_status(addr: std::net::SocketAddr, query: &str, extra_headers: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    let status = std::str::from_utf8(&head[9..12]).ok().and_then(|code| code.parse().ok());
    (status.unwrap_or_else(|| panic!("a status line: {}", String::from_utf8_lossy(&head))), stream)
}

/// Encodes one masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [1u8, 2, 3, 4];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one server frame from a raw stream: its opcode and payload.
async fn raw_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    let mut len = u64::from(head[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        stream.read_exact(&mut b).await.ok()?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        stream.read_exact(&mut b).await.ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[0] & 0x0f, payload))
}

/// Reads server frames from a raw stream until a close frame; answers its code.
pub async fn raw_close_code(stream: &mut TcpStream) -> u16 {
    raw_close_code_within(stream, WAIT).await
}

/// Like [`raw_close_code`], waiting up to `wait` (virtual time in paused-clock tests).
pub async fn raw_close_code_within(stream: &mut TcpStream, wait: Duration) -> u16 {
    let read = async {
        loop {
            let (opcode, payload) = raw_frame(stream).await?;
            if opcode == 0x8 {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(wait, read).await.expect("close in time").expect("a close frame")
}

/// Reads server frames from a raw stream until a text frame; answers it parsed.
pub async fn raw_next_json(stream: &mut TcpStream) -> Value {
    let read = async {
        loop {
            let (opcode, payload) = raw_frame(stream).await?;
            if opcode == 0x1 {
                return serde_json::from_slice(&payload).ok();
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("frame in time").expect("a JSON frame")
}

/// Reruns the calling test alone in a child process and answers false, or answers true when
/// this already is that child. For tests that measure the whole process (memory), which other
/// tests running in parallel threads would disturb. `test` is the path the harness knows it by,
/// e.g. `limits::some_test`.
pub fn run_alone(test: &str) -> bool {
    const CHILD: &str = "SWITCHYARD_E2E_ALONE";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let output = std::process::Command::new(exe)
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("child test process starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{test} failed when run alone:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{test} did not run in the child:\n{stdout}");
    false
}

/// This process's resident set size in KiB (Linux).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Connects to a WebSocket URL (e.g. `ws://ADDR/ws?user=alice` of a node process) and reads the
/// welcome.
pub async fn connect_url(url: &str) -> Client {
    let builder = ClientBuilder::new().uri(url).expect("uri");
    let (ws, _) = builder.connect().await.expect("upgrade accepted");
    Client::new(ws, usize::MAX).await
}

/// Connects to a `wss://` URL through `connector` (trusting the test's CA) and reads the welcome.
pub async fn connect_with(url: &str, connector: &tokio_websockets::Connector) -> Client {
    let builder = ClientBuilder::new().uri(url).expect("uri").connector(connector);
    let (ws, _) = builder.connect().await.expect("upgrade accepted");
    Client::new(ws, usize::MAX).await
}
