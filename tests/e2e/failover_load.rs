//! The load of a failover test: senders that write a steady stream of keyed direct and room
//! messages and retry each with its key until it is acknowledged (after `unavailable`, and on a
//! new session when theirs was closed), and devices that read their streams whole, reconnecting
//! with `since` from what they have. What was acknowledged and what each device received is
//! handed back for the test to hold against the stored history.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_websockets::ClientBuilder;

use crate::procs::{NodeProc, http_within};
use crate::support::Client;

/// The room every device joins and every publisher writes to.
pub(crate) const ROOM: &str = "failover";

/// How long one attempt waits for its answer: a node must answer, `unavailable` at worst, even
/// while a master is dead.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// How long a message may take, over all its retries, to be acknowledged.
const ACK_LIMIT: Duration = Duration::from_secs(90);

/// Pause between two sends of one sender.
const PACE: Duration = Duration::from_millis(20);

/// One acknowledged send: the stream its seq is in, that seq, its body (also its key, unique),
/// and for a direct message sent over WebSocket the recipient's stream, where it is too.
#[derive(Clone, Debug)]
pub(crate) struct Acked {
    pub(crate) stream: String,
    pub(crate) seq: u64,
    pub(crate) body: String,
    pub(crate) also_in: Option<String>,
    /// From the first attempt to the acknowledgement.
    pub(crate) latency: Duration,
    /// When the acknowledgement came.
    pub(crate) at: Instant,
    /// Whether it was acknowledged before the fault began (the replica's stall, then the
    /// master's death).
    pub(crate) before_fault: bool,
}

/// What the senders share: when to stop, whether the fault began, and how many `unavailable`
/// answers (and unanswered attempts) they met.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    pub(crate) faulted: AtomicBool,
    pub(crate) refused: AtomicUsize,
}

/// A WebSocket client of `query` on the node at `addr`, welcome read, or `None` when the node
/// refused the upgrade or closed before its welcome (a node may refuse sessions while a backend
/// is down).
async fn try_connect(addr: SocketAddr, query: &str) -> Option<Client> {
    let builder = ClientBuilder::new().uri(&format!("ws://{addr}/ws?{query}")).ok()?;
    let (ws, _) = tokio::time::timeout(ANSWER_WAIT, builder.connect()).await.ok()?.ok()?;
    Client::try_new(ws, usize::MAX, ANSWER_WAIT).await
}

/// What became of one attempt of a command over WebSocket.
enum Attempt {
    Answer(Value),
    /// The session ended before the answer.
    Closed,
}

/// Sends `command` with a fresh id and reads until its answer, ignoring other frames (the room's
/// messages to a publisher). Panics when nothing answers within [`ANSWER_WAIT`].
async fn attempt(client: &mut Client, mut command: Value, id: u64) -> Attempt {
    command["id"] = json!(id);
    if client.ws.send(tokio_websockets::Message::text(command.to_string())).await.is_err() {
        return Attempt::Closed;
    }
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("no answer to {command} within {ANSWER_WAIT:?}"));
        let Some(Ok(message)) = next else { return Attempt::Closed };
        if message.is_close() {
            return Attempt::Closed;
        }
        let Some(text) = message.as_text() else { continue };
        let frame: Value = serde_json::from_str(text).expect("server frames are JSON");
        if frame["id"] == json!(id) && (frame["type"] == "reply" || frame["type"] == "error") {
            return Attempt::Answer(frame);
        }
    }
}

/// Sends `command` as `user` on the node at `addr` until it is acknowledged, with the same `key`
/// every time: after `unavailable`, and on a new session when the session was closed (joining
/// `room` first, when given). Answers the reply.
async fn ws_until_acked(
    addr: SocketAddr,
    user: &str,
    client: &mut Option<Client>,
    room: Option<&str>,
    command: Value,
    shared: &Shared,
) -> Value {
    let started = Instant::now();
    let mut id = 0;
    let mut last = Value::Null;
    loop {
        assert!(started.elapsed() < ACK_LIMIT, "{command} not acknowledged within {ACK_LIMIT:?}; last answer {last}");
        id += 1;
        if client.is_none() {
            *client = try_connect(addr, &format!("user={user}")).await;
            if let (Some(session), Some(room)) = (client.as_mut(), room) {
                match attempt(session, json!({"type": "join", "room": room}), id).await {
                    Attempt::Answer(a) if a["type"] == "reply" => {}
                    Attempt::Answer(a) => {
                        assert_eq!(a["code"], "unavailable", "join {room}: {a}");
                        *client = None;
                    }
                    Attempt::Closed => *client = None,
                }
                id += 1;
            }
        }
        let Some(session) = client.as_mut() else {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match attempt(session, command.clone(), id).await {
            Attempt::Answer(answer) if answer["type"] == "reply" => return answer,
            Attempt::Answer(answer) => {
                assert_eq!(answer["code"], "unavailable", "{command} answered {answer}");
                last = answer;
            }
            Attempt::Closed => {
                last = json!("session closed");
                *client = None;
            }
        }
        shared.refused.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs `body` (with its `key`) to `path` on the node at `addr` until it is answered 200, after
/// 503s; answers the reply. Panics when an attempt is not answered within [`ANSWER_WAIT`].
async fn api_until_acked(addr: SocketAddr, path: &str, body: &Value, shared: &Shared) -> Value {
    let started = Instant::now();
    loop {
        match http_within(addr, "POST", path, &body.to_string(), ANSWER_WAIT).await {
            Some((200, answer)) => return answer,
            Some((503, answer)) => {
                assert!(started.elapsed() < ACK_LIMIT, "POST {path} {body}: still 503 after {ACK_LIMIT:?}: {answer}");
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            Some((status, answer)) => panic!("POST {path} {body} answered {status} {answer}"),
            None => panic!("POST {path} {body} was not answered within {ANSWER_WAIT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sender's kind: direct messages over WebSocket, room messages over WebSocket, or both
/// alternately through the API.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Direct,
    Publish,
    Api,
}

/// One sender on the node at `addr`, writing until told to stop: its `n`-th message goes to
/// `users[n % len]` (direct) or the room; answers what was acknowledged.
pub(crate) async fn sender(
    kind: Kind,
    index: usize,
    addr: SocketAddr,
    users: Arc<Vec<String>>,
    shared: Arc<Shared>,
) -> Vec<Acked> {
    let name = match kind {
        Kind::Direct => format!("dm{index}"),
        Kind::Publish => format!("pub{index}"),
        Kind::Api => format!("api{index}"),
    };
    let mut client = None;
    let mut acked = Vec::new();
    let mut n = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let body = format!("{name}-{n}");
        let to = &users[n % users.len()];
        let started = Instant::now();
        let (stream, seq, also_in) = match kind {
            Kind::Direct => {
                let send = json!({"type": "send", "to": to, "body": body, "key": body});
                let reply = ws_until_acked(addr, &name, &mut client, None, send, &shared).await;
                (format!("user:{name}"), reply["seq"].clone(), Some(format!("user:{to}")))
            }
            Kind::Publish => {
                let publish = json!({"type": "publish", "room": ROOM, "body": body, "key": body});
                let reply = ws_until_acked(addr, &name, &mut client, Some(ROOM), publish, &shared).await;
                (format!("room:{ROOM}"), reply["seq"].clone(), None)
            }
            Kind::Api if n % 2 == 0 => {
                let path = format!("/api/v1/users/{to}/messages");
                let reply = api_until_acked(addr, &path, &json!({"body": body, "key": body}), &shared).await;
                (format!("user:{to}"), reply["seq"].clone(), None)
            }
            Kind::Api => {
                let path = format!("/api/v1/rooms/{ROOM}/messages");
                let reply = api_until_acked(addr, &path, &json!({"body": body, "key": body}), &shared).await;
                (format!("room:{ROOM}"), reply["seq"].clone(), None)
            }
        };
        let seq = seq.as_u64().unwrap_or_else(|| panic!("{body}: an acknowledgement without a seq"));
        let before_fault = !shared.faulted.load(Ordering::Relaxed);
        let (latency, at) = (started.elapsed(), Instant::now());
        acked.push(Acked { stream, seq, body, also_in, latency, at, before_fault });
        n += 1;
        tokio::time::sleep(PACE).await;
    }
    acked
}

/// What one device received: every message frame of its streams in arrival order, over all its
/// sessions, and how many sessions it needed.
#[derive(Default, Debug)]
pub(crate) struct Received {
    pub(crate) frames: Vec<(String, u64, String)>,
    pub(crate) sessions: usize,
}

impl Received {
    /// The highest seq received of `stream` (0: none).
    fn last(&self, stream: &str) -> u64 {
        self.frames.iter().filter(|f| f.0 == stream).map(|f| f.1).max().unwrap_or(0)
    }
}

/// A device of `user` on the node at `addr`: connects, `sync`s and joins the room from what it
/// has (so every stream arrives in strict seq order), reads until it has the last seq `targets`
/// names for each of its two streams (sent once the senders stopped), and connects again from what it has whenever its
/// session ends. `ready` is told once the first session joined.
pub(crate) async fn device(
    user: String,
    label: &'static str,
    addr: SocketAddr,
    mut targets: watch::Receiver<Option<HashMap<String, u64>>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Received {
    let own = format!("user:{user}");
    let room = format!("room:{ROOM}");
    let mut received = Received::default();
    let mut ready = Some(ready);
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() > d) {
            return received;
        }
        if deadline.is_none() && targets.borrow().is_some() {
            deadline = Some(Instant::now() + Duration::from_secs(30));
        }
        let Some(mut client) = try_connect(addr, &format!("user={user}&device={label}")).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        received.sessions += 1;
        let sync = json!({"type": "sync", "since": received.last(&own)});
        let join = json!({"type": "join", "room": ROOM, "since": received.last(&room)});
        let mut open = true;
        for (i, command) in [sync, join].into_iter().enumerate() {
            // Frames that come before the answers are the user's stream, in order: keep them.
            let mut command = command;
            command["id"] = json!(i);
            if client.ws.send(tokio_websockets::Message::text(command.to_string())).await.is_err() {
                open = false;
                break;
            }
            loop {
                match read(&mut client).await {
                    Some(frame) if frame["id"] == json!(i) => {
                        if frame["type"] != "reply" {
                            assert_eq!(frame["code"], "unavailable", "{user}/{label}: {command} answered {frame}");
                            open = false;
                        }
                        break;
                    }
                    Some(frame) => record(&mut received, &frame),
                    None => {
                        open = false;
                        break;
                    }
                }
            }
            if !open {
                break;
            }
        }
        if !open {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(()).await;
        }
        loop {
            let done = targets.borrow().as_ref().map(|t| {
                [&own, &room].into_iter().all(|stream| received.last(stream) >= t.get(stream).copied().unwrap_or(0))
            });
            if done == Some(true) {
                return received;
            }
            if done.is_some() && deadline.is_none() {
                deadline = Some(Instant::now() + Duration::from_secs(30));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return received;
            }
            tokio::select! {
                frame = read(&mut client) => match frame {
                    Some(frame) => record(&mut received, &frame),
                    None => break,
                },
                _ = targets.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// The next text frame, or `None` when the session ended.
async fn read(client: &mut Client) -> Option<Value> {
    loop {
        let message = client.ws.next().await?.ok()?;
        if message.is_close() {
            return None;
        }
        if let Some(text) = message.as_text() {
            return Some(serde_json::from_str(text).expect("server frames are JSON"));
        }
    }
}

fn record(received: &mut Received, frame: &Value) {
    if frame["type"] == "message" {
        let stream = frame["stream"].as_str().unwrap_or_default().to_owned();
        let seq = frame["seq"].as_u64().unwrap_or_else(|| panic!("a stream message without seq: {frame}"));
        received.frames.push((stream, seq, frame["body"].as_str().unwrap_or_default().to_owned()));
    }
}

/// A stream's whole history through `node`'s API, in pages of 1000.
pub(crate) async fn history(node: &NodeProc, stream: &str) -> Vec<Value> {
    let path = match stream.split_once(':') {
        Some(("user", user)) => format!("/api/v1/users/{user}/history"),
        Some(("room", room)) => format!("/api/v1/rooms/{room}/history"),
        _ => panic!("no such stream {stream}"),
    };
    let (mut all, mut since) = (Vec::new(), 0);
    loop {
        let page = node.ok("GET", &format!("{path}?since={since}&limit=1000"), None).await;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        let Some(last) = messages.last() else { return all };
        since = last["seq"].as_u64().expect("a seq");
        all.extend(messages);
    }
}

/// The `/readyz` answers of one node over time (`None`: no answer within a second).
pub(crate) async fn watch_ready(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<(Instant, Option<u16>)> {
    let mut seen: Vec<(Instant, Option<u16>)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let status = http_within(addr, "GET", "/readyz", "", Duration::from_secs(1)).await.map(|r| r.0);
        if seen.last().is_none_or(|last| last.1 != status) {
            seen.push((Instant::now(), status));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}
