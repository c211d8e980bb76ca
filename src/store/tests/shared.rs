//! Checks for the stores that several nodes share: many concurrent appenders, on one instance or
//! on two instances of one prefix (two "nodes"), must see every seq assigned exactly once, crossed
//! direct messages must not fail on deadlocks, a key raced from two nodes is stored once, and
//! nodes that start together migrate once.

use std::collections::BTreeSet;

use super::*;

/// Appenders per instance, and appends per appender.
const TASKS: usize = 8;
const EACH: usize = 25;

/// One test per check for the backend that `$open` opens (see `store_suite!`).
macro_rules! shared_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            /// Opens `nodes` instances on one fresh prefix, all at once.
            async fn nodes(count: usize) -> Option<Vec<Subject>> {
                let prefix = unique_prefix();
                let opened =
                    futures_util::future::join_all((0..count).map(|_| ($open)(prefix.clone(), KEEP_ALL))).await;
                opened.into_iter().collect()
            }

            /// Closes every node, and removes the data through the first.
            async fn finish(mut nodes: Vec<Subject>) {
                let first = nodes.remove(0);
                for node in nodes {
                    node.store.close().await;
                }
                first.finish().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_appenders_on_one_node_get_each_seq_once() {
                let Some(nodes) = nodes(1).await else { return };
                shared::appenders_get_each_seq_once(nodes.iter().map(|n| n.store.clone()).collect()).await;
                finish(nodes).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn appenders_on_two_nodes_get_each_seq_once() {
                let Some(nodes) = nodes(2).await else { return };
                shared::appenders_get_each_seq_once(nodes.iter().map(|n| n.store.clone()).collect()).await;
                finish(nodes).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crossed_direct_messages_do_not_fail() {
                let Some(nodes) = nodes(2).await else { return };
                shared::crossed_direct_messages_do_not_fail(nodes.iter().map(|n| n.store.clone()).collect()).await;
                finish(nodes).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_key_raced_from_two_nodes_is_stored_once() {
                let Some(nodes) = nodes(2).await else { return };
                shared::a_key_raced_from_two_nodes_is_stored_once(&nodes[0].store, &nodes[1].store).await;
                finish(nodes).await;
            }

            /// Every node migrates at start; four starting at once must all come up, on one schema.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nodes_starting_together_migrate_once() {
                let Some(nodes) = nodes(4).await else { return };
                for (i, node) in nodes.iter().enumerate() {
                    let appended = node.store.append(to_room("start", "1")).await.unwrap();
                    assert_eq!(appended.seq, i as u64 + 1);
                }
                finish(nodes).await;
            }
        }
    };
}

pub(crate) use shared_suite;

/// [`TASKS`] appenders per store, [`EACH`] appends each, all to one room: the replies and the
/// stream hold 1..=N, each once.
pub(crate) async fn appenders_get_each_seq_once(stores: Vec<Arc<dyn Store>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (node, store) in stores.iter().enumerate() {
        for task in 0..TASKS {
            let store = store.clone();
            tasks.spawn(async move {
                let mut seqs = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let body = format!("\"{node}-{task}-{i}\"");
                    seqs.push(store.append(to_room("busy", &body)).await.unwrap().seq);
                }
                seqs
            });
        }
    }
    let mut replied: Vec<u64> = tasks.join_all().await.into_iter().flatten().collect();
    replied.sort_unstable();
    let total = (stores.len() * TASKS * EACH) as u64;
    assert_eq!(replied, (1..=total).collect::<Vec<_>>(), "each seq answered once");
    let stored = stores[0].read(&room("busy"), HistoryQuery::After { since: 0, limit: 1000 }).await.unwrap();
    assert_eq!((seqs(&stored), stored.last_seq), ((1..=total).collect::<Vec<_>>(), total));
    let bodies: BTreeSet<String> = stored.messages.iter().map(body_of).collect();
    assert_eq!(bodies.len() as u64, total, "every append stored once");
}

/// alice→bob on one node while bob→alice on the other: the two streams are locked in opposite
/// entry orders, and no append may fail (a deadlock must be avoided or retried, never answered).
pub(crate) async fn crossed_direct_messages_do_not_fail(stores: Vec<Arc<dyn Store>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (from, to, store) = if task % 2 == 0 { ("alice", "bob", &stores[0]) } else { ("bob", "alice", &stores[1]) };
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..EACH {
                store.append(direct(from, to, &format!("\"{task}-{i}\""))).await.unwrap();
            }
        });
    }
    tasks.join_all().await;
    let total = (TASKS * EACH) as u64;
    for name in ["alice", "bob"] {
        let stream = stores[1].read(&StreamId::User(user(name)), HistoryQuery::After { since: 0, limit: 1000 }).await;
        assert_eq!(seqs(&stream.unwrap()), (1..=total).collect::<Vec<_>>(), "{name}'s stream");
    }
}

/// The same key sent to two nodes at once, 50 times: both answer the same mid and seq, one of
/// them as the duplicate, and the stream holds 50 messages.
pub(crate) async fn a_key_raced_from_two_nodes_is_stored_once(a: &Arc<dyn Store>, b: &Arc<dyn Store>) {
    const KEYS: u64 = 50;
    for k in 0..KEYS {
        let key = format!("race-{k}");
        let (x, y) =
            tokio::join!(a.append(keyed(to_room("race", "1"), &key)), b.append(keyed(to_room("race", "2"), &key)));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!((&x.mid, x.seq), (&y.mid, y.seq), "key {key}");
        assert!(x.duplicate != y.duplicate, "exactly one of the two stored it: {x:?} {y:?}");
        assert_eq!(x.seq, k + 1);
    }
    assert_eq!(b.read(&room("race"), HistoryQuery::Last { limit: 100 }).await.unwrap().messages.len() as u64, KEYS);
}
