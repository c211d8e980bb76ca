//! Repair of live delivery: what a session does when the bus skips, repeats or reorders.
//!
//! A bus may delay, reorder, duplicate or drop messages (every real one does around reconnects).
//! Per stream the session knows the next seq it is owed live: the one after the highest it has
//! (or after where it started following the stream). A message past that seq is held back; when
//! the missing ones arrive, the held ones follow in seq order. A gap still open after
//! [`REPAIR_WAIT`] is read from the store, which has every committed message. Duplicates are
//! already dropped by the session's [`SeqSet`](super::seqset::SeqSet). So each session gets every
//! message of a stream it follows once and in seq order, whatever the bus did.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::seqset::SeqSet;
use crate::bus::Delivery;
use crate::protocol::StreamId;

/// How long a session waits for the messages missing before a held one, before reading them
/// from the store. Reorders within a node are microseconds; a bus that lost a message stays
/// silent, so this bounds the extra latency of that case.
pub(super) const REPAIR_WAIT: Duration = Duration::from_millis(150);
/// How long to wait before trying again when the store could not be read.
pub(super) const REPAIR_RETRY: Duration = Duration::from_secs(1);
/// Most messages held back per stream: beyond it the gap is repaired at once rather than
/// waited for, so a session's memory stays bounded whatever the bus does.
pub(super) const MAX_HELD: usize = 256;

/// A session's open gaps: what each stream holds back, and when to read what is still missing.
#[derive(Debug, Default)]
pub(super) struct Repair {
    pub held: HashMap<StreamId, Held>,
    /// When to read the gaps still open from the store; `None` until that is due.
    pub at: Option<Instant>,
}

/// Messages of one stream that arrived ahead of a gap, by seq.
#[derive(Debug, Default)]
pub(super) struct Held {
    messages: BTreeMap<u64, Arc<Delivery>>,
}

impl Held {
    /// Holds `delivery` (at `seq`); true when the stream now holds too many to keep waiting.
    pub(super) fn hold(&mut self, seq: u64, delivery: &Arc<Delivery>) -> bool {
        self.messages.entry(seq).or_insert_with(|| delivery.clone());
        self.messages.len() >= MAX_HELD
    }

    /// Takes the held messages that are in order now, in seq order, marking them had in `seen`:
    /// each one whose every predecessor since `live_from` the session has. Stops at the next
    /// gap; drops the ones the session already has.
    pub(super) fn release(&mut self, seen: &mut SeqSet, live_from: Option<u64>) -> Vec<Arc<Delivery>> {
        let mut out = Vec::new();
        while let Some(entry) = self.messages.first_entry() {
            let seq = *entry.key();
            if seen.contains(seq) {
                entry.remove();
                continue;
            }
            let next = match live_from {
                Some(from) => seen.next_missing(from + 1),
                None => seen.first().map_or(seq, |first| seen.next_missing(first)),
            };
            if seq != next {
                break;
            }
            seen.insert(seq);
            out.push(entry.remove());
        }
        out
    }

    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::StreamId;

    fn at(seq: u64) -> Arc<Delivery> {
        let message = Message {
            mid: Arc::from(format!("m{seq}")),
            from: Arc::from("a"),
            to: None,
            room: None,
            body: Arc::from("1"),
            ts: 0,
        };
        Arc::new(Delivery::new(Some((StreamId::parse("room:r").unwrap(), seq)), message, None))
    }

    fn seqs(out: &[Arc<Delivery>]) -> Vec<u64> {
        out.iter().map(|d| d.position.as_ref().unwrap().1).collect()
    }

    #[test]
    fn releases_in_order_up_to_the_next_gap() {
        let mut held = Held::default();
        let mut seen = SeqSet::default();
        seen.insert_range(1, 2);
        for seq in [7, 5, 4, 9] {
            assert!(!held.hold(seq, &at(seq)));
        }
        assert!(held.release(&mut seen, Some(0)).is_empty(), "3 is still missing");
        seen.insert(3);
        assert_eq!(seqs(&held.release(&mut seen, Some(0))), [4, 5], "6 is missing");
        seen.insert(6);
        assert_eq!(seqs(&held.release(&mut seen, Some(0))), [7]);
        assert!(!held.is_empty());
        seen.insert(8);
        assert_eq!(seqs(&held.release(&mut seen, Some(0))), [9]);
        assert!(held.is_empty());
        assert_eq!(seen.next_missing(1), 10, "what was released is had");
    }

    #[test]
    fn a_seq_the_session_sent_itself_does_not_hide_a_gap_below_it() {
        // The session published 3 (its reply carried the seq) while 1 and 2 were in flight, and
        // 2 came first: 2 waits for 1, even though 3 is had.
        let mut held = Held::default();
        let mut seen = SeqSet::default();
        seen.insert(3);
        held.hold(2, &at(2));
        assert!(held.release(&mut seen, Some(0)).is_empty(), "1 is missing");
        seen.insert(1);
        assert_eq!(seqs(&held.release(&mut seen, Some(0))), [2]);
    }

    #[test]
    fn drops_what_the_session_already_has() {
        let mut held = Held::default();
        let mut seen = SeqSet::default();
        for seq in [3, 4, 6] {
            held.hold(seq, &at(seq));
        }
        seen.insert_range(1, 4);
        assert_eq!(
            seqs(&held.release(&mut seen, Some(0))),
            Vec::<u64>::new(),
            "3 and 4 came another way; 5 is missing"
        );
        seen.insert(5);
        assert_eq!(seqs(&held.release(&mut seen, Some(0))), [6]);
    }

    #[test]
    fn says_when_too_many_are_held() {
        let mut held = Held::default();
        let full = (2..2 + MAX_HELD as u64).map(|seq| held.hold(seq, &at(seq))).collect::<Vec<_>>();
        assert_eq!(full.iter().filter(|f| **f).count(), 1);
        assert!(full[MAX_HELD - 1]);
    }
}
