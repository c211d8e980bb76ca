//! The checks every store passes, one per test (see `store_suite!`).

use super::*;

/// Seqs start at 1, per stream, with no gap.
pub(crate) async fn seqs_start_at_one_per_stream(store: &dyn Store) {
    for i in 1..=3 {
        let a = store.append(to_room("a", &i.to_string())).await.unwrap();
        assert_eq!((a.seq, a.duplicate), (i, false));
    }
    assert_eq!(store.append(to_room("b", "1")).await.unwrap().seq, 1);
    assert_eq!(store.read(&room("a"), HistoryQuery::Last { limit: 0 }).await.unwrap().last_seq, 3);
}

/// A message to two streams gets each stream's next seq and one mid; the reply carries the
/// sender's seq, and every entry's seq in entry order. Both copies come back field for field.
pub(crate) async fn a_direct_message_gets_one_mid_and_a_seq_per_stream(store: &dyn Store) {
    // bob's stream is ahead of alice's, so the two seqs differ.
    store.append(direct("carol", "bob", "\"first\"")).await.unwrap();
    let request = direct("alice", "bob", "{\"text\":\"dm\"}");
    let message = request.message.clone();
    let sent = store.append(request).await.unwrap();
    assert_eq!((sent.seq, &sent.seqs[..], sent.duplicate), (1, &[2, 1][..], false));
    assert_eq!(sent.mid, message.mid);
    let bob = store.read(&StreamId::User(user("bob")), HistoryQuery::Last { limit: 10 }).await.unwrap();
    assert_eq!((seqs(&bob), bob.last_seq), (vec![1, 2], 2));
    assert_eq!(bob.messages[1], StoredMessage { seq: 2, message: message.clone() }, "bob's copy");
    let alice = store.read(&StreamId::User(user("alice")), HistoryQuery::Last { limit: 10 }).await.unwrap();
    assert_eq!(alice.messages, vec![StoredMessage { seq: 1, message }], "alice's copy");
    let posted = store.append(to_room("lobby", "1")).await.unwrap();
    let lobby = store.read(&room("lobby"), HistoryQuery::Last { limit: 1 }).await.unwrap();
    assert_eq!((lobby.messages[0].message.room.as_ref().map(|r| r.as_str()), posted.seqs), (Some("lobby"), vec![1]));
}

/// The body is raw JSON text and comes back byte for byte: spacing, escapes, key order and
/// number spelling untouched.
pub(crate) async fn bodies_come_back_verbatim(store: &dyn Store) {
    let bodies = [
        r#"{"z": 1,  "a" :[1.50, 2e3, -0.0],"s":"\u00e9 é \" \\ 🚀"}"#,
        r#""plain""#,
        "[ ]",
        "12345678901234567890123",
    ];
    for body in bodies {
        store.append(to_room("verbatim", body)).await.unwrap();
    }
    let read = store.read(&room("verbatim"), HistoryQuery::After { since: 0, limit: 10 }).await.unwrap();
    let got: Vec<String> = read.messages.iter().map(body_of).collect();
    assert_eq!(got, bodies);
}

/// The same key answers the first append and stores nothing; another scope or key is another
/// message.
pub(crate) async fn a_repeated_key_stores_nothing(store: &dyn Store) {
    let first = store.append(keyed(to_room("a", "k"), "key-1")).await.unwrap();
    let again = store.append(keyed(to_room("a", "k"), "key-1")).await.unwrap();
    assert_eq!((again.mid.clone(), again.seq, again.duplicate), (first.mid.clone(), first.seq, true));
    assert!(again.seqs.is_empty(), "a duplicate stored nothing");
    let other = store.append(keyed(to_room("a", "k"), "key-2")).await.unwrap();
    assert_eq!((other.seq, other.duplicate), (2, false));
    let mut scoped = keyed(to_room("a", "k"), "key-1");
    scoped.idempotency = Some(("u:bob".into(), "key-1".into()));
    assert_eq!(store.append(scoped).await.unwrap().seq, 3, "keys are per scope");
    // A keyed direct message answers the sender's seq both times.
    let mut dm = direct("alice", "bob", "1");
    dm.idempotency = Some(("u:alice".into(), "dm-1".into()));
    let sent = store.append(dm.clone()).await.unwrap();
    let repeated = store.append(dm).await.unwrap();
    assert_eq!((repeated.mid, repeated.seq, repeated.duplicate), (sent.mid, sent.seq, true));
    assert_eq!(store.read(&room("a"), HistoryQuery::Last { limit: 10 }).await.unwrap().last_seq, 3);
    assert_eq!(store.read(&StreamId::User(user("bob")), HistoryQuery::Last { limit: 9 }).await.unwrap().last_seq, 1);
}

/// Appends raced on one store, 10 keys sent 4 times each among 20 unkeyed ones (a store that
/// groups concurrent appends puts repeats of a key in one group): each key is stored once, its
/// repeats answer the first's mid and seq, and the stream's seqs have no gap.
pub(crate) async fn keys_raced_on_one_store_are_stored_once(store: &dyn Store) {
    let appends = (0..60).map(|i| {
        let request = to_room("raced", &i.to_string());
        let request = if i % 3 == 0 { request } else { keyed(request, &format!("raced-{}", i % 10)) };
        store.append(request)
    });
    let answers: Vec<Appended> =
        futures_util::future::join_all(appends).await.into_iter().map(Result::unwrap).collect();
    let stored: Vec<&Appended> = answers.iter().filter(|a| !a.duplicate).collect();
    let mut seqs: Vec<u64> = stored.iter().map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "20 unkeyed and 10 keys stored once each");
    for duplicate in answers.iter().filter(|a| a.duplicate) {
        let first = stored.iter().find(|a| a.mid == duplicate.mid).expect("a duplicate answers a stored mid");
        assert_eq!(first.seq, duplicate.seq, "{duplicate:?}");
    }
    let read = store.read(&room("raced"), HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    assert_eq!((read.messages.len(), read.last_seq), (30, 30));
}

/// Appends sent together (a client's back-to-back commands) are stored in their order, each
/// answered on its own: a key repeated among them is the first one's duplicate, and a direct
/// message among room messages gets its seq in each of its streams.
pub(crate) async fn appends_sent_together_are_stored_in_order(store: &dyn Store) {
    let mut requests: Vec<AppendRequest> = (1..=80).map(|i| to_room("together", &i.to_string())).collect();
    requests[3] = keyed(to_room("together", "keyed"), "together-1");
    requests[5] = keyed(to_room("together", "again"), "together-1");
    requests[7] = direct("alice", "bob", "\"dm\"");
    let answers: Vec<Appended> = store.append_all(requests).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers.len(), 80);
    assert!(answers[5].duplicate && answers[5].mid == answers[3].mid && answers[5].seq == answers[3].seq);
    assert_eq!(answers[7].seqs, vec![1, 1], "the direct message's seq in bob's and alice's streams");
    let room_seqs: Vec<u64> =
        answers.iter().enumerate().filter(|(i, _)| *i != 5 && *i != 7).map(|(_, a)| a.seq).collect();
    assert_eq!(room_seqs, (1..=78).collect::<Vec<u64>>(), "stored in the order sent, once each");
    let read = store.read(&room("together"), HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    let bodies: Vec<String> = read.messages.iter().map(body_of).collect();
    assert_eq!((bodies[2].as_str(), bodies[3].as_str(), bodies[4].as_str()), ("3", "keyed", "5"));
    assert_eq!(read.last_seq, 78);
}

/// `--history-size` 5: the last 5 are kept, and seqs go on from the last one assigned. A page
/// read from before them starts at the first one kept, however many older messages a store
/// that trims lazily still holds (Redis trims by whole stream nodes).
pub(crate) async fn retention_keeps_the_last_messages(store: &dyn Store) {
    for i in 1..=40 {
        store.append(to_room("a", &i.to_string())).await.unwrap();
    }
    let all = store.read(&room("a"), HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    assert_eq!((seqs(&all), all.last_seq), (vec![36, 37, 38, 39, 40], 40));
    assert_eq!(body_of(&all.messages[0]), "36");
    let page = store.read(&room("a"), HistoryQuery::After { since: 0, limit: 2 }).await.unwrap();
    assert_eq!(seqs(&page), vec![36, 37]);
    let back = store.read(&room("a"), HistoryQuery::Before { before: 38, limit: 10 }).await.unwrap();
    assert_eq!(seqs(&back), vec![36, 37]);
    let last = store.read(&room("a"), HistoryQuery::Last { limit: 10 }).await.unwrap();
    assert_eq!(seqs(&last), vec![36, 37, 38, 39, 40]);
}

/// After, Before and Last answer ascending slices of the right length.
pub(crate) async fn reads_answer_ascending_slices(store: &dyn Store) {
    for i in 1..=5 {
        store.append(to_room("a", &i.to_string())).await.unwrap();
    }
    let a = room("a");
    let read = |query| async move { seqs(&store.read(&room("a"), query).await.unwrap()) };
    assert_eq!(read(HistoryQuery::After { since: 2, limit: 2 }).await, vec![3, 4]);
    assert_eq!(read(HistoryQuery::After { since: 4, limit: 10 }).await, vec![5]);
    assert_eq!(read(HistoryQuery::After { since: 5, limit: 10 }).await, Vec::<u64>::new());
    assert_eq!(read(HistoryQuery::After { since: 9, limit: 10 }).await, Vec::<u64>::new());
    assert_eq!(read(HistoryQuery::Before { before: 4, limit: 2 }).await, vec![2, 3]);
    assert_eq!(read(HistoryQuery::Before { before: 1, limit: 2 }).await, Vec::<u64>::new());
    assert_eq!(read(HistoryQuery::Before { before: 99, limit: 10 }).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(read(HistoryQuery::Last { limit: 2 }).await, vec![4, 5]);
    assert_eq!(read(HistoryQuery::Last { limit: 0 }).await, Vec::<u64>::new());
    let slice = store.read(&a, HistoryQuery::After { since: 0, limit: 1 }).await.unwrap();
    assert_eq!((seqs(&slice), slice.last_seq), (vec![1], 5), "last_seq is the stream's, not the page's");
}

/// A stream never written answers nothing and last seq 0.
pub(crate) async fn a_stream_never_written_is_empty(store: &dyn Store) {
    for query in [HistoryQuery::Last { limit: 5 }, HistoryQuery::After { since: 0, limit: 5 }] {
        let never = store.read(&room("never"), query).await.unwrap();
        assert_eq!((never.messages.len(), never.last_seq), (0, 0));
    }
}

/// Cursors start at 0 and only move forward.
pub(crate) async fn cursors_only_move_forward(store: &dyn Store) {
    let carol = user("carol");
    assert_eq!(store.cursor(&carol).await.unwrap(), 0);
    store.ack(&carol, 5).await.unwrap();
    store.ack(&carol, 3).await.unwrap();
    assert_eq!(store.cursor(&carol).await.unwrap(), 5);
    store.ack(&carol, 9).await.unwrap();
    assert_eq!(store.cursor(&carol).await.unwrap(), 9);
    assert_eq!(store.cursor(&user("dave")).await.unwrap(), 0, "cursors are per user");
}

pub(crate) async fn ready_answers(store: &dyn Store) {
    assert!(store.ready().await);
}

/// Retention by age, with [`SHORT_TTL`]: expired messages are never read, yet a page that starts
/// among them is still full, however far the backend got in removing them. Message 4 keeps the
/// stream itself alive (a Redis stream expires a TTL after its last append) while 1-3 expire.
pub(crate) async fn expired_messages_are_never_read(store: &dyn Store) {
    let pause = std::time::Duration::from_millis(SHORT_TTL.ttl_ms * 7 / 10);
    for i in 1..=10 {
        if matches!(i, 4 | 5) {
            tokio::time::sleep(pause).await;
        }
        store.append(to_room("old", &i.to_string())).await.unwrap();
    }
    let old = room("old");
    let page = store.read(&old, HistoryQuery::After { since: 0, limit: 5 }).await.unwrap();
    assert_eq!(page.last_seq, 10);
    assert_eq!(seqs(&page), vec![4, 5, 6, 7, 8]);
    assert_eq!(seqs(&store.read(&old, HistoryQuery::Last { limit: 20 }).await.unwrap()), (4..=10).collect::<Vec<_>>());

    // Trimming an expired head stops at the first live message, however long the head: 1-20
    // expire, 21-40 are live when appending 41-48 makes the backend look at the head.
    let mixed = |i: u64| to_room("mixed", &i.to_string());
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
    let all = store.read(&room("mixed"), HistoryQuery::After { since: 0, limit: 100 }).await.unwrap();
    assert_eq!(seqs(&all), (21..=48).collect::<Vec<_>>(), "live messages were trimmed with the expired ones");
}
