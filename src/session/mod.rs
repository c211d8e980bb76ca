//! One WebSocket session: the connection loop and the per-session delivery rules.
//!
//! The loop is one task that `select!`s over the socket, the session's outbound queue, its close
//! signal, the ping timer, the token's expiry and the node's shutdown. Replies are written
//! directly; everything routed through the hub arrives on the bounded queue and is written in
//! batches (many frames, one flush).
//!
//! Per stream, the session remembers which seqs it already has ([`SeqSet`]): live messages and
//! its own sends. A catch-up (`join`/`sync` with `since`) subscribes first and reads the store
//! second, so a message published in between shows up in both and is written once; messages of a
//! stream therefore reach the client at most once and, live, in seq order.

mod commands;
use commands::Backlog;
pub use commands::raw_list;
mod ratelimit;
mod repair;
mod seqset;
mod stomp;
pub(crate) use stomp::{Stomp, connect as stomp_connect};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::Identity;
use crate::bus::{Delivery, SessionId};
use crate::hub::{Outbound, SessionHandle, SharedFrame};
use crate::metrics::Kind;
use crate::node::Node;
use crate::presence::SessionInfo;
use crate::protocol::{
    ErrorCode, ProtocolError, RoomName, StreamId, close, encode_disconnect, encode_error, encode_welcome, now_ms,
    parse_command,
};
use crate::ws::{self, Incoming, Transport, WebSocket};

use ratelimit::{RateLimiter, Verdict};
use repair::{REPAIR_RETRY, REPAIR_WAIT, Repair};
use seqset::SeqSet;

/// Most queued frames written per flush.
const WRITE_BATCH: usize = 64;
/// A write that makes no progress for this long means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a session knows of one stream.
#[derive(Default)]
struct StreamState {
    /// The seqs it has: delivered to it, or sent by it.
    seen: SeqSet,
    /// From which seq on it is owed every message live; a resync after a bus outage
    /// re-reads from here. `None` when unknown (nothing to resync).
    live_from: Option<u64>,
}

impl StreamState {
    /// The first seq the session is owed live and does not have: after where it started
    /// following the stream, past every seq it has from there on. `None` when it does not know
    /// where it started and has nothing yet (any message is then in order).
    fn next_owed(&self) -> Option<u64> {
        match self.live_from {
            Some(from) => Some(self.seen.next_missing(from + 1)),
            None => self.seen.first().map(|first| self.seen.next_missing(first)),
        }
    }
}

/// When the session's open gaps are due to be read from the store, if any are.
fn repair_at(repair: &Option<Box<Repair>>) -> Option<Instant> {
    repair.as_ref()?.at
}

/// Resolves at `at`; never when there is none (the branch is then disabled anyway).
async fn repair_due(at: Option<Instant>) {
    match at {
        Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
        None => std::future::pending().await,
    }
}

/// One thing to write, or to do, out of the queue's items.
enum Piece<'a> {
    Frame(&'a SharedFrame),
    Delivery(&'a Arc<Delivery>),
    Resync,
}

/// The pieces of queue items, in order: a burst's messages one by one.
struct Pieces<'a> {
    items: std::slice::Iter<'a, Outbound>,
    burst: std::slice::Iter<'a, Arc<Delivery>>,
}

impl<'a> Pieces<'a> {
    fn of(items: &'a [Outbound]) -> Self {
        Self { items: items.iter(), burst: [].iter() }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        loop {
            if let Some(delivery) = self.burst.next() {
                return Some(Piece::Delivery(delivery));
            }
            return Some(match self.items.next()? {
                Outbound::Message(delivery) => Piece::Delivery(delivery),
                Outbound::Frame(frame) => Piece::Frame(frame),
                Outbound::Resync => Piece::Resync,
                Outbound::Messages(burst) => {
                    self.burst = burst.iter();
                    continue;
                }
            });
        }
    }
}

/// Why the loop ends.
enum Stop {
    /// Close with this code and reason, telling the client why first.
    Close(u16, Arc<str>),
    /// The socket is gone or already closing; nothing more to say.
    Gone,
}

/// Generic over the stream (plain TCP or TLS), so that each gets its own monomorphized loop.
struct Session<S: Transport = tokio::net::TcpStream> {
    node: Arc<Node>,
    ws: WebSocket<S>,
    identity: Identity,
    /// Also what presence records of the session (`handle.info`), kept there only.
    handle: Arc<SessionHandle>,
    rooms: HashSet<RoomName>,
    /// Looked up per delivery: foldhash costs a third of what SipHash did here (callgrind).
    streams: HashMap<StreamId, StreamState, foldhash::fast::RandomState>,
    limiter: RateLimiter,
    last_heard: Instant,
    /// The gaps open in live delivery: the messages held back and when to read what is missing
    /// from the store (see `repair`). Boxed and kept apart from the streams, as it is rare: an
    /// idle session pays one pointer for it.
    repair: Option<Box<Repair>>,
    /// A frame read while gathering commands sent back to back (see `pipeline`) that is not one
    /// of them, with the rate limiter's verdict if it was asked: handled next, before anything
    /// else. Boxed, as it is rare.
    stashed: Option<Box<Stashed>>,
    /// What a STOMP session (PROTOCOL.md §7) holds beside this; `None` for JSON. Inline, not
    /// boxed: 56 bytes that a JSON session carries too, which costs it nothing against the copy
    /// of its `SessionInfo` a session used to hold beside its handle's (72 bytes), and spares
    /// every STOMP session an allocation.
    stomp: Option<Stomp>,
}

/// A frame held for the loop, and the rate limiter's verdict on it if it was already asked.
struct Stashed {
    frame: Result<Incoming, ws::Error>,
    verdict: Option<Verdict>,
}

/// Runs a session until it closes, then unregisters it; a STOMP one when `stomp` is given (its
/// `CONNECT` is done, see [`stomp_connect`]).
///
/// Not an `async fn`: one would keep its arguments and the session built from them side by
/// side in the task for its whole life (about 1 KB, measured); the session is built first and
/// moved into the future once.
pub fn run<S: Transport + Send + 'static>(
    node: Arc<Node>,
    ws: WebSocket<S>,
    identity: Identity,
    client: std::net::IpAddr,
    stomp: Option<Stomp>,
) -> impl Future<Output = ()> {
    let id = SessionId::random();
    let (queue, rx) = mpsc::channel(node.config.outbound_queue);
    let info = SessionInfo {
        session: id,
        user: identity.user.clone(),
        node: node.id.clone(),
        device: identity.device.clone(),
        connected_at: now_ms(),
    };
    let mut handle = SessionHandle::new(info, queue);
    handle.json = stomp.is_none();
    let handle = Arc::new(handle);
    let now = Instant::now();
    let mut session = Session {
        limiter: RateLimiter::new(node.config.rate_limit, now.into_std()),
        node,
        ws,
        identity,
        handle,
        rooms: HashSet::new(),
        streams: HashMap::default(),
        last_heard: now,
        repair: None,
        stashed: None,
        stomp,
    };
    let span = tracing::debug_span!("session", id = %id, user = %session.handle.info.user, %client);
    async move {
        let stop = match session.node.open_session(&session.handle, &session.handle.info).await {
            Ok(()) => {
                tracing::debug!("connected");
                session.serve(rx).await
            }
            Err(e) => Stop::Close(close::INTERNAL, Arc::from(e.message.as_str())),
        };
        session.finish(stop).await;
        let rooms = std::mem::take(&mut session.rooms);
        session.node.close_session(&session.handle.info, rooms).await;
        tracing::debug!("disconnected");
    }
    .instrument(span)
}

impl<S: Transport> Session<S> {
    async fn serve(&mut self, mut rx: mpsc::Receiver<Outbound>) -> Stop {
        let config = self.node.config.clone();
        let session = self.handle.info.session.to_string();
        let welcome = match &self.stomp {
            None => encode_welcome(
                &session,
                &self.handle.info.user,
                self.handle.info.device.as_deref(),
                &self.node.id,
                config.ping_interval,
            ),
            Some(stomp) => stomp.connected(&session, &self.handle.info.user, config.ping_interval),
        };
        let own = StreamId::User(self.handle.info.user.clone());
        let live_from = self.node.last_seq(&own).await.ok();
        self.streams.insert(own, StreamState { seen: SeqSet::default(), live_from });
        if let Err(stop) = self.write([welcome]).await {
            return stop;
        }
        if self.stomp.is_some()
            && let Err(stop) = Box::pin(self.on_stomp(None, None)).await
        {
            return stop;
        }
        let ping_every = Duration::from_secs(config.ping_interval);
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let expiry = tokio::time::sleep_until(token_deadline(self.identity.expires_at));
        tokio::pin!(expiry);
        // One wait for the whole session: made anew on every wake-up, it would register with
        // the watch channel each time (7 % of a delivery's instructions, measured).
        let mut shutdown = self.node.shutdown.clone();
        let shutdown = shutdown.wait();
        tokio::pin!(shutdown);
        // Grown on first use: an idle session holds no batch buffer.
        let mut batch = Vec::new();
        loop {
            if let Some(stashed) = self.stashed.take() {
                let Stashed { frame, verdict } = *stashed;
                if let Err(stop) = Box::pin(self.on_frame(frame, verdict)).await {
                    return stop;
                }
                continue;
            }
            let step = tokio::select! {
                biased;
                (code, reason) = self.handle.close.requested() => Err(Stop::Close(code, reason)),
                _ = &mut shutdown => Err(Stop::Close(close::GOING_AWAY, Arc::from("node shutting down"))),
                _ = &mut expiry => Err(Stop::Close(close::TOKEN_EXPIRED, Arc::from("token expired"))),
                // Boxed: handling a command is a large future next to the idle loop, and it lives
                // only while a command runs, so it stays out of every idle session's task
                // (about 0.5 KB each, measured with 8,000 idle sessions).
                frame = self.ws.next() => Box::pin(self.on_frame(frame, None)).await,
                n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                    if n == 0 {
                        Err(Stop::Gone)
                    } else {
                        self.deliver(&mut batch).await
                    }
                }
                _ = ping.tick() => self.ping(ping_every).await,
                _ = repair_due(repair_at(&self.repair)), if repair_at(&self.repair).is_some() => {
                    Box::pin(self.repair()).await
                }
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Handles one frame; `verdict` is the rate limiter's if it was already asked.
    async fn on_frame(&mut self, frame: Result<Incoming, ws::Error>, verdict: Option<Verdict>) -> Result<(), Stop> {
        let incoming = match frame {
            Ok(Incoming::Close(_)) => return Err(Stop::Gone),
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::debug!(error = %e, "connection error");
                return Err(match e.close() {
                    Some((code, reason)) => Stop::Close(code, Arc::from(reason)),
                    None => Stop::Gone,
                });
            }
        };
        self.last_heard = Instant::now();
        if self.stomp.is_some() {
            return self.on_stomp(Some(incoming), verdict).await;
        }
        let text = match incoming {
            Incoming::Text(text) => Some(text),
            Incoming::Binary(_) => None,
            Incoming::Ping | Incoming::Pong | Incoming::Close(_) => return Ok(()),
        };
        match verdict.unwrap_or_else(|| self.limiter.check(self.last_heard.into_std())) {
            Verdict::Allow => {}
            Verdict::Refuse => {
                let id = text.and_then(|t| parse_command(&t).id);
                let err = ProtocolError::new(ErrorCode::RateLimited, "too many commands: slow down");
                return self.write([encode_error(id.as_deref(), &err)]).await;
            }
            Verdict::Close => {
                return Err(Stop::Close(close::POLICY, Arc::from("rate limit exceeded repeatedly")));
            }
        }
        let Some(text) = text else {
            let err = ProtocolError::bad_request("binary frames are not supported: send JSON text frames");
            return self.write([encode_error(None, &err)]).await;
        };
        let frame = parse_command(&text);
        match frame.command {
            Ok(command) => self.execute(frame.id, command).await,
            Err(e) => self.write([encode_error(frame.id.as_deref(), &e)]).await,
        }
    }

    /// Writes queued frames, skipping what this session must not get twice and holding back what
    /// arrived ahead of a gap (see `repair`).
    async fn deliver(&mut self, batch: &mut Vec<Outbound>) -> Result<(), Stop> {
        let mut resync = false;
        let (mut held, mut overflow) = (false, false);
        let mut counts = [0u64; 3];
        let mut oldest = u64::MAX;
        let (me, streams, repair) = (self.handle.info.session, &mut self.streams, &mut self.repair);
        let stomp = self.stomp.as_ref();
        let frames = Pieces::of(batch).filter_map(|piece| match piece {
            Piece::Frame(frame) => match stomp {
                None => Some((None, &frame.json[..])),
                Some(stomp) => {
                    let (room, tail) = frame.stomp()?;
                    Some((Some(stomp.room(room)?), &tail[..]))
                }
            },
            Piece::Resync => {
                resync = true;
                None
            }
            Piece::Delivery(delivery) => {
                // A STOMP session takes only what it subscribed to, and counts nothing else as had.
                let subscription = match stomp {
                    None => None,
                    Some(stomp) => Some(stomp.subscription(delivery.position.as_ref().map(|(stream, _)| stream))?),
                };
                let kind = match &delivery.position {
                    None if delivery.exclude == Some(me) => return None,
                    None => Kind::Broadcast,
                    Some((stream, seq)) => {
                        let state = match streams.get_mut(stream) {
                            Some(state) => state,
                            // Still queued after a `leave`: the session is not a member any more.
                            None if matches!(stream, StreamId::Room(_)) => return None,
                            None => streams.entry(stream.clone()).or_default(),
                        };
                        if delivery.exclude == Some(me) {
                            // Its own message: the reply carried the seq, so it counts as had.
                            state.seen.insert(*seq);
                            return None;
                        }
                        if state.next_owed().is_some_and(|next| *seq > next) {
                            held = true;
                            let waiting = repair.get_or_insert_default().held.entry(stream.clone()).or_default();
                            overflow |= waiting.hold(*seq, delivery);
                            return None;
                        }
                        if !state.seen.insert(*seq) {
                            return None;
                        }
                        Kind::of(stream)
                    }
                };
                counts[kind as usize] += 1;
                oldest = oldest.min(delivery.ts());
                Some((subscription, if stomp.is_some() { &delivery.stomp()[..] } else { &delivery.json()[..] }))
            }
        });
        let pushed = match stomp {
            None => self.ws.push_text(frames.map(|(_, frame)| frame)),
            Some(_) => {
                self.ws.push_text_parts(frames.filter_map(|(subscription, tail)| Some((subscription?.head(), tail))))
            }
        };
        batch.clear();
        self.wrote(pushed).await?;
        self.count_delivered(counts, oldest);
        if held || self.repair.is_some() {
            self.release_held().await?;
            if overflow {
                Box::pin(self.repair()).await?;
            }
        }
        if resync {
            // Boxed, like the flush: rare, and a large future to carry in every idle session.
            Box::pin(self.resync()).await?;
        }
        Ok(())
    }

    fn count_delivered(&self, counts: [u64; 3], oldest: u64) {
        for (kind, n) in [Kind::Direct, Kind::Room, Kind::Broadcast].into_iter().zip(counts) {
            if n > 0 {
                self.node.count(kind, n);
            }
        }
        if oldest != u64::MAX {
            let latency = now_ms().saturating_sub(oldest) as f64 / 1000.0;
            self.node.metrics.delivery_latency.observe(latency);
        }
    }

    /// Writes the held messages that are in order now; arms the repair timer for the gaps left.
    async fn release_held(&mut self) -> Result<(), Stop> {
        let mut released: Vec<Arc<Delivery>> = Vec::new();
        if let Some(repair) = &mut self.repair {
            let streams = &mut self.streams;
            repair.held.retain(|stream, held| {
                // A stream left meanwhile is owed nothing any more.
                let Some(state) = streams.get_mut(stream) else { return false };
                released.extend(held.release(&mut state.seen, state.live_from));
                !held.is_empty()
            });
            repair.at = match (repair.held.is_empty(), repair.at) {
                (true, _) => None,
                (false, Some(at)) => Some(at),
                (false, None) => Some(Instant::now() + REPAIR_WAIT),
            };
            if repair.at.is_none() {
                self.repair = None;
            }
        }
        if !released.is_empty() {
            let mut counts = [0u64; 3];
            let mut oldest = u64::MAX;
            for d in &released {
                let kind = d.position.as_ref().map_or(Kind::Broadcast, |(stream, _)| Kind::of(stream));
                counts[kind as usize] += 1;
                oldest = oldest.min(d.ts());
            }
            let pushed = match self.stomp.as_ref() {
                None => self.ws.push_text(released.iter().map(|d| &d.json()[..])),
                Some(stomp) => self.ws.push_text_parts(released.iter().filter_map(|d| {
                    Some((stomp.subscription(d.position.as_ref().map(|(stream, _)| stream))?.head(), &d.stomp()[..]))
                })),
            };
            self.wrote(pushed).await?;
            self.count_delivered(counts, oldest);
        }
        Ok(())
    }

    /// Reads from the store what is still missing before held messages, writes it, then the held
    /// messages it unblocked. A store that cannot be read is tried again after [`REPAIR_RETRY`].
    async fn repair(&mut self) -> Result<(), Stop> {
        let Some(repair) = &mut self.repair else { return Ok(()) };
        repair.at = None;
        let streams = &self.streams;
        let gaps: Vec<(StreamId, u64)> = repair
            .held
            .keys()
            .filter_map(|stream| Some((stream.clone(), streams.get(stream)?.next_owed().unwrap_or(1) - 1)))
            .collect();
        let mut failed = false;
        for (stream, had) in gaps {
            match self.read_missing(stream.clone(), had).await {
                Ok(backlog) => {
                    self.node.metrics.repairs.inc();
                    if let Some(state) = self.streams.get_mut(&stream) {
                        // Everything up to the stream's end is had now, or gone by retention.
                        state.live_from = Some(state.live_from.map_or(backlog.last, |from| from.max(backlog.last)));
                    }
                    self.write_recovered(&stream, backlog).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, %stream, "repairing a gap in live delivery failed; retrying");
                    failed = true;
                }
            }
        }
        self.release_held().await?;
        if failed {
            self.repair.get_or_insert_default().at = Some(Instant::now() + REPAIR_RETRY);
        }
        Ok(())
    }

    /// Catches up every stream the session is owed live messages of, from the store: the bus
    /// may have lost messages while its connection was down. Failures are logged and skipped;
    /// the next resync or the client's own `sync` covers them.
    async fn resync(&mut self) -> Result<(), Stop> {
        let stomp = self.stomp.as_ref();
        let owed: Vec<(StreamId, u64)> = self
            .streams
            .iter()
            .filter(|(stream, _)| stomp.is_none_or(|stomp| stomp.follows(stream)))
            .filter_map(|(stream, state)| Some((stream.clone(), state.live_from?)))
            .collect();
        for (stream, from) in owed {
            match self.read_missing(stream.clone(), from).await {
                Ok(backlog) => {
                    if let Some(state) = self.streams.get_mut(&stream) {
                        state.live_from = Some(backlog.last);
                    }
                    self.write_recovered(&stream, backlog).await?;
                }
                Err(e) => tracing::warn!(error = %e, %stream, "resync failed"),
            }
        }
        Ok(())
    }

    async fn ping(&mut self, every: Duration) -> Result<(), Stop> {
        // STOMP's own rule first: its timeout is the one the client negotiated.
        let beat = match &self.stomp {
            Some(stomp) => stomp.beat()?,
            None => false,
        };
        if self.last_heard.elapsed() > every * 2 {
            // A STOMP client that promised heart-beats (at least this often: the server offers
            // the ping interval) and went silent is told so, whichever check saw it first.
            let reason = match &self.stomp {
                Some(stomp) if stomp.expects_beats() => {
                    format!("heart-beat timeout: nothing received for {} ms", (every * 2).as_millis())
                }
                _ => "ping timeout".to_owned(),
            };
            return Err(Stop::Close(close::GOING_AWAY, Arc::from(reason)));
        }
        if beat && self.ws.push_text([&b"\n"[..]]).is_err() {
            return Err(Stop::Gone);
        }
        let pushed = self.ws.push_ping();
        self.wrote(pushed).await
    }

    /// Writes messages of `stream` read from the store in place of live deliveries the bus lost,
    /// counted (and their latency measured) like the live ones they replace. When some of them
    /// are no longer kept, the session cannot receive every message of the stream any more: it
    /// is closed as a reader that fell behind (4003), after what it can still have, so that the
    /// client resumes with `since` and is told `truncated`, instead of skipping them unawares.
    async fn write_recovered(&mut self, stream: &StreamId, backlog: Backlog) -> Result<(), Stop> {
        let kind = Kind::of(stream);
        let mut counts = [0u64; 3];
        counts[kind as usize] = backlog.frames.len() as u64;
        self.write(backlog.frames).await?;
        self.count_delivered(counts, backlog.oldest);
        if backlog.expired {
            tracing::info!(%stream, session = %self.handle.info.session, "live messages expired before a repair could deliver them");
            let reason = "too slow: messages expired before they could be delivered; resume with since";
            return Err(Stop::Close(close::TOO_SLOW, Arc::from(reason)));
        }
        Ok(())
    }

    /// Writes frames, in as few writes as the socket allows.
    async fn write(&mut self, frames: impl AsRef<[Bytes]>) -> Result<(), Stop> {
        let pushed = self.ws.push_text(frames.as_ref().iter().map(|frame| &frame[..]));
        self.wrote(pushed).await
    }

    /// Finishes a push: done when the socket took everything at once, the common case; else
    /// waits for it to drain, giving up when the session is asked to close meanwhile or the client
    /// has not read anything for [`WRITE_TIMEOUT`]. The wait is boxed so that every idle
    /// session's task does not carry it.
    async fn wrote(&mut self, pushed: std::io::Result<()>) -> Result<(), Stop> {
        if pushed.is_err() {
            return Err(Stop::Gone);
        }
        if !self.ws.pending() {
            return Ok(());
        }
        let (ws, closing) = (&mut self.ws, &self.handle.close);
        Box::pin(async move {
            tokio::select! {
                result = tokio::time::timeout(WRITE_TIMEOUT, ws.flush()) => match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Stop::Gone),
                    Err(_) => Err(Stop::Close(close::TOO_SLOW, Arc::from("too slow: writes stalled"))),
                },
                (code, reason) = closing.requested() => Err(Stop::Close(code, reason)),
            }
        })
        .await
    }

    /// Ends the connection: says why (a `disconnect` frame, then the close frame) and waits
    /// briefly for the client's close.
    async fn finish(&mut self, stop: Stop) {
        let Stop::Close(code, reason) = stop else { return };
        let said = match &self.stomp {
            None => Some(encode_disconnect(code, &reason)),
            Some(stomp) => stomp.goodbye(code, &reason),
        };
        let ws = &mut self.ws;
        let goodbye = async {
            if let Some(said) = said {
                ws.push_text([&said[..]])?;
            }
            ws.close(code, &reason).await
        };
        if let Ok(Ok(())) = tokio::time::timeout(WRITE_TIMEOUT / 2, goodbye).await {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.closed()).await;
        }
    }
}

/// When a session must close because its token expired (far in the future without a token).
/// Capped at that far future: a signed `exp` may be any u64, and beyond about i64::MAX seconds
/// adding it to the clock would overflow and panic.
fn token_deadline(expires_at: Option<u64>) -> Instant {
    let far = Duration::from_secs(100 * 365 * 24 * 3600);
    let left = match expires_at {
        Some(exp) => Duration::from_secs(exp.saturating_sub(now_ms() / 1000)).min(far),
        None => far,
    };
    Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found next to what the `jwt` fuzz target found: a signed `exp` may be any u64, and beyond
    /// about i64::MAX seconds adding it to the clock panicked the session's task before it could
    /// unregister.
    #[test]
    fn far_expiry_does_not_overflow_the_clock() {
        let hundred_years = Duration::from_secs(100 * 365 * 24 * 3600);
        for exp in [u64::MAX, i64::MAX as u64, u64::MAX / 1000] {
            let left = token_deadline(Some(exp)) - Instant::now();
            assert!(left > hundred_years - Duration::from_secs(60) && left <= hundred_years, "{exp}: {left:?}");
        }
        let soon = token_deadline(Some(now_ms() / 1000 + 30)) - Instant::now();
        assert!(soon <= Duration::from_secs(30) && soon > Duration::from_secs(25), "{soon:?}");
        assert!(token_deadline(Some(0)) <= Instant::now(), "an expiry in the past is now");
    }
}
