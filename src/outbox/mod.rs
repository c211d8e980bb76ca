//! The outbox: messages that applications write into a table of their own database, inside the
//! transaction of their business write, and that nodes started with `--outbox` deliver
//! (docs/outbox.md).
//!
//! A source ([`Outbox`], one per SQL backend) claims the oldest rows in a transaction that locks
//! them and skips rows other consumers hold, so that nodes consume side by side. The consumer
//! appends each row through the node exactly like an API call and deletes it in that same
//! transaction once the append answered. The invariants:
//! - **nothing lost**: a row leaves the outbox only in the transaction that saw its append
//!   answered, or moved to the dead-letter table with its reason;
//! - **nothing duplicated**: every append carries an idempotency key fixed per row (its `key`, or
//!   `outbox:<id>`), so a row appended by a consumer that died before committing the delete is a
//!   no-op when another consumer appends it again within the store's 10-minute key window;
//! - **per-destination order**: a claimed row waits while an older row of the same user or room
//!   is held by another consumer, so each destination's rows arrive in id order;
//! - **nothing stuck**: a row that can never be delivered is dead-lettered at once and never
//!   blocks the rows behind it; a failure that may pass (the store is unavailable) leaves the row
//!   in place and retries after a bounded back-off.
//!
//! Bounded: one transaction at a time per consumer, at most [`BATCH`] rows each.

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::node::{DirectMessage, Node, RoomMessage};
use crate::protocol::{ErrorCode, ProtocolError, RoomName, UserId, checked_body, valid_name};

/// Rows claimed per transaction.
pub(crate) const BATCH: usize = 100;
/// Longest a single database statement or commit may take before the batch is given up.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an append may take; past it the row is left for a retry (its key makes that safe).
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a batch in flight may still run once the node is shutting down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How soon a consumer whose claimed rows all wait for older ones held elsewhere looks again:
/// the other consumer's commit sends no notification.
const BLOCKED_RETRY: Duration = Duration::from_millis(100);
/// Longest idempotency key a row may carry, as for the server API.
const MAX_KEY_LEN: usize = 256;

/// One row of the outbox table, as the application wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OutboxRow {
    pub id: i64,
    pub to_user: Option<String>,
    pub to_room: Option<String>,
    /// JSON text, delivered verbatim.
    pub body: String,
    /// Shown as `from`; `None` is "system".
    pub sender: Option<String>,
    /// The application's idempotency key, if it gave one.
    pub key: Option<String>,
}

/// The destination columns of a row that a claim did not lock but that is older than one it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Older {
    pub id: i64,
    pub to_user: Option<String>,
    pub to_room: Option<String>,
}

/// Rows locked by one open transaction of a source.
pub(crate) struct Claim {
    /// The locked rows, in id order.
    pub rows: Vec<OutboxRow>,
    /// Every row with an id below the largest locked one, locked or not (the source may include
    /// the locked rows themselves): what tells which locked rows must wait for older ones.
    pub older: Vec<Older>,
    pub txn: Box<dyn ClaimTxn>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OutboxError {
    /// The database did not answer, refused a statement or timed out; the transaction is lost
    /// and every row it held stays in the outbox.
    #[error("outbox database: {0}")]
    Unavailable(String),
}

/// A source of outbox rows: a table in a SQL database.
#[async_trait]
pub(crate) trait Outbox: Send + Sync {
    /// Begins a transaction and locks up to `limit` of the oldest rows that no other transaction
    /// holds (skipping, never waiting for, locked ones). Answers them in id order, with the
    /// [`Older`] rows the consumer needs to keep each destination in order.
    async fn claim(&self, limit: usize) -> Result<Claim, OutboxError>;

    /// Resolves when new rows may have been committed: at a notification where the database
    /// sends them, else after a polling period; in both cases at the latest after the source's
    /// fallback period, so that a missed notification never strands a row.
    async fn wait(&self);
}

/// The open transaction of a [`Claim`]. Dropping it without [`ClaimTxn::commit`] rolls back:
/// every claimed row stays in the outbox and is unlocked (so is it when the connection dies).
#[async_trait]
pub(crate) trait ClaimTxn: Send {
    /// Deletes a delivered row (visible to others once committed).
    async fn delete(&mut self, id: i64) -> Result<(), OutboxError>;

    /// Moves a row to the dead-letter table with `reason` and the time of failure.
    async fn dead_letter(&mut self, id: i64, reason: &str) -> Result<(), OutboxError>;

    /// Commits the deletes and moves; the rows not touched are released as they were.
    async fn commit(self: Box<Self>) -> Result<(), OutboxError>;
}

/// Starts consuming `outbox` for `node` until the node's shutdown signal. One transaction at a
/// time; a batch in flight at shutdown gets [`SHUTDOWN_GRACE`] to finish, after which it is
/// dropped (and rolled back) like a batch of a node that died.
pub(crate) fn spawn(node: Arc<Node>, outbox: Arc<dyn Outbox>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(node, outbox))
}

async fn run(node: Arc<Node>, outbox: Arc<dyn Outbox>) {
    let mut shutdown = node.shutdown.clone();
    let mut backoff = Backoff::default();
    while !shutdown.started() {
        let pass = consume(&node, outbox.as_ref());
        tokio::pin!(pass);
        let result = tokio::select! {
            result = &mut pass => result,
            _ = shutdown.wait() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut pass).await {
                Ok(result) => result,
                Err(_) => break,
            },
        };
        let pause = match result {
            Ok(Pass::Busy) => {
                backoff.reset();
                continue;
            }
            Ok(Pass::Idle) => {
                backoff.reset();
                None
            }
            Ok(Pass::Blocked) => Some(BLOCKED_RETRY),
            Err(stall) => {
                let delay = backoff.next();
                match stall {
                    Stall::Database(e) => {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "outbox: batch failed");
                    }
                    Stall::Append { id, error } => tracing::warn!(
                        row = id,
                        error = %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "outbox: the node could not append a row; it stays in the outbox"
                    ),
                }
                Some(delay)
            }
        };
        tokio::select! {
            _ = async {
                match pause {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => outbox.wait().await,
                }
            } => {}
            _ = shutdown.wait() => break,
        }
    }
}

/// What one batch did.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// It delivered or dead-lettered rows: there may be more.
    Busy,
    /// It found no row.
    Idle,
    /// Every row it claimed waits for an older row of its destination held by another consumer.
    Blocked,
}

/// Why a batch stopped early. The rows it had finished are committed when the database allows.
enum Stall {
    Database(OutboxError),
    /// The append of a row failed in a way that may pass; the row and those behind it stay.
    Append {
        id: i64,
        error: String,
    },
}

impl From<OutboxError> for Stall {
    fn from(e: OutboxError) -> Self {
        Self::Database(e)
    }
}

/// Runs one database call with [`DB_TIMEOUT`].
async fn timed<T>(call: impl Future<Output = Result<T, OutboxError>>) -> Result<T, OutboxError> {
    tokio::time::timeout(DB_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(OutboxError::Unavailable(format!("no answer within {DB_TIMEOUT:?}"))))
}

/// Claims a batch, delivers what may go now in id order, and commits.
async fn consume(node: &Node, outbox: &dyn Outbox) -> Result<Pass, Stall> {
    let Claim { rows, older, mut txn } = timed(outbox.claim(BATCH)).await?;
    let claimed = rows.len();
    let rows = deliverable(rows, &older);
    if rows.is_empty() {
        timed(txn.commit()).await?;
        return Ok(if claimed == 0 { Pass::Idle } else { Pass::Blocked });
    }
    let (mut delivered, mut dead, mut stall) = (0u64, Vec::new(), None);
    for row in rows {
        let message = match check(&row, node.config.max_message_size) {
            Ok(message) => message,
            Err(reason) => {
                timed(txn.dead_letter(row.id, &reason)).await?;
                dead.push((row.id, reason));
                continue;
            }
        };
        match tokio::time::timeout(APPEND_TIMEOUT, message.deliver(node)).await {
            Ok(Ok(())) => {
                timed(txn.delete(row.id)).await?;
                delivered += 1;
            }
            Ok(Err(e)) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal) => {
                stall = Some(Stall::Append { id: row.id, error: e.to_string() });
                break;
            }
            Ok(Err(e)) => {
                let reason = format!("the node refused it: {e}");
                timed(txn.dead_letter(row.id, &reason)).await?;
                dead.push((row.id, reason));
            }
            Err(_) => {
                let error = format!("no answer within {APPEND_TIMEOUT:?}");
                stall = Some(Stall::Append { id: row.id, error });
                break;
            }
        }
    }
    timed(txn.commit()).await?;
    node.metrics.outbox_delivered.inc_by(delivered);
    node.metrics.outbox_dead_letters.inc_by(dead.len() as u64);
    for (id, reason) in dead {
        // Never the body: it is the application's data and may be large or private.
        tracing::warn!(row = id, reason = %reason, "outbox: row moved to the dead-letter table");
    }
    match stall {
        Some(stall) => Err(stall),
        None => Ok(Pass::Busy),
    }
}

/// The claimed rows that may be delivered now, in id order. A row waits (stays in the outbox for
/// a later batch) while a row of the same user or room with a smaller id is outside this claim:
/// held by another consumer, or committed after the claim's snapshot. Whoever holds the oldest
/// row of a destination is never made to wait, so some consumer always progresses.
pub(crate) fn deliverable(rows: Vec<OutboxRow>, older: &[Older]) -> Vec<OutboxRow> {
    let claimed: HashSet<i64> = rows.iter().map(|r| r.id).collect();
    let (mut users, mut rooms) = (HashMap::<&str, i64>::new(), HashMap::<&str, i64>::new());
    for o in older.iter().filter(|o| !claimed.contains(&o.id)) {
        for (oldest, name) in [(&mut users, &o.to_user), (&mut rooms, &o.to_room)] {
            if let Some(name) = name {
                let id = oldest.entry(name.as_str()).or_insert(o.id);
                *id = (*id).min(o.id);
            }
        }
    }
    let waits = |oldest: &HashMap<&str, i64>, name: &Option<String>, id: i64| {
        name.as_deref().and_then(|n| oldest.get(n)).is_some_and(|&first| first < id)
    };
    rows.into_iter().filter(|r| !waits(&users, &r.to_user, r.id) && !waits(&rooms, &r.to_room, r.id)).collect()
}

/// Where a valid row goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    User(UserId),
    Room(RoomName),
}

/// A row that passed [`check`]: what the node appends.
#[derive(Debug)]
struct Message {
    target: Target,
    from: Arc<str>,
    body: Arc<str>,
    key: String,
}

impl Message {
    async fn deliver(self, node: &Node) -> Result<(), ProtocolError> {
        let Self { target, from, body, key } = self;
        let key = Some(key);
        match target {
            Target::User(to) => node.send_direct(DirectMessage { from, sender: None, to, body, key }).await?,
            Target::Room(room) => node.publish_room(RoomMessage { from, sender: None, room, body, key }).await?,
        };
        Ok(())
    }
}

/// The idempotency key of a row: the application's `key` when it gave one (the same key an API
/// call with the same `from` would use, so both paths deduplicate together), else one made of
/// the row id. Either is fixed for the row, so appending it again is a no-op.
fn row_key(row: &OutboxRow) -> String {
    match &row.key {
        Some(key) => key.clone(),
        None => format!("outbox:{}", row.id),
    }
}

/// Validates a row as the server API validates a request; `Err` is the reason the row can never
/// be delivered (it names the column, never repeats the body).
fn check(row: &OutboxRow, max_message_size: usize) -> Result<Message, String> {
    const NAME: &str = "1-128 characters of A-Z a-z 0-9 _ . : @ -";
    let target = match (&row.to_user, &row.to_room) {
        (Some(_), Some(_)) => return Err("both to_user and to_room are set; set exactly one".into()),
        (None, None) => return Err("neither to_user nor to_room is set; set exactly one".into()),
        (Some(user), None) => {
            Target::User(UserId::parse(user).map_err(|_| format!("to_user is not a valid user id (use {NAME})"))?)
        }
        (None, Some(room)) => {
            Target::Room(RoomName::parse(room).map_err(|_| format!("to_room is not a valid room name (use {NAME})"))?)
        }
    };
    let from = match &row.sender {
        None => Arc::from("system"),
        Some(sender) if valid_name(sender) => Arc::from(sender.as_str()),
        Some(_) => return Err(format!("sender is not a valid name (use {NAME})")),
    };
    if row.key.as_ref().is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN) {
        return Err(format!("key must be 1-{MAX_KEY_LEN} bytes"));
    }
    if row.body.len() > max_message_size {
        return Err(format!("body is {} bytes, over --max-message-size ({max_message_size})", row.body.len()));
    }
    let raw: Box<RawValue> = serde_json::from_str(&row.body).map_err(|e| format!("body is not JSON: {e}"))?;
    let body = checked_body(raw).map_err(|e| e.message)?;
    Ok(Message { target, from, body: Arc::from(body.get()), key: row_key(row) })
}

/// Exponential back-off between [`BACKOFF_MIN`] and [`BACKOFF_MAX`], with jitter so that nodes
/// that failed together do not retry together.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = BACKOFF_MIN.saturating_mul(1 << self.failures.min(16)).min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.75 + fastrand::f64() / 2.0).min(BACKOFF_MAX)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn row(id: i64, to_user: Option<&str>, to_room: Option<&str>, body: &str) -> OutboxRow {
        OutboxRow {
            id,
            to_user: to_user.map(str::to_owned),
            to_room: to_room.map(str::to_owned),
            body: body.to_owned(),
            sender: None,
            key: None,
        }
    }

    fn older(id: i64, to_user: Option<&str>, to_room: Option<&str>) -> Older {
        Older { id, to_user: to_user.map(str::to_owned), to_room: to_room.map(str::to_owned) }
    }

    #[test]
    fn a_valid_row_becomes_a_message() {
        let m = check(&row(7, Some("bob"), None, " {\"a\": [1, 2]} "), 1024).unwrap();
        assert_eq!(m.target, Target::User(UserId::parse("bob").unwrap()));
        assert_eq!(&*m.from, "system");
        assert_eq!(&*m.body, "{\"a\": [1, 2]}", "verbatim but for the whitespace around it");
        assert_eq!(m.key, "outbox:7");

        let mut r = row(8, None, Some("lobby"), "\"hi\"");
        r.sender = Some("shop".into());
        r.key = Some("order-42".into());
        let m = check(&r, 1024).unwrap();
        assert_eq!(m.target, Target::Room(RoomName::parse("lobby").unwrap()));
        assert_eq!((&*m.from, m.key.as_str()), ("shop", "order-42"), "the application's key wins");
    }

    #[test]
    fn every_bad_row_has_a_reason() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let cases = [
            (row(1, Some("bob"), Some("lobby"), "1"), "both to_user and to_room"),
            (row(2, None, None, "1"), "neither to_user nor to_room"),
            (row(3, Some("bob smith"), None, "1"), "to_user is not a valid user id"),
            (row(4, None, Some(&"r".repeat(129)), "1"), "to_room is not a valid room name"),
            (row(5, Some("bob"), None, "{not json"), "body is not JSON"),
            (row(6, Some("bob"), None, ""), "body is not JSON"),
            (row(7, Some("bob"), None, "1 2"), "body is not JSON"),
            (row(8, Some("bob"), None, &deep), "nested more than 64"),
            (row(9, Some("bob"), None, &format!("\"{}\"", "x".repeat(300))), "over --max-message-size (256)"),
        ];
        for (r, want) in cases {
            let reason = check(&r, 256).unwrap_err();
            assert!(reason.contains(want), "row {}: {reason}", r.id);
        }
        let mut r = row(10, Some("bob"), None, "1");
        r.sender = Some("no spaces please".into());
        assert!(check(&r, 256).unwrap_err().contains("sender"));
        r.sender = None;
        r.key = Some(String::new());
        assert!(check(&r, 256).unwrap_err().contains("key must be 1-256 bytes"));
        r.key = Some("k".repeat(257));
        assert!(check(&r, 256).unwrap_err().contains("key must be 1-256 bytes"));
    }

    #[test]
    fn a_row_waits_for_an_older_row_of_its_destination_held_elsewhere() {
        let rows = vec![
            row(10, Some("alice"), None, "1"),
            row(11, Some("bob"), None, "1"),
            row(12, None, Some("lobby"), "1"),
            row(13, Some("alice"), None, "1"),
        ];
        // Row 5 (alice) is held by another consumer; row 12 is ours; 6 goes to another room.
        let seen = [older(5, Some("alice"), None), older(6, None, Some("hall")), older(12, None, Some("lobby"))];
        let ids: Vec<i64> = deliverable(rows.clone(), &seen).iter().map(|r| r.id).collect();
        assert_eq!(ids, [11, 12]);
        assert_eq!(deliverable(rows, &[]).len(), 4, "nothing older: everything goes");
    }

    #[test]
    fn backoff_is_bounded() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first >= BACKOFF_MIN.mul_f64(0.75) && first <= BACKOFF_MIN.mul_f64(1.25), "{first:?}");
        for _ in 0..40 {
            assert!(b.next() <= BACKOFF_MAX);
        }
        b.reset();
        assert!(b.next() <= BACKOFF_MIN.mul_f64(1.25));
    }
}
