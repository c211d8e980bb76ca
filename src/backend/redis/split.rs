//! Appends on a Redis Cluster, where one script may only touch one hash slot.
//!
//! A room message, and a direct message to oneself, touch one stream: one script, as on one
//! Redis. A direct message touches two streams (the recipient's and the sender's), in two slots
//! as a rule, so it goes in steps, one script per slot, in the request's order of entries. Every
//! step carries the same idempotency key (the client's, or one made of the message's mid, which the
//! first step of an unkeyed message goes without: nothing runs that one again), kept in the step's
//! own slot, so a step run twice stores nothing twice and answers the first run's mid and seq.
//! Hence:
//! - an acknowledged message is in every stream: every step succeeded;
//! - a message answered `unavailable` is in no stream (its first step failed, and a script that
//!   fails stores nothing), or its first steps are stored and the rest is completed by a retry
//!   with the same key, the client's or this node's own: the node runs the missing steps again in
//!   the background (see [`COMPLETE_FOR`]), so an unkeyed message too ends up whole unless the node
//!   dies first;
//! - nothing is stored twice: a retry finds each step's key and answers the stored message, whose
//!   first mid the later steps are written with.
//!
//! There is no queue: the cluster connection pipelines concurrent scripts to each master, and
//! scripts for different streams do not batch (they are in different slots). At most [`QUEUE`]
//! appends are in Redis at once; beyond that an append is answered `unavailable` at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::conn::slot;
use super::store::{Appends, Item, QUEUE, Run, appended, full};
use crate::message::{Message, Record};
use crate::store::{AppendRequest, Appended, Entry, IDEMPOTENCY_WINDOW_MS, StoreError};

/// How long a node keeps completing a message whose first steps it stored: well within the
/// idempotency window, so that the keys of the stored steps are still there.
const COMPLETE_FOR: Duration = Duration::from_millis(IDEMPOTENCY_WINDOW_MS / 2);
/// The first and the longest pause between attempts to complete a message.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Most messages a node completes at once; beyond it a half-stored message is logged and left to
/// the client's retry.
const MAX_COMPLETING: usize = 10_000;

/// Messages this process is completing in the background, across stores.
static COMPLETING: AtomicUsize = AtomicUsize::new(0);

/// An append in Redis, counted against [`QUEUE`] until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        let taken = count.fetch_add(1, Ordering::AcqRel) < QUEUE;
        let slot = Self(count);
        taken.then_some(slot)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The request's entries grouped by the slot of their stream, in the order they first appear:
/// the steps of its append.
fn steps(appends: &Appends, request: &AppendRequest) -> Vec<Vec<usize>> {
    let mut steps: Vec<(u16, Vec<usize>)> = Vec::with_capacity(request.entries.len());
    for (i, entry) in request.entries.iter().enumerate() {
        let slot = slot(appends.keys.seq(&entry.stream).as_bytes());
        match steps.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, entries)) => entries.push(i),
            None => steps.push((slot, vec![i])),
        }
    }
    steps.into_iter().map(|(_, entries)| entries).collect()
}

/// One step of a message: its entries, keyed with `key` when given.
fn part(message: &Message, entries: Vec<Entry>, key: Option<&(String, String)>, record: &[u8], deadline: u64) -> Item {
    let request = AppendRequest { message: message.clone(), entries, reply_entry: 0, idempotency: key.cloned() };
    Item { request, record: record.to_vec(), deadline }
}

impl Appends {
    /// Appends `item` on a Redis Cluster (see the module docs).
    pub(super) async fn append_split(self: &Arc<Self>, item: Item) -> Result<Appended, StoreError> {
        let Some(_in_flight) = InFlight::take(&self.in_flight) else { return Err(full()) };
        let steps = steps(self, &item.request);
        if steps.len() == 1 {
            let answer = self.send([&item], self.run()).await?;
            return appended(&answer, self.fused);
        }
        let Item { request, mut record, .. } = item;
        let key = request.idempotency.clone().unwrap_or_else(|| ("~".into(), request.message.mid.to_string()));
        let mut message = request.message.clone();
        let mut seqs = vec![0; request.entries.len()];
        let mut duplicate = false;
        for (done, step) in steps.iter().enumerate() {
            let entries: Vec<Entry> = step.iter().map(|&e| request.entries[e].clone()).collect();
            // A step after a duplicate completes a message stored before: published in its script
            // whenever the bus is this cluster, since the node publishes nothing for a duplicate.
            let run = Run { publish: self.fused || duplicate, wait: self.wait_replicas > 0 };
            // The first step of a message without a client's key needs none: nothing runs it
            // again (a message whose first step failed is not completed), and a key costs Redis a
            // write.
            let keyed = (done > 0 || request.idempotency.is_some()).then_some(&key);
            let one = part(&message, entries, keyed, &record, self.clock.write_deadline());
            let answer = match self.send([&one], run).await.and_then(|a| appended(&a, run.publish)) {
                Ok(answer) => answer,
                Err(e) => {
                    if done > 0 {
                        let left = steps[done..]
                            .iter()
                            .map(|step| step.iter().map(|&e| request.entries[e].clone()).collect())
                            .collect();
                        self.complete_later(message, record, left, key);
                    }
                    return Err(e);
                }
            };
            if answer.duplicate && answer.mid != message.mid {
                // Stored before under another mid: the later steps carry that one.
                message.mid = answer.mid.clone();
                record = Record::encode(&message);
            }
            duplicate |= answer.duplicate;
            match answer.duplicate {
                true => seqs[step[0]] = answer.seq,
                false => step.iter().zip(&answer.seqs).for_each(|(&e, &seq)| seqs[e] = seq),
            }
        }
        let seq = seqs[request.reply_entry.min(seqs.len() - 1)];
        let published = self.fused && !duplicate;
        Ok(Appended { mid: message.mid, seq, duplicate, seqs: if duplicate { Vec::new() } else { seqs }, published })
    }

    /// Runs the steps `left` of a message whose first steps are stored, again and again until
    /// they are, for [`COMPLETE_FOR`] at most.
    fn complete_later(
        self: &Arc<Self>,
        message: Message,
        record: Vec<u8>,
        left: Vec<Vec<Entry>>,
        key: (String, String),
    ) {
        if COMPLETING.fetch_add(1, Ordering::AcqRel) >= MAX_COMPLETING {
            COMPLETING.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(mid = %message.mid, "too many half-stored messages to complete: a retry with the same key completes this one");
            return;
        }
        let appends = self.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + COMPLETE_FOR;
            let mut pause = RETRY_MIN;
            let run = Run { publish: appends.publish != super::store::Publish::No, wait: appends.wait_replicas > 0 };
            for entries in left {
                loop {
                    let one = part(&message, entries.clone(), Some(&key), &record, appends.clock.write_deadline());
                    match appends.send([&one], run).await {
                        Ok(_) => break,
                        Err(e) if tokio::time::Instant::now() + pause > until => {
                            tracing::error!(mid = %message.mid, error = %e, "gave up completing a half-stored message");
                            COMPLETING.fetch_sub(1, Ordering::AcqRel);
                            return;
                        }
                        Err(_) => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(RETRY_MAX);
                        }
                    }
                }
            }
            tracing::info!(mid = %message.mid, "completed a message whose append was answered unavailable");
            COMPLETING.fetch_sub(1, Ordering::AcqRel);
        });
    }
}
