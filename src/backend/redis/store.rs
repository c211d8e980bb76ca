//! The cluster store: streams in Redis, shared by every node (key layout in `keys.rs`).
//!
//! An append is one Lua script, so it is atomic per message: check the idempotency key, then for
//! each entry bump the stream's seq and `XADD` the message's [`Record`] with the retention
//! (`MAXLEN` for `--history-size`; for `--history-ttl`, up to 16 expired entries trimmed from the
//! head, looked at only when the oldest one has expired, and that one only every
//! [`AGE_CHECK_EVERY`]th seq). Redis runs scripts one at a time, so seqs are assigned once
//! cluster-wide. When the bus is the same Redis (`fused`), the script also `PUBLISH`es each entry
//! on its audience's channel: every subscriber then sees a stream's messages in seq order, and
//! nothing is published that is not readable, with no second round trip. A message published while a node's
//! subscription is down is not lost: it is in the stream, and sessions catch up by seq. A script
//! that Redis reaches after its deadline (Redis was paused past the node's response timeout)
//! writes nothing, so an append the node answered `unavailable` is never stored later.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use crate::store::{AppendRequest, Appended, IDEMPOTENCY_WINDOW_MS, Retention, Slice, Store, StoreError, StoredMessage};
use crate::bus::SessionId;
use super::RedisClock;
use crate::backend::redis as cluster;
use crate::backend::redis::keys::Keys;
use crate::message::Record;
use crate::protocol::{HistoryQuery, StreamId, UserId, now_ms};

/// KEYS: idempotency key, then (seq key, log key) per entry.
/// ARGV: now, idempotency ttl, max messages, expiry cutoff, ttl, entry count, reply entry
/// (1-based), mid, keyed (1/0), deadline (ms, see [`crate::backend::redis::WRITE_DEADLINE`]), the
/// message's record, publish (1/0), then (channel, envelope head) per entry. Answers one string:
/// `0 <mid> <seq> <seq of each entry>…`, `1 <mid> <seq>` (the first append's answer) for a
/// duplicate, or `2` without writing anything when Redis runs it after the deadline. One string
/// rather than an array: the node's RESP parser (redis-rs) costs about 1,300 instructions per
/// value it decodes, a twentieth of a direct message's cost on the node for an array of three.
const APPEND: &str = r#"
local t = redis.call('TIME')
if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[10]) then return '2' end
local keyed = ARGV[9] == '1'
if keyed then
  local prev = redis.call('GET', KEYS[1])
  if prev then return '1 ' .. prev end
end
local n = tonumber(ARGV[6])
local cutoff = tonumber(ARGV[4])
local reply_entry = tonumber(ARGV[7])
local record = ARGV[11]
local publish = ARGV[12] == '1'
local reply = '0'
local seqs = {}
for i = 1, n do
  local seqk, logk = KEYS[2 * i], KEYS[2 * i + 1]
  local a = 12 + 2 * (i - 1)
  local number = redis.call('INCR', seqk)
  -- The seq as text once: Lua formats a number with sprintf at every concatenation.
  local seq = tostring(number)
  local id = '0-' .. seq
  redis.call('XADD', logk, 'MAXLEN', ARGV[3], id, 'r', record, 't', ARGV[1])
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
  if publish then redis.call('PUBLISH', ARGV[a + 1], ARGV[a + 2] .. seq .. ' ' .. record) end
  if i == reply_entry then reply = seq end
  seqs[i] = seq
end
local answer = ARGV[8] .. ' ' .. reply
if keyed then redis.call('SET', KEYS[1], answer, 'PX', ARGV[2]) end
return '0 ' .. answer .. ' ' .. table.concat(seqs, ' ')
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

/// Bytes an append's arguments take beyond the record, and per entry: its keys, channel and
/// envelope head.
const ARGS_ROOM: usize = 256;
const ENTRY_ROOM: usize = 192;

/// How long `ready` waits for a PING.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

pub struct RedisStore {
    conn: ConnectionManager,
    clock: Arc<RedisClock>,
    keys: Keys,
    retention: Retention,
    /// Whether the bus is this same Redis, so that the append script publishes.
    fused: bool,
    append: Script,
    ack: Script,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn malformed(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected reply from redis: {what}"))
}

impl RedisStore {
    /// A store on `conn`; `fused` when the bus is the same Redis (see the module header).
    pub fn new(conn: ConnectionManager, clock: Arc<RedisClock>, keys: Keys, retention: Retention, fused: bool) -> Self {
        Self { conn, clock, keys, retention, fused, append: Script::new(APPEND), ack: Script::new(ACK) }
    }
}

/// The envelope head a subscriber decodes (see `bus/redis.rs`): `M <exclude> <stream> `,
/// followed by the seq, a space and the record.
pub(crate) fn envelope_head(exclude: Option<SessionId>, stream: &StreamId) -> Vec<u8> {
    let (kind, name) = stream.parts();
    let mut head = Vec::with_capacity(24 + kind.len() + name.len());
    head.extend_from_slice(b"M ");
    match exclude {
        Some(session) => head.extend_from_slice(&session.hex()),
        None => head.push(b'-'),
    }
    head.push(b' ');
    head.extend_from_slice(kind.as_bytes());
    head.extend_from_slice(name.as_bytes());
    head.push(b' ');
    head
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

#[async_trait]
impl Store for RedisStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        if request.entries.is_empty() {
            return Err(StoreError::Internal("append without entries".into()));
        }
        let mid = request.message.mid.clone();
        let record = Record::encode(&request.message);
        let now = now_ms();
        let idem_key = match &request.idempotency {
            Some((scope, key)) => self.keys.idempotency(scope, key),
            None => self.keys.idempotency("-", "-"),
        };
        let keys = 1 + 2 * request.entries.len();
        let n = request.entries.len();
        let mut cmd = cluster::evalsha(&self.append, keys, keys + 12 + 2 * n, ARGS_ROOM + ENTRY_ROOM * n + record.len());
        cmd.arg(idem_key);
        for entry in &request.entries {
            cmd.arg(self.keys.seq(&entry.stream)).arg(self.keys.log(&entry.stream));
        }
        cmd.arg(now)
            .arg(IDEMPOTENCY_WINDOW_MS)
            .arg(self.retention.max_messages)
            .arg(now.saturating_sub(self.retention.ttl_ms))
            .arg(self.retention.ttl_ms)
            .arg(request.entries.len())
            .arg(request.reply_entry + 1)
            .arg(&*mid)
            .arg(if request.idempotency.is_some() { "1" } else { "0" })
            .arg(self.clock.write_deadline())
            .arg(&record[..])
            .arg(if self.fused { "1" } else { "0" });
        for entry in &request.entries {
            if self.fused {
                cmd.arg(self.keys.channel(&entry.topic)).arg(envelope_head(entry.exclude, &entry.stream));
            } else {
                cmd.arg("").arg("");
            }
        }
        let mut conn = self.conn.clone();
        let answer: String = cluster::eval(&mut conn, &self.append, &cmd).await.map_err(unavailable)?;
        let mut fields = answer.split(' ');
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
        Ok(Appended { mid: Arc::from(mid), seq, duplicate, seqs, published: self.fused && !duplicate })
    }

    async fn read(&self, stream: &StreamId, query: HistoryQuery) -> Result<Slice, StoreError> {
        let log = self.keys.log(stream);
        let mut pipe = redis::pipe();
        pipe.atomic().get(self.keys.seq(stream));
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
        let mut conn = self.conn.clone();
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let range = if replies.len() > 1 { replies.pop() } else { None };
        let last_seq: Option<u64> =
            redis::from_redis_value(replies.pop().ok_or_else(|| malformed("seq"))?).map_err(|_| malformed("seq"))?;
        let cutoff = now_ms().saturating_sub(self.retention.ttl_ms);
        let mut messages: Vec<StoredMessage> = match (range, limit) {
            (Some(range), 1..) => entries(range)?
                .into_iter()
                .filter(|(_, ts, _)| *ts >= cutoff)
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
        Ok(Slice { messages, last_seq: last_seq.unwrap_or(0) })
    }

    async fn cursor(&self, user: &UserId) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let cursor: Option<u64> =
            redis::cmd("GET").arg(self.keys.cursor(user)).query_async(&mut conn).await.map_err(unavailable)?;
        Ok(cursor.unwrap_or(0))
    }

    async fn ack(&self, user: &UserId, seq: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = cluster::evalsha(&self.ack, 1, 3, 96);
        cmd.arg(self.keys.cursor(user)).arg(self.clock.write_deadline()).arg(seq);
        let _: i64 = cluster::eval(&mut conn, &self.ack, &cmd).await.map_err(unavailable)?;
        Ok(())
    }

    async fn ready(&self) -> bool {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        matches!(tokio::time::timeout(PING_TIMEOUT, ping.query_async::<String>(&mut conn)).await, Ok(Ok(_)))
    }

    async fn close(&self) {}

    fn publishes(&self) -> bool {
        self.fused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_head_names_the_excluded_session_and_the_stream() {
        let stream = StreamId::parse("room:a:b").unwrap();
        assert_eq!(envelope_head(None, &stream), b"M - room:a:b ");
        let head = envelope_head(Some(SessionId(0xff)), &StreamId::parse("user:bob").unwrap());
        assert_eq!(head, format!("M {} user:bob ", SessionId(0xff)).as_bytes());
        assert_eq!(head, b"M 00000000000000ff user:bob ");
    }
}
