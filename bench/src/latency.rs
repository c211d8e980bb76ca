//! Latency histograms (microseconds) and their summaries.
//!
//! An HDR histogram with 3 significant digits: every reported value is within 0.1 % of a value
//! that was recorded. Histograms cross process boundaries as `(value, count)` buckets, which
//! re-record into the same buckets on the other side, so merging loses nothing.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest value kept as is: one hour in µs. Larger ones count as this.
const HIGHEST_US: u64 = 3_600_000_000;

#[derive(Clone, Debug)]
pub struct Latency {
    hist: Histogram<u64>,
    /// Values below zero (a receive stamped before the send: the clock stepped) recorded as 0.
    negative: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self { hist: Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds"), negative: 0 }
    }

    /// Records `to - from` (both µs since the epoch).
    pub fn record_between(&mut self, from_us: u64, to_us: u64) {
        match to_us.checked_sub(from_us) {
            Some(d) => self.record(d),
            None => {
                self.negative += 1;
                self.record(0);
            }
        }
    }

    pub fn record(&mut self, us: u64) {
        self.hist.saturating_record(us.min(HIGHEST_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        self.hist.add(&other.hist).expect("histograms of the same bounds merge");
        self.negative += other.negative;
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The histogram as buckets, for sending to another process.
    pub fn to_buckets(&self) -> Buckets {
        Buckets {
            counts: self.hist.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect(),
            negative: self.negative,
        }
    }

    pub fn from_buckets(b: &Buckets) -> Self {
        let mut out = Self::new();
        for &(value, count) in &b.counts {
            out.hist.saturating_record_n(value.min(HIGHEST_US), count);
        }
        out.negative = b.negative;
        out
    }

    pub fn summary(&self) -> Summary {
        let h = &self.hist;
        if h.is_empty() {
            return Summary { negative: self.negative, ..Summary::default() };
        }
        Summary {
            count: h.len(),
            min: Some(h.min()),
            mean: Some(h.mean().round() as u64),
            p50: Some(h.value_at_quantile(0.50)),
            p90: Some(h.value_at_quantile(0.90)),
            p99: Some(h.value_at_quantile(0.99)),
            p999: Some(h.value_at_quantile(0.999)),
            max: Some(h.max()),
            negative: self.negative,
        }
    }
}

/// A histogram in transit: `(bucket value, count)` pairs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Buckets {
    pub counts: Vec<(u64, u64)>,
    pub negative: u64,
}

/// Percentiles of a latency distribution in microseconds (`None` when nothing was recorded).
/// A percentile is the smallest recorded value (±0.1 %) that at least that share of the
/// samples does not exceed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: Option<u64>,
    pub mean: Option<u64>,
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    pub p999: Option<u64>,
    pub max: Option<u64>,
    /// Samples whose receive time was before their send time (recorded as 0).
    pub negative: u64,
}

impl Summary {
    /// "p50 1.234 ms  p99 …" for the human report.
    pub fn human(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        let ms = |v: Option<u64>| v.map_or("-".into(), format_ms);
        let mut s = format!(
            "n={} min {} p50 {} p90 {} p99 {} p99.9 {} max {} (ms)",
            self.count,
            ms(self.min),
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        );
        if self.negative > 0 {
            s.push_str(&format!("; {} negative samples counted as 0", self.negative));
        }
        s
    }
}

/// Microseconds as milliseconds with 3 decimals.
pub fn format_ms(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: Option<u64>, expected: u64) -> bool {
        let a = actual.unwrap() as f64;
        (a - expected as f64).abs() <= expected as f64 * 0.001 + 1.0
    }

    #[test]
    fn percentiles_of_a_uniform_run() {
        let mut l = Latency::new();
        for us in 1..=10_000 {
            l.record(us);
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.min, Some(1));
        assert!(within(s.p50, 5_000), "{s:?}");
        assert!(within(s.p90, 9_000), "{s:?}");
        assert!(within(s.p99, 9_900), "{s:?}");
        assert!(within(s.p999, 9_990), "{s:?}");
        assert!(within(s.max, 10_000), "{s:?}");
        assert!(within(s.mean, 5_000), "{s:?}");
    }

    #[test]
    fn a_single_outlier_shows_only_at_the_top() {
        let mut l = Latency::new();
        for _ in 0..999 {
            l.record(100);
        }
        l.record(50_000);
        let s = l.summary();
        assert!(within(s.p99, 100));
        assert!(within(s.p999, 100), "p99.9 of 1000 samples is the 999th: {s:?}");
        assert!(within(s.max, 50_000));
    }

    #[test]
    fn empty_summary_has_no_values() {
        let s = Latency::new().summary();
        assert_eq!(s, Summary::default());
        assert_eq!(s.human(), "no samples");
    }

    #[test]
    fn buckets_round_trip_and_merge() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for us in [5, 50, 500, 5_000, 50_000, 5_000_000] {
            a.record(us);
            b.record(us * 2);
        }
        b.record_between(10, 5); // negative
        let back = Latency::from_buckets(&a.to_buckets());
        assert_eq!(back.summary(), a.summary());
        let mut merged = Latency::from_buckets(&a.to_buckets());
        merged.merge(&Latency::from_buckets(&b.to_buckets()));
        let s = merged.summary();
        assert_eq!(s.count, 13);
        assert_eq!(s.negative, 1);
        assert_eq!(s.min, Some(0));
        assert!(within(s.max, 10_000_000));
    }

    #[test]
    fn huge_values_saturate() {
        let mut l = Latency::new();
        l.record(u64::MAX);
        assert!(within(l.summary().max, HIGHEST_US));
    }

    #[test]
    fn formats_milliseconds() {
        assert_eq!(format_ms(1_234), "1.234");
        assert_eq!(format_ms(7), "0.007");
        assert_eq!(format_ms(12_000_050), "12000.050");
    }
}
