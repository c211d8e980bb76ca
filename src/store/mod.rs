//! Streams: numbered, durable message logs (`user:<id>`, `room:<name>`), read cursors and
//! idempotency keys.
//!
//! The contract every backend keeps:
//! - seqs of a stream are 1, 2, 3, … with no gap, assigned once and never reused, even after the
//!   messages themselves are gone (retention or restart);
//! - an append answers only once it is committed, and an append answered with an error is never
//!   committed later (a store that can be reached late checks a deadline on the server);
//! - an append with an idempotency key already used by the same scope within
//!   [`IDEMPOTENCY_WINDOW_MS`] stores nothing and answers the first result;
//! - what is kept are the message's fields ([`Message`]), never a wire protocol's frame.
//!
//! The store → bus hand-off: the store assigns seqs and commits, then the node publishes each
//! committed entry on the bus. A bus may delay, reorder, duplicate or drop, so sessions repair
//! from the store (see `session`). One exception, declared by [`Appended::published`]: a store
//! and a bus on the same Redis publish inside the append's script, atomically with it.

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use async_trait::async_trait;

use crate::bus::{SessionId, Topic};
use crate::message::Message;
pub use crate::message::StoredMessage;
use crate::protocol::{ErrorCode, HistoryQuery, ProtocolError, StreamId, UserId};

/// Retention of every stream (`--history-size`, `--history-ttl`).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_messages: u64,
    pub ttl_ms: u64,
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 10 * 60 * 1000;

/// One stream a message is appended to, and who receives that copy live.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stream: StreamId,
    /// Who receives the live delivery. Only a store that publishes itself reads it.
    pub topic: Topic,
    /// The sending session, which gets a reply instead of an echo.
    pub exclude: Option<SessionId>,
}

/// An append of one message to one or two streams (a direct message goes to the recipient's
/// and the sender's stream), all or nothing.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub message: Message,
    pub entries: Vec<Entry>,
    /// Which entry's seq the caller answers with.
    pub reply_entry: usize,
    /// `(scope, key)`: a retry with the same pair inside the window is not stored again.
    pub idempotency: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub mid: Arc<str>,
    /// The seq of the reply entry.
    pub seq: u64,
    /// The key was seen before: nothing was stored, `mid` and `seq` are the first append's.
    pub duplicate: bool,
    /// The seq of each entry, in the request's order; empty for a duplicate.
    pub seqs: Vec<u64>,
    /// The store already handed the entries to the bus (a fused store and bus, see the module
    /// header); otherwise the caller publishes them.
    pub published: bool,
}

/// Messages read from a stream, ascending, and the stream's last seq at the time of the read.
#[derive(Clone, Debug, Default)]
pub struct Slice {
    pub messages: Vec<StoredMessage>,
    pub last_seq: u64,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store failure: {0}")]
    Internal(String),
}

impl From<StoreError> for ProtocolError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ProtocolError::new(ErrorCode::Unavailable, m),
            StoreError::Internal(m) => ProtocolError::new(ErrorCode::Internal, m),
        }
    }
}

/// Appends `requests` one after the other with `append`, answering each: the way of a store
/// that has no better one for appends sent together.
pub async fn one_by_one<F, Fut>(requests: Vec<AppendRequest>, mut append: F) -> Vec<Result<Appended, StoreError>>
where
    F: FnMut(AppendRequest) -> Fut,
    Fut: Future<Output = Result<Appended, StoreError>>,
{
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        answers.push(append(request).await);
    }
    answers
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Stores the message in each entry's stream with that stream's next seq, all or nothing;
    /// answers the mid, the seq of `reply_entry` and every entry's seq (see the module contract).
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError>;

    /// Appends messages one sender sent back to back, in their order, each on its own (one may
    /// fail and the next be stored), answering each. A store may send them together; by
    /// default they go one after the other.
    async fn append_all(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        one_by_one(requests, |request| self.append(request)).await
    }

    /// Reads the kept messages that `query` selects; expired ones are never returned.
    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError>;

    /// The user's read cursor: the highest seq any of their sessions acknowledged (0 if none).
    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError>;

    /// Moves the user's read cursor forward to `seq`; never moves it backward.
    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError>;

    /// Whether the store answers right now (for `/readyz`).
    async fn ready(&self) -> bool;

    /// Flushes and releases the store at shutdown; later calls fail with `Unavailable`.
    async fn close(&self);

    /// Whether every append of this store publishes itself (fused with the bus, see the module
    /// header), so that the caller keeps nothing to publish afterwards.
    fn publishes(&self) -> bool {
        false
    }
}
