//! The cluster store on NATS JetStream: every Switchyard stream is one subject of a single
//! JetStream stream, cursors are a key-value bucket.
//!
//! Layout, for `--prefix P` (see [`Layout`]):
//! - JetStream stream `<P>_messages` with subjects `P.m.>` and `P.clock`: a message of stream
//!   `user:alice` is a JetStream message on `P.m.u.alice` (names encoded, see [`token`]) whose
//!   payload is the message's [`Record`] and whose headers carry its seq (`Sy-Seq`) and the
//!   JetStream sequence of the stream's message before it (`Sy-Prev`). Retention by
//!   `--history-size` is the stream's per-subject limit (`max_msgs_per_subject`, exact); by
//!   `--history-ttl`, reads skip older messages.
//! - Key-value bucket `<P>_cursors`: a user's read cursor.
//!
//! **Seqs with no gap and no race.** An append reads the stream's last message (cached per node
//! after each append) and publishes seq + 1 with `Nats-Expected-Last-Subject-Sequence` set to the
//! JetStream sequence of that last message: JetStream stores it only if no other message reached
//! the subject meanwhile, so two nodes can never store the same seq; the loser reads the new last
//! message and tries again. Appends of one stream on one node take turns (striped locks), so a
//! node does not race itself.
//!
//! **Idempotency** is JetStream's own: every entry is published with `Nats-Msg-Id` (from the
//! idempotency key when there is one, else from the mid), and the stream's duplicate window is
//! [`IDEMPOTENCY_WINDOW_MS`]. A repeated key is answered with the first message, read back.
//!
//! **A direct message** is two entries, and JetStream 2.9 stores one subject at a time: the
//! recipient's copy first, then the sender's. When the second fails the append is answered
//! `unavailable` with the first stored; a retry with the same idempotency key finds the first
//! (a duplicate) and stores the second, so that an acknowledged message is in both streams and
//! none twice. Without a key, a failed direct message may stay in the recipient's stream only.
//!
//! **Nothing answered `unavailable` is read later.** JetStream 2.9 cannot refuse a write by
//! time, so every message carries a deadline (`Sy-Deadline`, in JetStream's clock, see
//! [`NatsClock`]) and a message JetStream stored after it (its own timestamp says when) is void:
//! never read, never answered as a duplicate, and its seq is given to the next message, since
//! nobody was told it. A publish that JetStream takes after the node gave up on it (JetStream
//! was paused, say) is thereby as if it never happened, as a Redis script run after its deadline
//! writes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, DirectGetErrorKind, DiscardPolicy, StorageType};
use async_nats::jetstream::{self as js, message::StreamMessage};
use async_trait::async_trait;
use bytes::Bytes;

use crate::message::Record;
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{
    AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, Slice, Store, StoreError, StoredMessage,
};

/// How long after a node sent a message JetStream may still store it: one stored later is void
/// (see the module header). In JetStream's clock.
const WRITE_DEADLINE: Duration = Duration::from_millis(1500);
/// How long one publish waits for JetStream's acknowledgement: past the deadline, with a margin
/// for the error of the clock estimate and the way back of the acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// An acknowledgement slower than this may be of a void message: the message is read back.
const SLOW_ACK: Duration = Duration::from_millis(1000);
/// How long an append waits for a stream without a leader to have one again.
const LEADERLESS_FOR: Duration = Duration::from_secs(5);
/// How often a node samples JetStream's clock.
const CLOCK_EVERY: Duration = Duration::from_secs(5);
/// How many times an append reads the stream's end again after losing a race for it.
const RACES: usize = 1000;
/// Every how many seqs of a stream an append looks for expired messages at its head.
const AGE_CHECK_EVERY: u64 = 16;
/// Most tries of one idempotency key whose earlier tries are void.
const MAX_GENERATIONS: usize = 16;
/// Striped locks: appends of streams that hash alike take turns on a node.
const STRIPES: usize = 64;
/// Most streams whose end a node remembers.
const HEADS: usize = 65_536;

const SEQ: &str = "Sy-Seq";
const PREV: &str = "Sy-Prev";
const DEADLINE: &str = "Sy-Deadline";

/// A prefix as part of a JetStream stream or bucket name, which allow `A-Z a-z 0-9 - _` only:
/// every other byte, and `_` itself, as `_XX`, so that no two prefixes share a name.
pub(crate) fn name_part(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 8);
    for b in prefix.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => out.push(b as char),
            _ => out.push_str(&format!("_{b:02X}")),
        }
    }
    out
}

/// The names of one cluster's streams, subjects and buckets.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: String,
    pub(crate) messages: String,
    pub(crate) cursors: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str) -> Self {
        let part = name_part(prefix);
        Self { prefix: prefix.to_owned(), messages: format!("{part}_messages"), cursors: format!("{part}_cursors") }
    }

    fn subject(&self, stream: &StreamId) -> String {
        let (kind, name) = match stream {
            StreamId::User(user) => ("u", user.as_str()),
            StreamId::Room(room) => ("r", room.as_str()),
        };
        format!("{}.m.{kind}.{}", self.prefix, super::subjects::token(name))
    }

    fn clock(&self) -> String {
        format!("{}.clock", self.prefix)
    }
}

/// The end of a stream as an append needs it: the seq of its last message that is not void,
/// the JetStream sequence of its last message (void or not, what JetStream compares) and that of
/// its last message that is not void (what the next one points back to).
#[derive(Clone, Copy, Debug, Default)]
struct Head {
    seq: u64,
    js: u64,
    valid_js: u64,
}

impl Head {
    /// The end as the stream's last message shows it.
    fn after(last: &StreamMessage) -> Self {
        let seq = header_u64(last, SEQ).unwrap_or(0);
        if is_void(last) {
            // Its seq was never given to anyone: the next message takes it.
            Head { seq: seq.saturating_sub(1), js: last.sequence, valid_js: header_u64(last, PREV).unwrap_or(0) }
        } else {
            Head { seq, js: last.sequence, valid_js: last.sequence }
        }
    }
}

/// JetStream's clock as this node estimates it: the offset of a message's timestamp from the
/// local clock, sampled every [`CLOCK_EVERY`].
#[derive(Default)]
pub(crate) struct NatsClock {
    offset_ms: AtomicI64,
}

impl NatsClock {
    /// The deadline of a message sent now, in JetStream's clock.
    fn deadline(&self) -> u64 {
        let now = now_ms() as i64 + self.offset_ms.load(Ordering::Relaxed);
        now as u64 + WRITE_DEADLINE.as_millis() as u64
    }

    /// Publishes an empty message on the clock subject and reads its timestamp back.
    async fn sample(&self, js: &js::Context, messages: &stream::Stream, subject: &str) -> Result<(), StoreError> {
        let sent = now_ms();
        let ack =
            js.publish(subject.to_owned(), Bytes::new()).await.map_err(|e| unavailable("sampling the clock", e))?;
        let ack = ack.await.map_err(|e| unavailable("sampling the clock", e))?;
        let acked = now_ms();
        let message = messages.direct_get(ack.sequence).await.map_err(|e| unavailable("sampling the clock", e))?;
        let local = (sent + acked) / 2;
        self.offset_ms.store(millis(&message) as i64 - local as i64, Ordering::Relaxed);
        Ok(())
    }
}

/// When JetStream stored a message, in ms since the epoch.
fn millis(message: &StreamMessage) -> u64 {
    u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Whether JetStream stored the message after its deadline (see the module header).
fn is_void(message: &StreamMessage) -> bool {
    header_u64(message, DEADLINE).is_some_and(|deadline| millis(message) > deadline)
}

pub struct NatsStore {
    js: js::Context,
    messages: stream::Stream,
    cursors: kv::Store,
    layout: Layout,
    retention: Retention,
    heads: Mutex<HashMap<StreamId, Head>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    clock: Arc<NatsClock>,
}

/// What became of one entry's publish.
enum Outcome {
    /// Stored now, at this seq.
    Stored(u64),
    /// Its id was taken: this message was stored before.
    Duplicate(StoredMessage, String),
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("nats: {what}: {e}"))
}

fn header_u64(message: &StreamMessage, name: &str) -> Option<u64> {
    message.headers.get(name)?.as_str().parse().ok()
}

impl NatsStore {
    /// Creates (or updates to this node's retention) the message stream and the cursor bucket of
    /// `prefix`; `replicas` copies of each.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        retention: Retention,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let mut js = js::new(client);
        js.set_timeout(ACK_TIMEOUT);
        let layout = Layout::new(prefix);
        let config = stream::Config {
            name: layout.messages.clone(),
            subjects: vec![format!("{prefix}.m.>"), layout.clock()],
            max_messages_per_subject: i64::try_from(retention.max_messages).unwrap_or(i64::MAX),
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_millis(IDEMPOTENCY_WINDOW_MS),
            allow_direct: true,
            ..Default::default()
        };
        let messages = match js.get_stream(&layout.messages).await {
            Ok(mut existing) => {
                let info = existing.info().await?;
                if info.config.max_messages_per_subject != config.max_messages_per_subject {
                    tracing::info!(stream = %layout.messages, "setting the per-stream history to --history-size");
                    js.update_stream(stream::Config { num_replicas: info.config.num_replicas, ..config.clone() })
                        .await?;
                }
                super::ensure_stream(&js, stream::Config { num_replicas: info.config.num_replicas, ..config }).await?
            }
            Err(_) => super::ensure_stream(&js, config).await?,
        };
        let cursors = super::bucket(&js, &layout.cursors, replicas, Duration::ZERO).await?;
        let clock = Arc::new(NatsClock::default());
        clock.sample(&js, &messages, &layout.clock()).await?;
        tokio::spawn(keep_time(Arc::downgrade(&clock), js.clone(), messages.clone(), layout.clock()));
        Ok(Self {
            js,
            messages,
            cursors,
            layout,
            retention,
            heads: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            clock,
        })
    }

    /// Deletes the stream and the bucket (tests).
    #[cfg(test)]
    pub async fn destroy(&self) {
        let _ = self.js.delete_stream(&self.layout.messages).await;
        let _ = self.js.delete_key_value(&self.layout.cursors).await;
    }

    fn stripe(&self, stream: &StreamId) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one(stream);
        &self.stripes[(hash as usize) % STRIPES]
    }

    fn cached_head(&self, stream: &StreamId) -> Option<Head> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).get(stream).copied()
    }

    fn remember(&self, stream: &StreamId, head: Option<Head>) {
        let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        match head {
            Some(head) => {
                if heads.len() >= HEADS {
                    heads.clear();
                }
                heads.insert(stream.clone(), head);
            }
            None => {
                heads.remove(stream);
            }
        }
    }

    /// The stream's last message as JetStream has it now (`None`: never written).
    async fn last(&self, subject: &str) -> Result<Option<StreamMessage>, StoreError> {
        match self.messages.direct_get_last_for_subject(subject).await {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(unavailable("reading a stream's end", e)),
        }
    }

    async fn get(&self, sequence: u64) -> Result<StreamMessage, StoreError> {
        self.messages.direct_get(sequence).await.map_err(|e| unavailable("reading a message", e))
    }

    /// A stored message as the store answers it.
    fn stored(&self, stream: &StreamId, message: &StreamMessage) -> Result<StoredMessage, StoreError> {
        let seq =
            header_u64(message, SEQ).ok_or_else(|| StoreError::Internal("nats: a message without its seq".into()))?;
        let decoded = Record::decode(Some(stream), &message.payload)
            .ok_or_else(|| StoreError::Internal("nats: a stored message that is not a record".into()))?;
        Ok(StoredMessage { seq, message: decoded })
    }

    /// Stores `record` as the next message of `stream` under `id`, or finds the message that
    /// took `id` first.
    ///
    /// An id a void message took (an earlier try answered `unavailable`) is followed by its next
    /// generation, `<id>~1`, `<id>~2`, …, so that a retry with the same key can still be stored
    /// once, and its repeats still find it.
    async fn append_entry(&self, stream: &StreamId, record: &Bytes, base: &str) -> Result<Outcome, StoreError> {
        let subject = self.layout.subject(stream);
        let _turn = self.stripe(stream).lock().await;
        let mut generation = 0;
        let mut id = base.to_owned();
        let give_up = tokio::time::Instant::now() + LEADERLESS_FOR;
        let mut pause = Duration::from_millis(25);
        for _ in 0..RACES {
            let head = match self.cached_head(stream) {
                Some(head) => head,
                None => self.last(&subject).await?.map(|last| Head::after(&last)).unwrap_or_default(),
            };
            let seq = head.seq + 1;
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, head.js.to_string().as_str());
            headers.insert(SEQ, seq.to_string().as_str());
            headers.insert(PREV, head.valid_js.to_string().as_str());
            headers.insert(DEADLINE, self.clock.deadline().to_string().as_str());
            let sent = tokio::time::Instant::now();
            let acked = match self.js.publish_with_headers(subject.clone(), headers, record.clone()).await {
                Ok(ack) => tokio::time::timeout(ACK_TIMEOUT, ack.into_future()).await,
                Err(e) => Ok(Err(e)),
            };
            let ack = match acked {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {
                    // Another node appended meanwhile: read the end again.
                    self.remember(stream, None);
                    continue;
                }
                Ok(Err(e)) if matches!(e.kind(), PublishErrorKind::StreamNotFound) && sent < give_up => {
                    // No server serves the stream right now (its replicas are electing a
                    // leader after one died): nothing was stored, so it is sent again.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(400));
                    continue;
                }
                Ok(Err(e)) if !matches!(e.kind(), PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe) => {
                    // Refused before it was stored (no stream, too large, …).
                    return Err(unavailable("appending", e));
                }
                _ => {
                    self.remember(stream, None);
                    return Err(late());
                }
            };
            if ack.duplicate {
                let taken = self.get(ack.sequence).await?;
                if !is_void(&taken) {
                    let subject = taken.subject.to_string();
                    return Ok(Outcome::Duplicate(self.stored(&self.stream_of(&subject)?, &taken)?, subject));
                }
                generation += 1;
                if generation > MAX_GENERATIONS {
                    return Err(StoreError::Unavailable(format!("nats: {MAX_GENERATIONS} tries of this key failed")));
                }
                id = format!("{base}~{generation}");
                continue;
            }
            if sent.elapsed() > SLOW_ACK && is_void(&self.get(ack.sequence).await?) {
                self.remember(stream, Some(Head { js: ack.sequence, ..head }));
                return Err(late());
            }
            self.remember(stream, Some(Head { seq, js: ack.sequence, valid_js: ack.sequence }));
            if seq % AGE_CHECK_EVERY == 0
                && let Err(e) = self.trim_expired(&subject).await
            {
                tracing::debug!(error = %e, %stream, "trimming expired messages failed; the next check tries again");
            }
            return Ok(Outcome::Stored(seq));
        }
        Err(StoreError::Unavailable(format!("nats: {RACES} appends to {stream} raced this one; try again")))
    }

    /// The stream a message subject names.
    fn stream_of(&self, subject: &str) -> Result<StreamId, StoreError> {
        let malformed = || StoreError::Internal(format!("nats: the id was taken on {subject}"));
        let rest = subject
            .strip_prefix(self.layout.prefix.as_str())
            .and_then(|s| s.strip_prefix(".m."))
            .ok_or_else(malformed)?;
        let (kind, name) = rest.split_once('.').ok_or_else(malformed)?;
        let name = super::subjects::name_of(name);
        let text = match kind {
            "u" => format!("user:{name}"),
            "r" => format!("room:{name}"),
            _ => return Err(malformed()),
        };
        StreamId::parse(&text).map_err(|_| malformed())
    }

    /// Removes the expired head of a stream (`--history-ttl`): up to the first message that has
    /// not expired, at most [`AGE_CHECK_EVERY`] of them (as many as were appended since the last
    /// look), never the last message, whose seq the next append counts from. Reads skip
    /// expired messages anyway; this frees their space while the stream is written. A stream
    /// nobody writes keeps its last `--history-size` messages, unread once expired.
    async fn trim_expired(&self, subject: &str) -> Result<(), StoreError> {
        let cutoff = now_ms().saturating_sub(self.retention.ttl_ms);
        let expired = |m: &StreamMessage| Record::check(&m.payload).is_some_and(|layout| layout.ts() < cutoff);
        let mut at = match self.messages.direct_get_first_for_subject(subject).await {
            Ok(first) if expired(&first) => first,
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(()),
            Err(e) => return Err(unavailable("reading a stream's head", e)),
        };
        for _ in 0..AGE_CHECK_EVERY {
            match self.messages.direct_get_next_for_subject(subject, Some(at.sequence + 1)).await {
                Ok(next) if expired(&next) => at = next,
                Ok(next) => {
                    at = next;
                    break;
                }
                // `at` is the last message: it stays.
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(unavailable("reading a stream's head", e)),
            }
        }
        self.messages
            .purge()
            .filter(subject)
            .sequence(at.sequence)
            .await
            .map_err(|e| unavailable("trimming expired messages", e))?;
        Ok(())
    }

    /// Walks a stream's messages from its last one back to `lo` (by each message's `Sy-Prev`).
    async fn walk_back(
        &self,
        stream: &StreamId,
        last: StreamMessage,
        lo: u64,
        hi: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::new();
        let mut at = Some(last);
        while let Some(message) = at.take() {
            let prev = header_u64(&message, PREV).unwrap_or(0);
            let stored = self.stored(stream, &message)?;
            if stored.seq < lo {
                break;
            }
            if stored.seq <= hi && !is_void(&message) {
                out.push(stored);
            }
            if prev == 0 || out.len() as u64 > hi - lo {
                break;
            }
            at = match self.messages.direct_get(prev).await {
                Ok(message) => Some(message),
                // Trimmed by the per-subject limit: nothing older is kept.
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => None,
                Err(e) => return Err(unavailable("reading a message", e)),
            };
        }
        out.reverse();
        Ok(out)
    }

    /// Reads a stream's messages forward from its first kept one: the first `limit` from seq
    /// `lo` on that have not expired.
    async fn walk_forward(
        &self,
        stream: &StreamId,
        subject: &str,
        lo: u64,
        limit: usize,
        cutoff: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::new();
        let mut at = self.messages.direct_get_first_for_subject(subject).await;
        loop {
            let message = match at {
                Ok(message) => message,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(unavailable("reading a message", e)),
            };
            let stored = self.stored(stream, &message)?;
            if stored.seq >= lo && stored.message.ts >= cutoff && !is_void(&message) {
                out.push(stored);
                if out.len() >= limit {
                    break;
                }
            }
            at = self.messages.direct_get_next_for_subject(subject, Some(message.sequence + 1)).await;
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        let mut message = request.message.clone();
        let mut record = Bytes::from(Record::encode(&message));
        let mut seqs = Vec::with_capacity(request.entries.len());
        let mut fresh = false;
        for (i, entry) in request.entries.iter().enumerate() {
            let id = match &request.idempotency {
                Some((scope, key)) => format!("k{}.{}.{i}", hex(scope), hex(key)),
                None => format!("m{}.{i}", message.mid),
            };
            match self.append_entry(&entry.stream, &record, &id).await? {
                Outcome::Stored(seq) => {
                    fresh = true;
                    seqs.push(seq);
                }
                Outcome::Duplicate(stored, subject) => {
                    if subject != self.layout.subject(&entry.stream) && i == 0 {
                        // The key was used for another message: answer that one.
                        return Ok(Appended {
                            mid: stored.message.mid.clone(),
                            seq: stored.seq,
                            duplicate: true,
                            seqs: Vec::new(),
                            published: false,
                        });
                    }
                    if i == 0 {
                        // A retry: the rest of the entries carry the message first stored.
                        message = stored.message.clone();
                        record = Bytes::from(Record::encode(&message));
                    }
                    seqs.push(stored.seq);
                }
            }
        }
        let seq = seqs.get(request.reply_entry).copied().unwrap_or(0);
        if !fresh {
            return Ok(Appended { mid: message.mid, seq, duplicate: true, seqs: Vec::new(), published: false });
        }
        Ok(Appended { mid: message.mid, seq, duplicate: false, seqs, published: false })
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let subject = self.layout.subject(stream);
        let Some(mut last) = self.last(&subject).await? else { return Ok(Slice::default()) };
        while is_void(&last) {
            // What the last message that is not void points back to.
            match header_u64(&last, PREV).unwrap_or(0) {
                0 => return Ok(Slice::default()),
                prev => last = self.get(prev).await?,
            }
        }
        let last_seq = header_u64(&last, SEQ).unwrap_or(0);
        let kept_from = last_seq.saturating_sub(self.retention.max_messages) + 1;
        let cutoff = now_ms().saturating_sub(self.retention.ttl_ms);
        let mut messages = match query {
            HistoryQuery::After { since, limit } => {
                let lo = (since + 1).max(kept_from);
                if lo > last_seq || limit == 0 {
                    Vec::new()
                } else if last_seq - lo < 2 * limit as u64 + 16 {
                    // Near the end (a catch-up): back from the last message.
                    let mut messages = self.walk_back(stream, last, lo, last_seq).await?;
                    messages.retain(|m| m.message.ts >= cutoff);
                    messages.truncate(limit);
                    messages
                } else {
                    self.walk_forward(stream, &subject, lo, limit, cutoff).await?
                }
            }
            HistoryQuery::Before { before, limit } => {
                let hi = before.saturating_sub(1).min(last_seq);
                let lo = (hi.saturating_sub(limit as u64) + 1).max(kept_from);
                if lo > hi || limit == 0 { Vec::new() } else { self.walk_back(stream, last, lo, hi).await? }
            }
            HistoryQuery::Last { limit } => {
                let lo = (last_seq.saturating_sub(limit as u64) + 1).max(kept_from);
                if limit == 0 { Vec::new() } else { self.walk_back(stream, last, lo, last_seq).await? }
            }
        };
        messages.retain(|m| m.message.ts >= cutoff);
        Ok(Slice { messages, last_seq })
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let entry = self
            .cursors
            .entry(super::keys::token(user.as_str()))
            .await
            .map_err(|e| unavailable("reading a cursor", e))?;
        Ok(entry.and_then(|e| std::str::from_utf8(&e.value).ok()?.parse().ok()).unwrap_or(0))
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let key = super::keys::token(user.as_str());
        let value = Bytes::from(seq.to_string());
        for _ in 0..RACES {
            let entry = self.cursors.entry(key.as_str()).await.map_err(|e| unavailable("reading a cursor", e))?;
            let written = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    let current: u64 = std::str::from_utf8(&entry.value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                    if current >= seq {
                        return Ok(());
                    }
                    self.cursors
                        .update(key.as_str(), value.clone(), entry.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                _ => self.cursors.create(key.as_str(), value.clone()).await.map(|_| ()).map_err(|e| e.to_string()),
            };
            if written.is_ok() {
                return Ok(());
            }
            // Another session moved it meanwhile: look again.
        }
        Err(StoreError::Unavailable("nats: the cursor kept changing; try again".into()))
    }

    async fn ready(&self) -> bool {
        // A stream info request: what JetStream answers only while it can serve the stream.
        let mut messages = self.messages.clone();
        matches!(tokio::time::timeout(Duration::from_secs(1), messages.info()).await, Ok(Ok(_)))
    }

    async fn close(&self) {}
}

fn late() -> StoreError {
    StoreError::Unavailable(
        "nats: JetStream did not acknowledge the append in time; if it stores it later, it stays void".into(),
    )
}

/// Samples JetStream's clock every [`CLOCK_EVERY`] while the store exists.
async fn keep_time(clock: std::sync::Weak<NatsClock>, js: js::Context, messages: stream::Stream, subject: String) {
    let mut tick = tokio::time::interval(CLOCK_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(clock) = clock.upgrade() else { return };
        if let Err(e) = clock.sample(&js, &messages, &subject).await {
            tracing::debug!(error = %e, "sampling JetStream's clock failed");
        }
    }
}

fn hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Retention;
    use crate::store::tests::{RETENTION, direct, keyed, nats_url, room, to_room, user};

    /// A store of its own on the test NATS (removed with [`NatsStore::destroy`]).
    async fn store() -> Option<NatsStore> {
        let url = nats_url();
        let client = match async_nats::connect(url.as_str()).await {
            Ok(client) => client,
            Err(e) => return crate::testing::absent("nats store", &format!("no NATS at {url}: {e}")),
        };
        Some(NatsStore::open(client, &crate::testing::unique_prefix(), RETENTION, 1).await.unwrap())
    }

    #[tokio::test]
    async fn a_message_stored_after_its_deadline_is_never_read_and_its_seq_goes_to_the_next() {
        let Some(store) = store().await else { return };
        let lobby = room("lobby");
        store.append(to_room("lobby", "1")).await.unwrap();
        // JetStream takes a publish after its deadline (it was paused while the node gave up).
        let last = store.last(&store.layout.subject(&lobby)).await.unwrap().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "late-key");
        headers.insert(SEQ, "2");
        headers.insert(PREV, last.sequence.to_string().as_str());
        headers.insert(DEADLINE, (now_ms() - 10).to_string().as_str());
        let late = Bytes::from(Record::encode(&to_room("lobby", "late").message));
        store
            .js
            .publish_with_headers(store.layout.subject(&lobby), headers, late.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        let read = store.read(&lobby, HistoryQuery::Last { limit: 10 }).await.unwrap();
        assert_eq!((read.messages.len(), read.last_seq), (1, 1), "the void message is not read");
        // The next message takes seq 2, and a retry of the late one with its key is stored once.
        assert_eq!(store.append(to_room("lobby", "2")).await.unwrap().seq, 2);
        let Outcome::Stored(3) = store.append_entry(&lobby, &late, "late-key").await.unwrap() else { panic!() };
        let Outcome::Duplicate(again, _) = store.append_entry(&lobby, &late, "late-key").await.unwrap() else {
            panic!("a repeat finds it")
        };
        assert_eq!(again.seq, 3);
        let read = store.read(&lobby, HistoryQuery::After { since: 0, limit: 10 }).await.unwrap();
        let bodies: Vec<&str> = read.messages.iter().map(|m| &*m.message.body).collect();
        assert_eq!((bodies, read.last_seq), (vec!["1", "2", "late"], 3));
        store.destroy().await;
    }

    #[tokio::test]
    async fn expired_messages_are_removed_as_the_stream_is_written_but_never_its_last() {
        let url = nats_url();
        let Ok(client) = async_nats::connect(url.as_str()).await else {
            return crate::testing::absent("nats store", &format!("no NATS at {url}")).unwrap_or(());
        };
        let retention = Retention { max_messages: 1000, ttl_ms: 1000 };
        let store = NatsStore::open(client, &crate::testing::unique_prefix(), retention, 1).await.unwrap();
        let old = room("old");
        for i in 1..=20 {
            store.append(to_room("old", &i.to_string())).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Seqs 21..=32: the look at seq 32 finds 1..=20 expired and removes 16 of them.
        for i in 21..=32 {
            store.append(to_room("old", &i.to_string())).await.unwrap();
        }
        let subject = store.layout.subject(&old);
        let first = store.messages.direct_get_first_for_subject(subject.as_str()).await.unwrap();
        assert_eq!(header_u64(&first, SEQ), Some(17), "1..=16 removed, the expired 17..=20 wait for the next look");
        let read = store.read(&old, HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
        assert_eq!((read.messages.first().map(|m| m.seq), read.last_seq), (Some(21), 32), "expired ones are not read");
        // A stream whose every message expired keeps its last, and goes on from its seq.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for i in 33..=48 {
            store.append(to_room("old", &i.to_string())).await.unwrap();
        }
        assert_eq!(store.read(&old, HistoryQuery::Last { limit: 0 }).await.unwrap().last_seq, 48);
        store.destroy().await;
    }

    #[tokio::test]
    async fn a_direct_message_half_stored_is_completed_by_a_retry_with_its_key() {
        let Some(store) = store().await else { return };
        let request = keyed(direct("alice", "bob", "\"hi\""), "dm-1");
        // Only bob's copy got stored before the failure.
        let (scope, key) = request.idempotency.clone().unwrap();
        let record = Bytes::from(Record::encode(&request.message));
        let bob = StreamId::User(user("bob"));
        store.append_entry(&bob, &record, &format!("k{}.{}.0", hex(&scope), hex(&key))).await.unwrap();
        // The client retries with the same key; the message is accepted anew (another mid).
        let mut retry = keyed(direct("alice", "bob", "\"hi\""), "dm-1");
        retry.message.mid = Arc::from("another-mid");
        let done = store.append(retry.clone()).await.unwrap();
        assert!(!done.duplicate, "the sender's copy was stored now");
        assert_eq!((done.mid.as_ref(), &done.seqs[..]), (request.message.mid.as_ref(), &[1, 1][..]));
        let alice = store.read(&StreamId::User(user("alice")), HistoryQuery::Last { limit: 5 }).await.unwrap();
        assert_eq!(alice.messages[0].message, request.message, "the first message, in both streams");
        let again = store.append(retry).await.unwrap();
        assert_eq!((again.duplicate, again.seq, again.mid), (true, 1, done.mid));
        assert_eq!(store.read(&bob, HistoryQuery::Last { limit: 5 }).await.unwrap().last_seq, 1, "bob's once");
        store.destroy().await;
    }

    #[test]
    fn names_never_collide() {
        use crate::backend::nats::{keys, subjects};
        assert_eq!(subjects::token("a.b"), "a%2Eb");
        assert_ne!(subjects::token("a.b"), subjects::token("a_b"));
        assert_eq!(keys::token("alice@example.com:1"), "alice=40example=2Ecom=3A1", "a cursor's key");
        assert_ne!(name_part("a.b"), name_part("a_b"));
        assert_eq!(Layout::new("sy.t").messages, "sy_2Et_messages");
        let layout = Layout::new("p");
        assert_eq!(layout.subject(&StreamId::parse("room:a.b:c").unwrap()), "p.m.r.a%2Eb:c");
    }
}
