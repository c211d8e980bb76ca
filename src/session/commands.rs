//! The client commands of PROTOCOL.md §3, one method each.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use tokio::time::Instant;

use super::ratelimit::Verdict;
use super::{SeqSet, Session, Stashed, Stop, StreamState};
use crate::node::{DirectMessage, Prepared, RoomMessage, UserPresence};
use crate::protocol::{
    Command, ErrorCode, HistoryQuery, PresenceQuery, ProtocolError, RoomName, StreamId, encode_error, encode_message,
    encode_reply, parse_command, write_message,
};
use crate::store::StoredMessage;
use crate::ws::Incoming;

#[derive(Serialize)]
struct Empty {}

/// What a catch-up read from the store owes the session: the stream's last seq, whether
/// retention dropped part of it, the frames the session does not have yet, in seq order, and
/// the acceptance time of the oldest of them (`u64::MAX` when there is none).
pub(super) struct Backlog {
    pub last: u64,
    pub truncated: bool,
    /// A message after `since` that the session never had is no longer kept (retention or TTL
    /// removed it first): a repair of live delivery cannot make the session whole.
    pub expired: bool,
    pub frames: Vec<Bytes>,
    pub oldest: u64,
}

#[derive(Serialize)]
pub(super) struct Accepted {
    pub mid: Arc<str>,
    pub seq: u64,
}

#[derive(Serialize)]
struct Joined<'a> {
    room: &'a RoomName,
    seq: u64,
    truncated: bool,
}

#[derive(Serialize)]
struct Synced {
    seq: u64,
    truncated: bool,
}

#[derive(Serialize)]
struct UsersPresence<'a> {
    users: BTreeMap<&'a str, UserPresence>,
}

#[derive(Serialize)]
struct RoomPresence<'a> {
    room: &'a RoomName,
    count: usize,
    users: Vec<crate::protocol::UserId>,
}

#[derive(Serialize)]
struct History {
    messages: Box<RawValue>,
    last_seq: u64,
}

/// Most `send` and `publish` commands appended together (see [`Session::pipeline`]).
const PIPELINE: usize = 32;

/// Most rooms the `presence` reply lists.
const ROOM_PRESENCE_LIMIT: usize = 1000;

/// Encodes the messages of `stream` as one JSON array of `message` frames.
pub fn raw_list(stream: &StreamId, messages: &[StoredMessage]) -> Box<RawValue> {
    let mut out = Vec::with_capacity(2 + messages.iter().map(|m| 192 + m.message.body.len()).sum::<usize>());
    out.push(b'[');
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message(&mut out, Some((stream, m.seq)), &m.message);
    }
    out.push(b']');
    let text = String::from_utf8(out).unwrap_or_else(|_| "[]".to_owned());
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::from_string("[]".to_owned()).expect("[] is JSON"))
}

impl<S: crate::ws::Transport> Session<S> {
    pub(super) async fn execute(&mut self, id: Option<Box<RawValue>>, command: Command) -> Result<(), Stop> {
        match command {
            command @ (Command::Send { .. } | Command::Publish { .. }) => self.pipeline(id, command).await,
            Command::Join { room, since } => match self.join(&room, since).await {
                Ok((seq, truncated, backlog)) => {
                    self.answer(id.as_deref(), Ok(Joined { room: &room, seq, truncated })).await?;
                    self.write(backlog).await
                }
                Err(e) => self.answer::<Empty>(id.as_deref(), Err(e)).await,
            },
            Command::Sync { since } => match self.sync(since).await {
                Ok((seq, truncated, backlog)) => {
                    self.answer(id.as_deref(), Ok(Synced { seq, truncated })).await?;
                    self.write(backlog).await
                }
                Err(e) => self.answer::<Empty>(id.as_deref(), Err(e)).await,
            },
            Command::Leave { room } => {
                let result = self.leave(&room).await.map(|()| Empty {});
                self.answer(id.as_deref(), result).await
            }
            Command::Ack { seq } => {
                let result = self.node.ack(&self.handle.info.user, seq).await.map(|()| Empty {});
                self.answer(id.as_deref(), result).await
            }
            Command::Presence(PresenceQuery::Users(users)) => {
                let result = self.node.user_presence(&users).await;
                let result =
                    result.map(|list| UsersPresence { users: users.iter().map(|u| u.as_str()).zip(list).collect() });
                self.answer(id.as_deref(), result).await
            }
            Command::Presence(PresenceQuery::Room(room)) => {
                let result = self.room_presence(&room).await;
                self.answer(id.as_deref(), result).await
            }
            Command::History { stream, query } => {
                let result = self.history(&stream, query).await;
                self.answer(id.as_deref(), result).await
            }
            Command::Ping => self.answer(id.as_deref(), Ok(Empty {})).await,
        }
    }

    /// Replies when the command carried an id; errors are sent either way.
    async fn answer<T: Serialize>(
        &mut self,
        id: Option<&RawValue>,
        result: Result<T, ProtocolError>,
    ) -> Result<(), Stop> {
        let frame = match (result, id) {
            (Ok(fields), Some(id)) => encode_reply(id, fields),
            (Ok(_), None) => return Ok(()),
            (Err(e), id) => encode_error(id, &e),
        };
        self.write([frame]).await
    }

    fn stream(&mut self, stream: StreamId) -> &mut StreamState {
        self.streams.entry(stream).or_default()
    }

    /// Runs a `send` or `publish` together with those the client sent right behind it, as far
    /// as they already arrived whole (none is waited for): their messages are appended together,
    /// in order, each on its own, and the replies written together. The store then takes them in
    /// one call and the nodes receive them together, so every member's socket gets them in one
    /// write. The first frame that is not such a command is stashed for the loop.
    pub(super) async fn pipeline(&mut self, id: Option<Box<RawValue>>, command: Command) -> Result<(), Stop> {
        let next = self.ws.next_buffered();
        if let Ok(None) = next {
            // Alone, the common case: no vectors.
            let result = match self.prepare(command) {
                Ok((message, stream)) => self.node.append_one(message).await.map(|a| self.accepted(stream, a)),
                Err(e) => Err(e),
            };
            return self.answer(id.as_deref(), result).await;
        }
        let mut next = Some(next);
        let mut commands = vec![(id, command)];
        while commands.len() < PIPELINE {
            let frame = match next.take().unwrap_or_else(|| self.ws.next_buffered()) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    self.stash(Err(e), None);
                    break;
                }
            };
            let Incoming::Text(text) = &frame else {
                self.stash(Ok(frame), None);
                break;
            };
            let parsed = parse_command(text);
            let Ok(command @ (Command::Send { .. } | Command::Publish { .. })) = parsed.command else {
                self.stash(Ok(frame), None);
                break;
            };
            self.last_heard = Instant::now();
            match self.limiter.check(self.last_heard.into_std()) {
                Verdict::Allow => commands.push((parsed.id, command)),
                verdict => {
                    self.stash(Ok(frame), Some(verdict));
                    break;
                }
            }
        }
        let mut prepared = Vec::with_capacity(commands.len());
        let mut checked = Vec::with_capacity(commands.len());
        for (id, command) in commands {
            match self.prepare(command) {
                Ok((message, stream)) => {
                    prepared.push(message);
                    checked.push((id, Ok(stream)));
                }
                Err(e) => checked.push((id, Err(e))),
            }
        }
        let mut appended = self.node.append_all(prepared).await.into_iter();
        let mut replies = Vec::with_capacity(checked.len());
        for (id, stream) in checked {
            let result = stream.and_then(|stream| {
                let appended = appended.next().expect("an answer per append")?;
                Ok(self.accepted(stream, appended))
            });
            match (result, id) {
                (Ok(fields), Some(id)) => replies.push(encode_reply(&id, fields)),
                (Ok(_), None) => {}
                (Err(e), id) => replies.push(encode_error(id.as_deref(), &e)),
            }
        }
        self.write(replies).await
    }

    /// The reply to a stored `send` or `publish`, whose seq in `stream` the session now has.
    pub(super) fn accepted(&mut self, stream: StreamId, appended: crate::store::Appended) -> Accepted {
        self.stream(stream).seen.insert(appended.seq);
        Accepted { mid: appended.mid, seq: appended.seq }
    }

    pub(super) fn stash(&mut self, frame: Result<Incoming, crate::ws::Error>, verdict: Option<Verdict>) {
        self.stashed = Some(Box::new(Stashed { frame, verdict }));
    }

    /// The append of a `send` or `publish`, and the stream whose seq the reply carries.
    pub(super) fn prepare(&self, command: Command) -> Result<(Prepared, StreamId), ProtocolError> {
        let user = &self.handle.info.user;
        match command {
            Command::Send { to, body, key } => {
                let msg = DirectMessage {
                    from: Arc::from(user.as_str()),
                    sender: Some((user.clone(), Some(self.handle.info.session))),
                    to,
                    body: Arc::from(body.get()),
                    key,
                };
                Ok((self.node.prepare_direct(msg), StreamId::User(user.clone())))
            }
            Command::Publish { room, body, key } => {
                if !self.rooms.contains(&room) {
                    let text = format!("join room {room} before publishing to it");
                    return Err(ProtocolError::new(ErrorCode::NotMember, text));
                }
                let msg = RoomMessage {
                    from: Arc::from(user.as_str()),
                    sender: Some((user.clone(), self.handle.info.session)),
                    room: room.clone(),
                    body: Arc::from(body.get()),
                    key,
                };
                Ok((self.node.prepare_room(msg), StreamId::Room(room)))
            }
            _ => Err(ProtocolError::bad_request("only send and publish are appended")),
        }
    }

    /// Joins (or re-joins) a room and reads its backlog. Live messages already flow to the
    /// session when the store is read, which is what closes the race with concurrent publishes.
    pub(super) async fn join(
        &mut self,
        room: &RoomName,
        since: Option<u64>,
    ) -> Result<(u64, bool, Vec<Bytes>), ProtocolError> {
        if !self.node.may_enter(&self.identity, room) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("room {room} needs a `rooms` claim in your token"),
            ));
        }
        let limit = self.node.config.max_rooms_per_session;
        if self.rooms.len() >= limit && !self.rooms.contains(room) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("a session may be in at most {limit} rooms (--max-rooms-per-session): leave one first"),
            ));
        }
        if self.rooms.insert(room.clone())
            && let Err(e) = self.node.join(room, &self.handle).await
        {
            self.rooms.remove(room);
            let _ = self.node.leave(room, &self.handle.info.user, self.handle.info.session).await;
            return Err(e);
        }
        self.catch_up(StreamId::Room(room.clone()), since).await
    }

    pub(super) async fn sync(&mut self, since: Option<u64>) -> Result<(u64, bool, Vec<Bytes>), ProtocolError> {
        let since = match since {
            Some(since) => since,
            None => self.node.cursor(&self.handle.info.user).await?,
        };
        self.catch_up(StreamId::User(self.handle.info.user.clone()), Some(since)).await
    }

    /// With `since`: the kept messages after it that this session does not have yet. Without:
    /// nothing, and everything up to the stream's current end counts as had.
    async fn catch_up(
        &mut self,
        stream: StreamId,
        since: Option<u64>,
    ) -> Result<(u64, bool, Vec<Bytes>), ProtocolError> {
        let Some(since) = since else {
            let last = self.node.last_seq(&stream).await?;
            let state = self.stream(stream);
            state.seen.insert_range(1, last);
            state.live_from = Some(state.live_from.map_or(last, |from| from.min(last)));
            return Ok((last, false, Vec::new()));
        };
        let Backlog { last, truncated, frames: backlog, .. } = self.read_missing(stream.clone(), since).await?;
        let state = self.stream(stream);
        state.live_from = Some(state.live_from.map_or(since, |from| from.min(since)).min(last));
        Ok((last, truncated, backlog))
    }

    /// The kept messages after `since` that the session does not have, marked as had. When the
    /// stream is shorter than `since` or than a seq the session has (its store lost data and
    /// restarted its seqs), what the session had of it no longer means anything and is
    /// forgotten: every kept message is delivered, as `truncated`.
    pub(super) async fn read_missing(&mut self, stream: StreamId, since: u64) -> Result<Backlog, ProtocolError> {
        let mut caught = self.node.catch_up(&stream, since).await?;
        let had = self.streams.get(&stream).and_then(|s| s.seen.last());
        let lost = since > caught.slice.last_seq || had.is_some_and(|had| had > caught.slice.last_seq);
        if lost && since > 0 && since <= caught.slice.last_seq {
            caught = self.node.catch_up(&stream, 0).await?;
            caught.truncated = true;
        }
        let state = self.streams.entry(stream.clone()).or_default();
        let first_kept = caught.slice.messages.first().map_or(caught.slice.last_seq + 1, |m| m.seq);
        let expired = !lost && state.seen.next_missing(since + 1) < first_kept;
        if lost {
            state.seen = SeqSet::default();
        } else if expired {
            // Gone by retention: nothing can deliver them any more, so they are not owed either
            // (a catch-up answers `truncated`; a repair closes the session, see
            // `write_recovered`). Else the next live message would start a repair for them.
            state.seen.insert_range(since + 1, first_kept - 1);
        }
        let mut oldest = u64::MAX;
        let stomp = self.stomp.as_ref();
        // A STOMP session without a subscription to the stream takes none of it, and has none.
        let follows = stomp.is_none_or(|stomp| stomp.follows(&stream));
        let frames = caught
            .slice
            .messages
            .iter()
            .filter(|m| follows && state.seen.insert(m.seq))
            .filter_map(|m| {
                oldest = oldest.min(m.message.ts);
                match stomp {
                    None => Some(encode_message(Some((&stream, m.seq)), &m.message)),
                    Some(stomp) => stomp.encode_stored(&stream, m.seq, &m.message),
                }
            })
            .collect();
        Ok(Backlog { last: caught.slice.last_seq, truncated: caught.truncated, expired, frames, oldest })
    }

    pub(super) async fn leave(&mut self, room: &RoomName) -> Result<(), ProtocolError> {
        if !self.rooms.remove(room) {
            return Err(ProtocolError::new(ErrorCode::NotMember, format!("not a member of room {room}")));
        }
        let stream = StreamId::Room(room.clone());
        if let Some(repair) = &mut self.repair {
            repair.held.remove(&stream);
        }
        self.streams.remove(&stream);
        self.node.leave(room, &self.handle.info.user, self.handle.info.session).await
    }

    async fn room_presence<'r>(&mut self, room: &'r RoomName) -> Result<RoomPresence<'r>, ProtocolError> {
        if !self.node.may_enter(&self.identity, room) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("room {room} needs a `rooms` claim in your token"),
            ));
        }
        let (count, users) = self.node.room_presence(room, ROOM_PRESENCE_LIMIT).await?;
        Ok(RoomPresence { room, count, users })
    }

    async fn history(&mut self, stream: &StreamId, query: HistoryQuery) -> Result<History, ProtocolError> {
        if !self.node.may_read(&self.identity, stream) {
            return Err(ProtocolError::new(ErrorCode::Forbidden, format!("you may not read {stream}")));
        }
        let slice = self.node.history(stream, query).await?;
        Ok(History { messages: raw_list(stream, &slice.messages), last_seq: slice.last_seq })
    }
}
