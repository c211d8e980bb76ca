//! The sessions connected to this node, indexed by user and by room.
//!
//! Lock-light by design: the indexes are sharded, a shard lock is held only to walk a list of
//! handles and never across an `.await`, and handing a frame to a session is a non-blocking push
//! of a cheap clone (an `Arc` or a `Bytes`) into its bounded queue. A session whose queue is full
//! is asked to close with 4003 instead of being waited for, so one slow reader never holds up
//! the others and memory stays bounded.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

use crate::bus::{Delivery, Event, SessionId, Sink, Topic};
use crate::metrics::Metrics;
use crate::presence::SessionInfo;
use crate::protocol::{RoomName, UserId, close};

const SHARDS: usize = 16;

/// What a session's queue holds.
#[derive(Debug)]
pub enum Outbound {
    /// A message with its stream position, filtered per session for duplicates.
    Message(Arc<Delivery>),
    /// Messages of one topic that the node received together, in order, filtered like
    /// `Message`. One queue slot, one wake-up and one socket write for all of them; at most
    /// [`crate::bus::MAX_BURST`]. A thin pointer, so that a queue slot stays 16 bytes: each
    /// session's queue holds a block of 32 slots even while idle.
    Messages(Arc<Vec<Arc<Delivery>>>),
    /// Any other pre-encoded frame (a presence event), behind an `Arc` so a queue slot stays
    /// pointer-sized.
    Frame(Arc<SharedFrame>),
    /// Catch up every stream from the store (see [`Event::Resync`]).
    Resync,
}

/// A frame with no seq as the cluster carries it (JSON), and its STOMP form, made by the first
/// STOMP session that takes it and shared by the others.
#[derive(Debug)]
pub struct SharedFrame {
    pub json: Bytes,
    stomp: std::sync::OnceLock<Option<(RoomName, Bytes)>>,
}

impl SharedFrame {
    pub fn new(json: Bytes) -> Self {
        Self { json, stomp: std::sync::OnceLock::new() }
    }

    /// The room and the `MESSAGE` tail of a presence event; `None` for a frame STOMP has no
    /// form of.
    pub fn stomp(&self) -> Option<(&RoomName, &Bytes)> {
        let encoded = self.stomp.get_or_init(|| crate::stomp::encode::presence_tail(&self.json));
        encoded.as_ref().map(|(room, tail)| (room, tail))
    }
}

/// A request to close a session, set once.
///
/// Only the session's own task waits for it (its loop and its writes), so one waker slot is
/// enough: the session polls this on every wake-up, and a poll is a few atomic operations where a
/// `Notify` would lock its waiter list to register and again to unregister.
#[derive(Default)]
pub struct CloseSignal {
    requested: AtomicBool,
    reason: Mutex<Option<(u16, Arc<str>)>>,
    waker: AtomicWaker,
}

impl CloseSignal {
    /// Asks the session to close; the first request wins.
    pub fn request(&self, code: u16, reason: Arc<str>) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason));
            drop(slot);
            self.requested.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Waits until a close is requested and returns its code and reason. Awaited by one task
    /// only (see the type).
    pub async fn requested(&self) -> (u16, Arc<str>) {
        std::future::poll_fn(|cx| {
            if let Some(r) = self.reason() {
                return Poll::Ready(r);
            }
            self.waker.register(cx.waker());
            // A request between the check and the registration woke nobody: look again.
            self.reason().map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }

    fn reason(&self) -> Option<(u16, Arc<str>)> {
        if !self.requested.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The hub's view of one local session.
pub struct SessionHandle {
    pub id: SessionId,
    pub user: UserId,
    /// What presence records of the session (to register it again if the cluster forgot it).
    pub info: SessionInfo,
    queue: mpsc::Sender<Outbound>,
    pub close: CloseSignal,
    /// Whether the session speaks JSON (not STOMP), so takes a message's JSON frame.
    pub json: bool,
}

impl SessionHandle {
    pub fn new(info: SessionInfo, queue: mpsc::Sender<Outbound>) -> Self {
        Self { id: info.session, user: info.user.clone(), info, queue, close: CloseSignal::default(), json: true }
    }

    /// Queues `item`, or asks the session to close as too slow when its queue is full.
    fn push(&self, item: Outbound, metrics: &Metrics) {
        match self.queue.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.close.requested.load(Ordering::Relaxed) {
                    metrics.outbound_dropped.inc();
                }
                self.close.request(close::TOO_SLOW, Arc::from("too slow: outbound queue full"));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

type Members = HashMap<SessionId, Arc<SessionHandle>, foldhash::fast::RandomState>;

struct Index<K> {
    shards: Box<[RwLock<HashMap<K, Members>>]>,
    hasher: foldhash::fast::RandomState,
}

impl<K: Hash + Eq + Clone> Index<K> {
    fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(), hasher: Default::default() }
    }

    fn shard(&self, key: &K) -> &RwLock<HashMap<K, Members>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn insert(&self, key: &K, handle: Arc<SessionHandle>) {
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        shard.entry(key.clone()).or_default().insert(handle.id, handle);
    }

    /// Removes; true when the session was a member of `key`.
    fn remove(&self, key: &K, id: SessionId) -> bool {
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        let Some(members) = shard.get_mut(key) else { return false };
        let removed = members.remove(&id).is_some();
        if members.is_empty() {
            shard.remove(key);
        }
        removed
    }

    fn for_each(&self, key: &K, mut f: impl FnMut(&Arc<SessionHandle>)) {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        if let Some(members) = shard.get(key) {
            members.values().for_each(&mut f);
        }
    }

    fn for_all(&self, mut f: impl FnMut(&Arc<SessionHandle>)) {
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            shard.values().flat_map(HashMap::values).for_each(&mut f);
        }
    }

    fn entries(&self) -> Vec<(K, Arc<SessionHandle>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            for (key, members) in shard.iter() {
                out.extend(members.values().map(|h| (key.clone(), h.clone())));
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

pub struct Hub {
    users: Index<UserId>,
    rooms: Index<RoomName>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { users: Index::new(), rooms: Index::new(), metrics }
    }

    /// Registers a session under its user.
    pub fn add_session(&self, handle: Arc<SessionHandle>) {
        self.users.insert(&handle.user.clone(), handle)
    }

    /// Unregisters a session; true when it was registered.
    pub fn remove_session(&self, user: &UserId, id: SessionId) -> bool {
        self.users.remove(user, id)
    }

    /// Adds a session to a room.
    pub fn join(&self, room: &RoomName, handle: Arc<SessionHandle>) {
        self.rooms.insert(room, handle)
    }

    /// Removes a session from a room; true when it was a member.
    pub fn leave(&self, room: &RoomName, id: SessionId) -> bool {
        self.rooms.remove(room, id)
    }

    /// Asks every local session to close (node shutdown); answers how many were asked.
    pub fn close_all(&self, code: u16, reason: &str) -> usize {
        let reason: Arc<str> = Arc::from(reason);
        let mut asked = 0;
        self.users.for_all(|h| {
            h.close.request(code, reason.clone());
            asked += 1;
        });
        asked
    }

    /// Every local session.
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.users.entries().into_iter().map(|(_, h)| h).collect()
    }

    /// Every (room, local member) pair.
    pub fn memberships(&self) -> Vec<(RoomName, Arc<SessionHandle>)> {
        self.rooms.entries()
    }

    /// (sessions, users, rooms) on this node.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut sessions = 0;
        self.users.for_all(|_| sessions += 1);
        (sessions, self.users.len(), self.rooms.len())
    }

    fn each(&self, topic: &Topic, f: impl FnMut(&Arc<SessionHandle>)) {
        match topic {
            Topic::User(user) => self.users.for_each(user, f),
            Topic::Room(room) => self.rooms.for_each(room, f),
            Topic::All => self.users.for_all(f),
        }
    }
}

impl Sink for Hub {
    fn deliver_messages(&self, topic: &Topic, deliveries: &[Arc<Delivery>]) {
        if let [delivery] = deliveries {
            return self.deliver(topic, &Event::Message(delivery.clone()));
        }
        let mut burst: Option<Arc<Vec<Arc<Delivery>>>> = None;
        let mut encoded = false;
        self.each(topic, |h| {
            // Encoded once per node, as for one message, and only when a JSON session takes them.
            if h.json && !encoded {
                for delivery in deliveries {
                    delivery.json();
                }
                encoded = true;
            }
            let burst = burst.get_or_insert_with(|| Arc::new(deliveries.to_vec()));
            // The session skips its own messages (it counts them as had).
            h.push(Outbound::Messages(burst.clone()), &self.metrics);
        });
    }

    fn deliver(&self, topic: &Topic, event: &Event) {
        match event {
            Event::Message(delivery) => self.each(topic, |h| {
                if delivery.exclude != Some(h.id) {
                    // Encoded here, once per node and only when a JSON session takes it, so
                    // that sessions only share the bytes (a STOMP session encodes its own form
                    // once per node too, see `Delivery::stomp`).
                    if h.json {
                        delivery.json();
                    }
                    h.push(Outbound::Message(delivery.clone()), &self.metrics);
                }
            }),
            Event::Frames(notices) => {
                let frames: Vec<_> =
                    notices.iter().map(|n| (Arc::new(SharedFrame::new(n.frame.clone())), n.exclude)).collect();
                // Member by member, so that a session gets the whole batch in one wake-up.
                self.each(topic, |h| {
                    for (frame, exclude) in &frames {
                        if *exclude != Some(h.id) {
                            h.push(Outbound::Frame(frame.clone()), &self.metrics);
                        }
                    }
                })
            }
            Event::Resync => self.each(topic, |h| h.push(Outbound::Resync, &self.metrics)),
            Event::Disconnect { code, reason, except } => self.each(topic, |h| {
                if *except != Some(h.id) {
                    h.close.request(*code, reason.clone());
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bursts, Notice};
    use crate::protocol::StreamId;

    fn frames(list: &[(&'static [u8], Option<u64>)]) -> Event {
        Event::Frames(
            list.iter()
                .map(|(frame, exclude)| Notice { frame: Bytes::from_static(frame), exclude: exclude.map(SessionId) })
                .collect(),
        )
    }

    fn handle(user: &str, id: u64, cap: usize) -> (Arc<SessionHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(cap);
        let info = SessionInfo {
            session: SessionId(id),
            user: UserId::parse(user).unwrap(),
            node: Arc::from("n1"),
            device: None,
            connected_at: 0,
        };
        (Arc::new(SessionHandle::new(info, tx)), rx)
    }

    /// A hub with sessions 1 (user a) and 2 (user b), each with a queue of `cap`, in room `r`.
    fn room_of_two(cap: usize) -> (Hub, RoomName, mpsc::Receiver<Outbound>, mpsc::Receiver<Outbound>) {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let room = RoomName::parse("r").unwrap();
        let (a, ra) = handle("a", 1, cap);
        let (b, rb) = handle("b", 2, cap);
        hub.join(&room, a);
        hub.join(&room, b);
        (hub, room, ra, rb)
    }

    #[tokio::test]
    async fn fans_out_one_frame_and_skips_the_sender() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let room = RoomName::parse("r").unwrap();
        let (a, mut ra) = handle("a", 1, 4);
        let (b, mut rb) = handle("b", 2, 4);
        hub.join(&room, a.clone());
        hub.join(&room, b.clone());
        let message = crate::message::Message {
            mid: Arc::from("m"),
            from: Arc::from("a"),
            to: None,
            room: None,
            body: Arc::from("{}"),
            ts: 0,
        };
        let delivery = Arc::new(Delivery::new(None, message, Some(SessionId(1))));
        hub.deliver(&Topic::Room(room.clone()), &Event::Message(delivery.clone()));
        assert!(ra.try_recv().is_err(), "the sender gets no echo");
        let frame = delivery.json();
        match rb.try_recv().unwrap() {
            Outbound::Message(d) => assert_eq!(d.json().as_ptr(), frame.as_ptr(), "the bytes are shared, not copied"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(hub.leave(&room, SessionId(1)));
        assert!(!hub.leave(&room, SessionId(1)), "not a member any more");
        assert!(hub.leave(&room, SessionId(2)));
    }

    #[test]
    fn a_queue_slot_stays_two_words() {
        // Every session's queue holds a block of 32 slots, idle or not (measured: a fat pointer
        // here cost 259 B per idle session).
        assert_eq!(std::mem::size_of::<Outbound>(), 16);
    }

    #[tokio::test]
    async fn messages_received_together_reach_each_member_as_one_item_sharing_the_bytes() {
        let (hub, room, mut ra, mut rb) = room_of_two(1);
        let stream = StreamId::Room(room.clone());
        let burst: Vec<Arc<Delivery>> = (1..=3u64)
            .map(|seq| {
                let message = crate::message::Message {
                    mid: Arc::from(format!("m{seq}")),
                    from: Arc::from("a"),
                    to: None,
                    room: Some(room.clone()),
                    body: Arc::from(seq.to_string()),
                    ts: 0,
                };
                Arc::new(Delivery::new(Some((stream.clone(), seq)), message, Some(SessionId(1))))
            })
            .collect();
        let mut bursts = Bursts::default();
        let other = Topic::User(UserId::parse("z").unwrap());
        for delivery in &burst {
            bursts.push(&Topic::Room(room.clone()), delivery.clone(), &hub);
            bursts.push(&other, delivery.clone(), &hub);
        }
        assert!(ra.try_recv().is_err(), "held until the read is whole");
        bursts.flush(&hub);
        // One queue slot each (the queues hold one), the sender's own included: it skips them.
        for rx in [&mut ra, &mut rb] {
            match rx.try_recv().unwrap() {
                Outbound::Messages(got) => {
                    let seqs: Vec<u64> = got.iter().map(|d| d.position.as_ref().unwrap().1).collect();
                    assert_eq!(seqs, [1, 2, 3], "in order");
                    for (got, sent) in got.iter().zip(&burst) {
                        assert_eq!(got.json().as_ptr(), sent.json().as_ptr(), "the bytes are shared, not copied");
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn a_delivery_from_a_bus_record_encodes_the_frame_of_its_message() {
        let stream = crate::protocol::StreamId::parse("user:alice").unwrap();
        let message = crate::message::Message {
            mid: Arc::from("0000018f0000abcdef0123456789"),
            from: Arc::from("alice"),
            to: Some(UserId::parse("bob").unwrap()),
            room: None,
            body: Arc::from("{\"a\":[1,\"\\u00e9\"]}"),
            ts: 1_763_800_000_123,
        };
        let local = Delivery::new(Some((stream.clone(), 9)), message.clone(), None);
        let record = Bytes::from(crate::message::Record::encode(&message));
        let received = Delivery::from_record(Some((stream.clone(), 9)), record, None).unwrap();
        assert_eq!(received.json(), local.json());
        assert_eq!(received.ts(), message.ts);
        let mut again = Vec::new();
        received.write_record(&mut again);
        assert_eq!(again, crate::message::Record::encode(&message), "a received record is passed on as it came");
        assert!(Delivery::from_record(Some((stream, 9)), Bytes::from_static(b"garbage"), None).is_none());
    }

    #[tokio::test]
    async fn a_close_request_wakes_the_waiting_session_once() {
        let (a, _ra) = handle("a", 1, 1);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.close.requested().await }
        });
        tokio::task::yield_now().await;
        a.close.request(close::KICKED, Arc::from("first"));
        a.close.request(close::TOO_SLOW, Arc::from("second"));
        let (code, reason) = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!((code, &*reason), (close::KICKED, "first"), "the first request wins");
        assert_eq!(a.close.requested().await.0, close::KICKED, "and stays");
    }

    #[tokio::test]
    async fn a_batch_of_frames_reaches_each_member_in_order_but_the_one_it_excludes() {
        let (hub, room, mut ra, mut rb) = room_of_two(4);
        hub.deliver(&Topic::Room(room), &frames(&[(b"a joined", Some(1)), (b"b joined", Some(2)), (b"c left", None)]));
        fn received(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Bytes> {
            std::iter::from_fn(|| match rx.try_recv().ok()? {
                Outbound::Frame(frame) => Some(frame.json.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
        }
        assert_eq!(received(&mut ra), [&b"b joined"[..], b"c left"]);
        assert_eq!(received(&mut rb), [&b"a joined"[..], b"c left"]);
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_session_as_too_slow() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(metrics.clone());
        let (a, _ra) = handle("a", 1, 1);
        hub.add_session(a.clone());
        let topic = Topic::User(a.user.clone());
        hub.deliver(&topic, &frames(&[(b"1", None)]));
        hub.deliver(&topic, &frames(&[(b"2", None)]));
        let (code, _) = a.close.requested().await;
        assert_eq!(code, close::TOO_SLOW);
        assert_eq!(metrics.outbound_dropped.get(), 1);
    }
}
