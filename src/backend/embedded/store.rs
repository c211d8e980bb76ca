//! The single-node store: redb, an embedded, crash-safe B-tree in one file under `--data-dir`.
//!
//! All writes go through one thread that commits them in batches (group commit): each batch is
//! one transaction however many appends it holds, and an append is answered only after its batch
//! committed, so nothing is published that a reader could not already read. With `--data-sync
//! always` every commit is fsync'd before it is answered. With `periodic` the commits are not,
//! and one at least every [`SYNC_EVERY`] (or every [`SYNC_GAP`]` / 2` stream entries) is: redb
//! then keeps the earlier ones too. A crash loses the commits made since the last fsync; so
//! that the seqs they took are never given to other messages (a client may have them), a store
//! opened after such a crash moves every stream's last seq [`SYNC_GAP`] ahead, which the
//! [`UNSYNCED`] file in the data directory tells. Messages
//! are kept as [`Record`]s. Reads run on the blocking pool against consistent read transactions
//! and never wait for the writer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, Key, ReadableDatabase, ReadableTable, Table, TableDefinition, Value, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::DataSync;
use crate::message::Record;
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{
    AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, Slice, Store, StoreError, StoredMessage,
};

/// (stream, seq) → (accepted at ms, the message as a [`Record`]).
const MESSAGES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("records");
/// Where stores before the neutral record kept JSON frames; dropped at open.
const OLD_MESSAGES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("messages");
/// stream → (last seq ever assigned, first seq still kept).
const STREAMS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("streams");
/// user → read cursor.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// (scope, key) → (expires at ms, seq, mid).
const IDEMPOTENCY: TableDefinition<(&str, &str), (u64, u64, &str)> = TableDefinition::new("idempotency");

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 512;
/// How often expired messages and idempotency keys are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// With `--data-sync periodic`, the longest a commit waits for its fsync.
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// With `--data-sync periodic`, how far every stream's seq moves ahead after a crash: more than
/// the stream entries the commits between two fsyncs can hold.
const SYNC_GAP: u64 = 10_000;
/// Present while the store may hold commits that were not fsync'd.
const UNSYNCED: &str = "unsynced";

/// How long a readiness probe waits for the writer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

enum WriteOp {
    Append(AppendRequest, oneshot::Sender<Result<Appended, StoreError>>),
    Ack(UserId, u64, oneshot::Sender<Result<(), StoreError>>),
    Sweep,
    /// fsyncs what was committed without (`--data-sync periodic`).
    Sync,
    /// Answers once the writer reaches it: proves the writer is alive and not stuck.
    Probe(oneshot::Sender<()>),
    /// Stops the writer; answers once it has released the database.
    Close(oneshot::Sender<()>),
}

pub struct EmbeddedStore {
    /// `None` once closed; readers clone the `Arc` for the length of one read.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    writer: mpsc::Sender<WriteOp>,
    retention: Retention,
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store writer has stopped".into())
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// redb's page cache. Its default is 1 GiB, which a long-running node would fill with pages of
/// old messages; the B-tree's inner pages of a store of several GiB fit in far less.
const CACHE_BYTES: usize = 64 << 20;

/// Sends `op()` to the writer every `every`, until the store is gone.
fn tick(writer: &mpsc::Sender<WriteOp>, every: Duration, op: fn() -> WriteOp) {
    let writer = writer.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(writer) = writer.upgrade() else { break };
            if writer.send(op()).await.is_err() {
                break;
            }
        }
    });
}

/// Moves every stream's last seq [`SYNC_GAP`] ahead; answers how many streams there are.
fn skip_lost_seqs(streams: &mut Table<'_, &'static str, (u64, u64)>) -> Result<usize, redb::Error> {
    let all: Vec<(String, (u64, u64))> =
        streams.iter()?.map(|row| row.map(|(k, v)| (k.value().to_owned(), v.value()))).collect::<Result<_, _>>()?;
    for (stream, (last, first)) in &all {
        streams.insert(stream.as_str(), (last + SYNC_GAP, *first))?;
    }
    Ok(all.len())
}

/// Creates the [`UNSYNCED`] file and makes sure it is on disk before any commit goes unsynced.
fn mark_unsynced(dir: &Path, unsynced: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(unsynced)
        .map_err(|e| anyhow::anyhow!("--data-dir {}: cannot write {UNSYNCED}: {e}", dir.display()))?;
    file.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, retention: Retention, sync: DataSync) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--data-dir {}: cannot create it: {e}", dir.display()))?;
        let path = dir.join("switchyard.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| anyhow::anyhow!("--data-dir {}: cannot open {}: {e}", dir.display(), path.display()))?;
        let unsynced = dir.join(UNSYNCED);
        let crashed = unsynced.exists();
        {
            let txn = db.begin_write()?;
            txn.open_table(MESSAGES)?;
            let mut streams = txn.open_table(STREAMS)?;
            txn.open_table(CURSORS)?;
            txn.open_table(IDEMPOTENCY)?;
            if txn.delete_table(OLD_MESSAGES)? {
                tracing::warn!("dropped the history kept in the format of an earlier version; seqs go on");
            }
            if crashed {
                let moved = skip_lost_seqs(&mut streams)?;
                tracing::warn!(
                    streams = moved,
                    gap = SYNC_GAP,
                    "the store was not closed cleanly while --data-sync periodic: messages of its last moments may be lost; every stream's seqs go on after a gap"
                );
            }
            drop(streams);
            txn.commit()?;
        }
        match sync {
            DataSync::Periodic => mark_unsynced(dir, &unsynced)?,
            DataSync::Always if crashed => std::fs::remove_file(&unsynced)?,
            DataSync::Always => {}
        }
        let db = Arc::new(db);
        let (writer, rx) = mpsc::channel(4096);
        let state = Writer {
            db: db.clone(),
            retention,
            sync,
            unsynced: (sync == DataSync::Periodic).then_some(unsynced),
            pending: 0,
            synced: Instant::now(),
        };
        std::thread::Builder::new().name("store-writer".into()).spawn(move || state.run(rx))?;
        tick(&writer, SWEEP_EVERY, || WriteOp::Sweep);
        if sync == DataSync::Periodic {
            tick(&writer, SYNC_EVERY, || WriteOp::Sync);
        }
        Ok(Self { db: std::sync::RwLock::new(Some(db)), writer, retention })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(op(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    fn read_blocking(
        db: &Database,
        stream_id: &StreamId,
        query: HistoryQuery,
        ttl_ms: u64,
    ) -> Result<Slice, StoreError> {
        let key = stream_id.key();
        let stream = key.as_str();
        let txn = db.begin_read().map_err(internal)?;
        let streams = txn.open_table(STREAMS).map_err(internal)?;
        let last_seq = streams.get(stream).map_err(internal)?.map_or(0, |v| v.value().0);
        let messages = txn.open_table(MESSAGES).map_err(internal)?;
        let cutoff = now_ms().saturating_sub(ttl_ms);
        let all = (stream, 0)..=(stream, u64::MAX);
        let out = match query {
            HistoryQuery::After { since, limit } => {
                let from = (stream, since.saturating_add(1))..=(stream, u64::MAX);
                take_kept(stream_id, messages.range(from).map_err(internal)?, limit, cutoff)?
            }
            HistoryQuery::Before { before, limit } => {
                let mut out = take_kept(
                    stream_id,
                    messages.range((stream, 0)..(stream, before)).map_err(internal)?.rev(),
                    limit,
                    cutoff,
                )?;
                out.reverse();
                out
            }
            HistoryQuery::Last { limit } => {
                let mut out = take_kept(stream_id, messages.range(all).map_err(internal)?.rev(), limit, cutoff)?;
                out.reverse();
                out
            }
        };
        Ok(Slice { messages: out, last_seq })
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        self.submit(|tx| WriteOp::Append(request, tx)).await
    }

    /// Queued for the writer one after the other before any answer is awaited, so that they
    /// share a commit (and its fsync) as far as the writer's batch goes.
    async fn append_all(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            let (tx, rx) = oneshot::channel();
            let sent = self.writer.send(WriteOp::Append(request, tx)).await;
            answers.push(sent.map(|()| rx));
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(match answer {
                Ok(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
                Err(_) => Err(stopped()),
            });
        }
        results
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let db = self.db()?;
        let stream = stream.clone();
        let ttl = self.retention.ttl_ms;
        tokio::task::spawn_blocking(move || Self::read_blocking(&db, &stream, query, ttl)).await.map_err(internal)?
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let db = self.db()?;
        let user = user.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(internal)?;
            let table = txn.open_table(CURSORS).map_err(internal)?;
            Ok(table.get(user.as_str()).map_err(internal)?.map_or(0, |v| v.value()))
        })
        .await
        .map_err(internal)?
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        self.submit(|tx| WriteOp::Ack(user.clone(), seq, tx)).await
    }

    async fn ready(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        let probe = async { self.writer.send(WriteOp::Probe(tx)).await.is_ok() && rx.await.is_ok() };
        let writer_alive = tokio::time::timeout(PROBE_TIMEOUT, probe).await.unwrap_or(false);
        writer_alive && self.db().is_ok_and(|db| db.begin_read().is_ok())
    }

    async fn close(&self) {
        let released = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(released);
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

type Row = Result<
    (redb::AccessGuard<'static, (&'static str, u64)>, redb::AccessGuard<'static, (u64, &'static [u8])>),
    redb::StorageError,
>;

/// The first `limit` unexpired messages of `rows` of `stream`, in the order given.
fn take_kept(
    stream: &StreamId,
    rows: impl Iterator<Item = Row>,
    limit: usize,
    cutoff: u64,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::new();
    for row in rows {
        if out.len() >= limit {
            break;
        }
        let (key, value) = row.map_err(internal)?;
        let (ts, record) = value.value();
        if ts >= cutoff {
            let seq = key.value().1;
            let message = Record::decode(Some(stream), record)
                .ok_or_else(|| StoreError::Internal(format!("{stream} seq {seq}: unreadable record")))?;
            out.push(StoredMessage { seq, message });
        }
    }
    Ok(out)
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    retention: Retention,
    sync: DataSync,
    /// The [`UNSYNCED`] file, removed after the last fsync of a clean close (`periodic`).
    unsynced: Option<std::path::PathBuf>,
    /// Stream entries committed since the last fsync.
    pending: u64,
    /// When the last fsync was.
    synced: Instant,
}

type MessagesTable<'t> = Table<'t, (&'static str, u64), (u64, &'static [u8])>;
type IdempotencyTable<'t> = Table<'t, (&'static str, &'static str), (u64, u64, &'static str)>;

/// The tables of one write transaction, each opened on first use and kept open for the rest of
/// the batch: opening a table costs about as much as inserting a message into it.
struct Tables<'t> {
    txn: &'t WriteTransaction,
    streams: Option<Table<'t, &'static str, (u64, u64)>>,
    messages: Option<MessagesTable<'t>>,
    cursors: Option<Table<'t, &'static str, u64>>,
    idempotency: Option<IdempotencyTable<'t>>,
}

impl<'t> Tables<'t> {
    fn new(txn: &'t WriteTransaction) -> Self {
        Self { txn, streams: None, messages: None, cursors: None, idempotency: None }
    }
}

/// The table in `slot`, opened in `txn` if it is not yet.
fn open<'s, 't, K: Key + 'static, V: Value + 'static>(
    txn: &'t WriteTransaction,
    slot: &'s mut Option<Table<'t, K, V>>,
    definition: TableDefinition<K, V>,
) -> Result<&'s mut Table<'t, K, V>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(definition).map_err(internal)?);
    }
    Ok(slot.as_mut().expect("opened above"))
}

/// A written append, answered once its batch committed.
struct Pending {
    reply: oneshot::Sender<Result<Appended, StoreError>>,
    result: Appended,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = None;
        while let Some(first) = rx.blocking_recv() {
            match first {
                WriteOp::Close(reply) => closing = Some(reply),
                op => batch.push(op),
            }
            while closing.is_none() && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(WriteOp::Close(reply)) => closing = Some(reply),
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch);
            }
            if let Some(reply) = closing {
                self.close();
                let _ = reply.send(());
                return;
            }
        }
    }

    /// fsyncs what is committed and, that done, says the store holds nothing unsynced.
    fn close(self) {
        let Some(unsynced) = &self.unsynced else { return };
        if let Err(e) = self.fsync() {
            tracing::error!(error = %e, "the store's last fsync failed");
        } else if let Err(e) = std::fs::remove_file(unsynced) {
            tracing::error!(error = %e, "removing the store's unsynced mark failed");
        }
    }

    /// An empty commit with an fsync, which makes the commits before it durable too.
    fn fsync(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(internal)?;
        txn.set_durability(Durability::Immediate).map_err(internal)?;
        txn.commit().map_err(internal)
    }

    /// Whether this commit is fsync'd.
    fn durability(&self, asked: bool) -> Durability {
        let due = asked || self.pending >= SYNC_GAP / 2 || self.synced.elapsed() >= SYNC_EVERY;
        if self.sync == DataSync::Always || due { Durability::Immediate } else { Durability::None }
    }

    fn write_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut appends: Vec<Pending> = Vec::new();
        let mut acks = Vec::new();
        let asked = batch.iter().any(|op| matches!(op, WriteOp::Sync));
        if asked && self.pending == 0 && batch.iter().all(|op| matches!(op, WriteOp::Sync)) {
            batch.clear();
            return;
        }
        let durability = self.durability(asked);
        let outcome = (|| -> Result<(), StoreError> {
            let mut txn = self.db.begin_write().map_err(internal)?;
            txn.set_durability(durability).map_err(internal)?;
            let mut tables = Tables::new(&txn);
            for op in batch.drain(..) {
                match op {
                    WriteOp::Append(request, reply) => match self.append(&mut tables, request) {
                        Ok(result) => appends.push(Pending { reply, result }),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                    WriteOp::Ack(user, seq, reply) => {
                        let table = open(&txn, &mut tables.cursors, CURSORS)?;
                        let current = table.get(user.as_str()).map_err(internal)?.map_or(0, |v| v.value());
                        if seq > current {
                            table.insert(user.as_str(), seq).map_err(internal)?;
                        }
                        acks.push(reply);
                    }
                    WriteOp::Sweep => self.sweep(&mut tables)?,
                    WriteOp::Sync => {}
                    WriteOp::Probe(reply) => {
                        let _ = reply.send(());
                    }
                    // `run` never puts a close into a batch.
                    WriteOp::Close(reply) => {
                        let _ = reply.send(());
                    }
                }
            }
            drop(tables);
            txn.commit().map_err(internal)
        })();
        if outcome.is_ok() {
            if matches!(durability, Durability::Immediate) {
                (self.pending, self.synced) = (0, Instant::now());
            } else {
                self.pending += appends.iter().map(|p| p.result.seqs.len() as u64).sum::<u64>();
            }
        }
        match outcome {
            Ok(()) => {
                for pending in appends {
                    let _ = pending.reply.send(Ok(pending.result));
                }
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                for pending in appends {
                    let _ = pending.reply.send(Err(StoreError::Internal(e.to_string())));
                }
                for ack in acks {
                    let _ = ack.send(Err(StoreError::Internal(e.to_string())));
                }
            }
        }
    }

    /// Appends one request inside `txn`, returning the answer to give after the commit.
    fn append(&self, tables: &mut Tables<'_>, request: AppendRequest) -> Result<Appended, StoreError> {
        let now = now_ms();
        if let Some((scope, key)) = &request.idempotency {
            let table = open(tables.txn, &mut tables.idempotency, IDEMPOTENCY)?;
            if let Some(v) = table.get((scope.as_str(), key.as_str())).map_err(internal)? {
                let (expires, seq, mid) = v.value();
                if expires > now {
                    return Ok(Appended {
                        mid: Arc::from(mid),
                        seq,
                        duplicate: true,
                        seqs: Vec::new(),
                        published: false,
                    });
                }
            }
        }
        if request.entries.is_empty() {
            return Err(StoreError::Internal("append without entries".into()));
        }
        let mid = request.message.mid.clone();
        let record = Record::encode(&request.message);
        let streams = open(tables.txn, &mut tables.streams, STREAMS)?;
        let messages = open(tables.txn, &mut tables.messages, MESSAGES)?;
        let mut seqs = Vec::with_capacity(request.entries.len());
        for entry in &request.entries {
            let key = entry.stream.key();
            let (last, first) = streams.get(key.as_str()).map_err(internal)?.map_or((0, 1), |v| v.value());
            let seq = last + 1;
            messages.insert((key.as_str(), seq), (request.message.ts, &record[..])).map_err(internal)?;
            let mut first = first;
            while seq - first + 1 > self.retention.max_messages {
                messages.remove((key.as_str(), first)).map_err(internal)?;
                first += 1;
            }
            streams.insert(key.as_str(), (seq, first)).map_err(internal)?;
            seqs.push(seq);
        }
        let reply_seq = seqs.get(request.reply_entry).copied().unwrap_or(0);
        if let Some((scope, key)) = &request.idempotency {
            let table = open(tables.txn, &mut tables.idempotency, IDEMPOTENCY)?;
            table
                .insert((scope.as_str(), key.as_str()), (now + IDEMPOTENCY_WINDOW_MS, reply_seq, &*mid))
                .map_err(internal)?;
        }
        Ok(Appended { mid, seq: reply_seq, duplicate: false, seqs, published: false })
    }

    /// Removes expired messages and idempotency keys.
    fn sweep(&self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(self.retention.ttl_ms);
        let streams = open(tables.txn, &mut tables.streams, STREAMS)?;
        let messages = open(tables.txn, &mut tables.messages, MESSAGES)?;
        let mut moved = Vec::new();
        for item in streams.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            let (last, first) = v.value();
            let stream = k.value().to_owned();
            let mut new_first = first;
            while new_first <= last {
                let expired =
                    messages.get((stream.as_str(), new_first)).map_err(internal)?.is_none_or(|m| m.value().0 < cutoff);
                if !expired {
                    break;
                }
                new_first += 1;
            }
            if new_first != first {
                moved.push((stream, last, first, new_first));
            }
        }
        for (stream, last, first, new_first) in moved {
            for seq in first..new_first {
                messages.remove((stream.as_str(), seq)).map_err(internal)?;
            }
            streams.insert(stream.as_str(), (last, new_first)).map_err(internal)?;
        }
        let idem = open(tables.txn, &mut tables.idempotency, IDEMPOTENCY)?;
        idem.retain(|_, (expires, _, _)| expires > now).map_err(internal)?;
        Ok(())
    }
}
