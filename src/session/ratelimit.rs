//! Per-session command rate limiting: a token bucket of N per second with a burst of 2N, and a
//! second, slower bucket that counts refusals so that a session that keeps flooding is closed
//! rather than answered forever.

use std::time::Instant;

#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Self { capacity, per_sec, tokens: capacity, at: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with one incoming command.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer `rate_limited`.
    Refuse,
    /// Close the session with 1008.
    Close,
}

#[derive(Debug)]
pub struct RateLimiter {
    commands: Option<Bucket>,
    refusals: Bucket,
}

impl RateLimiter {
    /// `per_sec` commands a second with a burst of twice that; 0 turns limiting off.
    pub fn new(per_sec: u32, now: Instant) -> Self {
        let n = f64::from(per_sec);
        Self {
            commands: (per_sec > 0).then(|| Bucket::new(2.0 * n, n, now)),
            refusals: Bucket::new((2.0 * n).max(20.0), (n / 10.0).max(1.0), now),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let Some(commands) = &mut self.commands else { return Verdict::Allow };
        if commands.take(now) {
            Verdict::Allow
        } else if self.refusals.take(now) {
            Verdict::Refuse
        } else {
            Verdict::Close
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refuse_then_refill() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, t0);
        for _ in 0..20 {
            assert_eq!(rl.check(t0), Verdict::Allow);
        }
        assert_eq!(rl.check(t0), Verdict::Refuse);
        assert_eq!(rl.check(t0 + Duration::from_millis(100)), Verdict::Allow, "one token back after 100 ms");
    }

    #[test]
    fn a_flood_ends_in_close() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, t0);
        let verdicts: Vec<_> = (0..100).map(|_| rl.check(t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Allow).count(), 20);
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Refuse).count(), 20);
        assert_eq!(verdicts.last(), Some(&Verdict::Close));
    }

    #[test]
    fn a_steady_sender_below_the_limit_is_never_refused() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, t0);
        for i in 0..1000 {
            assert_eq!(rl.check(t0 + Duration::from_millis(100 * i)), Verdict::Allow);
        }
    }

    #[test]
    fn zero_is_off() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(0, t0);
        assert!((0..10_000).all(|_| rl.check(t0) == Verdict::Allow));
    }
}
