//! Switchyard behind nginx, configured from the shipped `deploy/nginx/switchyard.conf` (see
//! `nginx_server.rs`): three node processes over a private Redis, clients over `wss://` through
//! nginx landing on every node; a node SIGKILLed behind nginx, its clients reconnecting through
//! nginx to the others and resuming with nothing lost; and what nginx hands a node (the upgrade,
//! `X-Forwarded-For`, `X-Forwarded-Proto`), seen by an upstream that records it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::seq;
use crate::nginx_server::{NginxServer, split_response};
use crate::procs::{Cluster, NodeProc};
use crate::support::Client;

const USERS: [&str; 3] = ["ana", "ben", "cy"];
const DEVICES: [&str; 3] = ["phone", "laptop", "tablet"];
const ROOM: &str = "lobby";

/// A message as a device knows it: its seq and mid.
type Seen = (u64, String);

/// One device of a user, connected through nginx, and what it has seen and sent.
struct Device {
    user: &'static str,
    name: &'static str,
    client: Client,
    /// The node nginx put it on (its welcome names it).
    node: String,
    /// Per stream, the messages received, in arrival order.
    got: BTreeMap<String, Vec<Seen>>,
    /// Per stream, the messages this device sent (their replies carried the seq; the node does
    /// not echo them).
    sent: BTreeMap<String, Vec<Seen>>,
}

impl Device {
    async fn connect(nginx: &NginxServer, user: &'static str, name: &'static str) -> Self {
        let client = nginx.connect(&format!("/ws?user={user}&device={name}")).await;
        let node = client.welcome["node"].as_str().expect("the welcome names the node").to_owned();
        Self { user, name, client, node, got: BTreeMap::new(), sent: BTreeMap::new() }
    }

    fn own_stream(&self) -> String {
        format!("user:{}", self.user)
    }

    /// The last seq of `stream` this device has, received or sent.
    fn last(&self, stream: &str) -> u64 {
        let seen = self.got.get(stream).into_iter().chain(self.sent.get(stream)).flatten();
        seen.map(|(seq, _)| *seq).max().unwrap_or(0)
    }

    /// A direct message to `to` with body `{"n": n}`.
    async fn send(&mut self, to: &str, n: u64) {
        let reply = self.client.ok(json!({"type":"send","to":to,"body":{"n":n}})).await;
        let own = self.own_stream();
        self.sent.entry(own).or_default().push((seq(&reply), reply["mid"].as_str().expect("mid").to_owned()));
    }

    async fn publish(&mut self, n: u64) {
        let reply = self.client.ok(json!({"type":"publish","room":ROOM,"body":{"n":n}})).await;
        let stream = format!("room:{ROOM}");
        self.sent.entry(stream).or_default().push((seq(&reply), reply["mid"].as_str().expect("mid").to_owned()));
    }

    /// Reads until it has `want` messages of each stream (sent ones included), then makes sure
    /// nothing more comes.
    async fn read_until(&mut self, want: &BTreeMap<String, usize>) {
        let have =
            |d: &Self, stream: &str| d.got.get(stream).map_or(0, Vec::len) + d.sent.get(stream).map_or(0, Vec::len);
        while want.iter().any(|(stream, n)| have(self, stream) < *n) {
            let frame = self.client.next_frame().await;
            match frame["type"].as_str() {
                Some("message") => {
                    let stream = frame["stream"].as_str().expect("stream").to_owned();
                    assert!(want.contains_key(&stream), "{}/{} got {frame}", self.user, self.name);
                    let mid = frame["mid"].as_str().expect("mid").to_owned();
                    self.got.entry(stream).or_default().push((seq(&frame), mid));
                }
                Some("presence") => {}
                _ => panic!("{}/{}: unexpected frame {frame}", self.user, self.name),
            }
        }
        self.client.expect_silence(300).await;
    }
}

/// Every message sent so far, by stream: the `n` of its body.
#[derive(Default)]
struct Ledger(BTreeMap<String, BTreeSet<u64>>);

impl Ledger {
    fn note(&mut self, stream: String, n: u64) {
        assert!(self.0.entry(stream).or_default().insert(n), "body {n} used twice");
    }

    fn direct(&mut self, from: Option<&str>, to: &str, n: u64) {
        self.note(format!("user:{to}"), n);
        if let Some(from) = from {
            self.note(format!("user:{from}"), n);
        }
    }

    fn room(&mut self, n: u64) {
        self.note(format!("room:{ROOM}"), n);
    }
}

/// A stream's history, read through nginx: `(seq, mid)` in order, after checking that the seqs
/// are 1, 2, 3, … and that it holds exactly the bodies `expected`, once each.
async fn history(nginx: &NginxServer, stream: &str, expected: &BTreeSet<u64>) -> Vec<Seen> {
    let path = match stream.split_once(':') {
        Some(("user", user)) => format!("/api/v1/users/{user}/history?limit=1000"),
        Some(("room", room)) => format!("/api/v1/rooms/{room}/history?limit=1000"),
        _ => unreachable!("a stream name"),
    };
    let (status, _, body) = nginx.https("GET", &path, "", "").await;
    assert_eq!(status, 200, "GET {path} through nginx: {body}");
    let answer: Value = serde_json::from_str(&body).expect("history is JSON");
    let messages = answer["messages"].as_array().expect("messages");
    let seqs: Vec<u64> = messages.iter().map(seq).collect();
    assert_eq!(seqs, (1..=messages.len() as u64).collect::<Vec<_>>(), "{stream} has seqs 1..n");
    let bodies: Vec<u64> = messages.iter().map(|m| m["body"]["n"].as_u64().expect("body n")).collect();
    assert_eq!(bodies.iter().copied().collect::<BTreeSet<_>>(), *expected, "{stream} holds what was sent");
    assert_eq!(bodies.len(), expected.len(), "{stream} holds each message once");
    messages.iter().map(|m| (seq(m), m["mid"].as_str().expect("mid").to_owned())).collect()
}

/// Every device sends a direct message to the user `step` places after its own and one to the
/// room, numbered on from `n`, each written in the ledger.
async fn send_round(devices: &mut [Device], ledger: &mut Ledger, n: &mut u64, step: usize) {
    for device in devices.iter_mut() {
        let to = USERS[(USERS.iter().position(|u| *u == device.user).expect("a user") + step) % USERS.len()];
        *n += 1;
        device.send(to, *n).await;
        ledger.direct(Some(device.user), to, *n);
        *n += 1;
        device.publish(*n).await;
        ledger.room(*n);
    }
}

/// Reads every device up to the history of its streams, then checks that each device has
/// every message of each of its streams exactly once, in seq order, counting those it sent.
async fn settle(devices: &mut [Device], nginx: &NginxServer, ledger: &Ledger) {
    let mut histories = BTreeMap::new();
    for (stream, expected) in &ledger.0 {
        histories.insert(stream.clone(), history(nginx, stream, expected).await);
    }
    for device in devices.iter_mut() {
        let streams = [device.own_stream(), format!("room:{ROOM}")];
        let want: BTreeMap<String, usize> =
            streams.iter().map(|s| (s.clone(), histories.get(s).map_or(0, Vec::len))).collect();
        device.read_until(&want).await;
        for stream in &streams {
            let got = device.got.get(stream).cloned().unwrap_or_default();
            let sent = device.sent.get(stream).cloned().unwrap_or_default();
            let who = format!("{}/{} on {stream}", device.user, device.name);
            assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{who}: received out of order or twice: {got:?}");
            let mut all: Vec<Seen> = got.iter().chain(&sent).cloned().collect();
            all.sort();
            let expected = histories.get(stream).cloned().unwrap_or_default();
            assert_eq!(all, expected, "{who}: received {got:?} and sent {sent:?}");
        }
    }
}

/// Waits until the connection of `device` ends (its node died): without a close frame, as
/// nginx drops the client when the node's socket goes.
async fn dropped(device: &mut Device) {
    let who = format!("{}/{}", device.user, device.name);
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match device.client.ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(message)) if message.is_close() => return,
                Some(Ok(message)) => {
                    if let Some(text) = message.as_text() {
                        panic!("{who} got a frame after its node was killed: {text}");
                    }
                }
            }
        }
    })
    .await;
    assert!(end.is_ok(), "{who}'s connection through nginx outlived its node by 15 s");
}

/// Three nodes behind nginx; clients over `wss://` land on every node; one node is SIGKILLed:
/// its clients' connections drop, they reconnect through nginx (landing on the others) and
/// resume with `since`, and every message sent meanwhile through the surviving nodes, by
/// clients and by the server API through nginx, reaches every device of every user once and
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_behind_nginx_loses_nothing() {
    if !crate::nginx_server::available() {
        return;
    }
    let Some(cluster) = Cluster::start("nginx") else { return };
    let mut nodes: Vec<NodeProc> = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(cluster.node(name).await);
    }
    let nginx = NginxServer::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>()).expect("nginx");

    let (status, _, body) = nginx.https("GET", "/readyz", "", "").await;
    assert_eq!(status, 200, "/readyz through nginx: {body}");
    let (status, _, body) = nginx.https("GET", "/api/v1/nodes", "", "").await;
    assert_eq!(status, 200, "/api/v1/nodes through nginx: {body}");
    let listed: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(listed["nodes"].as_array().map(Vec::len), Some(3), "{listed}");

    let mut devices = Vec::new();
    // A user's devices connect one after another, so that (least_conn taking turns among equals)
    // each user has devices on several nodes and keeps some when one node dies.
    for user in USERS {
        for name in DEVICES {
            let mut device = Device::connect(&nginx, user, name).await;
            device.client.ok(json!({"type":"sync"})).await;
            device.client.ok(json!({"type":"join","room":ROOM})).await;
            devices.push(device);
        }
    }
    let landed: BTreeSet<String> = devices.iter().map(|d| d.node.clone()).collect();
    let ids: BTreeSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
    assert_eq!(landed, ids, "nginx spread the {} clients over every node", devices.len());

    // Before: every device sends a direct message to the next user and one to the room.
    let mut ledger = Ledger::default();
    let mut n = 0;
    send_round(&mut devices, &mut ledger, &mut n, 1).await;
    settle(&mut devices, &nginx, &ledger).await;

    // The node of the first device dies without a word.
    let victim = devices[0].node.clone();
    let at = nodes.iter().position(|n| n.id == victim).expect("the victim is a node");
    let victim_addr = nodes[at].addr;
    nodes[at].kill();
    let (mut cut, mut alive): (Vec<Device>, Vec<Device>) = devices.into_iter().partition(|d| d.node == victim);
    for device in cut.iter_mut() {
        dropped(device).await;
    }

    // Meanwhile, through the surviving nodes: direct messages to every user (the cut devices'
    // users included) and room messages from the clients still connected, and one of each from
    // a backend through nginx.
    for device in alive.iter_mut() {
        let me = device.user;
        for to in USERS.iter().filter(|u| **u != me) {
            n += 1;
            device.send(to, n).await;
            ledger.direct(Some(device.user), to, n);
        }
        n += 1;
        device.publish(n).await;
        ledger.room(n);
    }
    for user in USERS {
        n += 1;
        let body = json!({"body":{"n":n},"from":"backend"}).to_string();
        let (status, _, answer) = nginx.https("POST", &format!("/api/v1/users/{user}/messages"), "", &body).await;
        assert_eq!(status, 200, "API direct message through nginx after the kill: {answer}");
        ledger.direct(None, user, n);
    }
    n += 1;
    let body = json!({"body":{"n":n},"from":"backend"}).to_string();
    let (status, _, answer) = nginx.https("POST", &format!("/api/v1/rooms/{ROOM}/messages"), "", &body).await;
    assert_eq!(status, 200, "API room message through nginx after the kill: {answer}");
    ledger.room(n);

    // The cut devices reconnect through nginx, land on the others, and resume where they were.
    for device in cut.iter_mut() {
        let (user, name) = (device.user, device.name);
        let (user_since, room_since) = (device.last(&device.own_stream()), device.last(&format!("room:{ROOM}")));
        device.client = nginx.connect(&format!("/ws?user={user}&device={name}")).await;
        device.node = device.client.welcome["node"].as_str().expect("node").to_owned();
        assert_ne!(device.node, victim, "{user}/{name} reconnected to the killed node");
        let reply = device.client.ok(json!({"type":"sync","since":user_since})).await;
        assert_eq!(reply["truncated"], false, "{reply}");
        let reply = device.client.ok(json!({"type":"join","room":ROOM,"since":room_since})).await;
        assert_eq!(reply["truncated"], false, "{reply}");
    }
    let log = nginx.error_log();
    assert!(
        log.lines().any(|l| l.contains("Connection refused") && l.contains(&victim_addr.to_string())),
        "nginx tried the killed node {victim_addr} and moved on; its log:\n{log}"
    );

    // After: everyone, reconnected devices included, sends once more.
    let cut_count = cut.len();
    let mut devices: Vec<Device> = cut.into_iter().chain(alive).collect();
    send_round(&mut devices, &mut ledger, &mut n, 2).await;
    settle(&mut devices, &nginx, &ledger).await;
    println!(
        "nginx: {} devices over 3 nodes; node {victim} killed under {cut_count} of them, which resumed on {:?}; {n} messages, all delivered",
        devices.len(),
        devices[..cut_count].iter().map(|d| d.node.as_str()).collect::<Vec<_>>(),
    );
}

/// What nginx hands a node: a WebSocket upgrade as an upgrade over HTTP/1.1, the client's address
/// appended to `X-Forwarded-For`, `X-Forwarded-Proto: https`, API calls and `/readyz` as they
/// came; `/metrics` stays private and plain HTTP is redirected to HTTPS. The upstream here records
/// each request head instead of serving it.
#[tokio::test]
async fn nginx_hands_a_node_the_upgrade_and_the_client_address() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let Some(nginx) = NginxServer::start(&[addr]) else { return };
    let (heads, mut recorded) = tokio::sync::mpsc::unbounded_channel();
    let recorder = tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            let head = read_request(&mut stream).await;
            let answer: &[u8] = if head.to_ascii_lowercase().contains("\r\nupgrade: websocket") {
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            };
            let _ = stream.write_all(answer).await;
            let _ = heads.send(head);
        }
    });
    let mut next_head = async || {
        let head = tokio::time::timeout(Duration::from_secs(5), recorded.recv()).await;
        headers(&head.expect("nginx passed the request on in time").expect("recorder running"))
    };

    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: 203.0.113.9\r\n";
    let (status, _, _) = nginx.https("GET", "/ws?user=ana", upgrade, "").await;
    assert_eq!(status, 101, "the upgrade's answer comes back");
    let (line, seen) = next_head().await;
    assert_eq!(line, "GET /ws?user=ana HTTP/1.1");
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["connection"], "upgrade");
    assert_eq!(seen["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "the client's address last, after what it sent");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["host"], "127.0.0.1");

    let (status, _, _) = nginx.https("GET", "/readyz", "", "").await;
    assert_eq!(status, 200);
    let (line, seen) = next_head().await;
    assert_eq!(line, "GET /readyz HTTP/1.1");
    assert_eq!(seen["connection"], "close");
    assert!(!seen.contains_key("upgrade"), "{seen:?}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");

    let (status, _, _) = nginx.https("GET", "/metrics", "", "").await;
    assert_eq!(status, 404, "metrics are scraped from each node, not through nginx");
    let (status, _, _) = nginx.https("POST", "/api/v1/broadcast", "", r#"{"body":1}"#).await;
    assert_eq!(status, 200);
    let (line, seen) = next_head().await;
    assert_eq!(line, "POST /api/v1/broadcast HTTP/1.1", "the next request after /metrics is the POST");
    assert_eq!(seen["content-length"], "10");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");

    let mut plain = TcpStream::connect(("127.0.0.1", nginx.http_port)).await.expect("connect");
    plain
        .write_all(b"GET /ws?user=ana HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut response))
        .await
        .expect("in time")
        .expect("read");
    let (status, head, _) = split_response(&String::from_utf8_lossy(&response));
    assert_eq!(status, 301, "{head}");
    assert!(head.contains("\r\nLocation: https://chat.example.com/ws?user=ana"), "{head}");
    recorder.abort();
}

/// Reads one request (head and `Content-Length` body); answers the head.
async fn read_request(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).await.expect("read a request");
        assert!(n > 0, "nginx closed before a whole request head");
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let length: usize = headers(&head).1.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while data.len() < head_end + 4 + length {
        let n = stream.read(&mut buf).await.expect("read a request body");
        assert!(n > 0, "nginx closed before the whole body");
        data.extend_from_slice(&buf[..n]);
    }
    head
}

/// A request head's first line and its headers (names in lower case; a repeated one keeps its
/// last value).
fn headers(head: &str) -> (String, BTreeMap<String, String>) {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let fields = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (first, fields)
}
