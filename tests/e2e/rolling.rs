//! A rolling restart of a three-node cluster under a steady mixed load loses nothing: every
//! device of every user ends with every message of its streams once, and each session delivers
//! them in seq order but where PROTOCOL.md §4 allows otherwise (a catch-up after its reply, older
//! than a live message the session already had).
//!
//! The nodes restart one after another (SIGTERM with a short drain, wait for the exit, start again
//! on the same port, wait for `/readyz`). Devices and senders reach the cluster through
//! `entries`: the nodes themselves, each client moving to the next address of its list when its
//! node closes it (1001) or refuses it, or nginx in front of them on the shipped config.
//! A device resumes with `sync`/`join` `since` the last seq it has.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

use crate::nginx_server::NginxServer;
use crate::procs::{Cluster, NodeProc, http_within};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Where the load reaches the cluster.
#[derive(Clone)]
pub enum Entries {
    /// The nodes themselves (`ws://`, `http://`): a client moves to the next when its node
    /// closes or refuses it.
    Nodes(Vec<SocketAddr>),
    /// nginx in front of them (`wss://`, `https://`, the shipped config): one address, behind
    /// which nginx picks a node for every connection.
    Nginx(Arc<NginxServer>),
}

impl Entries {
    /// A WebSocket to `path` through entry `at`, or `None` when refused.
    async fn ws(&self, at: usize, path: &str) -> Option<Ws> {
        let connected = match self {
            Self::Nodes(addrs) => {
                let url = format!("ws://{}{path}", addrs[at % addrs.len()]);
                ClientBuilder::new().uri(&url).expect("uri").connect().await
            }
            Self::Nginx(nginx) => {
                let url = nginx.wss_url(path);
                ClientBuilder::new().uri(&url).expect("uri").connector(nginx.connector()).connect().await
            }
        };
        connected.ok().map(|(ws, _)| ws)
    }

    /// An API request through entry `at`: the status and the JSON answer, `None` when no answer.
    async fn http(&self, at: usize, method: &str, path: &str, body: &str) -> Option<(u16, Value)> {
        match self {
            Self::Nodes(addrs) => {
                http_within(addrs[at % addrs.len()], method, path, body, Duration::from_secs(5)).await
            }
            Self::Nginx(nginx) => {
                let (status, _, answer) = nginx.https(method, path, "", body).await;
                Some((status, serde_json::from_str(&answer).unwrap_or(Value::Null)))
            }
        }
    }
}

/// Users and how many devices each has.
const USERS: [(&str, usize); 4] = [("ann", 3), ("ben", 2), ("cid", 3), ("dee", 2)];
/// Rooms and their members (every device of a member joins).
const ROOMS: [(&str, &[&str]); 2] = [("lobby", &["ann", "ben", "cid", "dee"]), ("team", &["ann", "cid"])];
/// Pause between two messages of one sender.
const PACE: Duration = Duration::from_millis(40);
const DRAIN: [&str; 4] = ["--drain-delay", "1", "--drain-seconds", "2"];

/// What every stream was sent: seq → mid, from the senders' replies.
type Sent = Arc<Mutex<HashMap<String, HashMap<u64, String>>>>;

/// What one device received, per stream in arrival order, and the close codes it got.
#[derive(Default)]
struct Seen {
    /// Every message once, in the order it first arrived (a later session's catch-up may send
    /// again what an earlier one had: a client skips those by seq).
    streams: HashMap<String, Vec<(u64, String)>>,
    closes: Vec<u16>,
    connects: usize,
    /// What PROTOCOL.md §4 does not allow: a message twice in one session, or out of seq order
    /// but for a catch-up's (after its reply, and no newer than the reply's `seq`).
    violations: Vec<String>,
}

impl Seen {
    /// The highest seq of `stream` below which the device has every message: where it resumes.
    fn resume_from(&self, stream: &str) -> u64 {
        let mut seqs: Vec<u64> = self.streams.get(stream).map_or(Vec::new(), |v| v.iter().map(|(s, _)| *s).collect());
        seqs.sort_unstable();
        seqs.iter().zip(1..).take_while(|(seq, want)| **seq == *want).count() as u64
    }
}

#[tokio::test]
async fn a_rolling_restart_under_load_loses_nothing() {
    let Some(cluster) = Cluster::start("rolling") else { return };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.node_with(&format!("n{i}"), &DRAIN).await);
    }
    let entries = Entries::Nodes(nodes.iter().map(|n| n.addr).collect());
    rolling_restart(&cluster, &mut nodes, &entries).await;
}

/// The same behind nginx on the shipped config: clients over `wss://`, the API over `https://`,
/// and nginx moving every reconnect and request to a node that takes it (a draining node's
/// upgrades answer 503, which the config passes to the next node).
#[tokio::test]
async fn a_rolling_restart_behind_nginx_loses_nothing() {
    let Some(cluster) = Cluster::start("rolling-nginx") else { return };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.node_with(&format!("n{i}"), &DRAIN).await);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let Some(nginx) = NginxServer::start(&addrs) else { return };
    rolling_restart(&cluster, &mut nodes, &Entries::Nginx(Arc::new(nginx))).await;
}

/// Runs the load through `entries`, restarts `nodes` one by one, then checks every device.
pub async fn rolling_restart(cluster: &Cluster, nodes: &mut [NodeProc], entries: &Entries) {
    let sent: Sent = Arc::default();
    let sending = Arc::new(AtomicBool::new(true));
    // Set once the senders stopped: the last seq of every stream.
    let finals: Arc<Mutex<Option<HashMap<String, u64>>>> = Arc::default();

    let mut devices = Vec::new();
    for (u, (user, count)) in USERS.iter().enumerate() {
        for d in 0..*count {
            let rooms: Vec<String> =
                ROOMS.iter().filter(|(_, members)| members.contains(user)).map(|(r, _)| r.to_string()).collect();
            let seen = Arc::new(Mutex::new(Seen::default()));
            let task = tokio::spawn(device(
                user.to_string(),
                format!("d{d}"),
                rooms,
                entries.clone(),
                u + d,
                seen.clone(),
                finals.clone(),
            ));
            devices.push((format!("{user}/d{d}"), seen, task));
        }
    }
    // Let every device connect before the load starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while devices.iter().any(|(_, seen, _)| seen.lock().unwrap().connects == 0) {
        assert!(Instant::now() < deadline, "devices connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut senders = Vec::new();
    for (i, (user, _)) in USERS.iter().enumerate() {
        let path = format!("/api/v1/users/{user}/messages");
        senders.push(tokio::spawn(api_sender(
            path,
            format!("user:{user}"),
            entries.clone(),
            i,
            sent.clone(),
            sending.clone(),
        )));
    }
    for (i, (room, _)) in ROOMS.iter().enumerate() {
        let path = format!("/api/v1/rooms/{room}/messages");
        senders.push(tokio::spawn(api_sender(
            path,
            format!("room:{room}"),
            entries.clone(),
            i,
            sent.clone(),
            sending.clone(),
        )));
    }
    senders.push(tokio::spawn(client_sender(entries.clone(), sent.clone(), sending.clone())));

    for (i, node) in nodes.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let port = node.addr.port();
        node.signal("TERM");
        let status = node.exited(Duration::from_secs(40)).await;
        assert!(status.success(), "node n{i} exits cleanly after its drain: {status}");
        *node = cluster.node_on(&format!("n{i}"), port, &DRAIN).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.readyz(Duration::from_secs(2)).await != Some(200) {
            assert!(Instant::now() < deadline, "n{i} ready again:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sending.store(false, Ordering::Release);
    for sender in senders {
        sender.await.expect("sender");
    }
    let sent = sent.lock().unwrap().clone();
    let last: HashMap<String, u64> =
        sent.iter().map(|(s, m)| (s.clone(), m.keys().copied().max().unwrap_or(0))).collect();
    *finals.lock().unwrap() = Some(last.clone());

    for (name, _, task) in &mut devices {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("{name} caught up with every stream"))
            .expect("device task");
    }
    let mut closes_1001 = 0;
    let mut total = 0;
    for (name, seen, _) in &devices {
        let seen = seen.lock().unwrap();
        assert!(seen.closes.iter().all(|&c| c == 1001), "{name} was only ever closed with 1001: {:?}", seen.closes);
        closes_1001 += seen.closes.len();
        for (stream, got) in &seen.streams {
            let sent = &sent[stream];
            let want: Vec<(u64, String)> = (1..=last[stream]).map(|seq| (seq, sent[&seq].clone())).collect();
            assert_eq!(got.len(), want.len(), "{name} on {stream}: every message once");
            assert!(seen.violations.is_empty(), "{name}: {:?}", seen.violations);
            let mut sorted = got.clone();
            sorted.sort_unstable();
            if let Some(at) = sorted.iter().zip(&want).position(|(g, w)| g != w) {
                let around = |v: &[(u64, String)]| v[at.saturating_sub(2)..(at + 3).min(v.len())].to_vec();
                panic!(
                    "{name} on {stream}: every message once; from index {at} got {:?}, want {:?}",
                    around(&sorted),
                    around(&want)
                );
            }
            total += got.len();
        }
        let (user, _) = name.split_once('/').unwrap();
        let streams = 1 + ROOMS.iter().filter(|(_, m)| m.contains(&user)).count();
        assert_eq!(seen.streams.len(), streams, "{name} got its user stream and its rooms");
    }
    assert!(closes_1001 >= 3, "the drains closed sessions with 1001 ({closes_1001})");
    eprintln!(
        "rolling restart: {} streams, {} messages sent, {total} deliveries checked, {closes_1001} sessions moved by a drain",
        sent.len(),
        sent.values().map(HashMap::len).sum::<usize>()
    );
}

/// Sends a message to `path` every [`PACE`] until `sending` ends, through the next entry when one
/// fails, with an idempotency key so a retry is never a second message.
async fn api_sender(
    path: String,
    stream: String,
    entries: Entries,
    mut at: usize,
    sent: Sent,
    sending: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while sending.load(Ordering::Acquire) {
        n += 1;
        let body = json!({"body": {"n": n}, "from": "loadgen", "key": format!("{stream}-{n}")}).to_string();
        // Generous: a gateway that counted every node as failed during the restarts answers 502
        // until its `fail_timeout` passes; the key makes every retry safe.
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = loop {
            match entries.http(at, "POST", &path, &body).await {
                Some((200, answer)) => break answer,
                other => {
                    assert!(Instant::now() < deadline, "{path}: no node took message {n}; the last answer: {other:?}");
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let (seq, mid) = (answer["seq"].as_u64().expect("seq"), answer["mid"].as_str().expect("mid").to_owned());
        let previous = sent.lock().unwrap().entry(stream.clone()).or_default().insert(seq, mid.clone());
        assert!(previous.is_none_or(|p| p == mid), "{stream} seq {seq} given to two messages");
        tokio::time::sleep(PACE).await;
    }
}

/// A client of user `bot` that sends DMs to every user in turn over its WebSocket, reconnecting
/// through the next entry when closed and resending with the same key until it has a reply.
async fn client_sender(entries: Entries, sent: Sent, sending: Arc<AtomicBool>) {
    let mut at = 0;
    let mut n = 0u64;
    let mut ws = None;
    while sending.load(Ordering::Acquire) {
        n += 1;
        let to = USERS[n as usize % USERS.len()].0;
        let command = json!({"type": "send", "id": n, "to": to, "body": {"bot": n}, "key": format!("bot-{n}")});
        let deadline = Instant::now() + Duration::from_secs(30);
        let reply = loop {
            assert!(Instant::now() < deadline, "bot: no node took message {n}");
            if ws.is_none() {
                match entries.ws(at, "/ws?user=bot").await {
                    Some(stream) => ws = Some(stream),
                    None => {
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let socket = ws.as_mut().expect("connected");
            if socket.send(Message::text(command.to_string())).await.is_err() {
                ws = None;
                at += 1;
                continue;
            }
            match reply_to(socket, n).await {
                Some(reply) => break reply,
                None => {
                    ws = None;
                    at += 1;
                }
            }
        };
        assert_eq!(reply["type"], "reply", "bot send {n}: {reply}");
        let mid = reply["mid"].as_str().expect("mid").to_owned();
        // The reply's seq is of the bot's own stream; the recipient's is read from history at
        // the end, by mid, since other senders write the same stream.
        sent.lock().unwrap().entry("bot".into()).or_default().insert(n, mid);
        tokio::time::sleep(PACE).await;
    }
    to_recipient_streams(&entries, &sent).await;
}

/// Files the bot's messages under their recipients' streams, with the seqs history gives them.
async fn to_recipient_streams(entries: &Entries, sent: &Sent) {
    let bot = sent.lock().unwrap().remove("bot").unwrap_or_default();
    let mids: std::collections::HashSet<String> = bot.into_values().collect();
    let mut found = 0;
    for (user, _) in USERS {
        let mut since = 0;
        loop {
            let path = format!("/api/v1/users/{user}/history?since={since}&limit=1000");
            // Right after the last restart a gateway may still count the restarted node as
            // failed, and answer 502 for a moment: asked again, as a backend would.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut at = 0;
            let answer = loop {
                match entries.http(at, "GET", &path, "").await {
                    Some((200, answer)) => break answer,
                    other => {
                        assert!(Instant::now() < deadline, "{path}: no node answers history: {other:?}");
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let messages = answer["messages"].as_array().expect("messages");
            if messages.is_empty() {
                break;
            }
            for m in messages {
                let (seq, mid) = (m["seq"].as_u64().expect("seq"), m["mid"].as_str().expect("mid"));
                since = seq;
                if mids.contains(mid) {
                    found += 1;
                    sent.lock().unwrap().entry(format!("user:{user}")).or_default().insert(seq, mid.to_owned());
                }
            }
        }
    }
    assert_eq!(found, mids.len(), "every message the bot sent is in its recipient's stream once");
}

/// Reads until the reply or error with id `n`; `None` when the socket closes or goes silent.
async fn reply_to(socket: &mut Ws, n: u64) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.ok()??.ok()?;
        let Some(text) = message.as_text() else {
            if message.is_close() {
                return None;
            }
            continue;
        };
        let frame: Value = serde_json::from_str(text).ok()?;
        if frame["id"] == json!(n) {
            return Some(frame);
        }
    }
}

/// One device of `user`: connected through `entries` from `at` on, resuming its streams with
/// `since` after every reconnect, until it has the last seq of every stream in `finals`.
async fn device(
    user: String,
    device: String,
    rooms: Vec<String>,
    entries: Entries,
    mut at: usize,
    seen: Arc<Mutex<Seen>>,
    finals: Arc<Mutex<Option<HashMap<String, u64>>>>,
) {
    let own = format!("user:{user}");
    let mut streams = vec![own.clone()];
    streams.extend(rooms.iter().map(|r| format!("room:{r}")));
    let last = |seen: &Seen, stream: &str| seen.resume_from(stream);
    let done = |seen: &Seen| {
        finals
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|f| streams.iter().all(|s| last(seen, s) >= f.get(s).copied().unwrap_or(0)))
    };
    let ids = AtomicUsize::new(0);
    loop {
        if done(&seen.lock().unwrap()) {
            return;
        }
        let Some(mut ws) = entries.ws(at, &format!("/ws?user={user}&device={device}")).await else {
            at += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.lock().unwrap().connects += 1;
        // `sync` right after the welcome, as a client that wants the user stream in order does
        // (PROTOCOL.md §4); a live message may still come first, and the catch-up after it.
        let mut commands = vec![(own.clone(), json!({"type": "sync", "since": last(&seen.lock().unwrap(), &own)}))];
        for room in &rooms {
            let stream = format!("room:{room}");
            let since = last(&seen.lock().unwrap(), &stream);
            commands.push((stream, json!({"type": "join", "room": room, "since": since})));
        }
        // This session's catch-ups (command id → stream, then stream → the reply's seq) and what
        // it received.
        let mut asked: HashMap<u64, String> = HashMap::new();
        let mut caught_up: HashMap<String, u64> = HashMap::new();
        let mut this_session: std::collections::HashSet<(String, u64)> = Default::default();
        let mut ok = true;
        for (stream, mut command) in commands {
            let id = ids.fetch_add(1, Ordering::Relaxed) as u64;
            asked.insert(id, stream);
            command["id"] = json!(id);
            if ws.send(Message::text(command.to_string())).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            at += 1;
            continue;
        }
        loop {
            let next = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => {
                    if done(&seen.lock().unwrap()) {
                        let _ = ws.close().await;
                        return;
                    }
                    continue;
                }
                Ok(next) => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                _ => {
                    // Ended without a close frame.
                    seen.lock().unwrap().closes.push(0);
                    break;
                }
            };
            if let Some((code, _)) = message.as_close() {
                seen.lock().unwrap().closes.push(u16::from(code));
                break;
            }
            let Some(text) = message.as_text() else { continue };
            let frame: Value = serde_json::from_str(text).expect("JSON frames");
            match frame["type"].as_str() {
                Some("message") => {
                    let stream = frame["stream"].as_str().expect("stream").to_owned();
                    let (seq, mid) = (frame["seq"].as_u64().expect("seq"), frame["mid"].as_str().expect("mid"));
                    let mut seen = seen.lock().unwrap();
                    if !this_session.insert((stream.clone(), seq)) {
                        seen.violations.push(format!("{stream} seq {seq} twice in one session"));
                    }
                    let got = seen.streams.entry(stream.clone()).or_default();
                    if let Some((_, had)) = got.iter().find(|(s, _)| *s == seq) {
                        if had != mid {
                            let problem = format!("{stream} seq {seq} is {mid}, was {had}");
                            seen.violations.push(problem);
                        }
                        continue;
                    }
                    let newest = got.iter().map(|(s, _)| *s).max().unwrap_or(0);
                    got.push((seq, mid.to_owned()));
                    if seq < newest && !caught_up.get(&stream).is_some_and(|&last| seq <= last) {
                        seen.violations.push(format!("{stream} seq {seq} after {newest}, not in a catch-up"));
                    }
                }
                Some("reply") => {
                    if let Some(stream) = frame["id"].as_u64().and_then(|id| asked.get(&id)) {
                        caught_up.insert(stream.clone(), frame["seq"].as_u64().expect("a catch-up's seq"));
                    }
                }
                Some("error") => panic!("{user}/{device}: {frame}"),
                _ => {}
            }
        }
        at += 1;
    }
}
