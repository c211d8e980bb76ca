//! Wall-clock time in microseconds since the Unix epoch: what probe bodies carry, so that any
//! process on this machine can compute a message's latency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// How long until the wall-clock time `at_us` (zero if it has passed).
pub fn until_us(at_us: u64) -> Duration {
    Duration::from_micros(at_us.saturating_sub(now_us()))
}

/// Seconds as microseconds.
pub fn secs_us(s: f64) -> u64 {
    (s * 1e6).round().max(0.0) as u64
}
