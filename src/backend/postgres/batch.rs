//! Group commit: the appends a node makes at the same moment go to PostgreSQL together, as one
//! call of the schema's `append_batch` function, so they share one transaction, one commit and
//! one hold of each stream's row lock.
//!
//! One writer per node sends the batches one after the other, as the embedded store's writer
//! thread does: each batch carries every append queued while the previous one was in the
//! database, so the busier the node, the more each commit carries, and a quiet node still sends
//! each append on its own at once. Measured against 2, 4 and 16 writers each taking the appends
//! of a share of the streams, one writer stored the most (BENCHMARKS.md): appends to one stream
//! wait for each other's commit anyway, and a few large transactions cost the database less than
//! many small ones.
//!
//! Each append keeps its own deadline: a batch takes the earliest of its appends' deadlines, an
//! append already past its own is answered `unavailable` without being sent, and the database
//! rolls back a whole batch that reaches its commit too late, so nothing answered `unavailable`
//! is ever stored. Two appends with the same idempotency key never share a batch (the second
//! waits for the next), so the second is answered as the first one's duplicate.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row, SqlStr};
use tokio::sync::{mpsc, oneshot};

use crate::backend::sql::{self, Appends, Repeat, Tables};
use crate::protocol::UserId;
use crate::store::{AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, StoreError};

/// Most appends one batch carries.
const MAX_BATCH: usize = 256;
/// Appends that may wait for the writer; a caller beyond it waits for room.
const QUEUE: usize = 4096;

/// One queued append and where its answer goes.
struct Pending {
    request: AppendRequest,
    /// In the database's clock.
    deadline: i64,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The node's side of the writer's queue.
pub(crate) struct Batcher {
    queue: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Starts the writer, which stops once the batcher is dropped and its queue is empty.
    pub(super) fn start(tables: Arc<Tables<Postgres>>, append_batch: SqlStr) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let writer = Writer { tables, append_batch, queue: receiver, held: VecDeque::new() };
        tokio::spawn(writer.run());
        Self { queue }
    }
}

#[async_trait::async_trait]
impl Appends for Batcher {
    type Database = Postgres;

    /// Queues `request` and waits for its batch to commit, within [`sql::CALL_TIMEOUT`] of now.
    async fn append(&self, tables: &Tables<Postgres>, request: AppendRequest) -> Result<Appended, StoreError> {
        let deadline = tables.clock.write_deadline();
        let until = tokio::time::Instant::now() + sql::CALL_TIMEOUT;
        let answer = self.queue_one(request, deadline, until).await;
        answered(answer, until).await
    }

    /// Queues every request before awaiting any answer, so that they go in the same batch as far
    /// as it reaches.
    async fn append_all(
        &self,
        tables: &Tables<Postgres>,
        requests: Vec<AppendRequest>,
    ) -> Vec<Result<Appended, StoreError>> {
        let deadline = tables.clock.write_deadline();
        let until = tokio::time::Instant::now() + sql::CALL_TIMEOUT;
        let mut queued = Vec::with_capacity(requests.len());
        for request in requests {
            queued.push(self.queue_one(request, deadline, until).await);
        }
        let mut answers = Vec::with_capacity(queued.len());
        for answer in queued {
            answers.push(answered(answer, until).await);
        }
        answers
    }
}

type Answer = oneshot::Receiver<Result<Appended, StoreError>>;

fn closed() -> StoreError {
    StoreError::Unavailable("postgres append: the store is closed".into())
}

impl Batcher {
    /// Queues one append for the writer, waiting for room until `until`; where its answer will
    /// come.
    async fn queue_one(
        &self,
        request: AppendRequest,
        deadline: i64,
        until: tokio::time::Instant,
    ) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        match tokio::time::timeout_at(until, self.queue.send(Pending { request, deadline, reply })).await {
            Ok(sent) => sent.map_err(|_| closed())?,
            Err(_) => return Err(late()),
        }
        Ok(answer)
    }
}

/// The answer of a queued append, waited for until `until`.
async fn answered(answer: Result<Answer, StoreError>, until: tokio::time::Instant) -> Result<Appended, StoreError> {
    match tokio::time::timeout_at(until, answer?).await {
        Ok(answer) => answer.map_err(|_| closed())?,
        Err(_) => Err(late()),
    }
}

fn late() -> StoreError {
    StoreError::Unavailable(format!("postgres append: no answer within {} ms", sql::CALL_TIMEOUT.as_millis()))
}

/// The task that sends the batches.
struct Writer {
    tables: Arc<Tables<Postgres>>,
    /// The call of `append_batch`.
    append_batch: SqlStr,
    queue: mpsc::Receiver<Pending>,
    /// Appends held back for the next batch.
    held: VecDeque<Pending>,
}

impl Writer {
    /// Runs the batches one after the other, until the queue closes.
    async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            if !batch.is_empty() {
                run(&self.tables, &self.append_batch, batch).await;
            }
        }
    }

    /// The appends for one batch: whatever is held back or queued, up to [`MAX_BATCH`], waiting
    /// for the first if there is none. Appends already past their deadline are answered at once.
    /// `None` once the queue is closed and empty.
    async fn next_batch(&mut self) -> Option<Vec<Pending>> {
        if self.held.is_empty() {
            let first = self.queue.recv().await?;
            self.held.push_back(first);
        }
        let now = self.tables.clock.now();
        let mut batch = Vec::new();
        let mut keys = HashSet::new();
        let mut held = VecDeque::new();
        let mut waiting = std::mem::take(&mut self.held);
        while batch.len() < MAX_BATCH {
            let pending = match waiting.pop_front() {
                Some(pending) => pending,
                None => match self.queue.try_recv() {
                    Ok(pending) => pending,
                    Err(_) => break,
                },
            };
            if pending.deadline < now {
                let late = "postgres append: waited past its deadline in the queue: nothing was stored";
                let _ = pending.reply.send(Err(StoreError::Unavailable(late.into())));
            } else if pending.request.idempotency.as_ref().is_some_and(|key| !keys.insert(key.clone())) {
                held.push_back(pending);
            } else {
                batch.push(pending);
            }
        }
        // What was held back goes first next time, in its order.
        held.extend(waiting);
        self.held = held;
        Some(batch)
    }
}

/// Sends one batch and answers each of its appends.
async fn run(tables: &Tables<Postgres>, append_batch: &SqlStr, batch: Vec<Pending>) {
    let deadline = batch.iter().map(|p| p.deadline).min().unwrap_or(i64::MIN);
    let columns = Columns::of(&batch);
    let rows = tables
        .calls
        .run("postgres append", Repeat::Unsafe, || columns.bind(tables, append_batch, deadline).fetch_all(&tables.pool))
        .await;
    let answers: Vec<Option<Result<Appended, StoreError>>> = match rows {
        Err(e) => vec![Some(Err(e)); batch.len()],
        Ok(rows) => {
            let mut answers = vec![None; batch.len()];
            for row in &rows {
                match answer(row, &batch) {
                    Ok((index, appended)) => answers[index] = Some(appended),
                    Err(e) => tracing::error!(error = %e, "postgres append: unreadable answer"),
                }
            }
            answers
        }
    };
    for (pending, answer) in batch.into_iter().zip(answers) {
        let answer = answer.unwrap_or_else(|| Err(sql::malformed("no answer for an append of the batch")));
        let _ = pending.reply.send(answer);
    }
}

/// One row of `append_batch`'s answer: which append (1-based), whether it was a duplicate, its
/// mid and its seqs in entry order.
fn answer(row: &PgRow, batch: &[Pending]) -> Result<(usize, Result<Appended, StoreError>), sqlx::Error> {
    let index = usize::try_from(row.try_get::<i32, _>(0)? - 1).unwrap_or(usize::MAX);
    let Some(pending) = batch.get(index) else {
        return Err(sqlx::Error::Protocol(format!("append_batch answered for append {index}")));
    };
    let duplicate: bool = row.try_get(1)?;
    let mid: String = row.try_get(2)?;
    let seqs: Vec<i64> = row.try_get(3)?;
    let mid = Arc::from(mid);
    let appended = if duplicate {
        match seqs.first() {
            Some(&seq) => Ok(Appended { mid, seq: seq as u64, duplicate, seqs: Vec::new(), published: false }),
            None => Err(sql::malformed("duplicate without seq")),
        }
    } else if seqs.len() != pending.request.entries.len() {
        Err(sql::malformed("a seq count that is not the entry count"))
    } else {
        let seqs: Vec<u64> = seqs.into_iter().map(|s| s as u64).collect();
        let seq = seqs[pending.request.reply_entry];
        Ok(Appended { mid, seq, duplicate, seqs, published: false })
    };
    Ok((index, appended))
}

/// A batch as the function's array parameters.
struct Columns<'a> {
    mids: Vec<&'a str>,
    senders: Vec<&'a str>,
    recipients: Vec<Option<&'a str>>,
    rooms: Vec<Option<&'a str>>,
    bodies: Vec<&'a str>,
    ts: Vec<i64>,
    scopes: Vec<Option<&'a str>>,
    keys: Vec<Option<&'a str>>,
    replies: Vec<i32>,
    entry_messages: Vec<i32>,
    entry_streams: Vec<String>,
}

impl<'a> Columns<'a> {
    fn of(batch: &'a [Pending]) -> Self {
        let mut columns = Columns {
            mids: Vec::with_capacity(batch.len()),
            senders: Vec::with_capacity(batch.len()),
            recipients: Vec::with_capacity(batch.len()),
            rooms: Vec::with_capacity(batch.len()),
            bodies: Vec::with_capacity(batch.len()),
            ts: Vec::with_capacity(batch.len()),
            scopes: Vec::with_capacity(batch.len()),
            keys: Vec::with_capacity(batch.len()),
            replies: Vec::with_capacity(batch.len()),
            entry_messages: Vec::with_capacity(batch.len() * 2),
            entry_streams: Vec::with_capacity(batch.len() * 2),
        };
        for (index, pending) in (1..).zip(batch) {
            let request = &pending.request;
            let message = &request.message;
            columns.mids.push(&message.mid);
            columns.senders.push(&message.from);
            columns.recipients.push(message.to.as_ref().map(UserId::as_str));
            columns.rooms.push(message.room.as_ref().map(|r| r.as_str()));
            columns.bodies.push(&message.body);
            columns.ts.push(sql::bigint(message.ts));
            columns.scopes.push(request.idempotency.as_ref().map(|(scope, _)| scope.as_str()));
            columns.keys.push(request.idempotency.as_ref().map(|(_, key)| key.as_str()));
            columns.replies.push(request.reply_entry as i32 + 1);
            for entry in &request.entries {
                columns.entry_messages.push(index);
                columns.entry_streams.push(entry.stream.key());
            }
        }
        columns
    }

    fn bind<'q>(
        &'q self,
        tables: &Tables<Postgres>,
        append_batch: &SqlStr,
        deadline: i64,
    ) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(append_batch.clone())
            .bind(deadline)
            .bind(sql::bigint(tables.retention.max_messages))
            .bind(IDEMPOTENCY_WINDOW_MS as i64)
            .bind(&self.mids)
            .bind(&self.senders)
            .bind(&self.recipients)
            .bind(&self.rooms)
            .bind(&self.bodies)
            .bind(&self.ts)
            .bind(&self.scopes)
            .bind(&self.keys)
            .bind(&self.replies)
            .bind(&self.entry_messages)
            .bind(&self.entry_streams)
    }
}
