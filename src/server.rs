//! The HTTP side of a node: the listener, the WebSocket upgrade on `/ws`, the demo page, health,
//! readiness and metrics, and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::api::{self, error_response};
use crate::config::ServeArgs;
use crate::drain::{Batches, DrainState, Phase, Plan};
use crate::metrics::Rejection;
use crate::node::Node;
use crate::protocol::{ErrorCode, ProtocolError, close};
use crate::proxy::TrustedProxies;
use crate::session;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::tls::{Tls, TlsStream};
use crate::ws::{self, Transport, handshake};

const DEMO_PAGE: &str = include_str!("../demo/index.html");
/// How long a shutdown waits for sessions to say goodbye.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame the Autobahn echo endpoint accepts (its cases go up to 16 MiB).
const ECHO_MAX_PAYLOAD: usize = 32 << 20;

/// Pending connections the kernel may queue before accepting: tokio's default of 128 overflows
/// under a reconnect storm, and each overflow costs a client a one-second SYN retry.
const LISTEN_BACKLOG: u32 = 4096;
/// File descriptors kept free for everything but sessions (Redis, the store, API requests).
const RESERVED_FDS: usize = 256;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the open-file limit to its hard maximum and answers how many sessions the node may
/// hold: `--max-connections` when given and possible, else what the limit allows, so that a node
/// at capacity answers HTTP 503 instead of failing to accept.
fn fit_to_fd_limit(requested: Option<usize>) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    let allowed = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return requested.unwrap_or(usize::MAX);
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        (limit.rlim_cur as usize).saturating_sub(RESERVED_FDS)
    };
    match requested {
        Some(requested) if requested > allowed => {
            tracing::warn!(
                requested,
                allowed,
                fd_limit = limit.rlim_cur,
                "--max-connections lowered to what the open-file limit allows"
            );
            allowed.max(1)
        }
        Some(requested) => requested,
        None => allowed.max(1),
    }
}

/// Counts live sessions, for `--max-connections`, `--max-connections-per-ip` and for draining at
/// shutdown.
#[derive(Default)]
struct Sessions {
    live: AtomicUsize,
    drained: Notify,
    /// Sessions per client address, kept only with `--max-connections-per-ip`.
    per_ip: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

/// Gives back a session's place in the counts when its task ends, however it ends.
struct SessionSlot {
    sessions: Arc<Sessions>,
    ip: Option<IpAddr>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.sessions.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        if self.sessions.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sessions.drained.notify_waiters();
        }
    }
}

impl Sessions {
    /// Resolves once no session is left.
    async fn all_gone(&self) {
        loop {
            let notified = self.drained.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts one more session from `ip`, unless it already has `limit` (0: no limit).
    fn admit_ip(&self, ip: IpAddr, limit: usize) -> bool {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_default();
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }
}

#[derive(Clone)]
struct AppState {
    node: Arc<Node>,
    sessions: Arc<Sessions>,
    drain: Arc<DrainState>,
}

/// The address of a request's client: its peer's, or the one a trusted proxy forwarded
/// (`--trusted-proxy`). Every request carries it as an extension.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// A running node.
pub struct Server {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    trigger: Trigger,
    sessions: Arc<Sessions>,
    drain: Arc<DrainState>,
    task: tokio::task::JoinHandle<()>,
    /// With `--tls-cert`: the TLS side, for [`reload_tls`](Self::reload_tls).
    tls: Option<Arc<Tls>>,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port) and starts serving.
    pub async fn start(config: ServeArgs) -> anyhow::Result<Self> {
        config.validate()?;
        let mut config = config;
        config.max_connections = Some(fit_to_fd_limit(config.max_connections));
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(Tls::new(cert, key)?)),
            _ => None,
        };
        let listener = listen(config.listen)
            .map_err(|e| anyhow::anyhow!("--listen {}: cannot listen there: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let (trigger, shutdown) = shutdown::channel();
        let autobahn = config.autobahn_echo;
        let node = Node::start(config, addr.to_string(), shutdown.clone()).await?;
        let sessions = Arc::new(Sessions::default());
        let drain = Arc::new(DrainState::default());
        let state = AppState { node: node.clone(), sessions: sessions.clone(), drain: drain.clone() };
        let mut app = Router::new()
            .route("/", get(|| async { Html(DEMO_PAGE) }))
            .route("/ws", get(upgrade))
            .route("/stomp", get(upgrade_stomp))
            .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state)
            .nest("/api", api::router(node.clone()));
        if autobahn {
            app = app.route("/echo", get(echo));
        }
        let header_timeout = Duration::from_secs(node.config.handshake_timeout);
        if let Some(tls) = &tls {
            tokio::spawn(tls.clone().watch(shutdown.clone()));
        }
        let trusted = Arc::new(TrustedProxies::new(node.config.trusted_proxy.clone()));
        let task = tokio::spawn(accept(listener, app, header_timeout, tls.clone(), trusted, shutdown.clone()));
        Ok(Self { addr, node, trigger, sessions, drain, task, tls })
    }

    /// Whether the node serves HTTPS and `wss://`.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads `--tls-cert` and `--tls-key` again (SIGHUP): new handshakes get the new pair, open
    /// sessions keep theirs; a pair that fails to load is logged and the old one stays.
    pub fn reload_tls(&self) {
        if let Some(tls) = &self.tls {
            tls.reload();
        }
    }

    /// Stops accepting, closes every session with 1001 and waits (bounded) for them to finish.
    pub async fn shutdown(self) {
        self.drain(Plan::NOW, std::future::pending()).await;
    }

    /// Drains, then stops: `/readyz` answers 503 at once; the node keeps serving for
    /// `plan.delay`; then it refuses new sessions and closes its own with 1001 in even batches
    /// over `plan.window`; then it stops accepting, closes whatever is left and waits (bounded)
    /// for the sessions to finish. When `skip` resolves (a second signal), what is left of the
    /// delay and the window is skipped.
    pub async fn drain(self, plan: Plan, skip: impl Future<Output = ()>) {
        tokio::pin!(skip);
        let metrics = &self.node.metrics;
        self.drain.enter(Phase::Unready);
        metrics.drain_phase.set(Phase::Unready as i64);
        let live = || self.sessions.live.load(Ordering::Acquire);
        let mut skipped = false;
        if !plan.delay.is_zero() {
            tracing::info!(
                delay_secs = plan.delay.as_secs_f64(),
                sessions = live(),
                "draining: /readyz answers 503, still serving"
            );
            tokio::select! {
                _ = tokio::time::sleep(plan.delay) => {}
                _ = &mut skip => skipped = true,
            }
        }
        self.drain.enter(Phase::Closing);
        metrics.drain_phase.set(Phase::Closing as i64);
        if !skipped && !plan.window.is_zero() {
            skipped = self.close_in_batches(plan.window, &mut skip).await;
        }
        if skipped {
            tracing::info!(left = live(), "drain skipped by a second signal: closing the rest at once");
        }
        self.trigger.fire();
        let closed = self.node.close_sessions(close::GOING_AWAY, "node shutting down");
        if skipped || plan.window.is_zero() {
            metrics.drain_closed.inc_by(closed as u64);
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, self.sessions.all_gone()).await.is_err() {
            tracing::warn!(
                left = self.sessions.live.load(Ordering::Acquire),
                "sessions still open after the drain timeout"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.node.deregister().await;
        self.node.close_store().await;
    }

    /// Closes the sessions there are now in even batches over `window`, and returns early when
    /// none is left; answers whether `skip` cut it short.
    async fn close_in_batches(
        &self,
        window: Duration,
        skip: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let sessions = self.node.local_sessions();
        let batches = Batches::new(sessions.len(), window);
        tracing::info!(
            sessions = sessions.len(),
            batches = batches.count(),
            window_secs = window.as_secs_f64(),
            "draining: closing sessions with 1001, new ones refused"
        );
        let reason: Arc<str> = Arc::from("node shutting down");
        let start = tokio::time::Instant::now();
        let mut reported = start;
        for k in 0..batches.count() {
            let due = start + batches.interval * k as u32;
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = self.sessions.all_gone() => return false,
                _ = skip.as_mut() => return true,
            }
            let batch = &sessions[batches.range(k)];
            for handle in batch {
                handle.close.request(close::GOING_AWAY, reason.clone());
            }
            self.node.metrics.drain_closed.inc_by(batch.len() as u64);
            if reported.elapsed() >= Duration::from_secs(1) || k + 1 == batches.count() {
                reported = tokio::time::Instant::now();
                tracing::info!(
                    closed = batches.range(k).end,
                    of = sessions.len(),
                    live = self.sessions.live.load(Ordering::Acquire),
                    "draining"
                );
            }
        }
        false
    }
}

/// Accepts connections until shutdown and serves HTTP/1.1 on each, upgrades included, over TLS
/// when `tls` is given. This loop stands in for `axum::serve` so that an upgraded connection
/// hands back the bare stream (a [`ws::Transport`], on which a WebSocket waits for input without
/// a buffer), and so that slow handshakes and request headers time out.
async fn accept(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    tls: Option<Arc<Tls>>,
    trusted: Arc<TrustedProxies>,
    mut stop: Shutdown,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, typically: give sessions a moment to end.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait() => return,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        let trusted = trusted.clone();
        match &tls {
            None => {
                tokio::spawn(serve_http(stream, app, peer, false, trusted, header_timeout, stop));
            }
            Some(tls) => {
                let config = tls.config.clone();
                tokio::spawn(async move {
                    // The TLS handshake and the request headers share the handshake timeout.
                    let started = tokio::time::Instant::now();
                    let mut stream = match TlsStream::new(stream, config) {
                        Ok(stream) => stream,
                        Err(e) => return tracing::warn!(error = %e, "cannot start a TLS connection"),
                    };
                    match tokio::time::timeout(header_timeout, stream.handshake()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    let left = header_timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
                    serve_http(stream, app, peer, true, trusted, left, stop).await;
                });
            }
        }
    }
}

/// Marks a request that came over TLS.
#[derive(Clone, Copy)]
struct Secure;

/// Serves HTTP/1.1 (and upgrades) on one connection until it ends or the node shuts down.
/// Every request learns its client's address (for `--max-connections-per-ip`) and whether it
/// came over TLS (which stream type the upgrade hands back).
async fn serve_http<S>(
    stream: S,
    app: Router,
    peer: SocketAddr,
    secure: bool,
    trusted: Arc<TrustedProxies>,
    header_timeout: Duration,
    mut stop: Shutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Every request learns its client's address (for `--max-connections-per-ip` and logs).
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        let client = trusted.client(peer.ip(), request.headers());
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(ClientAddr(client));
        if secure {
            request.extensions_mut().insert(Secure);
        }
        tower_service::Service::call(&mut app.clone(), request)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.drain.phase() == Phase::Serving && !state.node.shutdown.started() && state.node.ready().await {
        (StatusCode::OK, axum::Json(serde_json::json!({"ready": true}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"ready": false}))).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let metrics = &state.node.metrics;
    let (sessions, users, rooms) = state.node.local_counts();
    metrics.sessions.set(sessions as i64);
    metrics.users.set(users as i64);
    metrics.rooms.set(rooms as i64);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], metrics.encode()).into_response()
}

/// The query parameters of `/ws`, decoded.
#[derive(serde::Deserialize, Default)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    device: Option<String>,
}

/// The STOMP subprotocols a client may offer, in the order the server prefers them.
const STOMP_PROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// The STOMP subprotocol to answer with, when the client offered one.
fn stomp_protocol(headers: &http::HeaderMap) -> Option<&'static str> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    STOMP_PROTOCOLS.into_iter().find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
}

/// `GET /ws`: JSON, or STOMP when the client offers a STOMP subprotocol (PROTOCOL.md §7).
async fn upgrade(state: State<AppState>, peer: Extension<ClientAddr>, request: Request) -> Response {
    let stomp = stomp_protocol(request.headers()).map(Some);
    open(state, peer, request, stomp).await
}

/// `GET /stomp`: STOMP whatever the client offers.
async fn upgrade_stomp(state: State<AppState>, peer: Extension<ClientAddr>, request: Request) -> Response {
    let stomp = Some(stomp_protocol(request.headers()));
    open(state, peer, request, stomp).await
}

/// Authenticates before upgrading, so a refused client gets an HTTP status and a JSON body rather
/// than a WebSocket that closes at once. `stomp` is `Some` for a STOMP session, with the
/// subprotocol to echo if one was offered; a STOMP client may also authenticate in its
/// `CONNECT` frame instead (browsers cannot set headers on an upgrade).
async fn open(
    State(state): State<AppState>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    mut request: Request,
    stomp: Option<Option<&'static str>>,
) -> Response {
    let node = &state.node;
    if let Some(origin) = request.headers().get(header::ORIGIN)
        && !node.config.allowed_origin.is_empty()
        && !node.config.allowed_origin.iter().any(|allowed| origin.as_bytes().eq_ignore_ascii_case(allowed.as_bytes()))
    {
        node.metrics.reject(Rejection::Origin);
        tracing::debug!(%client, origin = ?origin, "upgrade refused: origin not allowed");
        return error_response(&ProtocolError::new(ErrorCode::Forbidden, "this origin may not open a WebSocket here"));
    }
    let accept = match handshake::accept_key(&request) {
        Ok(accept) => accept,
        Err(e) => {
            node.metrics.reject(Rejection::BadRequest);
            return handshake::refused(request.headers(), error_response(&e));
        }
    };
    let query: WsQuery = request.uri().query().and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default();
    let bearer = crate::auth::bearer(request.headers()).map(str::to_owned);
    let token = bearer.or(query.token);
    let deferred = stomp.is_some() && token.is_none() && query.user.is_none();
    let identity = match node.auth.authenticate(token.as_deref(), query.user.as_deref(), query.device.as_deref()) {
        Ok(identity) => Some(identity),
        Err(_) if deferred => None,
        Err(e) => {
            let reason = if e.code == ErrorCode::BadRequest { Rejection::BadRequest } else { Rejection::Unauthorized };
            node.metrics.reject(reason);
            return error_response(&e);
        }
    };
    if node.shutdown.started() || state.drain.phase() == Phase::Closing {
        node.metrics.reject(Rejection::Capacity);
        return error_response(&ProtocolError::new(
            ErrorCode::Unavailable,
            "node shutting down: connect to another node",
        ));
    }
    let per_ip_limit = node.config.max_connections_per_ip;
    let ip = (per_ip_limit > 0).then_some(client);
    if let Some(ip) = ip
        && !state.sessions.admit_ip(ip, per_ip_limit)
    {
        node.metrics.reject(Rejection::PerIp);
        tracing::debug!(%client, limit = per_ip_limit, "upgrade refused: too many connections from this address");
        return error_response(&ProtocolError::new(
            ErrorCode::RateLimited,
            format!("at most {per_ip_limit} connections from one address"),
        ));
    }
    let live = state.sessions.live.fetch_add(1, Ordering::AcqRel);
    let slot = SessionSlot { sessions: state.sessions.clone(), ip };
    if live >= node.config.max_connections.unwrap_or(usize::MAX) {
        node.metrics.reject(Rejection::Capacity);
        return error_response(&ProtocolError::new(
            ErrorCode::Unavailable,
            "node at its connection limit: try another node",
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let node = state.node.clone();
    if request.extensions().get::<Secure>().is_some() {
        tokio::spawn(run_session::<TlsStream>(node, on_upgrade, slot, stomp.is_some(), identity, client));
    } else {
        tokio::spawn(run_session::<TcpStream>(node, on_upgrade, slot, stomp.is_some(), identity, client));
    }
    let mut response = handshake::switching_protocols(&accept);
    if let Some(Some(protocol)) = stomp {
        response.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(protocol));
    }
    response
}

/// Runs the session on an upgraded connection served on the stream `S`.
async fn run_session<S: Transport + Send + 'static>(
    node: Arc<Node>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    slot: SessionSlot,
    stomp: bool,
    identity: Option<crate::auth::Identity>,
    client: IpAddr,
) {
    let _slot = slot;
    let Some(ws) = handshake::upgraded::<S>(on_upgrade, node.config.max_message_size).await else { return };
    match (stomp, identity) {
        (false, Some(identity)) => session::run(node, ws, identity, client, None).await,
        (true, identity) => {
            if let Some((ws, identity, stomp)) = session::stomp_connect(&node, ws, identity).await {
                session::run(node, ws, identity, client, Some(stomp)).await;
            }
        }
        (false, None) => unreachable!("a JSON session is authenticated before its upgrade"),
    }
}

/// `GET /echo` with `--autobahn-echo`: echoes every message, for the conformance fuzzer.
async fn echo(mut request: Request) -> Response {
    let accept = match handshake::accept_key(&request) {
        Ok(accept) => accept,
        Err(e) => return handshake::refused(request.headers(), error_response(&e)),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    if request.extensions().get::<Secure>().is_some() {
        tokio::spawn(echo_session::<TlsStream>(on_upgrade));
    } else {
        tokio::spawn(echo_session::<TcpStream>(on_upgrade));
    }
    handshake::switching_protocols(&accept)
}

/// Echoes every message of one `/echo` connection served on the stream `S`.
async fn echo_session<S: Transport + 'static>(on_upgrade: hyper::upgrade::OnUpgrade) {
    let Some(mut ws) = handshake::upgraded::<S>(on_upgrade, ECHO_MAX_PAYLOAD).await else { return };
    loop {
        match ws.next().await {
            Ok(ws::Incoming::Close(_)) => break,
            Ok(incoming) => {
                if ws.echo(&incoming).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                if let Some((code, reason)) = e.close()
                    && ws.close(code, reason).await.is_ok()
                {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.closed()).await;
                }
                break;
            }
        }
    }
}
