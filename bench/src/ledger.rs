//! Exact loss and duplicate accounting.
//!
//! Every probe message carries its flow (`p`) and its number in that flow (`n`, 0, 1, 2, … with
//! no gap on the publisher's side). A receiver keeps, per flow, the set of numbers it got as
//! [`Ranges`]: memory grows with the number of holes, not with the number of messages, so a run
//! of millions of in-order deliveries costs one range per receiver. The publisher keeps the
//! numbers the server refused ([`Ranges`] too); at the end, what was accepted is `[0, sent)`
//! minus the refused ones, and each receiver's loss is exactly the accepted numbers it lacks.

use serde::{Deserialize, Serialize};

/// A set of `u64` as sorted, disjoint, non-touching half-open ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds `n`; false when it was already there.
    pub fn insert(&mut self, n: u64) -> bool {
        // Fast path: in-order arrivals extend the last range.
        match self.0.last_mut() {
            None => {
                self.0.push((n, n + 1));
                return true;
            }
            Some(last) if n == last.1 => {
                last.1 += 1;
                return true;
            }
            Some(last) if n > last.1 => {
                self.0.push((n, n + 1));
                return true;
            }
            _ => {}
        }
        // First range ending after n; it exists because n < last end.
        let i = self.0.partition_point(|r| r.1 <= n);
        let (start, end) = self.0[i];
        if n >= start {
            return false;
        }
        let joins_prev = i > 0 && self.0[i - 1].1 == n;
        let joins_next = n + 1 == start;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = end;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = n + 1,
            (false, true) => self.0[i].0 = n,
            (false, false) => self.0.insert(i, (n, n + 1)),
        }
        true
    }

    pub fn contains(&self, n: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 <= n);
        i < self.0.len() && self.0[i].0 <= n
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// The largest number held.
    pub fn max(&self) -> Option<u64> {
        self.0.last().map(|r| r.1 - 1)
    }

    /// `[0, end)` minus this set.
    pub fn complement_below(&self, end: u64) -> Ranges {
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.0 {
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end));
        }
        Ranges(out)
    }

    /// `|self ∩ other|`.
    pub fn intersection_len(&self, other: &Ranges) -> u64 {
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j, mut total) = (0, 0, 0);
        while i < a.len() && j < b.len() {
            let lo = a[i].0.max(b[j].0);
            let hi = a[i].1.min(b[j].1);
            if hi > lo {
                total += hi - lo;
            }
            if a[i].1 < b[j].1 { i += 1 } else { j += 1 }
        }
        total
    }
}

/// What one receiver got of one flow.
#[derive(Clone, Debug, Default)]
pub struct FlowTally {
    got: Ranges,
    /// Deliveries of a number already received.
    pub duplicates: u64,
    /// New numbers that arrived after a higher number of the same flow.
    pub reordered: u64,
}

/// Whether a delivery was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    New,
    Duplicate,
}

impl FlowTally {
    pub fn record(&mut self, n: u64) -> Arrival {
        let highest = self.got.max();
        if !self.got.insert(n) {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        if highest.is_some_and(|h| n < h) {
            self.reordered += 1;
        }
        Arrival::New
    }

    /// Whether `n` arrived.
    pub fn has(&self, n: u64) -> bool {
        self.got.contains(n)
    }

    /// How many distinct numbers arrived.
    pub fn unique(&self) -> u64 {
        self.got.len()
    }
}

/// One receiver's account of flows, checked against what the publishers had accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Accepted messages that should have reached the receivers (accepted × audience).
    pub expected: u64,
    /// Distinct accepted messages that did reach them.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Deliveries beyond the first of the same message to the same receiver.
    pub duplicates: u64,
    /// New messages that arrived after a later one of the same flow.
    pub reordered: u64,
    /// Distinct messages received that were not expected there: refused by the server (an
    /// error answer), never sent, or of a flow not addressed to that receiver.
    pub unexpected: u64,
}

impl Check {
    /// The account of one receiver for one flow addressed to it: `accepted` are the numbers the
    /// publisher had accepted, `tally` what arrived (`None`: nothing did).
    pub fn expected_flow(tally: Option<&FlowTally>, accepted: &Ranges) -> Self {
        let expected = accepted.len();
        let Some(tally) = tally else {
            return Self { expected, lost: expected, ..Self::default() };
        };
        let received = tally.got.intersection_len(accepted);
        Self {
            expected,
            received,
            lost: expected - received,
            duplicates: tally.duplicates,
            reordered: tally.reordered,
            unexpected: tally.unique() - received,
        }
    }

    /// The account of a flow that was not addressed to the receiver: all of it is unexpected.
    pub fn stray_flow(tally: &FlowTally) -> Self {
        Self { duplicates: tally.duplicates, reordered: tally.reordered, unexpected: tally.unique(), ..Self::default() }
    }

    pub fn add(&mut self, other: &Check) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.unexpected += other.unexpected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ns: &[u64]) -> Ranges {
        let mut r = Ranges::new();
        for &n in ns {
            r.insert(n);
        }
        r
    }

    #[test]
    fn in_order_inserts_make_one_range() {
        let r = set(&(0..1000).collect::<Vec<_>>());
        assert_eq!(r.0.len(), 1);
        assert_eq!(r.len(), 1000);
        assert_eq!(r.max(), Some(999));
    }

    #[test]
    fn holes_and_late_fills_merge() {
        let mut r = set(&[0, 1, 2, 5, 6, 9]);
        assert_eq!(r.0, vec![(0, 3), (5, 7), (9, 10)]);
        assert!(r.insert(4)); // joins the next range
        assert_eq!(r.0, vec![(0, 3), (4, 7), (9, 10)]);
        assert!(r.insert(3)); // joins both
        assert_eq!(r.0, vec![(0, 7), (9, 10)]);
        assert!(r.insert(7)); // joins the previous one
        assert_eq!(r.0, vec![(0, 8), (9, 10)]);
        assert!(r.insert(8));
        assert_eq!(r.0, vec![(0, 10)]);
        assert!(!r.insert(0) && !r.insert(5) && !r.insert(9));
        assert_eq!(r.len(), 10);
    }

    #[test]
    fn insert_before_everything_and_between() {
        let mut r = set(&[10, 20]);
        assert!(r.insert(0));
        assert!(r.insert(15));
        assert_eq!(r.0, vec![(0, 1), (10, 11), (15, 16), (20, 21)]);
        assert!(r.contains(15) && !r.contains(14) && !r.contains(21));
    }

    #[test]
    fn inserting_matches_a_plain_set() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut r = Ranges::new();
            let mut plain = std::collections::BTreeSet::new();
            for _ in 0..300 {
                let n = rng.u64(0..120);
                assert_eq!(r.insert(n), plain.insert(n));
            }
            assert_eq!(r.len(), plain.len() as u64);
            for w in r.0.windows(2) {
                assert!(w[0].1 < w[1].0, "ranges touch or overlap: {:?}", r.0);
            }
            for n in 0..130 {
                assert_eq!(r.contains(n), plain.contains(&n));
            }
        }
    }

    #[test]
    fn complement_and_intersection() {
        let rejected = set(&[3, 4, 8]);
        let accepted = rejected.complement_below(10);
        assert_eq!(accepted.0, vec![(0, 3), (5, 8), (9, 10)]);
        assert_eq!(accepted.len(), 7);
        assert_eq!(Ranges::new().complement_below(5).0, vec![(0, 5)]);
        assert_eq!(set(&[0, 1, 2]).complement_below(3).len(), 0);
        assert_eq!(set(&[7]).complement_below(3).0, vec![(0, 3)]);

        let got = set(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(got.intersection_len(&accepted), 7);
        assert_eq!(accepted.intersection_len(&got), 7);
        assert_eq!(set(&[1, 3, 5]).intersection_len(&set(&[2, 4, 6])), 0);
    }

    #[test]
    fn tally_counts_duplicates_and_reorders() {
        let mut t = FlowTally::default();
        for n in [0, 1, 3, 2, 2, 4, 0] {
            t.record(n);
        }
        assert_eq!(t.unique(), 5);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.reordered, 1);
    }

    #[test]
    fn check_counts_loss_against_accepted() {
        // Published 0..10, the server refused 5; the receiver got 0..=4 and 6, 6 twice, and 5
        // (which was refused, so it should never have come) and 12 (never sent).
        let accepted = set(&[5]).complement_below(10);
        let mut t = FlowTally::default();
        for n in [0, 1, 2, 3, 4, 6, 6, 5, 12] {
            t.record(n);
        }
        let c = Check::expected_flow(Some(&t), &accepted);
        assert_eq!(c, Check { expected: 9, received: 6, lost: 3, duplicates: 1, reordered: 1, unexpected: 2 });
        let none = Check::expected_flow(None, &accepted);
        assert_eq!(none.lost, 9);
        assert_eq!(none.received, 0);
        let stray = Check::stray_flow(&t);
        assert_eq!((stray.expected, stray.unexpected, stray.lost), (0, 8, 0));
        let mut sum = c;
        sum.add(&none);
        assert_eq!((sum.expected, sum.received, sum.lost), (18, 6, 12));
    }
}
