//! STOMP 1.2 sessions (PROTOCOL.md §7): the `CONNECT` handshake, the client frames mapped onto
//! the commands of §3, and what a STOMP session writes where a JSON one writes JSON frames.
//!
//! A STOMP session is the same [`Session`] as a JSON one, with a [`Stomp`] beside it: the decoder
//! of its frames, its subscriptions and its heart-beats. Delivery, order, repair, limits and
//! closes are shared; only the encoding and the commands differ. A message reaches a STOMP
//! session only through a subscription: the user's own stream needs `/user/queue/messages`,
//! a broadcast `/broadcast`, and a room is joined by subscribing to `/topic/<room>`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::ratelimit::Verdict;
use super::{Session, Stop};
use crate::auth::Identity;
use crate::node::Node;
use crate::protocol::{
    Command as Native, ErrorCode, ProtocolError, RoomName, StreamId, UserId, checked_body, checked_key, close,
};
use crate::stomp::encode::{self, BROADCAST, ERRORS, SubscriptionId, TOPIC, UNSUBSCRIBED_HEAD, USER, USER_QUEUE};
use crate::stomp::frame::{Command, Decoder, Frame, FrameError, Item};
use crate::ws::{Incoming, Transport, WebSocket};

/// Most `SEND`s appended together, as the JSON session's pipeline.
const PIPELINE: usize = 32;

/// What a STOMP session holds beside the shared session state, inline in the session: small,
/// so that an idle STOMP session subscribed to its queue (most are) holds no buffer and no
/// allocation beyond a JSON one's.
pub(crate) struct Stomp {
    /// Holds no memory between frames.
    decoder: Decoder,
    /// The subscription to the user's own stream, `/user/queue/messages`.
    queue: Option<SubscriptionId>,
    /// The rest, which few sessions have.
    more: Option<Box<More>>,
    /// Whether the server sends heart-beats: at each ping tick, at least as often as the
    /// client asked (the server offers the ping interval, the spec's max(sx, cy)).
    send_beats: bool,
    /// How often the client must send something, in seconds rounded up (0: not negotiated, or
    /// above 18 hours, where the WebSocket ping timeout alone watches the client).
    expect_every: u16,
    /// When the client last sent a frame or a heart-beat, on [`clock_ms`].
    heard: u32,
}

/// The subscriptions to rooms, broadcasts and errors, and the receipt of the closing `ERROR`.
#[derive(Default)]
struct More {
    /// A few per session: a list costs far less than a map, and is as quick at that size.
    rooms: Vec<(RoomName, SubscriptionId)>,
    broadcast: Option<SubscriptionId>,
    errors: Option<SubscriptionId>,
    /// The `receipt-id` of the `ERROR` that closes the session, when the frame at fault asked
    /// for a receipt.
    error_receipt: Option<Box<str>>,
}

impl More {
    fn room(&self, room: &RoomName) -> Option<&SubscriptionId> {
        self.rooms.iter().find(|(r, _)| r == room).map(|(_, subscription)| subscription)
    }

    /// Adds or replaces; answers the one replaced.
    fn insert_room(&mut self, room: RoomName, subscription: SubscriptionId) -> Option<SubscriptionId> {
        if let Some((_, old)) = self.rooms.iter_mut().find(|(r, _)| *r == room) {
            return Some(std::mem::replace(old, subscription));
        }
        if self.rooms.len() < 4 {
            // A session in one or two rooms keeps no spare room in its list.
            self.rooms.reserve_exact(1);
        }
        self.rooms.push((room, subscription));
        None
    }

    fn remove_room(&mut self, room: &RoomName) -> Option<SubscriptionId> {
        let at = self.rooms.iter().position(|(r, _)| r == room)?;
        Some(self.rooms.swap_remove(at).1)
    }
}

/// A `MESSAGE` in one piece, for a frame written on its own (a catch-up, a refusal) rather than
/// as a shared tail behind each session's head.
fn whole_message(head: [&[u8]; 3], tail: &[u8]) -> Bytes {
    Bytes::from([head[0], head[1], head[2], tail].concat())
}

/// Milliseconds on a clock of the process's own, wrapping after 49 days: a session's last
/// heart-beat in 4 bytes. A gap is told right while it is under 49 days, and a session that
/// negotiated heart-beats and stayed silent that long was closed long before.
fn clock_ms() -> u32 {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u32
}

impl Stomp {
    fn more(&mut self) -> &mut More {
        self.more.get_or_insert_default()
    }

    /// The subscription a message of `stream` (`None`: a broadcast) is written for; `None`
    /// when this session did not subscribe to it. Only the user's own stream is delivered to
    /// its sessions.
    pub(super) fn subscription(&self, stream: Option<&StreamId>) -> Option<&SubscriptionId> {
        match stream {
            Some(StreamId::User(_)) => self.queue.as_ref(),
            Some(StreamId::Room(room)) => self.room(room),
            None => self.more.as_ref()?.broadcast.as_ref(),
        }
    }

    /// The subscription to `room`, if any.
    pub(super) fn room(&self, room: &RoomName) -> Option<&SubscriptionId> {
        self.more.as_ref()?.room(room)
    }

    /// A stored message of `stream` as a whole `MESSAGE` for this session, if it subscribed.
    pub(super) fn encode_stored(
        &self,
        stream: &StreamId,
        seq: u64,
        message: &crate::message::Message,
    ) -> Option<Bytes> {
        let head = self.subscription(Some(stream))?.head();
        let tail = encode::message_tail(Some((stream, seq)), message.view());
        Some(whole_message(head, &tail))
    }

    /// The `CONNECTED` frame, announcing beats at the ping interval both ways.
    pub(super) fn connected(&self, session: &str, user: &UserId, ping_interval: u64) -> Bytes {
        let ms = ping_interval * 1000;
        encode::connected(session, user, (ms, ms))
    }

    /// What to say before closing with `code`: nothing after `DISCONNECT`, else an `ERROR`.
    pub(super) fn goodbye(&self, code: u16, reason: &str) -> Option<Bytes> {
        let receipt = self.more.as_ref().and_then(|more| more.error_receipt.as_deref());
        (code != close::NORMAL).then(|| encode::error(reason, receipt))
    }

    /// Whether a resync may read `stream`: only a subscribed one is delivered.
    pub(super) fn follows(&self, stream: &StreamId) -> bool {
        self.subscription(Some(stream)).is_some()
    }

    /// Whether the client promised heart-beats: silence is then a heart-beat timeout.
    pub(super) fn expects_beats(&self) -> bool {
        self.expect_every > 0
    }

    /// The client sent a frame or a heart-beat.
    fn heard(&mut self) {
        self.heard = clock_ms();
    }

    /// At each ping tick: a heart-beat to send, or why the client is gone.
    pub(super) fn beat(&self) -> Result<bool, Stop> {
        let limit = u32::from(self.expect_every) * 2000;
        // `>=`: both ends are whole milliseconds, rounded down.
        if self.expect_every > 0 && clock_ms().wrapping_sub(self.heard) >= limit {
            let reason = format!("heart-beat timeout: nothing received for {limit} ms");
            return Err(Stop::Close(close::GOING_AWAY, Arc::from(reason)));
        }
        Ok(self.send_beats)
    }
}

/// Waits for the client's `CONNECT` (or `STOMP`) frame and authenticates it, unless the upgrade
/// already did (`identity`). On any failure the client gets an `ERROR` and the connection
/// closes; `None` then.
pub(crate) async fn connect<S: Transport>(
    node: &Node,
    mut ws: WebSocket<S>,
    identity: Option<Identity>,
) -> Option<(WebSocket<S>, Identity, Stomp)> {
    let mut decoder = Decoder::new(node.config.max_message_size);
    let deadline = Instant::now() + Duration::from_secs(node.config.handshake_timeout);
    let frame = loop {
        match decoder.next() {
            Ok(Some(Item::Frame(frame))) => break frame,
            Ok(Some(Item::HeartBeat)) => continue,
            Ok(None) => {}
            Err(e) => return refuse(ws, &e.to_string(), close_code(e)).await,
        }
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return refuse(ws, "no CONNECT frame in time", close::POLICY).await,
            Ok(Ok(Incoming::Text(text))) => decoder.push(text.as_bytes()),
            Ok(Ok(Incoming::Binary(data))) => decoder.push(&data),
            Ok(Ok(Incoming::Close(_))) => return None,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                if let Some((code, reason)) = e.close() {
                    let _ = ws.close(code, reason).await;
                }
                return None;
            }
        }
    };
    if !matches!(frame.command, Command::Connect | Command::Stomp) {
        return refuse(ws, "the first frame must be CONNECT or STOMP", close::PROTOCOL_ERROR).await;
    }
    let headers = &frame.headers;
    if let Some(versions) = headers.get("accept-version")
        && !versions.split(',').any(|v| v.trim() == "1.2")
    {
        return refuse(ws, "this server speaks STOMP 1.2: accept-version must include 1.2", close::PROTOCOL_ERROR)
            .await;
    }
    let identity = match identity {
        Some(identity) => identity,
        None => {
            let bearer = headers
                .get("Authorization")
                .or_else(|| headers.get("authorization"))
                .and_then(|value| value.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| &value[7..]));
            let token = bearer.or_else(|| headers.get("passcode")).filter(|t| !t.is_empty());
            match node.auth.authenticate(token, headers.get("login"), headers.get("device")) {
                Ok(identity) => identity,
                Err(e) => return refuse(ws, &e.message, close::POLICY).await,
            }
        }
    };
    let (send_every, expect_every) = match heart_beats(headers.get("heart-beat"), node.config.ping_interval) {
        Ok(beats) => beats,
        Err(e) => return refuse(ws, e, close::PROTOCOL_ERROR).await,
    };
    let stomp = Stomp {
        decoder,
        queue: None,
        more: None,
        send_beats: send_every.is_some(),
        expect_every: expect_every.map_or(0, |every| u16::try_from(every.as_millis().div_ceil(1000)).unwrap_or(0)),
        heard: clock_ms(),
    };
    Some((ws, identity, stomp))
}

/// The close code for a frame the decoder refused: 1009 for one too large, as for a WebSocket
/// message, however many messages it came in; 1002 for the rest.
fn close_code(e: FrameError) -> u16 {
    match e {
        FrameError::TooLarge => close::TOO_LARGE,
        _ => close::PROTOCOL_ERROR,
    }
}

/// The heart-beats negotiated from the client's `heart-beat: cx,cy` (STOMP 1.2 §Heart-beating),
/// the server offering the ping interval both ways: the server sends every max(sx, cy) when cy is
/// not 0, and expects something every max(cx, sy) when cx is not 0.
fn heart_beats(header: Option<&str>, ping_interval: u64) -> Result<(Option<Duration>, Option<Duration>), &'static str> {
    let Some(header) = header else { return Ok((None, None)) };
    let bad = "heart-beat must be two numbers of milliseconds: cx,cy";
    let (cx, cy) = header.split_once(',').ok_or(bad)?;
    let cx: u64 = cx.trim().parse().map_err(|_| bad)?;
    let cy: u64 = cy.trim().parse().map_err(|_| bad)?;
    let ours = ping_interval.saturating_mul(1000);
    let every = |theirs: u64| (theirs > 0).then(|| Duration::from_millis(theirs.max(ours)));
    Ok((every(cy), every(cx)))
}

/// Refuses a connection before its session starts: `ERROR`, then the close.
async fn refuse<S: Transport, T>(mut ws: WebSocket<S>, message: &str, code: u16) -> Option<T> {
    let bye = async {
        ws.push_text([&encode::error(message, None)[..]])?;
        ws.close(code, message).await
    };
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), bye).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.closed()).await;
    }
    None
}

impl<S: Transport> Session<S> {
    fn stomp(&mut self) -> &mut Stomp {
        self.stomp.as_mut().expect("a STOMP session")
    }

    /// Takes a WebSocket message of a STOMP session: its frames in order. The rate limit counts
    /// each frame, and a message with none (part of a frame, heart-beats) once; `verdict` is the
    /// limiter's on the message if it was already asked. `SEND`s that arrived together are
    /// appended together (see [`Session::stomp_sends`]).
    pub(super) async fn on_stomp(&mut self, incoming: Option<Incoming>, verdict: Option<Verdict>) -> Result<(), Stop> {
        let data: &[u8] = match &incoming {
            Some(Incoming::Text(text)) => text.as_bytes(),
            Some(Incoming::Binary(data)) => data,
            // Frames that came in the message of the `CONNECT`, behind it.
            None => &[],
            Some(_) => return Ok(()),
        };
        self.stomp().decoder.push(data);
        let mut verdict = Some(verdict.unwrap_or_else(|| self.limiter.check(self.last_heard.into_std())));
        let mut sends = Vec::new();
        loop {
            let item = self.stomp().decoder.next();
            let frame = match item {
                Ok(None) if sends.is_empty() || sends.len() >= PIPELINE || verdict == Some(Verdict::Close) => break,
                Ok(None) => {
                    // More SENDs may wait in messages already read from the socket: they join
                    // this batch, as in the JSON pipeline; anything else waits for the loop.
                    match self.ws.next_buffered() {
                        Ok(Some(Incoming::Text(text))) => self.stomp().decoder.push(text.as_bytes()),
                        Ok(Some(Incoming::Binary(data))) => self.stomp().decoder.push(&data),
                        Ok(None) => break,
                        Ok(Some(other)) => {
                            self.stash(Ok(other), None);
                            break;
                        }
                        Err(e) => {
                            self.stash(Err(e), None);
                            break;
                        }
                    }
                    self.last_heard = Instant::now();
                    verdict = Some(self.limiter.check(self.last_heard.into_std()));
                    continue;
                }
                Ok(Some(Item::HeartBeat)) => {
                    self.stomp().heard();
                    continue;
                }
                Ok(Some(Item::Frame(frame))) => frame,
                Err(e) => {
                    // The SENDs before the bad frame are answered first.
                    self.stomp_sends(sends).await?;
                    return Err(Stop::Close(close_code(e), Arc::from(e.to_string())));
                }
            };
            self.stomp().heard();
            let verdict = verdict.take().unwrap_or_else(|| self.limiter.check(self.last_heard.into_std()));
            if verdict == Verdict::Allow && frame.command == Command::Send && sends.len() < PIPELINE {
                sends.push(frame);
                continue;
            }
            self.stomp_sends(std::mem::take(&mut sends)).await?;
            match verdict {
                Verdict::Allow => self.on_stomp_frame(frame).await?,
                Verdict::Refuse => {
                    let err = ProtocolError::new(ErrorCode::RateLimited, "too many frames: slow down");
                    self.report(&err, frame.headers.get("receipt")).await?;
                }
                Verdict::Close => {
                    return Err(Stop::Close(close::POLICY, Arc::from("rate limit exceeded repeatedly")));
                }
            }
        }
        self.stomp_sends(sends).await?;
        if verdict == Some(Verdict::Close) {
            return Err(Stop::Close(close::POLICY, Arc::from("rate limit exceeded repeatedly")));
        }
        Ok(())
    }

    async fn on_stomp_frame(&mut self, frame: Frame) -> Result<(), Stop> {
        match frame.command {
            Command::Send => self.stomp_sends(vec![frame]).await,
            Command::Subscribe => self.stomp_subscribe(frame).await,
            Command::Unsubscribe => self.stomp_unsubscribe(frame).await,
            Command::Ack | Command::Nack => self.stomp_ack(frame).await,
            Command::Disconnect => {
                if let Some(receipt) = frame.headers.get("receipt") {
                    self.write([encode::receipt(receipt, &[])]).await?;
                }
                Err(Stop::Close(close::NORMAL, Arc::from("disconnect")))
            }
            Command::Connect | Command::Stomp => Err(self.fault("already connected", &frame)),
            Command::Begin | Command::Commit | Command::Abort => {
                Err(self.fault("transactions are not supported: send each message on its own", &frame))
            }
        }
    }

    /// Closes the session with an `ERROR` about `frame` (with its receipt's id), as STOMP does
    /// for a frame it cannot take.
    fn fault(&mut self, message: &str, frame: &Frame) -> Stop {
        self.stomp().more().error_receipt = frame.headers.get("receipt").map(Box::from);
        Stop::Close(close::PROTOCOL_ERROR, Arc::from(message))
    }

    /// Reports a refused frame on `/user/queue/errors`. A session that did not subscribe there
    /// still gets the `MESSAGE`, with no `subscription` (stompjs hands it to
    /// `onUnhandledMessage`): nothing is refused silently.
    async fn report(&mut self, err: &ProtocolError, receipt: Option<&str>) -> Result<(), Stop> {
        let refusal = self.refusal(err, receipt);
        self.write([refusal]).await
    }

    /// The `MESSAGE` that reports a refusal on `/user/queue/errors`.
    fn refusal(&self, err: &ProtocolError, receipt: Option<&str>) -> Bytes {
        let tail = encode::refusal_tail(err.code.as_str(), &err.message, receipt);
        let stomp = self.stomp.as_ref().expect("a STOMP session");
        let errors = stomp.more.as_ref().and_then(|more| more.errors.as_ref());
        let head = errors.map_or(UNSUBSCRIBED_HEAD, SubscriptionId::head);
        whole_message(head, &tail)
    }

    /// `SEND`s that arrived together, in order: `SEND /user/<id>` is a `send` and
    /// `SEND /topic/<room>` a `publish`. Their messages are appended together, as the JSON
    /// session's pipeline does, and each gets its `RECEIPT` (with `mid` and `seq`) or its report,
    /// in order, in one write. A `SEND` the server cannot take closes the session after the
    /// ones before it are answered.
    async fn stomp_sends(&mut self, frames: Vec<Frame>) -> Result<(), Stop> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut fault = None;
        let mut prepared = Vec::with_capacity(frames.len());
        let mut checked = Vec::with_capacity(frames.len());
        for (i, frame) in frames.iter().enumerate() {
            match send_command(frame) {
                Err(message) => {
                    fault = Some((message, i));
                    break;
                }
                Ok(command) => match command.and_then(|command| self.prepare(command)) {
                    Ok((message, stream)) => {
                        prepared.push(message);
                        checked.push((frame, Ok(stream)));
                    }
                    Err(e) => checked.push((frame, Err(e))),
                },
            }
        }
        let mut appended = match prepared.len() {
            0 => Vec::new(),
            1 => vec![self.node.append_one(prepared.pop().expect("one")).await],
            _ => self.node.append_all(prepared).await,
        }
        .into_iter();
        let mut answers = Vec::with_capacity(checked.len());
        for (frame, stream) in checked {
            let receipt = frame.headers.get("receipt");
            let result = stream.and_then(|stream| {
                let appended = appended.next().expect("an answer per append")?;
                Ok(self.accepted(stream, appended))
            });
            match (result, receipt) {
                (Ok(accepted), Some(receipt)) => {
                    answers.push(encode::send_receipt(receipt, &accepted.mid, accepted.seq))
                }
                (Ok(_), None) => {}
                (Err(e), receipt) => answers.push(self.refusal(&e, receipt)),
            }
        }
        self.write(answers).await?;
        match fault {
            Some((message, i)) => Err(self.fault(&message, &frames[i])),
            None => Ok(()),
        }
    }

    /// `SUBSCRIBE`: the user's queue (`sync`), a room (`join`), broadcasts or the error queue.
    /// The subscription exists before the catch-up is read, so that the catch-up and the live
    /// messages meanwhile are written for it; a refused one is removed again.
    async fn stomp_subscribe(&mut self, frame: Frame) -> Result<(), Stop> {
        let headers = &frame.headers;
        let receipt = headers.get("receipt");
        let (Some(id), Some(destination)) = (headers.get("id"), headers.get("destination")) else {
            return Err(self.fault("SUBSCRIBE needs an id and a destination", &frame));
        };
        let since = match headers.get("since").map(str::parse::<u64>) {
            None => None,
            Some(Ok(since)) => Some(since),
            Some(Err(_)) => {
                let err = ProtocolError::bad_request("since must be a seq: a non-negative integer");
                return self.report(&err, receipt).await;
            }
        };
        let subscription = SubscriptionId::new(id);
        let caught_up = match destination {
            USER_QUEUE => {
                let stream = StreamId::User(self.handle.info.user.clone());
                // Not delivered while unsubscribed, the stream's messages so far are owed only
                // from `since` (or the read cursor) on, not from where the session started.
                if let Some(state) = self.streams.get_mut(&stream) {
                    state.live_from = None;
                }
                self.stomp().queue = Some(subscription);
                let result = self.sync(since).await;
                if result.is_err() {
                    self.stomp().queue = None;
                }
                result
            }
            BROADCAST => {
                self.stomp().more().broadcast = Some(subscription);
                Ok((0, false, Vec::new()))
            }
            ERRORS => {
                self.stomp().more().errors = Some(subscription);
                Ok((0, false, Vec::new()))
            }
            _ => {
                let Some(room) = destination.strip_prefix(TOPIC) else {
                    let message = format!(
                        "unknown destination {destination}: subscribe to {USER_QUEUE}, /topic/<room>, {BROADCAST} or {ERRORS}"
                    );
                    return Err(self.fault(&message, &frame));
                };
                match RoomName::parse(room) {
                    Ok(room) => {
                        let before = self.stomp().more().insert_room(room.clone(), subscription);
                        let result = self.join(&room, since).await;
                        if result.is_err() {
                            let more = self.stomp().more();
                            match before {
                                Some(before) => more.insert_room(room, before),
                                None => more.remove_room(&room),
                            };
                        }
                        result
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match caught_up {
            Ok((seq, truncated, backlog)) => {
                if let Some(receipt) = receipt {
                    let seq = seq.to_string();
                    let extra = [("seq", &seq[..]), ("truncated", if truncated { "true" } else { "false" })];
                    self.write([encode::receipt(receipt, &extra)]).await?;
                }
                self.write(backlog).await
            }
            Err(e) => self.report(&e, receipt).await,
        }
    }

    /// `UNSUBSCRIBE`: ends a subscription by its id; a room's is a `leave`.
    async fn stomp_unsubscribe(&mut self, frame: Frame) -> Result<(), Stop> {
        let receipt = frame.headers.get("receipt");
        let Some(id) = frame.headers.get("id") else {
            return Err(self.fault("UNSUBSCRIBE needs an id", &frame));
        };
        let stomp = self.stomp();
        let mut result = Ok(());
        if stomp.queue.as_ref().is_some_and(|s| s.is(id)) {
            stomp.queue = None;
        } else if let Some(more) = &mut stomp.more {
            if let Some(at) = more.rooms.iter().position(|(_, s)| s.is(id)) {
                let (room, _) = more.rooms.swap_remove(at);
                result = self.leave(&room).await;
            } else if more.broadcast.as_ref().is_some_and(|s| s.is(id)) {
                more.broadcast = None;
            } else if more.errors.as_ref().is_some_and(|s| s.is(id)) {
                more.errors = None;
            }
        }
        match (result, receipt) {
            (Ok(()), Some(receipt)) => self.write([encode::receipt(receipt, &[])]).await,
            (Ok(()), None) => Ok(()),
            (Err(e), receipt) => self.report(&e, receipt).await,
        }
    }

    /// `ACK` of a message of the user's own stream moves its read cursor to that seq; any other
    /// `ACK`, and `NACK`, changes nothing (messages are kept in their streams either way).
    async fn stomp_ack(&mut self, frame: Frame) -> Result<(), Stop> {
        let receipt = frame.headers.get("receipt");
        let Some(id) = frame.headers.get("id").or_else(|| frame.headers.get("message-id")) else {
            return Err(self.fault("ACK and NACK need an id", &frame));
        };
        let own = StreamId::User(self.handle.info.user.clone()).to_string();
        let seq = id.rsplit_once('/').filter(|(stream, _)| *stream == own).and_then(|(_, seq)| seq.parse().ok());
        let result = match (frame.command, seq) {
            (Command::Ack, Some(seq)) => self.node.ack(&self.handle.info.user, seq).await,
            _ => Ok(()),
        };
        match (result, receipt) {
            (Ok(()), Some(receipt)) => self.write([encode::receipt(receipt, &[])]).await,
            (Ok(()), None) => Ok(()),
            (Err(e), receipt) => self.report(&e, receipt).await,
        }
    }
}

/// The command a `SEND` stands for, or why it is refused; `Err` when the server cannot take it
/// at all (no or an unknown destination), which ends the session.
fn send_command(frame: &Frame) -> Result<Result<Native, ProtocolError>, String> {
    let Some(destination) = frame.headers.get("destination") else {
        return Err("SEND needs a destination".to_owned());
    };
    enum To {
        User(UserId),
        Room(RoomName),
    }
    let to = if let Some(user) = destination.strip_prefix(USER).filter(|u| !u.contains('/')) {
        UserId::parse(user).map(To::User)
    } else if let Some(room) = destination.strip_prefix(TOPIC) {
        RoomName::parse(room).map(To::Room)
    } else {
        return Err(format!("unknown destination {destination}: SEND to /user/<id> or /topic/<room>"));
    };
    Ok(to.and_then(|to| {
        let (body, key) = send_body(frame)?;
        Ok(match to {
            To::User(to) => Native::Send { to, body, key },
            To::Room(room) => Native::Publish { room, body, key },
        })
    }))
}

/// A `SEND`'s body as the JSON a message carries, and its idempotency `key`: a JSON body as it
/// is, anything else as a JSON string of its text.
fn send_body(frame: &Frame) -> Result<(Box<RawValue>, Option<String>), ProtocolError> {
    let key = checked_key(frame.headers.get("key").map(str::to_owned))?;
    let text = std::str::from_utf8(&frame.body)
        .map_err(|_| ProtocolError::bad_request("the body must be UTF-8 text (JSON, or text stored as a string)"))?;
    let json = frame.headers.get("content-type").is_some_and(|t| {
        let media = t.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("application/json")
    });
    let body = if json {
        RawValue::from_string(text.to_owned()).map_err(|e| {
            ProtocolError::bad_request(format!("content-type is application/json but the body is not JSON: {e}"))
        })?
    } else {
        let quoted = serde_json::to_string(text).expect("a string serializes");
        RawValue::from_string(quoted).expect("a JSON string is JSON")
    };
    Ok((checked_body(body)?, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stomp_session_state_is_small() {
        // Carried inline by every session, JSON ones included (see `Session::stomp`).
        assert!(size_of::<Option<Stomp>>() <= 56, "{} bytes", size_of::<Option<Stomp>>());
    }

    #[test]
    fn heart_beats_are_negotiated_as_the_spec_says() {
        let s = Duration::from_secs;
        assert_eq!(heart_beats(None, 25), Ok((None, None)));
        assert_eq!(heart_beats(Some("0,0"), 25), Ok((None, None)));
        assert_eq!(heart_beats(Some("10000,10000"), 25), Ok((Some(s(25)), Some(s(25)))));
        assert_eq!(heart_beats(Some("60000, 0"), 25), Ok((None, Some(s(60)))));
        assert_eq!(heart_beats(Some("0,1000"), 1), Ok((Some(s(1)), None)));
        assert!(heart_beats(Some("1000"), 1).is_err());
        assert!(heart_beats(Some("a,b"), 1).is_err());
    }

    fn send(headers: &str, body: &[u8]) -> Result<(Box<RawValue>, Option<String>), ProtocolError> {
        let mut decoder = Decoder::new(1 << 16);
        decoder.push(format!("SEND\ndestination:/user/bo\n{headers}\n").as_bytes());
        decoder.push(body);
        decoder.push(b"\0");
        let Ok(Some(Item::Frame(frame))) = decoder.next() else { panic!("a frame") };
        send_body(&frame)
    }

    #[test]
    fn send_bodies_are_json_or_text() {
        assert_eq!(send("content-type:application/json\n", br#"{"a":1}"#).unwrap().0.get(), r#"{"a":1}"#);
        assert_eq!(send("content-type:application/json;charset=utf-8\n", b"null").unwrap().0.get(), "null");
        assert_eq!(send("", b"hi \"you\"").unwrap().0.get(), r#""hi \"you\"""#);
        assert_eq!(send("content-type:text/plain\n", b"").unwrap().0.get(), r#""""#);
        let nul = send("content-length:3\n", b"a\0b").unwrap();
        assert_eq!(nul.0.get(), r#""a\u0000b""#);
        assert!(send("content-type:application/json\n", b"{oops").unwrap_err().message.contains("not JSON"));
        assert!(send("", &[0xff, 0xfe]).unwrap_err().message.contains("UTF-8"));
        assert_eq!(send("key:k-1\n", b"x").unwrap().1.as_deref(), Some("k-1"));
        assert!(send(&format!("key:{}\n", "k".repeat(257)), b"x").is_err());
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(send("content-type:application/json\n", deep.as_bytes()).unwrap_err().message.contains("nested"));
    }
}
