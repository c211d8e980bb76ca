//! Group commit of notices (presence events): the notices raised for one topic while its
//! previous publish is in flight go out together, in order, as one [`Event::Frames`].
//!
//! Every notice reaches every member of a room, so a room that N users enter costs N²/2 frames
//! whatever is done; batching saves the cost around each frame. A notice published alone is one
//! bus message (a Redis round trip in a cluster) and one pass over the room's local members,
//! each woken for that single frame. A batch is one message and one pass, and each member takes
//! all its frames in one wake-up and one socket write. That matters most for the bursts a node
//! raises by itself (the leaves of a dead node's users, the joins of a node registering again)
//! and for joins and leaves racing on one node. Nothing waits for a batch to fill: a notice goes
//! out at once when its topic is idle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::{Bus, BusError, Event, Notice, Topic};

/// The outcome of a batch, once published.
type Outcome = Option<Result<(), BusError>>;

/// Publishes notices through the bus, batched per topic.
pub struct Batcher {
    bus: Arc<dyn Bus>,
    /// Most notices in one batch.
    max: usize,
    /// Topics with notices being published; an entry lives while someone uses it.
    topics: Mutex<HashMap<Topic, Arc<Queue>>>,
}

#[derive(Default)]
struct Queue {
    /// Held while a batch is published, so that the topic's batches go out one at a time, in order.
    turn: tokio::sync::Mutex<()>,
    /// Batches not published yet, oldest first; only the last one takes more notices.
    waiting: Mutex<VecDeque<Batch>>,
}

struct Batch {
    notices: Vec<Notice>,
    published: watch::Sender<Outcome>,
}

impl Queue {
    fn waiting(&self) -> MutexGuard<'_, VecDeque<Batch>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `notice` to the last batch, or starts a batch when that one is full; answers where
    /// the outcome of its batch will show.
    fn add(&self, notice: Notice, max: usize) -> watch::Receiver<Outcome> {
        let mut waiting = self.waiting();
        match waiting.back_mut() {
            Some(batch) if batch.notices.len() < max => {
                batch.notices.push(notice);
                batch.published.subscribe()
            }
            _ => {
                let (published, outcome) = watch::channel(None);
                waiting.push_back(Batch { notices: vec![notice], published });
                outcome
            }
        }
    }
}

/// Waits for the outcome of a batch.
async fn published(outcome: &mut watch::Receiver<Outcome>) -> Result<(), BusError> {
    match outcome.wait_for(Option::is_some).await {
        Ok(published) => published.clone().expect("waited until it is set"),
        Err(_) => Err(BusError::Unavailable("publishing was interrupted".into())),
    }
}

impl Batcher {
    /// A batcher publishing at most `max` notices per event (at least 1).
    pub fn new(bus: Arc<dyn Bus>, max: usize) -> Self {
        Self { bus, max: max.max(1), topics: Mutex::new(HashMap::new()) }
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<Topic, Arc<Queue>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `notice` to `topic` after the notices published before it, in the same event
    /// as those added while it waited. Returns once its batch was published, with the outcome.
    ///
    /// Whoever waits takes a turn at publishing the oldest batch, so a caller that is dropped
    /// holds up nobody; a batch whose publish was dropped half-way answers `Unavailable`.
    pub async fn publish(&self, topic: Topic, notice: Notice) -> Result<(), BusError> {
        let queue = self.topics().entry(topic.clone()).or_default().clone();
        let mut outcome = queue.add(notice, self.max);
        let result = loop {
            tokio::select! {
                biased;
                result = published(&mut outcome) => break result,
                _turn = queue.turn.lock() => {
                    let oldest = queue.waiting().pop_front();
                    if let Some(batch) = oldest {
                        let result = self.bus.publish(topic.clone(), Event::Frames(batch.notices)).await;
                        batch.published.send_replace(Some(result));
                    }
                }
            }
        };
        let mut topics = self.topics();
        drop(queue);
        // Only the map holds it: nobody is waiting (every `Arc` is taken under this lock).
        if topics.get(&topic).is_some_and(|queue| Arc::strong_count(queue) == 1) {
            topics.remove(&topic);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::sync::Notify;

    use super::*;
    use crate::bus::SessionId;
    use crate::protocol::RoomName;

    /// Records what is published; the first publish waits until released.
    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<Vec<Bytes>>>,
        calls: AtomicUsize,
        release: Notify,
    }

    #[async_trait]
    impl Bus for Recorder {
        async fn subscribe(&self, _topic: &Topic) -> Result<(), BusError> {
            Ok(())
        }

        async fn unsubscribe(&self, _topic: &Topic) -> Result<(), BusError> {
            Ok(())
        }

        async fn publish(&self, _topic: Topic, event: Event) -> Result<(), BusError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                self.release.notified().await;
            }
            let Event::Frames(notices) = event else { panic!("not notices: {event:?}") };
            self.events.lock().unwrap().push(notices.into_iter().map(|n| n.frame).collect());
            Ok(())
        }

        async fn ready(&self) -> bool {
            true
        }
    }

    fn notice(n: usize) -> Notice {
        Notice { frame: Bytes::from(n.to_string()), exclude: Some(SessionId(n as u64)) }
    }

    #[tokio::test]
    async fn notices_raised_during_a_publish_go_out_together_in_order() {
        let recorder = Arc::new(Recorder::default());
        let batcher = Arc::new(Batcher::new(recorder.clone(), 3));
        let room = Topic::Room(RoomName::parse("r").unwrap());
        let mut publishes = tokio::task::JoinSet::new();
        for n in 0..6 {
            let (batcher, room) = (batcher.clone(), room.clone());
            publishes.spawn(async move { batcher.publish(room, notice(n)).await });
            // Each task adds its notice before the next one starts.
            tokio::task::yield_now().await;
        }
        recorder.release.notify_one();
        while let Some(done) = publishes.join_next().await {
            done.unwrap().unwrap();
        }
        let events = recorder.events.lock().unwrap().clone();
        let numbers: Vec<Vec<&[u8]>> = events.iter().map(|e| e.iter().map(|f| &f[..]).collect()).collect();
        assert_eq!(
            numbers,
            vec![vec![&b"0"[..]], vec![b"1", b"2", b"3"], vec![b"4", b"5"]],
            "the first goes alone, the rest in batches of at most 3, in order"
        );
        assert!(batcher.topics().is_empty(), "an idle topic is forgotten");
    }

    #[tokio::test]
    async fn a_dropped_publisher_holds_up_nobody() {
        let recorder = Arc::new(Recorder::default());
        let batcher = Arc::new(Batcher::new(recorder.clone(), 10));
        let room = Topic::Room(RoomName::parse("r").unwrap());
        let first = tokio::spawn({
            let (batcher, room) = (batcher.clone(), room.clone());
            async move { batcher.publish(room, notice(0)).await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let (batcher, room) = (batcher.clone(), room.clone());
            async move { batcher.publish(room, notice(1)).await }
        });
        tokio::task::yield_now().await;
        first.abort();
        let interrupted = first.await;
        assert!(interrupted.unwrap_err().is_cancelled());
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second).await;
        second.expect("the second publish is not held up").unwrap().unwrap();
        let events = recorder.events.lock().unwrap().clone();
        assert_eq!(events, vec![vec![Bytes::from("1")]], "the second notice went out without the first");
        assert!(batcher.topics().is_empty());
    }
}
