//! When a rate-mode publisher sends: message `k` of a flow is due at
//! `start + offset + k / rate`, for every `k` due before the end. Flows of one run get offsets
//! spread over one period (flow `i` of `F`: `i/F` of a period), so that together they make an
//! even stream at the total rate instead of all firing at the same instants.

/// One flow's schedule, in µs since the epoch.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub start_us: u64,
    pub offset_us: u64,
    /// Messages per second (> 0).
    pub rate: f64,
    pub end_us: u64,
}

impl Schedule {
    /// When message `k` is due.
    pub fn due_at(&self, k: u64) -> u64 {
        self.start_us + self.offset_us + (k as f64 * 1e6 / self.rate) as u64
    }

    /// How many messages are due before the end.
    pub fn total(&self) -> u64 {
        let first = self.start_us + self.offset_us;
        if self.end_us <= first {
            return 0;
        }
        let mut n = ((self.end_us - first) as f64 * self.rate / 1e6).ceil() as u64;
        // Agree with due_at exactly: every counted message is due before the end.
        while n > 0 && self.due_at(n - 1) >= self.end_us {
            n -= 1;
        }
        while self.due_at(n) < self.end_us {
            n += 1;
        }
        n
    }

    /// How many messages are due by `now` (never more than [`total`](Self::total)).
    pub fn due_by(&self, now_us: u64) -> u64 {
        let first = self.start_us + self.offset_us;
        if now_us < first {
            return 0;
        }
        let total = self.total();
        let mut n = (((now_us - first) as f64 * self.rate / 1e6).floor() as u64 + 1).min(total);
        while n < total && self.due_at(n) <= now_us {
            n += 1;
        }
        while n > 0 && self.due_at(n - 1) > now_us {
            n -= 1;
        }
        n
    }

    /// The offset of flow `i` of `flows` flows sharing `rate_per_flow`.
    pub fn offset_for(i: usize, flows: usize, rate_per_flow: f64) -> u64 {
        if rate_per_flow <= 0.0 || flows == 0 {
            return 0;
        }
        ((i as f64 / flows as f64) * 1e6 / rate_per_flow) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_messages_due_in_the_run() {
        let s = Schedule { start_us: 1_000_000, offset_us: 0, rate: 1000.0, end_us: 2_000_000 };
        assert_eq!(s.total(), 1000);
        assert_eq!(s.due_by(999_999), 0);
        assert_eq!(s.due_by(1_000_000), 1);
        assert_eq!(s.due_by(1_000_999), 1);
        assert_eq!(s.due_by(1_001_000), 2);
        assert_eq!(s.due_by(5_000_000), 1000);
        let third = Schedule { rate: 3.0, ..s };
        assert_eq!(third.total(), 3);
        assert_eq!(third.due_at(2), 1_666_666);
        assert_eq!(third.due_by(1_666_666), 3);
        assert_eq!(third.due_by(1_666_665), 2);
    }

    #[test]
    fn offsets_spread_flows_over_one_period() {
        // 4 flows at 10/s each: offsets 0, 25, 50, 75 ms; together an even 40/s.
        let offsets: Vec<u64> = (0..4).map(|i| Schedule::offset_for(i, 4, 10.0)).collect();
        assert_eq!(offsets, vec![0, 25_000, 50_000, 75_000]);
        let mut all: Vec<u64> = offsets
            .iter()
            .flat_map(|&o| {
                let s = Schedule { start_us: 0, offset_us: o, rate: 10.0, end_us: 1_000_000 };
                (0..s.total()).map(move |k| s.due_at(k))
            })
            .collect();
        all.sort();
        assert_eq!(all.len(), 40);
        assert!(all.windows(2).all(|w| w[1] - w[0] == 25_000));
    }

    #[test]
    fn due_by_agrees_with_due_at() {
        let s = Schedule { start_us: 17, offset_us: 333, rate: 7.3, end_us: 3_000_017 };
        for k in 0..s.total() {
            assert_eq!(s.due_by(s.due_at(k)), k + 1);
            assert_eq!(s.due_by(s.due_at(k) - 1), k);
        }
        assert!(s.due_at(s.total()) >= s.end_us);
        assert_eq!(Schedule { offset_us: 5_000_000, ..s }.total(), 0);
    }
}
