//! Real node processes for the cluster tests: the built `switchyard` binary, run against a
//! private `redis-server` under a key prefix of its own, killed when dropped (panics included).
//!
//! A node listens on port 0 and the test reads the port from the first line the binary prints.
//! Its log (stderr) goes to a file that is printed when a test fails, since a failing cluster
//! test is mostly explained by what a node said.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fault_proxy::FaultProxy;
use crate::redis_server::RedisServer;
use crate::support::{self, Client};

/// How long a node gets to print its address and answer `/healthz`.
const START_WAIT: Duration = Duration::from_secs(20);

/// A Redis and the prefix that makes one test's cluster its own.
pub struct Cluster {
    pub redis: RedisServer,
    pub prefix: String,
    /// The Redis URL nodes are given: the server's own, or that of a proxy in front of it.
    redis_url: String,
    /// A `--bus` of another server for every node (store and presence stay on Redis).
    bus: Option<String>,
    /// Backend flags every node gets after the Redis ones (see [`Cluster::on`]).
    roles: Vec<String>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A private Redis, or `None` when `redis-server` is missing (see [`RedisServer::start`]).
    pub fn start(test: &str) -> Option<Self> {
        let redis = RedisServer::start_checked()?;
        let prefix = format!("{test}-{:08x}", fastrand::u32(..));
        let redis_url = redis.url();
        Some(Self {
            redis,
            prefix,
            redis_url,
            bus: None,
            roles: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        })
    }

    /// Like [`Cluster::start`], with every node's Redis connections going through the returned
    /// proxy, for tests that break them.
    pub fn start_behind_proxy(test: &str) -> Option<(Self, FaultProxy)> {
        let mut cluster = Self::start(test)?;
        let proxy = FaultProxy::start(([127, 0, 0, 1], cluster.redis.port).into());
        cluster.redis_url = format!("redis://{}/0", proxy.addr());
        Some((cluster, proxy))
    }

    /// This cluster with `--redis url` for every node started after instead of its private
    /// Redis (which keeps running, unused): e.g. a Redis Cluster's `redis+cluster://…`.
    pub fn with_redis(mut self, url: String) -> Self {
        self.redis_url = url;
        self
    }

    /// This cluster with its bus at `url` (e.g. RabbitMQ's), for every node started after.
    pub fn with_bus(mut self, url: String) -> Self {
        self.bus = Some(url);
        self
    }

    /// This cluster with every backend role on `url` instead of the private Redis (which nodes
    /// are still given, but for no role): `--store`, `--bus` and `--presence` beat `--redis`.
    pub fn on(mut self, url: &str) -> Self {
        self.roles = ["--store", url, "--bus", url, "--presence", url].iter().map(|s| s.to_string()).collect();
        self
    }

    /// This cluster with a prefix a SQL store takes (lower case, digits and `_` only), for
    /// tests whose store is PostgreSQL or MySQL.
    pub fn with_sql_prefix(mut self) -> Self {
        self.prefix = self.prefix.to_ascii_lowercase().replace('-', "_");
        self
    }

    /// Starts node `name` (its id is `<prefix>-<name>`) with cluster-test defaults: no rate
    /// limit (tests publish in bursts) and room in history and queues for thousands of messages.
    pub async fn node(&self, name: &str) -> NodeProc {
        self.node_with(name, &[]).await
    }

    /// Like [`Cluster::node`], with more `serve` flags.
    pub async fn node_with(&self, name: &str, extra: &[&str]) -> NodeProc {
        self.node_on(name, 0, extra).await
    }

    /// Like [`Cluster::node_with`], listening on `port` (0: a free one), e.g. to restart a node
    /// where it was.
    pub async fn node_on(&self, name: &str, port: u16, extra: &[&str]) -> NodeProc {
        let id = format!("{}-{name}", self.prefix);
        let listen = format!("127.0.0.1:{port}");
        let data = self.dir.path().join(&id);
        let log = self.dir.path().join(format!("{id}.log"));
        let url = &self.redis_url;
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &listen,
            "--redis",
            url,
            "--redis-prefix",
            &self.prefix,
            "--node-id",
            &id,
            "--rate-limit",
            "0",
            "--history-size",
            "10000",
            "--outbound-queue",
            "8192",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data-dir".into());
        args.push(data.to_string_lossy().into_owned());
        if let Some(bus) = &self.bus {
            args.extend(["--bus".to_owned(), bus.clone()]);
        }
        args.extend(self.roles.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        NodeProc::spawn(id, args, log).await
    }
}

/// One running `switchyard serve` process.
pub struct NodeProc {
    child: Option<Child>,
    pub id: String,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl NodeProc {
    /// A dev-mode single node on the embedded store in `data`, logging to `log`; `extra` are
    /// more `serve` flags.
    pub async fn single(data: &std::path::Path, log: PathBuf, extra: &[&str]) -> Self {
        let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0", "--rate-limit", "0", "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(data.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn("single".into(), args, log).await
    }

    async fn spawn(id: String, args: Vec<String>, log: PathBuf) -> Self {
        let stderr = std::fs::File::create(&log).expect("node log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SWITCHYARD_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(&args)
            .env("SWITCHYARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the switchyard binary starts");
        // Read stdout on a thread for the node's whole life: the node prints more than one line,
        // and a closed pipe would make its `println!` fail.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut node = Self { child: Some(child), id, addr: "127.0.0.1:0".parse().expect("addr"), log };
        let deadline = Instant::now() + START_WAIT;
        let first = loop {
            match rx.try_recv() {
                Ok(line) => break line,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!("node {} exited before listening:\n{}", node.id, node.log_text())
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        Instant::now() < deadline,
                        "node {} printed nothing in time:\n{}",
                        node.id,
                        node.log_text()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // `switchyard 0.1.0 listening on http://127.0.0.1:PORT (WebSocket ..., node ID)`
        let addr = first
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        node.addr = addr.unwrap_or_else(|| panic!("unexpected first line from node {}: {first}", node.id));
        while http_within(node.addr, "GET", "/healthz", "", Duration::from_secs(2)).await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "node {} never answered /healthz:\n{}", node.id, node.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// A dev-mode client of `user` on this node, welcome read.
    pub async fn connect(&self, user: &str) -> Client {
        support::connect_url(&self.ws_url(&format!("user={user}"))).await
    }

    /// An HTTP request (the API is open: dev mode without API keys); the status and the body as
    /// JSON, or as a string when it is not JSON.
    pub async fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(Value::to_string).unwrap_or_default();
        let (status, text) = support::raw_http(self.addr, method, path, "", &body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `http`, asserting a 200.
    pub async fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, answer) = self.http(method, path, body).await;
        assert_eq!(status, 200, "{method} {path} on {} answered {answer}", self.id);
        answer
    }

    /// The ids listed by `GET /api/v1/nodes`.
    pub async fn node_ids(&self) -> Vec<String> {
        let answer = self.ok("GET", "/api/v1/nodes", None).await;
        let nodes = answer["nodes"].as_array().unwrap_or_else(|| panic!("nodes list: {answer}"));
        nodes.iter().map(|n| n["id"].as_str().unwrap_or_default().to_owned()).collect()
    }

    /// The value of one metric line, e.g. `switchyard_bus_messages_received_total`.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let (status, text) = support::raw_http(self.addr, "GET", "/metrics", "", "").await;
        assert_eq!(status, 200, "/metrics of {}", self.id);
        assert!(
            text.lines().any(|l| l.starts_with(name_and_labels)),
            "{} has no metric {name_and_labels}:\n{text}",
            self.id
        );
        support::metric(&text, name_and_labels)
    }

    /// The status of `GET /readyz`, or `None` when the node did not answer within `wait`.
    pub async fn readyz(&self, wait: Duration) -> Option<u16> {
        http_within(self.addr, "GET", "/readyz", "", wait).await.map(|(status, _)| status)
    }

    /// SIGKILL: the node vanishes without a word, as in a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: a graceful shutdown. Answers the exit status once the process ended.
    pub async fn terminate(&mut self, wait: Duration) -> ExitStatus {
        self.signal("TERM");
        self.exited(wait).await
    }

    /// Sends the signal `name` (`TERM`, `INT`) and returns at once.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("node running");
        let _ = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status();
    }

    /// Waits for the process to exit and answers its status; panics after `wait`.
    pub async fn exited(&mut self, wait: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("node running");
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = child.try_wait().expect("wait for node") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {} did not exit within {wait:?} of its signal:\n{}", self.id, self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        self.log_text()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of node {} ({}):", self.id, self.addr);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A plain HTTP/1.1 request that tolerates a node that does not answer: the status and the body
/// parsed as JSON (or a string), or `None` when nothing came within `wait`.
pub async fn http_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    wait: Duration,
) -> Option<(u16, Value)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        // Small JSON answers: accept a single chunk when the body is chunked.
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body.split_once("\r\n").map(|(_, rest)| rest.trim_end_matches("\r\n0\r\n\r\n")).unwrap_or("").to_owned()
        } else {
            body.to_owned()
        };
        Some((status, serde_json::from_str(&body).unwrap_or(Value::String(body))))
    };
    tokio::time::timeout(wait, exchange).await.ok().flatten()
}
