//! A node: the backends chosen at start-up and the operations that sessions and the server API
//! share. Everything that routes a message or changes presence goes through here, so a session
//! and a backend calling the API get the same behaviour on every node. A background task
//! heart-beats in the node registry, reaps dead nodes (announcing the users who left rooms with
//! them) and, when the registry answers that the cluster forgot this node, records its sessions
//! and memberships in presence again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;

use crate::auth::{Authenticator, Identity};
use crate::backend::{self, BackendConfig, Backends};
use crate::bus::{Batcher, Bus, BusError, Delivery, Event, Notice, SessionId, Sink, Topic};
use crate::config::ServeArgs;
use crate::hub::{Hub, SessionHandle};
use crate::message::Message;
use crate::metrics::{Kind, Metrics};
use crate::outbox;
use crate::presence::{Presence, SessionInfo};
use crate::protocol::{
    ErrorCode, HistoryQuery, ProtocolError, RoomName, StreamId, UserId, close, encode_presence, new_mid, now_ms,
};
use crate::registry::{NodeInfo, Registry, Standing};
use crate::shutdown::Shutdown;
use crate::store::{AppendRequest, Appended, Entry, Slice, Store};

/// How often the node refreshes its entry in the node registry and reaps dead nodes.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Most presence events published as one batch: as many as a session writes in one go.
const PRESENCE_BATCH: usize = 64;

/// A message to append to one user's stream (and the sender's, when a user sent it).
pub struct DirectMessage {
    /// Shown as `from`: the sending user, or the name a backend gave.
    pub from: Arc<str>,
    /// The sending user, whose own stream gets a copy for their other devices.
    pub sender: Option<(UserId, Option<SessionId>)>,
    pub to: UserId,
    pub body: Arc<str>,
    pub key: Option<String>,
}

/// A message ready to append: its request, and what it counts as once stored.
pub struct Prepared {
    pub request: AppendRequest,
    kind: Kind,
}

/// A message to append to a room's stream.
pub struct RoomMessage {
    pub from: Arc<str>,
    /// The publishing user and session, when a client published.
    pub sender: Option<(UserId, SessionId)>,
    pub room: RoomName,
    pub body: Arc<str>,
    pub key: Option<String>,
}

/// The answer to a catch-up read: what to deliver, the stream's last seq, and whether retention
/// dropped part of what was asked for.
pub struct CatchUp {
    pub slice: Slice,
    pub truncated: bool,
}

/// Presence of one user, as the client `presence` command answers it.
#[derive(Serialize)]
pub struct UserPresence {
    pub online: bool,
    pub sessions: usize,
}

pub struct Node {
    pub id: Arc<str>,
    pub config: Arc<ServeArgs>,
    pub auth: Authenticator,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    /// Publishes presence events through `bus`, batched per room.
    notices: Batcher,
    presence: Arc<dyn Presence>,
    registry: Arc<dyn Registry>,
    pub(crate) hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub started_at: u64,
    pub address: String,
    pub shutdown: Shutdown,
    /// The outbox consumer (`--outbox`), which stops at the shutdown signal.
    outbox: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the last heartbeat reached the registry (ms since the epoch; 0 after a failed
    /// one): presence's backend is ready while it is recent (see [`PRESENCE_STALE_AFTER`]).
    heartbeat_ok_at: std::sync::atomic::AtomicU64,
}

/// How old the last heartbeat that reached the registry may be while the node says ready: two
/// heartbeats and a reply's timeout.
const PRESENCE_STALE_AFTER: Duration = Duration::from_secs(5);

impl Node {
    /// Builds a node with the backends its configuration names (see [`backend`]).
    pub async fn start(config: ServeArgs, address: String, shutdown: Shutdown) -> anyhow::Result<Arc<Self>> {
        let auth = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), _) => Authenticator::hs256(secret),
            (None, Some(path)) => Authenticator::public_key_file(path)?,
            (None, None) => Authenticator::dev(),
        };
        let id: Arc<str> = match &config.node_id {
            Some(id) => Arc::from(id.as_str()),
            None => Arc::from(format!("node-{:08x}", fastrand::u32(..))),
        };
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let sink = hub.clone() as Arc<dyn Sink>;
        let backends = BackendConfig::from_args(&config)?;
        let Backends { store, bus, presence, registry, outbox } =
            backend::build(&backends, id.clone(), metrics.clone(), sink).await?;
        // At most a sixteenth of a session's queue, so that a batch never comes close to filling it.
        let notices = Batcher::new(bus.clone(), (config.outbound_queue / 16).min(PRESENCE_BATCH));
        let node = Arc::new(Self {
            id,
            config: Arc::new(config),
            auth,
            store,
            bus,
            notices,
            presence,
            registry,
            hub,
            metrics,
            started_at: now_ms(),
            address,
            shutdown,
            outbox: std::sync::Mutex::new(None),
            heartbeat_ok_at: std::sync::atomic::AtomicU64::new(0),
        });
        node.heartbeat().await.map_err(|e| anyhow::anyhow!("registering the node: {e}"))?;
        node.heartbeat_reached(true);
        let beat = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            let mut shutdown = beat.shutdown.clone();
            let mut forgotten = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match beat.heartbeat().await {
                            Ok(Standing::Known) => beat.heartbeat_reached(true),
                            Ok(Standing::Forgotten) => {
                                beat.heartbeat_reached(true);
                                tracing::warn!("the cluster forgot this node: registering its sessions again");
                                forgotten = true;
                            }
                            Err(e) => {
                                beat.heartbeat_reached(false);
                                tracing::warn!(error = %e, "heartbeat failed");
                            }
                        }
                        if forgotten {
                            match beat.reregister().await {
                                Ok(()) => forgotten = false,
                                Err(e) => tracing::warn!(error = %e, "registering sessions again failed; retrying"),
                            }
                        }
                        if let Err(e) = beat.reap().await {
                            tracing::warn!(error = %e, "reaping dead nodes failed");
                        }
                    }
                    _ = shutdown.wait() => break,
                }
            }
        });
        if let Some(outbox) = outbox {
            *node.outbox.lock().expect("not poisoned") = Some(outbox::spawn(node.clone(), outbox));
        }
        Ok(node)
    }

    /// Clears what dead nodes left in presence and tells the rooms their users left.
    async fn reap(&self) -> anyhow::Result<()> {
        let left = self.registry.reap().await?;
        for (room, user) in &left {
            tracing::info!(%room, %user, "user left with a dead node");
        }
        self.announce_all("leave", left.iter().map(|(room, user)| (room, user, None))).await?;
        Ok(())
    }

    /// Records every local session and room membership in presence again, after the cluster
    /// forgot them ([`Standing::Forgotten`]). Users that enter a
    /// room by it are announced with `join` events, as for any join.
    async fn reregister(&self) -> anyhow::Result<()> {
        for handle in self.hub.sessions() {
            self.presence.connect(&handle.info).await?;
        }
        let mut entered = Vec::new();
        for (room, handle) in self.hub.memberships() {
            if self.presence.join(&room, &handle.user, handle.id).await? {
                entered.push((room, handle));
            }
        }
        self.announce_all("join", entered.iter().map(|(room, h)| (room, &h.user, Some(h.id)))).await?;
        Ok(())
    }

    /// Leaves the node registry at a clean shutdown, after the sessions are gone.
    pub async fn deregister(&self) {
        if let Err(e) = self.registry.deregister(&self.id).await {
            tracing::warn!(error = %e, "leaving the node registry failed");
        }
    }

    async fn heartbeat(&self) -> Result<Standing, crate::registry::RegistryError> {
        let (sessions, users, _) = self.hub.counts();
        let info = NodeInfo {
            id: self.id.clone(),
            address: self.address.clone(),
            started_at: self.started_at,
            last_seen: now_ms(),
            sessions,
            users,
        };
        self.registry.heartbeat(&info).await
    }

    /// Whether the node can serve: its store and bus answer.
    /// Whether every backend answers: the store and the bus by their own checks, presence (and
    /// the registry on its backend) by the node's heartbeat.
    pub async fn ready(&self) -> bool {
        let beat = self.heartbeat_ok_at.load(std::sync::atomic::Ordering::Acquire);
        let presence = now_ms().saturating_sub(beat) <= PRESENCE_STALE_AFTER.as_millis() as u64;
        presence && self.store.ready().await && self.bus.ready().await
    }

    /// Records whether a heartbeat reached the registry (see [`Node::ready`]).
    fn heartbeat_reached(&self, reached: bool) {
        let at = if reached { now_ms() } else { 0 };
        self.heartbeat_ok_at.store(at, std::sync::atomic::Ordering::Release);
    }

    /// Registers a new local session everywhere; applies the single-session policy.
    pub async fn open_session(&self, handle: &Arc<SessionHandle>, info: &SessionInfo) -> Result<(), ProtocolError> {
        self.presence.connect(info).await?;
        self.hub.add_session(handle.clone());
        self.bus.subscribe(&Topic::User(info.user.clone())).await.map_err(unavailable)?;
        self.metrics.connections.inc();
        if self.config.single_session {
            let event = Event::Disconnect {
                code: close::REPLACED,
                reason: Arc::from("signed in elsewhere"),
                except: Some(handle.id),
            };
            self.bus.publish(Topic::User(info.user.clone()), event).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Undoes [`Node::open_session`] after leaving `rooms`. Best effort: a session that is gone
    /// must not stay registered because one backend call failed.
    pub async fn close_session(&self, info: &SessionInfo, rooms: impl IntoIterator<Item = RoomName>) {
        for room in rooms {
            if let Err(e) = self.leave(&room, &info.user, info.session).await {
                tracing::warn!(error = %e, room = %room, "leave on disconnect failed");
            }
        }
        if self.hub.remove_session(&info.user, info.session)
            && let Err(e) = self.bus.unsubscribe(&Topic::User(info.user.clone())).await
        {
            tracing::warn!(error = %e, "unsubscribe on disconnect failed");
        }
        if let Err(e) = self.presence.disconnect(info).await {
            tracing::warn!(error = %e, "presence disconnect failed");
        }
    }

    fn accept(&self, from: Arc<str>, to: Option<UserId>, room: Option<RoomName>, body: Arc<str>) -> Message {
        let ts = now_ms();
        Message { mid: new_mid(ts), from, to, room, body, ts }
    }

    /// Appends, then hands each committed entry to the bus (unless the store did, fused). A
    /// failed publish is logged, not returned: the message is stored, and sessions repair from the
    /// store.
    async fn append(&self, request: AppendRequest) -> Result<Appended, ProtocolError> {
        if self.store.publishes() {
            return Ok(self.store.append(request).await?);
        }
        let (message, entries) = (request.message.clone(), request.entries.clone());
        let appended = self.store.append(request).await?;
        self.publish_stored(message, entries, &appended).await;
        Ok(appended)
    }

    /// Appends messages a session sent back to back, together and in order (see
    /// [`Store::append_all`]), each as [`Node::append`] would.
    pub async fn append_all(&self, prepared: Vec<Prepared>) -> Vec<Result<Appended, ProtocolError>> {
        let kinds: Vec<Kind> = prepared.iter().map(|p| p.kind).collect();
        let requests: Vec<AppendRequest> = prepared.into_iter().map(|p| p.request).collect();
        let copies: Vec<_> = match self.store.publishes() {
            true => Vec::new(),
            false => requests.iter().map(|r| (r.message.clone(), r.entries.clone())).collect(),
        };
        let results = self.store.append_all(requests).await;
        let mut copies = copies.into_iter();
        let mut answers = Vec::with_capacity(results.len());
        for (result, kind) in results.into_iter().zip(kinds) {
            let copy = copies.next();
            answers.push(match result {
                Ok(appended) => {
                    if let Some((message, entries)) = copy {
                        self.publish_stored(message, entries, &appended).await;
                    }
                    self.counted(kind, &appended);
                    Ok(appended)
                }
                Err(e) => Err(e.into()),
            });
        }
        answers
    }

    async fn publish_stored(&self, message: Message, entries: Vec<Entry>, appended: &Appended) {
        if appended.duplicate || appended.published {
            return;
        }
        for (entry, seq) in entries.into_iter().zip(&appended.seqs) {
            let delivery = Delivery::new(Some((entry.stream, *seq)), message.clone(), entry.exclude);
            if let Err(e) = self.bus.publish(entry.topic, Event::Message(Arc::new(delivery))).await {
                tracing::warn!(error = %e, "publishing a stored message failed; sessions repair from the store");
            }
        }
    }

    fn counted(&self, kind: Kind, appended: &Appended) {
        if !appended.duplicate {
            match kind {
                Kind::Direct => self.metrics.messages_in.direct.inc(),
                _ => self.metrics.messages_in.room.inc(),
            };
        }
    }

    /// Appends one prepared message, as [`Node::append`] would.
    pub async fn append_one(&self, prepared: Prepared) -> Result<Appended, ProtocolError> {
        let appended = self.append(prepared.request).await?;
        self.counted(prepared.kind, &appended);
        Ok(appended)
    }

    /// Appends a direct message to the recipient's stream and, when a user sent it, to the
    /// sender's; answers the seq in the sender's stream (or the recipient's for a backend).
    pub async fn send_direct(&self, msg: DirectMessage) -> Result<Appended, ProtocolError> {
        self.append_one(self.prepare_direct(msg)).await
    }

    /// The append of a direct message (see [`Node::send_direct`]).
    pub fn prepare_direct(&self, msg: DirectMessage) -> Prepared {
        let message = self.accept(msg.from.clone(), Some(msg.to.clone()), None, msg.body);
        let recipient =
            Entry { stream: StreamId::User(msg.to.clone()), topic: Topic::User(msg.to.clone()), exclude: None };
        let (entries, reply_entry, scope) = match msg.sender {
            Some((sender, session)) if sender == msg.to => {
                let own = Entry { exclude: session, ..recipient };
                (vec![own], 0, format!("u:{sender}"))
            }
            Some((sender, session)) => {
                let copy = Entry {
                    stream: StreamId::User(sender.clone()),
                    topic: Topic::User(sender.clone()),
                    exclude: session,
                };
                (vec![recipient, copy], 1, format!("u:{sender}"))
            }
            None => (vec![recipient], 0, format!("api:{}", msg.from)),
        };
        let idempotency = msg.key.map(|k| (scope, k));
        Prepared { request: AppendRequest { message, entries, reply_entry, idempotency }, kind: Kind::Direct }
    }

    /// Appends a message to a room's stream; every member but the publishing session gets it.
    pub async fn publish_room(&self, msg: RoomMessage) -> Result<Appended, ProtocolError> {
        self.append_one(self.prepare_room(msg)).await
    }

    /// The append of a room message (see [`Node::publish_room`]).
    pub fn prepare_room(&self, msg: RoomMessage) -> Prepared {
        let message = self.accept(msg.from.clone(), None, Some(msg.room.clone()), msg.body);
        let scope = match &msg.sender {
            Some((user, _)) => format!("u:{user}"),
            None => format!("api:{}", msg.from),
        };
        let entry = Entry {
            stream: StreamId::Room(msg.room.clone()),
            topic: Topic::Room(msg.room),
            exclude: msg.sender.map(|(_, s)| s),
        };
        let idempotency = msg.key.map(|k| (scope, k));
        Prepared {
            request: AppendRequest { message, entries: vec![entry], reply_entry: 0, idempotency },
            kind: Kind::Room,
        }
    }

    /// Sends a message to every session connected now; it belongs to no stream.
    pub async fn broadcast(&self, from: Arc<str>, body: Arc<str>) -> Result<Arc<str>, ProtocolError> {
        let message = self.accept(from, None, None, body);
        let mid = message.mid.clone();
        let delivery = Delivery::new(None, message, None);
        self.bus.publish(Topic::All, Event::Message(Arc::new(delivery))).await.map_err(unavailable)?;
        self.metrics.messages_in.broadcast.inc();
        Ok(mid)
    }

    /// Whether `identity` may join or read `room` (private prefixes need the `rooms` claim).
    pub fn may_enter(&self, identity: &Identity, room: &RoomName) -> bool {
        let private = self.config.private_prefix.iter().any(|p| room.as_str().starts_with(p.as_str()));
        !private || identity.has_room_claim(room)
    }

    /// Whether `identity` may read `stream`: its own user stream, or a room it may enter.
    pub fn may_read(&self, identity: &Identity, stream: &StreamId) -> bool {
        match stream {
            StreamId::User(user) => *user == identity.user,
            StreamId::Room(room) => self.may_enter(identity, room),
        }
    }

    fn quiet(&self, room: &RoomName) -> bool {
        self.config.quiet_prefix.iter().any(|p| room.as_str().starts_with(p.as_str()))
    }

    /// Sends a `presence` event (`join` or `leave` of `user`) to the sessions in `room` but
    /// `exclude`, unless the room is quiet. Returns once it was published, in one batch with the
    /// room's events raised while the previous batch was being published.
    async fn announce(
        &self,
        room: &RoomName,
        event: &str,
        user: &UserId,
        exclude: Option<SessionId>,
    ) -> Result<(), BusError> {
        if self.quiet(room) {
            return Ok(());
        }
        let notice = Notice { frame: encode_presence(room, event, user), exclude };
        self.notices.publish(Topic::Room(room.clone()), notice).await
    }

    /// [`Node::announce`] for many users at once (reaping a node, registering again),
    /// concurrently, so that each room's events go out in a few batches rather than one by one.
    async fn announce_all<'a>(
        &self,
        event: &str,
        users: impl Iterator<Item = (&'a RoomName, &'a UserId, Option<SessionId>)>,
    ) -> Result<(), BusError> {
        join_all(users.map(|(room, user, exclude)| self.announce(room, event, user, exclude)))
            .await
            .into_iter()
            .collect()
    }

    /// Makes a local session a member of `room`: live messages flow to it from now on. Sends a
    /// `join` presence event when the user was not in the room yet.
    pub async fn join(&self, room: &RoomName, handle: &Arc<SessionHandle>) -> Result<(), ProtocolError> {
        self.hub.join(room, handle.clone());
        self.bus.subscribe(&Topic::Room(room.clone())).await.map_err(unavailable)?;
        if self.presence.join(room, &handle.user, handle.id).await? {
            self.announce(room, "join", &handle.user, Some(handle.id)).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Removes a session from `room`; sends a `leave` presence event when it was the user's last.
    pub async fn leave(&self, room: &RoomName, user: &UserId, session: SessionId) -> Result<(), ProtocolError> {
        if self.hub.leave(room, session) {
            self.bus.unsubscribe(&Topic::Room(room.clone())).await.map_err(unavailable)?;
        }
        if self.presence.leave(room, user, session).await? {
            self.announce(room, "leave", user, None).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Reads what a catch-up after `since` delivers (PROTOCOL.md §3 `join`, `sync`): every kept
    /// message after `since`, or every kept message when `since` is beyond the end or older than
    /// what retention kept, which is then `truncated`.
    pub async fn catch_up(&self, stream: &StreamId, since: u64) -> Result<CatchUp, ProtocolError> {
        let all = self.config.history_size as usize;
        let slice = self.store.read(stream, HistoryQuery::After { since, limit: all }).await?;
        if since > slice.last_seq {
            let slice = self.store.read(stream, HistoryQuery::After { since: 0, limit: all }).await?;
            return Ok(CatchUp { slice, truncated: true });
        }
        let truncated = match slice.messages.first() {
            Some(first) => first.seq > since + 1,
            None => since < slice.last_seq,
        };
        Ok(CatchUp { slice, truncated })
    }

    /// The last seq of a stream (0 if never written).
    pub async fn last_seq(&self, stream: &StreamId) -> Result<u64, ProtocolError> {
        Ok(self.store.read(stream, HistoryQuery::Last { limit: 0 }).await?.last_seq)
    }

    pub async fn history(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, ProtocolError> {
        Ok(self.store.read(stream, query).await?)
    }

    pub async fn user_presence(&self, users: &[UserId]) -> Result<Vec<UserPresence>, ProtocolError> {
        let counts = self.presence.session_counts(users).await?;
        Ok(counts.into_iter().map(|n| UserPresence { online: n > 0, sessions: n }).collect())
    }

    /// Closes every session of `user` on every node with 4004; answers how many there were.
    pub async fn disconnect_user(&self, user: &UserId, reason: &str) -> Result<usize, ProtocolError> {
        let sessions = self.presence.sessions(user).await?.len();
        let event = Event::Disconnect { code: close::KICKED, reason: Arc::from(reason), except: None };
        self.bus.publish(Topic::User(user.clone()), event).await.map_err(unavailable)?;
        Ok(sessions)
    }

    /// The sessions of `user` on every node.
    pub async fn user_sessions(&self, user: &UserId) -> Result<Vec<SessionInfo>, ProtocolError> {
        Ok(self.presence.sessions(user).await?)
    }

    /// The number of distinct users in `room` and up to `limit` of their ids.
    pub async fn room_presence(&self, room: &RoomName, limit: usize) -> Result<(usize, Vec<UserId>), ProtocolError> {
        Ok(self.presence.room(room, limit).await?)
    }

    /// The live nodes of the cluster.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ProtocolError> {
        Ok(self.registry.nodes().await?)
    }

    /// The user's read cursor.
    pub async fn cursor(&self, user: &UserId) -> Result<u64, ProtocolError> {
        Ok(self.store.cursor(user).await?)
    }

    /// Moves the user's read cursor forward.
    pub async fn ack(&self, user: &UserId, seq: u64) -> Result<(), ProtocolError> {
        Ok(self.store.ack(user, seq).await?)
    }

    /// This node's sessions, users and rooms.
    pub fn local_counts(&self) -> (usize, usize, usize) {
        self.hub.counts()
    }

    /// Asks every local session to close (shutdown); answers how many were asked.
    pub fn close_sessions(&self, code: u16, reason: &str) -> usize {
        self.hub.close_all(code, reason)
    }

    /// Every local session, for a drain to close them a few at a time.
    pub(crate) fn local_sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.hub.sessions()
    }

    /// Flushes and releases the store at shutdown, once the outbox consumer has stopped (its
    /// batch in flight finished, or was rolled back after a grace period).
    pub async fn close_store(&self) {
        let consumer = self.outbox.lock().expect("not poisoned").take();
        if let Some(consumer) = consumer {
            let _ = consumer.await;
        }
        self.store.close().await;
    }

    pub fn count(&self, kind: Kind, n: u64) {
        self.metrics.messages_out.get(kind).inc_by(n);
    }
}

fn unavailable(e: crate::bus::BusError) -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, e.to_string())
}
