//! The cluster store on NATS JetStream: every Switchyard stream is one subject of a single
//! JetStream stream, cursors are a key-value bucket.
//!
//! Layout, for `--prefix P` (see [`Layout`]):
//! - JetStream stream `<P>_messages` with subjects `P.m.>` and `P.fence`: a message of stream
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
//! **Nothing answered `unavailable` is stored later.** When JetStream does not acknowledge a
//! publish in time, the publish may still be in flight. The store then publishes a fence: the
//! same `Nats-Msg-Id` on the fence subject. Whichever of the two JetStream takes first wins the
//! id and the other is dropped as its duplicate, so once the fence is acknowledged the message
//! either was stored (the fence came back a duplicate of it: the append succeeded) or never will
//! be (the append is answered `unavailable`).

use std::collections::HashMap;
#[cfg(test)]
use std::sync::Arc;
use std::sync::Mutex;
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

/// How long one publish waits for JetStream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a fence is retried before the append is given up as unknown.
const FENCE_FOR: Duration = Duration::from_secs(5);
/// How many times an append reads the stream's end again after losing a race for it.
const RACES: usize = 1000;
/// Most tries of one idempotency key that fences settled as not stored.
const MAX_GENERATIONS: usize = 16;
/// Striped locks: appends of streams that hash alike take turns on a node.
const STRIPES: usize = 64;
/// Most streams whose end a node remembers.
const HEADS: usize = 65_536;

const SEQ: &str = "Sy-Seq";
const PREV: &str = "Sy-Prev";

/// A name as a NATS subject token: `.` would split it, so it is written `%2E` (`%` is not in the
/// names' alphabet, so no two names share a token).
pub(crate) fn token(name: &str) -> String {
    name.replace('.', "%2E")
}

/// A key of a key-value bucket for a name: the bytes a key may not hold (`:`, `@`) as `=XX`.
fn kv_key(name: &str) -> String {
    let mut key = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => key.push(b as char),
            _ => key.push_str(&format!("={b:02X}")),
        }
    }
    key
}

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
        format!("{}.m.{kind}.{}", self.prefix, token(name))
    }

    fn fence(&self) -> String {
        format!("{}.fence", self.prefix)
    }
}

/// The last message of a stream as an append needs it: its seq and its JetStream sequence.
#[derive(Clone, Copy, Debug, Default)]
struct Head {
    seq: u64,
    js: u64,
}

pub struct NatsStore {
    js: js::Context,
    messages: stream::Stream,
    cursors: kv::Store,
    layout: Layout,
    retention: Retention,
    heads: Mutex<HashMap<StreamId, Head>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
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
            subjects: vec![format!("{prefix}.m.>"), layout.fence()],
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
                    js.update_stream(stream::Config { num_replicas: info.config.num_replicas, ..config }).await?;
                }
                existing
            }
            Err(_) => js.get_or_create_stream(config).await?,
        };
        let cursors = super::bucket(&js, &layout.cursors, replicas, Duration::ZERO).await?;
        Ok(Self {
            js,
            messages,
            cursors,
            layout,
            retention,
            heads: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
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
    /// An id a fence took (an earlier try answered `unavailable`) is followed by its next
    /// generation, `<id>~1`, `<id>~2`, …, so that a retry with the same key can still be stored
    /// once, and its repeats still find it.
    async fn append_entry(&self, stream: &StreamId, record: &Bytes, base: &str) -> Result<Outcome, StoreError> {
        let subject = self.layout.subject(stream);
        let _turn = self.stripe(stream).lock().await;
        let mut generation = 0;
        let mut id = base.to_owned();
        for _ in 0..RACES {
            let head = match self.cached_head(stream) {
                Some(head) => head,
                None => match self.last(&subject).await? {
                    Some(last) => Head { seq: header_u64(&last, SEQ).unwrap_or(0), js: last.sequence },
                    None => Head::default(),
                },
            };
            let seq = head.seq + 1;
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, head.js.to_string().as_str());
            headers.insert(SEQ, seq.to_string().as_str());
            headers.insert(PREV, head.js.to_string().as_str());
            let acked = match self.js.publish_with_headers(subject.clone(), headers, record.clone()).await {
                Ok(ack) => tokio::time::timeout(ACK_TIMEOUT, ack.into_future()).await,
                Err(e) => Ok(Err(e)),
            };
            match acked {
                Ok(Ok(ack)) if ack.duplicate => {
                    let taken = self.get(ack.sequence).await?;
                    if taken.subject.as_str() != self.layout.fence() {
                        let subject = taken.subject.to_string();
                        return Ok(Outcome::Duplicate(self.stored(&self.stream_of(&subject)?, &taken)?, subject));
                    }
                    generation += 1;
                    if generation > MAX_GENERATIONS {
                        return Err(StoreError::Unavailable(format!(
                            "nats: {MAX_GENERATIONS} tries of this key failed"
                        )));
                    }
                    id = format!("{base}~{generation}");
                    continue;
                }
                Ok(Ok(ack)) => {
                    self.remember(stream, Some(Head { seq, js: ack.sequence }));
                    return Ok(Outcome::Stored(seq));
                }
                Ok(Err(e)) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {
                    // Another node appended meanwhile: read the end again.
                    self.remember(stream, None);
                    continue;
                }
                Ok(Err(e)) if matches!(e.kind(), PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe) => {
                    self.remember(stream, None);
                    return self.fence(&id, record, stream).await;
                }
                Ok(Err(e)) => {
                    // Refused before it was stored (no stream, too large, …).
                    return Err(unavailable("appending", e));
                }
                Err(_) => {
                    self.remember(stream, None);
                    return self.fence(&id, record, stream).await;
                }
            }
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
        let name = name.replace("%2E", ".");
        let text = match kind {
            "u" => format!("user:{name}"),
            "r" => format!("room:{name}"),
            _ => return Err(malformed()),
        };
        StreamId::parse(&text).map_err(|_| malformed())
    }

    /// Settles a publish whose acknowledgement never came (see the module header): the fence
    /// takes `id` unless the message already has it.
    async fn fence(&self, id: &str, record: &Bytes, stream: &StreamId) -> Result<Outcome, StoreError> {
        let deadline = tokio::time::Instant::now() + FENCE_FOR;
        let fence = self.layout.fence();
        while tokio::time::Instant::now() < deadline {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
            let acked = match self.js.publish_with_headers(fence.clone(), headers, Bytes::new()).await {
                Ok(ack) => tokio::time::timeout(ACK_TIMEOUT, ack.into_future()).await.ok().and_then(Result::ok),
                Err(_) => None,
            };
            let Some(ack) = acked else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let not_stored = || {
                StoreError::Unavailable(
                    "nats: JetStream did not acknowledge the append in time; it was not stored".into(),
                )
            };
            if !ack.duplicate {
                return Err(not_stored());
            }
            // A duplicate of an earlier try of the fence, or of the message itself.
            let taken = self.get(ack.sequence).await?;
            if taken.subject.as_str() == fence {
                return Err(not_stored());
            }
            let stored = self.stored(stream, &taken)?;
            let ours = Record::decode(Some(stream), record).is_some_and(|m| m.mid == stored.message.mid);
            return Ok(if ours {
                Outcome::Stored(stored.seq)
            } else {
                Outcome::Duplicate(stored, taken.subject.to_string())
            });
        }
        Err(StoreError::Unavailable(
            "nats: JetStream does not answer; the append's outcome is unknown, retry it with the same key".into(),
        ))
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
            let stored = self.stored(stream, &message)?;
            if stored.seq < lo {
                break;
            }
            let prev = header_u64(&message, PREV).unwrap_or(0);
            if stored.seq <= hi {
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
            if stored.seq >= lo && stored.message.ts >= cutoff {
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
        let Some(last) = self.last(&subject).await? else { return Ok(Slice::default()) };
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
        let entry = self.cursors.entry(kv_key(user.as_str())).await.map_err(|e| unavailable("reading a cursor", e))?;
        Ok(entry.and_then(|e| std::str::from_utf8(&e.value).ok()?.parse().ok()).unwrap_or(0))
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let key = kv_key(user.as_str());
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
    async fn a_fence_settles_a_publish_whose_ack_was_lost() {
        let Some(store) = store().await else { return };
        let lobby = room("lobby");
        // The message reached JetStream, its acknowledgement never came back: the fence finds it.
        let request = to_room("lobby", "1");
        let record = Bytes::from(Record::encode(&request.message));
        let Outcome::Stored(seq) = store.append_entry(&lobby, &record, "lost-ack").await.unwrap() else { panic!() };
        let Outcome::Stored(found) = store.fence("lost-ack", &record, &lobby).await.unwrap() else {
            panic!("the fence must find the message as ours")
        };
        assert_eq!(found, seq);
        // The message never reached it: the fence takes the id, and the message coming late is
        // dropped as its duplicate, so an append answered `unavailable` is never stored.
        let late = Bytes::from(Record::encode(&to_room("lobby", "2").message));
        let e = store.fence("never-arrived", &late, &lobby).await.err().expect("not stored");
        assert!(e.to_string().contains("it was not stored"), "{e}");
        let e = store.fence("never-arrived", &late, &lobby).await.err().expect("the fence is found again");
        assert!(e.to_string().contains("it was not stored"), "{e}");
        let read = store.read(&lobby, HistoryQuery::Last { limit: 10 }).await.unwrap();
        assert_eq!((read.messages.len(), read.last_seq), (1, 1), "the late message was dropped");
        // A retry of it with the same key is stored once, under the id's next generation.
        let Outcome::Stored(2) = store.append_entry(&lobby, &late, "never-arrived").await.unwrap() else { panic!() };
        let Outcome::Duplicate(again, _) = store.append_entry(&lobby, &late, "never-arrived").await.unwrap() else {
            panic!("a repeat finds it")
        };
        assert_eq!(again.seq, 2);
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
        assert_eq!(token("a.b"), "a%2Eb");
        assert_ne!(token("a.b"), token("a_b"));
        assert_eq!(kv_key("alice@example.com:1"), "alice=40example.com=3A1");
        assert_ne!(name_part("a.b"), name_part("a_b"));
        assert_eq!(Layout::new("sy.t").messages, "sy_2Et_messages");
        let layout = Layout::new("p");
        assert_eq!(layout.subject(&StreamId::parse("room:a.b:c").unwrap()), "p.m.r.a%2Eb:c");
    }
}
