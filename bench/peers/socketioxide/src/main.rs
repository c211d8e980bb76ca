//! socketioxide + socketioxide-redis peer for the Switchyard benchmarks (issue 11): the same
//! protocol as `../socketio/server.js` (see `../README.md`), served by the Rust Socket.IO server
//! with its Redis adapter. One instance per process; `run.sh` starts several sharing one Redis.
//!
//! Env: PORT (default 3301), HOST (default 0.0.0.0), REDIS_URL (default redis://127.0.0.1:6379;
//!      `protocol=resp3` is added, the adapter's redis driver needs RESP3 push messages),
//!      NODE_ID (label for logs, default "sioxide-<PORT>"), SIO_PREFIX (the adapter's channel
//!      prefix, default "socketioxide"), SIO_STREAM_BUFFER (the adapter's receive buffer, default
//!      65536, see `run`), SIO_PING_INTERVAL / SIO_PING_TIMEOUT (ms; unset = the
//!      Socket.IO defaults 25000 / 20000, only check.mjs shortens them), SIO_THREADS (unset or 0:
//!      tokio's current-thread runtime; N: the multi-thread runtime with N workers, see `main`).
//!
//! Protocol: websocket transport only, /socket.io/?EIO=4&transport=websocket&user=<id>
//!   42["join","<room>"]                 -> join room, reply 42["joined","<room>"]
//!   42["publish",{"room":r,"body":b}]   -> 42["message",{"room":r,"from":user,"body":b}]
//!                                          to every member on every instance but the sender
//!   42["send",{"to":u,"body":b}]        -> 42["message",{"to":u,"from":user,"body":b}]
//!                                          to every socket of user u on every instance

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{Data, SocketRef};
use socketioxide::{SocketIo, TransportType};
use socketioxide_redis::{RedisAdapter, RedisAdapterConfig, RedisAdapterCtr};

static NODE_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// Emits that socketioxide reported as failed (a local socket's buffer full or closed, or the
/// Redis publish failing): each is a message some client did not get.
static EMIT_ERRORS: AtomicU64 = AtomicU64::new(0);

fn log(msg: std::fmt::Arguments<'_>) {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let id = NODE_ID.get().map(String::as_str).unwrap_or("sioxide");
    println!("[{}.{:03}] [{id}] {msg}", t.as_secs(), t.subsec_millis());
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis)
}

/// `String(x)` as the Node peer does it, for the usual cases: a string as is, anything else as JSON.
fn as_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn emit_failed(what: &str, err: &dyn std::fmt::Display) {
    let n = EMIT_ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log(format_args!("{what} failed ({n} emit errors so far): {err}"));
    }
}

#[derive(Deserialize)]
struct Publish {
    #[serde(default)]
    room: Option<Value>,
    #[serde(default)]
    body: Option<Value>,
}

#[derive(Deserialize)]
struct Send {
    #[serde(default)]
    to: Option<Value>,
    #[serde(default)]
    body: Option<Value>,
}

#[derive(Serialize)]
struct RoomMessage<'a> {
    room: &'a str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
}

#[derive(Serialize)]
struct DirectMessage<'a> {
    to: &'a str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
}

/// The `user` query parameter of the handshake URL; the socket id when there is none.
fn user_of<A: Adapter>(socket: &SocketRef<A>) -> String {
    socket
        .req_parts()
        .uri
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "user").map(|(_, v)| v.into_owned()))
        .unwrap_or_else(|| socket.id.to_string())
}

async fn on_connect<A: Adapter>(socket: SocketRef<A>, io: SocketIo<A>) {
    let user: Arc<str> = user_of(&socket).into();
    socket.join(format!("user:{user}"));

    socket.on("join", async |socket: SocketRef<A>, Data::<Value>(room)| {
        let room = as_string(&room);
        socket.join(room.clone());
        if let Err(e) = socket.emit("joined", &room) {
            emit_failed("joined", &e);
        }
    });

    let from = user.clone();
    socket.on("publish", async move |socket: SocketRef<A>, Data::<Publish>(msg)| {
        let Some(room) = msg.room.as_ref().filter(|r| !r.is_null()).map(as_string) else { return };
        let out = RoomMessage { room: &room, from: &from, body: msg.body };
        if let Err(e) = socket.to(room.clone()).emit("message", &out).await {
            emit_failed("publish", &e);
        }
    });

    let from = user;
    socket.on("send", async move |Data::<Send>(msg)| {
        let Some(to) = msg.to.as_ref().filter(|t| !t.is_null()).map(as_string) else { return };
        let out = DirectMessage { to: &to, from: &from, body: msg.body };
        if let Err(e) = io.to(format!("user:{to}")).emit("message", &out).await {
            emit_failed("send", &e);
        }
    });
}

fn redis_url_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn main() {
    // WARN and above from socketioxide / socketioxide-redis (they log dropped messages there).
    tracing_subscriber::fmt().with_max_level(tracing_subscriber::filter::LevelFilter::WARN).with_ansi(false).init();

    // socketioxide runs every event handler in a task of its own (`tokio::spawn`). On tokio's
    // multi-thread runtime two events from one socket can then run out of order (the newest
    // spawned task takes the worker's LIFO slot, and other workers steal), so a publisher's
    // messages reach members reordered. The current-thread runtime runs spawned tasks in spawn
    // order, which keeps each sender's order, as in the Node peer (one thread per instance).
    // SIO_THREADS=N (N >= 1) uses the multi-thread runtime with N workers instead.
    let threads: usize = std::env::var("SIO_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let runtime = if threads == 0 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(threads)) {
        log(format_args!("fatal: {e}"));
        std::process::exit(1);
    }
}

async fn run(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = env_or("PORT", "3301").parse()?;
    let host = env_or("HOST", "0.0.0.0");
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let prefix = env_or("SIO_PREFIX", "socketioxide");
    // The adapter's redis driver hands each message received from Redis to the namespace's
    // handler through a bounded channel with `try_send`, dropping it (with a "redis pubsub channel
    // full" warning) when `stream_buffer` (default 1024) messages are waiting. A burst from
    // another instance (check.mjs sends 2000 at once) overflows that on a busy machine, so the
    // benchmarks use 65536; SIO_STREAM_BUFFER=1024 restores the crate's default.
    let stream_buffer: usize = env_or("SIO_STREAM_BUFFER", "65536").parse()?;
    NODE_ID.set(env_or("NODE_ID", &format!("sioxide-{port}"))).ok();

    let client = redis::Client::open(redis_url_resp3(&redis_url))?;
    let config = RedisAdapterConfig::new().with_prefix(prefix.clone()).with_stream_buffer(stream_buffer);
    let adapter = RedisAdapterCtr::new_with_redis_config(&client, config).await?;

    let mut builder = SocketIo::builder()
        .transports([TransportType::Websocket]) // no long-polling; clients open the websocket directly
        .max_payload(1_000_000); // Socket.IO's (Node) maxHttpBufferSize default, as in server.js
    if let Some(d) = env_ms("SIO_PING_INTERVAL") {
        builder = builder.ping_interval(d);
    }
    if let Some(d) = env_ms("SIO_PING_TIMEOUT") {
        builder = builder.ping_timeout(d);
    }
    let (layer, io) = builder.with_adapter::<RedisAdapter<_>>(adapter).build_layer();

    // Resolves once the adapter's Redis subscriptions for "/" are in effect, so a client accepted
    // after we listen cannot miss a broadcast from another instance.
    io.ns("/", on_connect).await?;

    let app = axum::Router::new().layer(layer);
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse()?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // TCP_NODELAY on every accepted connection, as Node's http server does by default.
    let listener = socket.listen(4096)?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let rt = if threads == 0 { "current-thread".to_string() } else { format!("multi-thread x{threads}") };
    log(format_args!(
        "listening on {addr} pid={} redis={redis_url} prefix={prefix} runtime={rt} stream_buffer={stream_buffer}",
        std::process::id()
    ));

    let server = axum::serve(listener, app);
    tokio::select! {
        r = server => r?,
        sig = shutdown_signal() => {
            log(format_args!("{sig}: shutting down ({} emit errors)", EMIT_ERRORS.load(Ordering::Relaxed)));
            let _ = tokio::time::timeout(Duration::from_secs(2), io.close()).await;
        }
    }
    Ok(())
}
