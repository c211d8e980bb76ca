//! One behavioural suite for every store backend: the embedded store, and Redis (on
//! `SWITCHYARD_TEST_REDIS` or 127.0.0.1:6379, with a unique key prefix). Without a Redis the
//! Redis half is skipped with a printed reason, except under `CI=true`, where it fails.

use std::sync::Arc;

use super::*;
use crate::bus::{SessionId, Topic};
use crate::backend::embedded::EmbeddedStore;
use crate::backend::redis::{Keys, RedisStore};
use crate::message::Message;
use crate::protocol::{RoomName, new_mid, now_ms};

const RETENTION: Retention = Retention { max_messages: 5, ttl_ms: 3_600_000 };

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// A message to `room` and the entry of its stream.
fn room_entry(room: &str, body: &str) -> (Message, Entry) {
    let room = RoomName::parse(room).unwrap();
    let ts = now_ms();
    let message =
        Message { mid: new_mid(ts), from: Arc::from("alice"), to: None, room: Some(room.clone()), body: Arc::from(body), ts };
    let entry = Entry { stream: StreamId::Room(room.clone()), topic: Topic::Room(room), exclude: Some(SessionId(7)) };
    (message, entry)
}

fn append((message, entry): (Message, Entry), key: Option<&str>) -> AppendRequest {
    AppendRequest {
        message,
        entries: vec![entry],
        reply_entry: 0,
        idempotency: key.map(|k| ("u:alice".to_owned(), k.to_owned())),
    }
}

async fn conformance(store: &dyn Store) {
    // Seqs start at 1, per stream, with no gap.
    for i in 1..=3 {
        let a = store.append(append(room_entry("a", &i.to_string()), None)).await.unwrap();
        assert_eq!((a.seq, a.duplicate), (i, false));
    }
    assert_eq!(store.append(append(room_entry("b", "1"), None)).await.unwrap().seq, 1);

    // A message to two streams gets each stream's next seq and one mid.
    let ts = now_ms();
    let message = Message {
        mid: new_mid(ts),
        from: Arc::from("alice"),
        to: Some(user("bob")),
        room: None,
        body: Arc::from("\"dm\""),
        ts,
    };
    let to_bob = Entry { stream: StreamId::User(user("bob")), topic: Topic::User(user("bob")), exclude: None };
    let copy = Entry { stream: StreamId::User(user("alice")), topic: Topic::User(user("alice")), exclude: None };
    let request = AppendRequest { message: message.clone(), entries: vec![to_bob, copy], reply_entry: 1, idempotency: None };
    let sent = store.append(request).await.unwrap();
    assert_eq!((sent.seq, &sent.seqs[..]), (1, &[1, 1][..]), "the reply carries the sender's stream seq");
    for party in ["bob", "alice"] {
        let slice = store.read(&StreamId::User(user(party)), HistoryQuery::Last { limit: 10 }).await.unwrap();
        assert_eq!(slice.messages, vec![StoredMessage { seq: 1, message: message.clone() }], "{party}'s copy");
    }

    // Idempotency: the same key answers the first append and stores nothing.
    let first = store.append(append(room_entry("a", "k"), Some("key-1"))).await.unwrap();
    let again = store.append(append(room_entry("a", "k"), Some("key-1"))).await.unwrap();
    assert_eq!((again.mid.clone(), again.seq, again.duplicate), (first.mid.clone(), first.seq, true));
    assert_eq!(
        store
            .read(&StreamId::Room(RoomName::parse("a").unwrap()), HistoryQuery::Last { limit: 0 })
            .await
            .unwrap()
            .last_seq,
        4
    );

    // Retention keeps the last 5; reads answer ascending slices and the last seq.
    for i in 5..=8 {
        store.append(append(room_entry("a", &i.to_string()), None)).await.unwrap();
    }
    let a = StreamId::Room(RoomName::parse("a").unwrap());
    let seqs = |slice: &Slice| slice.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let all = store.read(&a, HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    assert_eq!((seqs(&all), all.last_seq), (vec![4, 5, 6, 7, 8], 8));
    assert_eq!(seqs(&store.read(&a, HistoryQuery::After { since: 5, limit: 2 }).await.unwrap()), vec![6, 7]);
    assert_eq!(seqs(&store.read(&a, HistoryQuery::Before { before: 7, limit: 2 }).await.unwrap()), vec![5, 6]);
    assert_eq!(seqs(&store.read(&a, HistoryQuery::Before { before: 1, limit: 2 }).await.unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(&store.read(&a, HistoryQuery::Last { limit: 2 }).await.unwrap()), vec![7, 8]);
    let never =
        store.read(&StreamId::Room(RoomName::parse("never").unwrap()), HistoryQuery::Last { limit: 5 }).await.unwrap();
    assert_eq!((never.messages.len(), never.last_seq), (0, 0));

    // Cursors only move forward.
    let carol = user("carol");
    assert_eq!(store.cursor(&carol).await.unwrap(), 0);
    store.ack(&carol, 5).await.unwrap();
    store.ack(&carol, 3).await.unwrap();
    assert_eq!(store.cursor(&carol).await.unwrap(), 5);
    assert!(store.ready().await);
}

/// Retention by age, with [`SHORT_TTL`]: expired messages are never read, yet a page that starts
/// among them is still full, however far the backend got in removing them. Message 4 keeps the
/// stream itself alive (a Redis stream expires a TTL after its last append) while 1-3 expire.
async fn expiry_conformance(store: &dyn Store) {
    let pause = std::time::Duration::from_millis(SHORT_TTL.ttl_ms * 7 / 10);
    for i in 1..=10 {
        if matches!(i, 4 | 5) {
            tokio::time::sleep(pause).await;
        }
        store.append(append(room_entry("old", &i.to_string()), None)).await.unwrap();
    }
    let old = StreamId::Room(RoomName::parse("old").unwrap());
    let seqs = |slice: Slice| slice.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let page = store.read(&old, HistoryQuery::After { since: 0, limit: 5 }).await.unwrap();
    assert_eq!(page.last_seq, 10);
    assert_eq!(seqs(page), vec![4, 5, 6, 7, 8]);
    assert_eq!(seqs(store.read(&old, HistoryQuery::Last { limit: 20 }).await.unwrap()), (4..=10).collect::<Vec<_>>());

    // Trimming an expired head stops at the first live message, however long the head: 1-20
    // expire, 21-40 are live when appending 41-48 makes the backend look at the head.
    let mixed = |i: u64| append(room_entry("mixed", &i.to_string()), None);
    for i in 1..=20 {
        store.append(mixed(i)).await.unwrap();
    }
    tokio::time::sleep(pause).await;
    for i in 21..=40 {
        store.append(mixed(i)).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(SHORT_TTL.ttl_ms * 4 / 10)).await;
    for i in 41..=48 {
        store.append(mixed(i)).await.unwrap();
    }
    let stream = StreamId::Room(RoomName::parse("mixed").unwrap());
    let all = store.read(&stream, HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    assert_eq!(seqs(all), (21..=48).collect::<Vec<_>>(), "live messages were trimmed with the expired ones");
}

const SHORT_TTL: Retention = Retention { max_messages: 100, ttl_ms: 1000 };

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), RETENTION).unwrap();
    conformance(&store).await;
    store.close().await;
}

#[tokio::test]
async fn embedded_store_expires_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), SHORT_TTL).unwrap();
    expiry_conformance(&store).await;
    store.close().await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let url = std::env::var("SWITCHYARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let client = crate::backend::redis::client(&url).unwrap();
    let conn =
        match tokio::time::timeout(std::time::Duration::from_secs(3), crate::backend::redis::commands(&client, &url)).await {
            Ok(Ok(conn)) => conn,
            other => {
                let why = format!("no Redis at {url}: {:?}", other.map(|r| r.err()));
                assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{why}");
                eprintln!("SKIP redis_store_conforms: {why}");
                return;
            }
        };
    let prefix = format!("sy-test-store-{:016x}", fastrand::u64(..));
    let keys = Keys::new(&prefix);
    let clock = Arc::new(crate::backend::redis::RedisClock::default());
    clock.sample(&mut conn.clone()).await.unwrap();
    conformance(&RedisStore::new(conn.clone(), clock.clone(), keys.clone(), RETENTION, false)).await;
    expiry_conformance(&RedisStore::new(conn.clone(), clock, keys.clone(), SHORT_TTL, true)).await;
    let streams =
        ["room:a", "room:b", "room:never", "room:old", "user:bob", "user:alice"].map(|s| StreamId::parse(s).unwrap());
    let mut doomed: Vec<String> = streams.iter().flat_map(|s| [keys.seq(s), keys.log(s)]).collect();
    doomed.extend([keys.cursor(&user("carol")), keys.idempotency("u:alice", "key-1")]);
    let _: i64 = ::redis::cmd("DEL").arg(doomed).query_async(&mut conn.clone()).await.unwrap();
}
