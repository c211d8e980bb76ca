//! Streams: numbered, durable message logs (`user:<id>`, `room:<name>`), read cursors and
//! idempotency keys.
//!
//! The contract every backend keeps:
//! - seqs of a stream are 1, 2, 3, … with no gap, assigned once and never reused, even after the
//!   messages themselves are gone (retention or restart);
//! - an append is stored before it is delivered, and the live deliveries of one stream leave in
//!   seq order, so a reader that subscribed first and then read the store sees every message;
//! - an append with an idempotency key already used by the same scope within
//!   [`IDEMPOTENCY_WINDOW_MS`] stores and delivers nothing and answers the first result.

mod embedded;
mod redis;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::broker::{SessionId, Topic};
use crate::protocol::{ErrorCode, HistoryQuery, MessageDraft, ProtocolError, StreamId, UserId};

pub use self::redis::RedisStore;
pub use embedded::EmbeddedStore;

/// Retention of every stream (`--history-size`, `--history-ttl`).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_messages: u64,
    pub ttl_ms: u64,
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 10 * 60 * 1000;

/// One copy of a message for one stream.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stream: StreamId,
    /// Who receives the live delivery.
    pub topic: Topic,
    pub draft: MessageDraft,
    /// The sending session, which gets a reply instead of an echo.
    pub exclude: Option<SessionId>,
}

/// An append of one message to one or two streams (a direct message goes to the recipient's
/// and the sender's stream), all or nothing.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub entries: Vec<Entry>,
    /// Which entry's seq the caller answers with.
    pub reply_entry: usize,
    /// `(scope, key)`: a retry with the same pair inside the window is not stored again.
    pub idempotency: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub mid: Arc<str>,
    pub seq: u64,
    /// The key was seen before: nothing was stored, `mid` and `seq` are the first append's.
    pub duplicate: bool,
}

/// A stored message: its seq and the `message` frame as encoded when it was appended.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub seq: u64,
    pub frame: Bytes,
}

/// Messages read from a stream, ascending, and the stream's last seq at the time of the read.
#[derive(Clone, Debug, Default)]
pub struct Slice {
    pub messages: Vec<StoredMessage>,
    pub last_seq: u64,
}

#[derive(Debug, thiserror::Error)]
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

#[async_trait]
pub trait Store: Send + Sync {
    /// Stores the entries, each with the next seq of its stream, then delivers them (see the
    /// module contract). Returns the mid and the seq of `reply_entry`.
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError>;

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
}
