//! One behavioural suite for every store backend, each check its own test per backend, so that
//! the first failure hides none of the others: the embedded store; Redis
//! (`SWITCHYARD_TEST_REDIS`, default 127.0.0.1:6379), PostgreSQL (`SWITCHYARD_TEST_POSTGRES`) and
//! MySQL or MariaDB (`SWITCHYARD_TEST_MYSQL`), each test with a unique prefix that it removes at
//! the end. A test whose server is absent is skipped with a printed reason, except under
//! `CI=true`, where it fails. The stores that several nodes share also run the checks of
//! [`shared`] with two instances ("nodes") on one prefix.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::*;
use crate::backend::embedded::EmbeddedStore;
use crate::backend::mysql::MysqlStore;
use crate::backend::nats::NatsStore;
use crate::backend::postgres::PostgresStore;
use crate::backend::redis::{Keys, Publish, RedisStore};
use crate::bus::{SessionId, Topic};
use crate::message::Message;
use crate::protocol::{RoomName, new_mid, now_ms};

pub(crate) mod checks;
pub(crate) mod shared;

/// Retention of most checks: 5 messages, an hour.
pub(crate) const RETENTION: Retention = Retention { max_messages: 5, ttl_ms: 3_600_000 };
/// Retention by age: one second.
// Long enough that the appends between the check's pauses fit in it on a loaded 2-core machine
// (at 1 s, the MySQL variant failed there: 27 appends outlasted 0.6 of the TTL).
pub(crate) const SHORT_TTL: Retention = Retention { max_messages: 100, ttl_ms: 3000 };
/// Retention that keeps everything a test writes.
pub(crate) const KEEP_ALL: Retention = Retention { max_messages: 100_000, ttl_ms: 3_600_000 };

type Teardown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A store under test and what removes its data afterwards.
pub(crate) struct Subject {
    pub(crate) store: Arc<dyn Store>,
    teardown: Option<Teardown>,
}

impl Subject {
    pub(crate) fn new(store: Arc<dyn Store>, teardown: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { store, teardown: Some(Box::pin(teardown)) }
    }

    /// Removes the test's data and closes the store.
    pub(crate) async fn finish(mut self) {
        if let Some(teardown) = self.teardown.take() {
            teardown.await;
        }
        self.store.close().await;
    }
}

pub(crate) use crate::testing::{absent, unique_prefix};

pub(crate) fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

pub(crate) fn room(name: &str) -> StreamId {
    StreamId::Room(RoomName::parse(name).unwrap())
}

/// A message from alice to the room `name`.
pub(crate) fn to_room(name: &str, body: &str) -> AppendRequest {
    let room = RoomName::parse(name).unwrap();
    let ts = now_ms();
    let message = Message {
        mid: new_mid(ts),
        from: Arc::from("alice"),
        to: None,
        room: Some(room.clone()),
        body: Arc::from(body),
        ts,
    };
    let entry = Entry { stream: StreamId::Room(room.clone()), topic: Topic::Room(room), exclude: Some(SessionId(7)) };
    AppendRequest { message, entries: vec![entry], reply_entry: 0, idempotency: None }
}

/// A direct message from `from` to `to`: the recipient's copy, then the sender's.
pub(crate) fn direct(from: &str, to: &str, body: &str) -> AppendRequest {
    let ts = now_ms();
    let message =
        Message { mid: new_mid(ts), from: Arc::from(from), to: Some(user(to)), room: None, body: Arc::from(body), ts };
    let entry =
        |name: &str| Entry { stream: StreamId::User(user(name)), topic: Topic::User(user(name)), exclude: None };
    AppendRequest { message, entries: vec![entry(to), entry(from)], reply_entry: 1, idempotency: None }
}

/// `request` with alice's idempotency key `key`.
pub(crate) fn keyed(mut request: AppendRequest, key: &str) -> AppendRequest {
    request.idempotency = Some(("u:alice".to_owned(), key.to_owned()));
    request
}

/// The seqs of a slice.
pub(crate) fn seqs(slice: &Slice) -> Vec<u64> {
    slice.messages.iter().map(|m| m.seq).collect()
}

/// The body of a stored message.
pub(crate) fn body_of(stored: &StoredMessage) -> String {
    stored.message.body.to_string()
}

pub(crate) async fn open_embedded(_prefix: String, retention: Retention) -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), retention, crate::config::DataSync::Always).unwrap();
    Some(Subject::new(Arc::new(store), async move { drop(dir) }))
}

pub(crate) async fn open_redis(prefix: String, retention: Retention) -> Option<Subject> {
    open_redis_as(prefix, retention, Publish::No, 0).await
}

/// Redis that publishes inside its append script, as when it is the bus too.
pub(crate) async fn open_redis_fused(prefix: String, retention: Retention) -> Option<Subject> {
    open_redis_as(prefix, retention, Publish::Plain, 0).await
}

/// The test Redis Cluster (`scripts/redis-cluster.sh start`), publishing with `SPUBLISH`.
pub(crate) async fn open_redis_cluster(prefix: String, retention: Retention) -> Option<Subject> {
    open_redis_as(prefix, retention, Publish::Sharded, 0).await
}

/// The test Redis Cluster, acknowledging appends once a replica has them.
pub(crate) async fn open_redis_cluster_waiting(prefix: String, retention: Retention) -> Option<Subject> {
    open_redis_as(prefix, retention, Publish::Sharded, 1).await
}

async fn open_redis_as(prefix: String, retention: Retention, publish: Publish, wait: usize) -> Option<Subject> {
    let redis = match publish {
        Publish::Sharded => crate::testing::TestRedis::start_cluster("redis cluster store").await?,
        _ => crate::testing::TestRedis::start("redis store").await?,
    };
    let keys = match publish {
        Publish::Sharded => Keys::cluster(&prefix),
        _ => Keys::new(&prefix),
    };
    let store = RedisStore::new(redis.conn.clone(), redis.clock.clone(), keys, retention, publish, wait);
    let redis = crate::testing::TestRedis { prefix, ..redis };
    Some(Subject::new(Arc::new(store), async move { redis.flush().await }))
}

pub(crate) fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub(crate) fn mysql_url() -> String {
    std::env::var("SWITCHYARD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// `SWITCHYARD_TEST_NATS`, else the NATS (with JetStream) on the default port.
pub(crate) fn nats_url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub(crate) async fn open_nats(prefix: String, retention: Retention) -> Option<Subject> {
    let url = nats_url();
    let options = async_nats::ConnectOptions::new().connection_timeout(std::time::Duration::from_secs(3));
    let client = match options.connect(url.as_str()).await {
        Ok(client) => client,
        Err(e) => return absent("nats store", &format!("no NATS at {url}: {e}")),
    };
    let store = Arc::new(NatsStore::open(client, &prefix, retention, 1).await.expect("JetStream answers"));
    let owner = store.clone();
    Some(Subject::new(store, async move { owner.destroy().await }))
}

pub(crate) async fn open_postgres(prefix: String, retention: Retention) -> Option<Subject> {
    let store = match PostgresStore::connect(&postgres_url(), &prefix, retention).await {
        Ok(store) => Arc::new(store),
        Err(e) => return absent("postgres store", &format!("{e:#}")),
    };
    let owner = store.clone();
    Some(Subject::new(store, async move { owner.drop_schema().await.unwrap() }))
}

pub(crate) async fn open_mysql(prefix: String, retention: Retention) -> Option<Subject> {
    let store = match MysqlStore::connect(&mysql_url(), &prefix, retention).await {
        Ok(store) => Arc::new(store),
        Err(e) => return absent("mysql store", &format!("{e:#}")),
    };
    let owner = store.clone();
    Some(Subject::new(store, async move { owner.drop_schema().await.unwrap() }))
}

/// One test per check of [`checks`] for the backend that `$open` (an async
/// `fn(prefix, retention) -> Option<Subject>`) opens.
macro_rules! store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! check {
                ($check:ident, $retention:expr) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        let Some(subject) = ($open)(unique_prefix(), $retention).await else { return };
                        checks::$check(&*subject.store).await;
                        subject.finish().await;
                    }
                };
            }

            check!(seqs_start_at_one_per_stream, RETENTION);
            check!(a_direct_message_gets_one_mid_and_a_seq_per_stream, RETENTION);
            check!(bodies_come_back_verbatim, RETENTION);
            check!(a_repeated_key_stores_nothing, RETENTION);
            check!(keys_raced_on_one_store_are_stored_once, KEEP_ALL);
            check!(appends_sent_together_are_stored_in_order, KEEP_ALL);
            check!(retention_keeps_the_last_messages, RETENTION);
            check!(reads_answer_ascending_slices, RETENTION);
            check!(a_stream_never_written_is_empty, RETENTION);
            check!(cursors_only_move_forward, RETENTION);
            check!(ready_answers, RETENTION);
            check!(expired_messages_are_never_read, SHORT_TTL);
        }
    };
}

store_suite!(embedded, open_embedded);
store_suite!(redis, open_redis);
store_suite!(redis_fused, open_redis_fused);
store_suite!(redis_cluster, open_redis_cluster);
store_suite!(redis_cluster_waiting, open_redis_cluster_waiting);
store_suite!(postgres, open_postgres);
store_suite!(mysql, open_mysql);
store_suite!(nats, open_nats);

shared::shared_suite!(redis_shared, open_redis);
shared::shared_suite!(redis_cluster_shared, open_redis_cluster);
shared::shared_suite!(postgres_shared, open_postgres);
shared::shared_suite!(mysql_shared, open_mysql);
shared::shared_suite!(nats_shared, open_nats);

/// What only a Redis Cluster shows: a direct message goes to Redis in two steps, one per slot (see
/// `backend/redis/split.rs`). A second step that fails is made to fail by a sender's seq that is
/// not a number, which makes its script stop before it writes anything.
mod redis_cluster_steps {
    use super::*;
    use crate::backend::redis::conn::slot;
    use crate::testing::TestRedis;

    /// The store under test, its keys and the test Redis Cluster.
    async fn open(test: &str) -> Option<(RedisStore, Keys, TestRedis)> {
        let redis = TestRedis::start_cluster(test).await?;
        let keys = redis.keys();
        let store = RedisStore::new(redis.conn.clone(), redis.clock.clone(), keys.clone(), KEEP_ALL, Publish::No, 0);
        Some((store, keys, redis))
    }

    /// Breaks (`Some`) or mends (`None`) the sender's stream: a seq that is not a number.
    async fn sender_seq(redis: &TestRedis, keys: &Keys, value: Option<&str>) {
        let key = keys.seq(&StreamId::User(user("bob")));
        let mut conn = redis.conn.clone();
        let _: () = match value {
            Some(value) => ::redis::cmd("SET").arg(&key).arg(value).query_async(&mut conn).await.unwrap(),
            None => ::redis::cmd("DEL").arg(&key).query_async(&mut conn).await.map(|_: i64| ()).unwrap(),
        };
    }

    async fn stream(store: &RedisStore, name: &str) -> Vec<(u64, String, String)> {
        let slice =
            store.read(&StreamId::User(user(name)), HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
        slice.messages.iter().map(|m| (m.seq, m.message.mid.to_string(), body_of(m))).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_two_streams_of_a_direct_message_are_in_two_slots() {
        let keys = Keys::cluster("t");
        let (alice, bob) = (StreamId::User(user("alice")), StreamId::User(user("bob")));
        assert_ne!(slot(keys.seq(&alice).as_bytes()), slot(keys.seq(&bob).as_bytes()), "the test needs two slots");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_stored_message_is_completed_by_a_retry_with_its_key_and_stored_once() {
        let Some((store, keys, redis)) = open("redis cluster, half a direct message").await else { return };
        sender_seq(&redis, &keys, Some("broken")).await;
        let first = keyed(direct("bob", "alice", "hi"), "k1");
        let e = store.append(first.clone()).await.expect_err("the sender's step fails");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert_eq!(stream(&store, "alice").await.len(), 1, "the recipient's step was stored");
        sender_seq(&redis, &keys, None).await;

        // The client's retry: another mid (a new request), the same key.
        let retry = keyed(direct("bob", "alice", "hi"), "k1");
        let answer = store.append(retry).await.unwrap();
        assert!(answer.duplicate, "the message existed: the retry answers it");
        assert_eq!(&*answer.mid, &*first.message.mid, "the first mid");
        let (alice, bob) = (stream(&store, "alice").await, stream(&store, "bob").await);
        assert_eq!(alice, vec![(1, first.message.mid.to_string(), "hi".into())]);
        assert_eq!(bob, alice, "the sender's stream has it once, under the first mid");
        assert_eq!(answer.seq, 1, "the seq of the reply entry (the sender's)");
        let again = store.append(keyed(direct("bob", "alice", "hi"), "k1")).await.unwrap();
        assert!(again.duplicate && again.mid == answer.mid);
        assert_eq!((stream(&store, "alice").await.len(), stream(&store, "bob").await.len()), (1, 1));
        redis.flush().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_stored_message_without_a_key_is_completed_by_the_node() {
        let Some((store, keys, redis)) = open("redis cluster, half an unkeyed message").await else { return };
        sender_seq(&redis, &keys, Some("broken")).await;
        let message = direct("bob", "alice", "unkeyed");
        store.append(message.clone()).await.expect_err("the sender's step fails");
        sender_seq(&redis, &keys, None).await;
        let mut bob = Vec::new();
        for _ in 0..100 {
            bob = stream(&store, "bob").await;
            if !bob.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let expected = vec![(1, message.message.mid.to_string(), "unkeyed".to_owned())];
        assert_eq!(bob, expected, "the node completed the sender's step");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(stream(&store, "alice").await, expected, "and stored nothing twice");
        assert_eq!(stream(&store, "bob").await, expected);
        redis.flush().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_whose_first_step_fails_is_in_no_stream() {
        let Some((store, keys, redis)) = open("redis cluster, failed first step").await else { return };
        let key = keys.seq(&StreamId::User(user("alice")));
        let _: () = ::redis::cmd("SET").arg(&key).arg("broken").query_async(&mut redis.conn.clone()).await.unwrap();
        store.append(direct("bob", "alice", "never")).await.expect_err("the recipient's step fails");
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(stream(&store, "bob").await.is_empty(), "nothing in the sender's stream either");
        redis.flush().await;
    }
}
