//! The cluster store: streams in Redis, shared by every node (key layout in `keys.rs`).
//!
//! A node sends each append as a Lua script, and the appends made while its earlier scripts ran
//! as one script together (see [`Appends`]). The script handles its messages one after the
//! other, each atomically: check the idempotency key, then for each entry bump the stream's seq
//! and `XADD` the message's [`Record`] with the retention (`MAXLEN ~` for `--history-size`,
//! trimmed by whole stream nodes, reads skipping what is kept beyond it; for
//! `--history-ttl`, up to 16 expired entries trimmed from the head, looked at only when the
//! oldest one has expired, and that one only every [`AGE_CHECK_EVERY`]th seq). Redis runs
//! scripts one at a time, so seqs are assigned once cluster-wide. When the bus is the same Redis
//! (`fused`), the script also `PUBLISH`es each entry on its audience's channel: every subscriber
//! then sees a stream's messages in seq order, and nothing is published that is not readable,
//! with no second round trip. A message published while a node's subscription is down is not
//! lost: it is in the stream, and sessions catch up by seq. A message that Redis reaches after
//! its deadline (Redis was paused past the node's response timeout) is not written, so an
//! append the node answered `unavailable` is never stored later.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};
use tokio::sync::oneshot;

use super::{Conn, RedisClock};
use crate::backend::redis as cluster;
use crate::backend::redis::keys::Keys;
use crate::message::Record;
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};
use crate::store::{
    AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, Slice, Store, StoreError, StoredMessage,
};

/// Appends a batch of messages, one after the other, as if each were a script of its own.
///
/// KEYS, per message: its idempotency key, then (seq key, log key) per entry.
/// ARGV: now, idempotency ttl, max messages, expiry cutoff, ttl, publish (0: no, 1: `PUBLISH`,
/// 2: `SPUBLISH`), message count;
/// then per message: deadline (ms, see [`crate::backend::redis::WRITE_DEADLINE`]), mid, keyed
/// (1/0), the message's record, entry count, reply entry (1-based), then (channel, envelope head)
/// per entry. Answers one line per message, in order: `0 <mid> <seq> <seq of each entry>…`,
/// `1 <mid> <seq>` (the first append's answer) for a duplicate, or `2` without writing anything
/// when Redis reaches the message after its deadline. Lines of one string rather than an array:
/// the node's RESP parser (redis-rs) costs about 1,300 instructions per value it decodes, a
/// twentieth of a direct message's cost on the node for an array of three.
const APPEND: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cutoff = tonumber(ARGV[4])
-- '0': the bus is elsewhere; '1': PUBLISH; '2': SPUBLISH (a Redis Cluster's sharded pub/sub,
-- on a channel in the stream's slot).
local publish = ARGV[6] ~= '0' and (ARGV[6] == '2' and 'SPUBLISH' or 'PUBLISH')
local answers = {}
local k, a = 1, 8
for m = 1, tonumber(ARGV[7]) do
  local keyed, record = ARGV[a + 2] == '1', ARGV[a + 3]
  local n, reply_entry = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local late = now > tonumber(ARGV[a])
  local prev = keyed and not late and redis.call('GET', KEYS[k])
  if late then
    answers[m] = '2'
  elseif prev then
    answers[m] = '1 ' .. prev
  else
    local reply = '0'
    local seqs = {}
    for i = 1, n do
      local seqk, logk = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
      local number = redis.call('INCR', seqk)
      -- The seq as text once: Lua formats a number with sprintf at every concatenation.
      local seq = tostring(number)
      local id = '0-' .. seq
      -- Trimmed by whole nodes ('~'): exact trimming walked the stream's head on every append,
      -- a fifth of Redis's time. Reads skip what lies beyond the last ARGV[3] seqs.
      redis.call('XADD', logk, 'MAXLEN', '~', ARGV[3], id, 'r', record, 't', ARGV[1])
      -- 16 is AGE_CHECK_EVERY.
      if number % 16 == 0 then
        local first = redis.call('XRANGE', logk, '-', '+', 'COUNT', 1)[1]
        if tonumber(first[2][4]) < cutoff then
          -- Trim the expired head, at most 16 entries (as many as were appended since the last
          -- look): up to the first unexpired entry, else up to the 17th, never past it.
          local head = redis.call('XRANGE', logk, '-', '+', 'COUNT', 17)
          local keep = head[17] and head[17][1] or id
          for j = 1, math.min(16, #head) do
            if tonumber(head[j][2][4]) >= cutoff then keep = head[j][1]; break end
          end
          redis.call('XTRIM', logk, 'MINID', keep)
        end
      end
      redis.call('PEXPIRE', logk, ARGV[5])
      if publish then
        local c = a + 4 + 2 * i
        redis.call(publish, ARGV[c], ARGV[c + 1] .. seq .. ' ' .. record)
      end
      if i == reply_entry then reply = seq end
      seqs[i] = seq
    end
    local answer = ARGV[a + 1] .. ' ' .. reply
    if keyed then redis.call('SET', KEYS[k], answer, 'PX', ARGV[2]) end
    answers[m] = '0 ' .. answer .. ' ' .. table.concat(seqs, ' ')
  end
  k = k + 1 + 2 * n
  a = a + 6 + 2 * n
end
return table.concat(answers, '\n')
"#;

/// Every how many seqs of a stream an append looks for expired entries at its head. Looking
/// reads the oldest entry back into Lua, frame and all, which cost a quarter of Redis's work per
/// append when done every time. Reads skip expired entries (and read this many more, so that a
/// page is still full), so trimming later only frees their memory later, and `--history-size`
/// bounds that meanwhile.
const AGE_CHECK_EVERY: usize = 16;

/// ARGV: deadline (ms, see [`WRITE_DEADLINE`](super::WRITE_DEADLINE)), seq. Moves a cursor forward
/// only; does nothing (and answers `LATE`) when Redis runs it after the deadline.
const ACK: &str = super::write_script!(
    r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('SET', KEYS[1], ARGV[2]) end
return 0
"#
);

/// Bytes an append's arguments take beyond the record, per batch and per message, and per
/// entry: its keys, channel and envelope head.
const ARGS_ROOM: usize = 128;
const MESSAGE_ROOM: usize = 160;
const ENTRY_ROOM: usize = 192;

/// Most messages one append script carries.
const MAX_BATCH: usize = 64;
/// Most record bytes one append script carries (a message beyond it goes alone).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Append scripts a node has in Redis at once. Appends made meanwhile wait and go together in
/// the next one (see [`Appends`]).
const IN_FLIGHT: usize = 2;
/// Appends that may wait; beyond it an append is answered `unavailable` at once.
pub(super) const QUEUE: usize = 4096;

/// How long `ready` waits for a PING.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an append waits for `--redis-wait-replicas` replicas: within the response timeout.
const WAIT_TIMEOUT: Duration = Duration::from_millis(1000);

pub struct RedisStore {
    /// The connection, keys, retention and fusion the reads share with the appends.
    appends: Arc<Appends>,
    clock: Arc<RedisClock>,
    ack: Script,
}

/// One message to append.
pub(super) struct Item {
    pub(super) request: AppendRequest,
    pub(super) record: Vec<u8>,
    /// In Redis's clock.
    pub(super) deadline: u64,
}

/// A waiting append and where its answer goes.
struct Pending {
    item: Item,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// How a node's appends reach Redis: at most [`IN_FLIGHT`] scripts at once. An append made
/// while a slot is free and nobody waits is sent at once from the caller's own task, alone, so a
/// quiet node pays nothing for batching. Otherwise it waits, and whoever frees a slot sends
/// every waiting append (up to [`MAX_BATCH`]) as one script from a task of its own: a busy node
/// pays Redis's cost of calling a script once for many messages, and its subscribers receive
/// them together. The script appends the messages one after the other as separate scripts
/// would, each with its own deadline and idempotency key, so a repeat of a key in the same batch
/// is answered as the first one's duplicate. A waiting append is never sent by a caller's task,
/// whose future may be dropped: only by a task that answers it.
pub(super) struct Appends {
    pub(super) conn: Conn,
    pub(super) keys: Keys,
    retention: Retention,
    /// How the append script may publish: the bus is this same Redis (or Redis Cluster).
    pub(super) publish: Publish,
    /// Whether appends publish in their script: the bus is this Redis, and no `WAIT` comes
    /// between storing and acknowledging (`--redis-wait-replicas 0`; otherwise the node
    /// publishes once the replicas confirmed, so that no session sees a message a failover can
    /// take back).
    pub(super) fused: bool,
    /// `--redis-wait-replicas`: replicas that must confirm each append before it is answered.
    pub(super) wait_replicas: usize,
    script: Script,
    queue: Mutex<Queue>,
    pub(super) clock: Arc<RedisClock>,
    /// Appends in Redis now, on a Redis Cluster (which has no queue, see `split.rs`).
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
}

/// How the append script publishes what it stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// The bus is another server: the node publishes.
    No,
    /// The bus is this Redis: `PUBLISH`.
    Plain,
    /// The bus is this Redis Cluster: `SPUBLISH`, on the stream's own shard.
    Sharded,
}

/// How one run of the append script goes.
#[derive(Clone, Copy)]
pub(super) struct Run {
    /// Publish what it stores (when the bus is this Redis).
    pub(super) publish: bool,
    /// `WAIT` for `--redis-wait-replicas` before answering.
    pub(super) wait: bool,
}

#[derive(Default)]
struct Queue {
    in_flight: usize,
    waiting: VecDeque<Pending>,
}

impl Queue {
    /// Takes a slot when one is free and nobody waits: the caller then sends its appends itself.
    fn take_slot(&mut self) -> bool {
        let free = self.in_flight < IN_FLIGHT && self.waiting.is_empty();
        self.in_flight += usize::from(free);
        free
    }

    /// Queues `item`; where its answer will come.
    fn enqueue(&mut self, item: Item) -> oneshot::Receiver<Result<Appended, StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.waiting.push_back(Pending { item, reply });
        answer
    }

    /// The next batch of waiting appends, oldest first.
    fn batch(&mut self) -> Vec<Pending> {
        let mut bytes = 0;
        let mut batch = Vec::new();
        while let Some(next) = self.waiting.front() {
            let more = bytes + next.item.record.len();
            if batch.len() == MAX_BATCH || (!batch.is_empty() && more > MAX_BATCH_BYTES) {
                break;
            }
            bytes = more;
            batch.push(self.waiting.pop_front().expect("there is a front"));
        }
        batch
    }
}

/// Whether appends go now, from their caller's task, or wait for their answers, or find the
/// queue full.
enum Turn {
    Now(Vec<Item>),
    Wait(Vec<oneshot::Receiver<Result<Appended, StoreError>>>),
    Full(usize),
}

/// A slot taken by an append sent from its caller's task: freed when that send ends or is
/// dropped, handing it on to the appends waiting meanwhile.
struct Slot(Arc<Appends>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

pub(super) fn full() -> StoreError {
    StoreError::Unavailable(format!("redis append: {QUEUE} appends already waiting"))
}

pub(super) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

pub(super) fn malformed(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected reply from redis: {what}"))
}

impl RedisStore {
    /// A store on `conn`; `publish` says whether the bus is the same Redis (see the module
    /// header); `wait_replicas` is `--redis-wait-replicas`.
    pub fn new(
        conn: Conn,
        clock: Arc<RedisClock>,
        keys: Keys,
        retention: Retention,
        publish: Publish,
        wait_replicas: usize,
    ) -> Self {
        let appends = Arc::new(Appends {
            conn,
            keys,
            retention,
            publish,
            fused: publish != Publish::No && wait_replicas == 0,
            wait_replicas,
            script: Script::new(APPEND),
            queue: Mutex::new(Queue::default()),
            clock: clock.clone(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        });
        Self { appends, clock, ack: Script::new(ACK) }
    }

    /// One read of `stream`: the stream's last seq and the page `query` asks for, without the
    /// entries the append's trimming left beyond `--history-size` or `--history-ttl`.
    async fn read_once(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let log = self.appends.keys.log(stream);
        let mut pipe = redis::pipe();
        pipe.atomic().get(self.appends.keys.seq(stream));
        let (limit, reverse) = match query {
            HistoryQuery::After { since, limit } => {
                // Read past the expired entries the append may not have trimmed yet.
                let count = limit.max(1) + AGE_CHECK_EVERY;
                pipe.cmd("XRANGE").arg(&log).arg(format!("(0-{since}")).arg("+").arg("COUNT").arg(count);
                (limit, false)
            }
            HistoryQuery::Before { before, limit } if before > 1 => {
                pipe.cmd("XREVRANGE").arg(&log).arg(format!("(0-{before}")).arg("-").arg("COUNT").arg(limit.max(1));
                (limit, true)
            }
            HistoryQuery::Before { .. } => (0, false),
            HistoryQuery::Last { limit } => {
                pipe.cmd("XREVRANGE").arg(&log).arg("+").arg("-").arg("COUNT").arg(limit.max(1));
                (limit, true)
            }
        };
        let mut conn = self.appends.conn.clone();
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let range = if replies.len() > 1 { replies.pop() } else { None };
        let last_seq: Option<u64> =
            redis::from_redis_value(replies.pop().ok_or_else(|| malformed("seq"))?).map_err(|_| malformed("seq"))?;
        let last_seq = last_seq.unwrap_or(0);
        let cutoff = now_ms().saturating_sub(self.appends.retention.ttl_ms);
        let window = last_seq.saturating_sub(self.appends.retention.max_messages);
        let mut messages: Vec<StoredMessage> = match (range, limit) {
            (Some(range), 1..) => entries(range)?
                .into_iter()
                .filter(|(seq, ts, _)| *ts >= cutoff && *seq > window)
                .take(limit)
                .map(|(seq, _, record)| {
                    let message = Record::decode(Some(stream), &record).ok_or_else(|| malformed("record"))?;
                    Ok(StoredMessage { seq, message })
                })
                .collect::<Result<_, StoreError>>()?,
            _ => Vec::new(),
        };
        if reverse {
            messages.reverse();
        }
        Ok(Slice { messages, last_seq })
    }
}

impl Appends {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one message: [`Appends::append_all`] without its vectors, for the common case.
    async fn append(self: &Arc<Self>, item: Item) -> Result<Appended, StoreError> {
        if self.keys.tagged() {
            return self.append_split(item).await;
        }
        let answer = {
            let mut queue = self.queue();
            if queue.take_slot() {
                Ok(item)
            } else if queue.waiting.len() >= QUEUE {
                return Err(full());
            } else {
                Err(queue.enqueue(item))
            }
        };
        match answer {
            Ok(item) => {
                let _slot = Slot(self.clone());
                self.send([&item], self.run()).await.and_then(|answer| appended(&answer, self.fused))
            }
            Err(answer) => self.answer(answer, tokio::time::Instant::now() + super::RESPONSE_TIMEOUT).await,
        }
    }

    /// Appends `items` in their order, together when they fit in one script.
    async fn append_all(self: &Arc<Self>, items: Vec<Item>) -> Vec<Result<Appended, StoreError>> {
        if self.keys.tagged() {
            // One after the other: a sender's messages keep their order in its own stream even
            // when each goes to Redis in steps.
            let mut answers = Vec::with_capacity(items.len());
            for item in items {
                answers.push(self.append_split(item).await);
            }
            return answers;
        }
        let waiting = match self.turn(items) {
            Turn::Now(items) => {
                let _slot = Slot(self.clone());
                let mut answers = Vec::with_capacity(items.len());
                for chunk in items.chunks(MAX_BATCH) {
                    match self.send(chunk, self.run()).await {
                        Ok(answer) => answers.extend(lines(&answer, chunk.len(), self.fused)),
                        Err(e) => answers.extend(chunk.iter().map(|_| Err(e.clone()))),
                    }
                }
                return answers;
            }
            Turn::Wait(waiting) => waiting,
            Turn::Full(n) => return vec![Err(full()); n],
        };
        // The connection's response timeout bounds the wait: the deadline Redis checks is
        // shorter, so an append answered `unavailable` here is never stored later.
        let until = tokio::time::Instant::now() + super::RESPONSE_TIMEOUT;
        let mut answers = Vec::with_capacity(waiting.len());
        for answer in waiting {
            answers.push(self.answer(answer, until).await);
        }
        answers
    }

    /// Takes a slot for `items`, or queues them one after the other.
    fn turn(&self, items: Vec<Item>) -> Turn {
        let mut queue = self.queue();
        if queue.take_slot() {
            return Turn::Now(items);
        }
        if queue.waiting.len() + items.len() > QUEUE {
            return Turn::Full(items.len());
        }
        Turn::Wait(items.into_iter().map(|item| queue.enqueue(item)).collect())
    }

    async fn answer(
        &self,
        answer: oneshot::Receiver<Result<Appended, StoreError>>,
        until: tokio::time::Instant,
    ) -> Result<Appended, StoreError> {
        let closed = || StoreError::Unavailable("redis append: the store is closed".into());
        match tokio::time::timeout_at(until, answer).await {
            Ok(answer) => answer.map_err(|_| closed())?,
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis append: no answer within {} ms",
                super::RESPONSE_TIMEOUT.as_millis()
            ))),
        }
    }

    /// Frees a slot, or hands it to a task that sends what waits.
    fn release(self: &Arc<Self>) {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.in_flight -= 1;
            return;
        }
        let batch = queue.batch();
        drop(queue);
        tokio::spawn(self.clone().drain(batch));
    }

    /// Sends batches of waiting appends while there are any, then frees its slot.
    async fn drain(self: Arc<Self>, mut batch: Vec<Pending>) {
        loop {
            let answer = self.send(batch.iter().map(|p| &p.item), self.run()).await;
            answer_each(batch, answer, self.fused);
            let mut queue = self.queue();
            if queue.waiting.is_empty() {
                queue.in_flight -= 1;
                return;
            }
            batch = queue.batch();
        }
    }

    /// How an acknowledged append runs: publishing in its script when fused, waiting for the
    /// replicas when asked to.
    pub(super) fn run(&self) -> Run {
        Run { publish: self.fused, wait: self.wait_replicas > 0 }
    }

    /// Runs the append script on `items`; its answer, one line per item. With `run.wait`, the
    /// script and a `WAIT` go together on one connection (so the `WAIT` covers the script's
    /// writes), and an append that too few replicas confirmed is answered `unavailable`: it is
    /// on the master, and a retry with the same key answers it without storing it again.
    pub(super) async fn send<'a>(
        &self,
        items: impl IntoIterator<Item = &'a Item> + Clone,
        run: Run,
    ) -> Result<String, StoreError> {
        let command = self.command(items, run.publish);
        let mut conn = self.conn.clone();
        if !run.wait {
            return cluster::eval(&mut conn, &self.script, &command).await.map_err(unavailable);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(command).cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
        let replies: (String, usize) = match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(&mut conn).await.map_err(unavailable)?;
                pipe.query_async(&mut conn).await.map_err(unavailable)?
            }
            other => other.map_err(unavailable)?,
        };
        let (answer, confirmed) = replies;
        if confirmed < self.wait_replicas {
            return Err(StoreError::Unavailable(format!(
                "redis stored the message on its master, but {confirmed} of {} replicas confirmed it within {} ms: \
                 retry with the same key",
                self.wait_replicas,
                WAIT_TIMEOUT.as_millis()
            )));
        }
        Ok(answer)
    }

    fn command<'a>(&self, items: impl IntoIterator<Item = &'a Item> + Clone, publish: bool) -> redis::Cmd {
        let (mut count, mut entries, mut bytes) = (0, 0, 0);
        for item in items.clone() {
            count += 1;
            entries += item.request.entries.len();
            bytes += item.record.len();
        }
        let keys = count + 2 * entries;
        let args = keys + 7 + 6 * count + 2 * entries;
        let room = ARGS_ROOM + MESSAGE_ROOM * count + ENTRY_ROOM * entries + bytes;
        let mut cmd = cluster::evalsha(&self.script, keys, args, room);
        for item in items.clone() {
            let request = &item.request;
            let first = request.entries.first().map(|e| &e.stream);
            match &request.idempotency {
                Some((scope, key)) => cmd.arg(self.keys.idempotency(first, scope, key)),
                None => cmd.arg(self.keys.idempotency(first, "-", "-")),
            };
            for entry in &request.entries {
                cmd.arg(self.keys.seq(&entry.stream)).arg(self.keys.log(&entry.stream));
            }
        }
        let now = now_ms();
        cmd.arg(now)
            .arg(IDEMPOTENCY_WINDOW_MS)
            .arg(self.retention.max_messages)
            .arg(now.saturating_sub(self.retention.ttl_ms))
            .arg(self.retention.ttl_ms)
            .arg(match (publish, self.publish) {
                (false, _) | (_, Publish::No) => "0",
                (true, Publish::Plain) => "1",
                (true, Publish::Sharded) => "2",
            })
            .arg(count);
        for item in items {
            let request = &item.request;
            cmd.arg(item.deadline)
                .arg(&*request.message.mid)
                .arg(if request.idempotency.is_some() { "1" } else { "0" })
                .arg(&item.record[..])
                .arg(request.entries.len())
                .arg(request.reply_entry + 1);
            for entry in &request.entries {
                if publish && self.publish != Publish::No {
                    cmd.arg(self.keys.channel(&entry.topic))
                        .arg(crate::bus::envelope::message_head(entry.exclude, &entry.stream));
                } else {
                    cmd.arg("").arg("");
                }
            }
        }
        cmd
    }
}

/// Parses `XRANGE`/`XREVRANGE` entries into (seq, ts, record).
fn entries(value: Value) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
    let Value::Array(items) = value else { return Err(malformed("stream range")) };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else { return Err(malformed("stream entry")) };
            if pair.len() != 2 {
                return Err(malformed("stream entry"));
            }
            let fields = pair.pop().expect("two items");
            let id: String =
                redis::from_redis_value(pair.pop().expect("two items")).map_err(|_| malformed("entry id"))?;
            let seq = id.strip_prefix("0-").and_then(|s| s.parse().ok()).ok_or_else(|| malformed("entry id"))?;
            let fields: Vec<Vec<u8>> = redis::from_redis_value(fields).map_err(|_| malformed("entry fields"))?;
            let (mut record, mut ts) = (None, 0);
            let mut fields = fields.into_iter();
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                match &name[..] {
                    b"r" => record = Some(value),
                    b"t" => ts = std::str::from_utf8(&value).ok().and_then(|t| t.parse().ok()).unwrap_or(0),
                    _ => {}
                }
            }
            Ok((seq, ts, record.ok_or_else(|| malformed("entry without record"))?))
        })
        .collect()
}

/// Answers each append of a batch from its line of the script's answer (see [`APPEND`]), or
/// all of them with the batch's error.
fn answer_each(batch: Vec<Pending>, answer: Result<String, StoreError>, fused: bool) {
    let outcomes: Vec<Result<Appended, StoreError>> = match answer {
        Ok(answer) => lines(&answer, batch.len(), fused),
        Err(e) => vec![Err(e); batch.len()],
    };
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        let _ = pending.reply.send(outcome);
    }
}

/// The outcome of each of `count` appends, from the lines of the script's answer.
fn lines(answer: &str, count: usize, fused: bool) -> Vec<Result<Appended, StoreError>> {
    let mut lines = answer.split('\n');
    (0..count)
        .map(|_| match lines.next() {
            Some(line) => appended(line, fused),
            None => Err(malformed("append answer: a line short")),
        })
        .collect()
}

/// One message's line of the append script's answer.
pub(super) fn appended(line: &str, fused: bool) -> Result<Appended, StoreError> {
    let mut fields = line.split(' ');
    let duplicate = match fields.next() {
        Some("0") => false,
        Some("1") => true,
        Some("2") => {
            return Err(StoreError::Unavailable(
                "redis reached the append after its deadline: nothing was stored".into(),
            ));
        }
        _ => return Err(malformed("append answer")),
    };
    let mid = fields.next().ok_or_else(|| malformed("append answer"))?;
    let seq = fields.next().and_then(|s| s.parse().ok()).ok_or_else(|| malformed("append seq"))?;
    let seqs = fields.map(str::parse).collect::<Result<Vec<u64>, _>>().map_err(|_| malformed("append seqs"))?;
    Ok(Appended { mid: Arc::from(mid), seq, duplicate, seqs, published: fused && !duplicate })
}

#[async_trait]
impl Store for RedisStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        if request.entries.is_empty() {
            return Err(StoreError::Internal("append without entries".into()));
        }
        let record = Record::encode(&request.message);
        self.appends.append(Item { request, record, deadline: self.clock.write_deadline() }).await
    }

    async fn append_all(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        if requests.iter().any(|r| r.entries.is_empty()) {
            return requests.iter().map(|_| Err(StoreError::Internal("append without entries".into()))).collect();
        }
        let deadline = self.clock.write_deadline();
        let items = requests
            .into_iter()
            .map(|request| Item { record: Record::encode(&request.message), request, deadline })
            .collect();
        self.appends.append_all(items).await
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let slice = self.read_once(stream, query).await?;
        // Entries kept beyond `--history-size` (the append trims by whole nodes) were skipped:
        // a page cut by them is read again from the first seq still in the window.
        if let HistoryQuery::After { since, limit } = query {
            let window = slice.last_seq.saturating_sub(self.appends.retention.max_messages);
            if since < window && slice.messages.len() < limit {
                return self.read_once(stream, HistoryQuery::After { since: window, limit }).await;
            }
        }
        Ok(slice)
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let mut conn = self.appends.conn.clone();
        let cursor: Option<u64> =
            redis::cmd("GET").arg(self.appends.keys.cursor(user)).query_async(&mut conn).await.map_err(unavailable)?;
        Ok(cursor.unwrap_or(0))
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let mut conn = self.appends.conn.clone();
        let mut cmd = cluster::evalsha(&self.ack, 1, 3, 96);
        cmd.arg(self.appends.keys.cursor(user)).arg(self.clock.write_deadline()).arg(seq);
        let _: i64 = cluster::eval(&mut conn, &self.ack, &cmd).await.map_err(unavailable)?;
        Ok(())
    }

    async fn ready(&self) -> bool {
        let mut conn = self.appends.conn.clone();
        if conn.clustered() || self.appends.wait_replicas > 0 {
            return conn.ready_with_replicas(PING_TIMEOUT, self.appends.wait_replicas).await;
        }
        let ping = redis::cmd("PING");
        matches!(tokio::time::timeout(PING_TIMEOUT, ping.query_async::<String>(&mut conn)).await, Ok(Ok(_)))
    }

    async fn close(&self) {}

    fn publishes(&self) -> bool {
        self.appends.fused
    }
}
