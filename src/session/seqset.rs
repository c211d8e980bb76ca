//! The seqs of one stream a session already has, as a short list of ranges.
//!
//! Live delivery and the session's own sends fill contiguous runs, so a handful of ranges covers a
//! session's whole life. A client that pipelines many publishes while others publish too leaves
//! one range per own seq until the queued deliveries fill the gaps between them: at most one per
//! message the session has queued, so the cap sits above any outbound queue a node allows. Past
//! it, the oldest ranges go first, which can at worst deliver a very old message a second time.
//! The list gives its memory back once it has merged into a few ranges again.

const MAX_RANGES: usize = 16_384;
/// Ranges kept allocated after a burst merged back.
const KEEP_CAPACITY: usize = 16;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSet {
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    ranges: Vec<(u64, u64)>,
}

impl SeqSet {
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, hi)| hi < seq);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= seq)
    }

    /// The lowest seq in the set.
    pub fn first(&self) -> Option<u64> {
        self.ranges.first().map(|&(lo, _)| lo)
    }

    /// The first seq from `from` on that is not in the set.
    pub fn next_missing(&self, from: u64) -> u64 {
        let i = self.ranges.partition_point(|&(_, hi)| hi < from);
        match self.ranges.get(i) {
            Some(&(lo, hi)) if lo <= from => hi.saturating_add(1),
            _ => from,
        }
    }

    /// The highest seq in the set.
    pub fn last(&self) -> Option<u64> {
        self.ranges.last().map(|&(_, hi)| hi)
    }

    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        // Live delivery: the next seq after the last range, extended in place.
        if let Some(last) = self.ranges.last_mut() {
            if last.1.checked_add(1) == Some(seq) {
                last.1 = seq;
                return true;
            }
        }
        if self.contains(seq) {
            return false;
        }
        self.insert_range(seq, seq);
        true
    }

    /// Adds every seq in `lo..=hi`.
    pub fn insert_range(&mut self, lo: u64, hi: u64) {
        if lo > hi {
            return;
        }
        let start = self.ranges.partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let end = self.ranges.partition_point(|&(l, _)| l <= hi.saturating_add(1));
        let (mut new_lo, mut new_hi) = (lo, hi);
        if start < end {
            new_lo = new_lo.min(self.ranges[start].0);
            new_hi = new_hi.max(self.ranges[end - 1].1);
        }
        self.ranges.splice(start..end, [(new_lo, new_hi)]);
        if self.ranges.len() > MAX_RANGES {
            self.ranges.remove(0);
        } else if self.ranges.len() <= 2 && self.ranges.capacity() > 4 * KEEP_CAPACITY {
            self.ranges.shrink_to(KEEP_CAPACITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_neighbours() {
        let mut s = SeqSet::default();
        assert!(s.insert(5));
        assert!(s.insert(7));
        assert!(s.insert(6));
        assert_eq!(s.ranges, vec![(5, 7)]);
        assert!(!s.insert(6));
        s.insert_range(1, 3);
        assert_eq!(s.ranges, vec![(1, 3), (5, 7)]);
        s.insert_range(2, 10);
        assert_eq!(s.ranges, vec![(1, 10)]);
        assert!(s.contains(1) && s.contains(10) && !s.contains(11) && !s.contains(0));
        assert_eq!(s.last(), Some(10));
        assert_eq!(SeqSet::default().last(), None);
    }

    #[test]
    fn finds_the_first_missing_seq() {
        let mut s = SeqSet::default();
        assert_eq!((s.first(), s.next_missing(1)), (None, 1));
        s.insert_range(3, 5);
        s.insert(8);
        assert_eq!(s.first(), Some(3));
        assert_eq!(s.next_missing(1), 1);
        assert_eq!(s.next_missing(3), 6);
        assert_eq!(s.next_missing(4), 6);
        assert_eq!(s.next_missing(6), 6);
        assert_eq!(s.next_missing(8), 9);
    }

    #[test]
    fn stays_bounded() {
        let mut s = SeqSet::default();
        let n = MAX_RANGES as u64 + 10;
        for i in 0..n {
            s.insert(i * 2);
        }
        assert_eq!(s.ranges.len(), MAX_RANGES);
        assert!(s.contains(2 * (n - 1)) && !s.contains(0), "the oldest ranges went first");
        s.insert_range(0, 2 * n);
        assert_eq!(s.ranges.len(), 1);
        assert!(s.ranges.capacity() <= 4 * KEEP_CAPACITY, "merged back, it gave its memory back");
    }

    #[test]
    fn empty_range_is_ignored() {
        let mut s = SeqSet::default();
        s.insert_range(1, 0);
        assert!(s.ranges.is_empty());
    }
}
