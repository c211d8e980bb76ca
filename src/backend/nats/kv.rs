//! What presence and the registry do with a key-value bucket beyond a get and a put: change a key
//! by compare-and-set, erase it, remove keys by subject, and list keys with the server's clock.
//!
//! **Erased, not deleted.** A key-value delete leaves a marker per key for ever; presence
//! deletes a key at every last leave and disconnect, so markers would pile up by the number of
//! sessions and memberships ever seen. Presence's buckets allow deleting messages instead: a key
//! whose value is erased (its one message deleted from the stream) or purged by subject leaves
//! nothing. Erasing a revision is itself a compare-and-set: a bucket keeps one message per key, so
//! revision R is still there only while no one wrote the key since, and erasing it fails once
//! someone did. Writing with expected revision 0 succeeds only while the key has no message,
//! which is a create.
//!
//! **Listings carry the server's clock.** A listing is an ephemeral pull consumer that delivers
//! the last message of each key under a filter; the consumer's creation time is the server's
//! clock at the moment of the listing, so liveness is judged by the NATS servers' clocks only
//! (entry times are the server's too), whatever the clocks of the nodes say. The consumer is
//! deleted once the listing is dropped, and expires on its own if that request is lost.

use std::time::Duration;

use async_nats::datetime::DateTime;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::DeleteMessageErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;

/// How many times a compare-and-set reads a key again after another writer came first.
const RACES: usize = 64;
/// Keys delivered per request of a listing.
const PAGE: usize = 256;
/// How long the server may take to fill one page of a listing before it sends what it has.
const PAGE_WAIT: Duration = Duration::from_millis(250);
/// Longest wait for one page of a listing.
const PAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server keeps a listing's consumer that its node forgot to delete.
const LISTING_IDLE: Duration = Duration::from_secs(30);
/// JetStream's answer to deleting a sequence the stream does not hold.
const NO_MESSAGE: u64 = 10057;

/// A failed operation on a bucket, said in words for an `unavailable` answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct KvError(pub(crate) String);

/// What went wrong doing `what` to `key`.
pub(crate) fn failed(what: &str, key: &str, e: impl std::fmt::Display) -> KvError {
    KvError(format!("{what} {key}: {e}"))
}

/// What a compare-and-set makes of the value it read.
pub(crate) enum Change<T> {
    /// Write nothing; answer `T`.
    Keep(T),
    /// Write this value; answer `T` once it is written.
    Put(Vec<u8>, T),
    /// Erase the key; answer `T` once it is gone.
    Erase(T),
}

/// Reads `key`, lets `change` decide from its value (`None`: absent), and writes the change only
/// if no one wrote the key meanwhile, else reads it again (a bounded number of times).
pub(crate) async fn modify<T>(
    bucket: &kv::Store,
    key: &str,
    mut change: impl FnMut(Option<&[u8]>) -> Change<T>,
) -> Result<T, KvError> {
    for _ in 0..RACES {
        let entry = bucket.entry(key).await.map_err(|e| failed("reading", key, e))?;
        // A delete marker (written by hand: presence never writes one) counts as absent.
        let (value, revision) = match &entry {
            Some(e) if e.operation == Operation::Put => (Some(&e.value[..]), e.revision),
            Some(e) => (None, e.revision),
            None => (None, 0),
        };
        match change(value) {
            Change::Keep(answer) => return Ok(answer),
            Change::Put(value, answer) => match bucket.update(key, Bytes::from(value), revision).await {
                Ok(_) => return Ok(answer),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(failed("writing", key, e)),
            },
            Change::Erase(answer) => {
                if revision == 0 || erase(bucket, key, revision).await? {
                    return Ok(answer);
                }
            }
        }
    }
    Err(KvError(format!("{key} kept changing under {RACES} tries; try again")))
}

/// Erases revision `revision` of `key`: false when it is no longer the key's value.
pub(crate) async fn erase(bucket: &kv::Store, key: &str, revision: u64) -> Result<bool, KvError> {
    match bucket.stream.delete_message(revision).await {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), DeleteMessageErrorKind::JetStream(j) if j.error_code().0 == NO_MESSAGE) => {
            Ok(false)
        }
        Err(e) => Err(failed("erasing", key, e)),
    }
}

/// Removes every key that `filter` matches (a key, or keys with `*` and `>`), leaving nothing.
pub(crate) async fn purge(bucket: &kv::Store, filter: &str) -> Result<(), KvError> {
    let subject = format!("{}{filter}", bucket.prefix);
    bucket.stream.purge().filter(subject).await.map(|_| ()).map_err(|e| failed("removing", filter, e))
}

/// Writes `value` at `key` whatever it held.
pub(crate) async fn put(bucket: &kv::Store, key: &str, value: Bytes) -> Result<u64, KvError> {
    bucket.put(key, value).await.map_err(|e| failed("writing", key, e))
}

/// A time of the server's as ms since the epoch.
pub(crate) fn epoch_ms(time: DateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// One key of a listing.
#[derive(Debug)]
pub(crate) struct Listed {
    pub(crate) key: String,
    /// When the key's value was written, by the server's clock, in ms since the epoch.
    pub(crate) written_ms: u64,
    /// Empty in a listing of keys only.
    pub(crate) value: Bytes,
}

/// The keys under a filter as the server has them now, a page at a time; see the module docs.
/// The consumer behind it is deleted when the listing is dropped.
pub(crate) struct Listing {
    consumer: consumer::Consumer<pull::Config>,
    bucket: kv::Store,
    now_ms: u64,
    done: bool,
}

impl Listing {
    /// Starts listing the keys that `filter` matches, with their values or not.
    pub(crate) async fn start(bucket: &kv::Store, filter: &str, values: bool) -> Result<Self, KvError> {
        let config = pull::Config {
            filter_subject: format!("{}{filter}", bucket.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            headers_only: !values,
            inactive_threshold: LISTING_IDLE,
            ..Default::default()
        };
        let consumer = bucket.stream.create_consumer(config).await.map_err(|e| failed("listing", filter, e))?;
        let info = consumer.cached_info();
        let (now_ms, done) = (epoch_ms(info.created), info.num_pending == 0);
        Ok(Self { consumer, bucket: bucket.clone(), now_ms, done })
    }

    /// The next keys, or `None` once every key was listed.
    pub(crate) async fn next_page(&mut self) -> Result<Option<Vec<Listed>>, KvError> {
        if self.done {
            return Ok(None);
        }
        let filter = self.consumer.cached_info().config.filter_subject.clone();
        // A bounded wait rather than a fetch: a 2.9 server can count as pending what a listing
        // filtered on last-per-subject will not deliver (keys whose message was erased), and then
        // answers a fetch with nothing at all, where the wait ends by itself.
        let fetching = self.consumer.batch().max_messages(PAGE).expires(PAGE_WAIT).messages();
        let mut batch = match tokio::time::timeout(PAGE_TIMEOUT, fetching).await {
            Ok(batch) => batch.map_err(|e| failed("listing", &filter, e))?,
            Err(_) => return Err(failed("listing", &filter, "timed out")),
        };
        let mut page = Vec::with_capacity(PAGE);
        loop {
            let message = match tokio::time::timeout(PAGE_TIMEOUT, batch.next()).await {
                Ok(Some(message)) => message.map_err(|e| failed("listing", &filter, e))?,
                Ok(None) => break,
                Err(_) => return Err(failed("listing", &filter, "timed out")),
            };
            let info = message.info().map_err(|e| failed("listing", &filter, e))?;
            let key = message.subject.strip_prefix(self.bucket.prefix.as_str());
            if let Some(key) = key.filter(|_| kv_operation(&message) == Operation::Put) {
                page.push(Listed {
                    key: key.to_owned(),
                    written_ms: epoch_ms(info.published),
                    value: message.payload.clone(),
                });
            }
            if info.pending == 0 {
                // Nothing is left after it. A 2.9 server does not always end a fetch that it
                // could not fill, so the listing does not wait for that.
                self.done = true;
                return Ok(Some(page));
            }
        }
        // A page that is not full was the last: the fetch ends early when nothing is left.
        self.done = page.len() < PAGE;
        Ok(Some(page))
    }

    /// Every key at once, for listings known to be small (the registry's entries), and the
    /// server's clock when the listing started, in ms since the epoch.
    pub(crate) async fn all(mut self) -> Result<(u64, Vec<Listed>), KvError> {
        let mut all = Vec::new();
        while let Some(page) = self.next_page().await? {
            all.extend(page);
        }
        Ok((self.now_ms, all))
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let (stream, name) = (self.bucket.stream.clone(), self.consumer.cached_info().name.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
        }
    }
}

/// The key-value operation a message carries (a put unless its `KV-Operation` header says not).
fn kv_operation(message: &async_nats::jetstream::Message) -> Operation {
    let header = message.headers.as_ref().and_then(|h| h.get("KV-Operation"));
    match header.map(|v| v.as_str()) {
        Some("DEL") => Operation::Delete,
        Some("PURGE") => Operation::Purge,
        _ => Operation::Put,
    }
}
