//! How a stopping node drains (`--drain-delay`, `--drain-seconds`): first it stays up but
//! unready, so a gateway stops sending it new clients; then it closes its sessions with 1001 in
//! even batches, so their reconnects reach the other nodes at a steady pace instead of all at
//! once; then it stops.
//!
//! [`DrainState`] is what the HTTP side reads (`/readyz`, the upgrade); [`Plan`] and [`Batches`]
//! are the schedule that [`crate::Server::drain`] follows.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// The delay and window an orchestrator's SIGTERM gets by default: 5 s for a gateway to take the
/// node out of rotation (the usual pre-stop sleep behind a Kubernetes Service or an ingress), then
/// 10 s of closes; with the final 10 s wait for goodbyes it fits Kubernetes' default 30 s grace.
pub const SIGTERM_DEFAULT: Plan = Plan { delay: Duration::from_secs(5), window: Duration::from_secs(10) };

/// Shortest pause between two batches: finer steps would only add wake-ups.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// When to stop serving and how fast to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Time the node stays up, unready, before closing anything.
    pub delay: Duration,
    /// Time over which the sessions are closed; zero closes them together.
    pub window: Duration,
}

impl Plan {
    /// No delay and every session closed at once: what `Server::shutdown` does.
    pub const NOW: Plan = Plan { delay: Duration::ZERO, window: Duration::ZERO };

    /// The plan from the flags, each falling back on `default` when not given.
    pub fn from_flags(delay: Option<u64>, window: Option<u64>, default: Plan) -> Plan {
        Plan {
            delay: delay.map_or(default.delay, Duration::from_secs),
            window: window.map_or(default.window, Duration::from_secs),
        }
    }
}

/// Where a node is between serving and stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Phase {
    Serving = 0,
    /// `/readyz` answers 503; sessions, new connections and the API all still work.
    Unready = 1,
    /// Sessions are being closed and new ones are refused (503).
    Closing = 2,
}

/// The drain's phase, shared with the request handlers.
#[derive(Default)]
pub(crate) struct DrainState(AtomicU8);

impl DrainState {
    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Unready,
            _ => Phase::Closing,
        }
    }

    /// Moves forward to `phase` (never back).
    pub fn enter(&self, phase: Phase) {
        self.0.fetch_max(phase as u8, Ordering::AcqRel);
    }
}

/// `total` sessions split into batches spread evenly over a window: batch `k` is due at
/// `k × interval` after the closes start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Batches {
    total: usize,
    count: usize,
    pub interval: Duration,
}

impl Batches {
    pub fn new(total: usize, window: Duration) -> Self {
        let most = (window.as_millis() / MIN_INTERVAL.as_millis()).max(1) as usize;
        let count = total.clamp(1, most);
        let interval = if count > 1 { window / count as u32 } else { Duration::ZERO };
        Self { total, count, interval }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The sessions of batch `k`: a range of indices into the `total`.
    pub fn range(&self, k: usize) -> std::ops::Range<usize> {
        let edge = |k: usize| k * self.total / self.count;
        edge(k)..edge(k + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_session_once_and_evenly() {
        for (total, window_ms) in
            [(0, 10_000), (1, 10_000), (7, 10_000), (400, 10_000), (100_000, 10_000), (5, 0), (9, 120)]
        {
            let b = Batches::new(total, Duration::from_millis(window_ms));
            let mut next = 0;
            let mut sizes = Vec::new();
            for k in 0..b.count() {
                let r = b.range(k);
                assert_eq!(r.start, next, "{total} over {window_ms} ms");
                next = r.end;
                sizes.push(r.len());
            }
            assert_eq!(next, total, "{total} over {window_ms} ms");
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{total} over {window_ms} ms: {sizes:?}");
            assert!(b.interval * b.count() as u32 <= Duration::from_millis(window_ms));
            if b.count() > 1 {
                assert!(b.interval >= MIN_INTERVAL);
            }
        }
        let b = Batches::new(400, Duration::from_secs(10));
        assert_eq!((b.count(), b.interval), (200, Duration::from_millis(50)));
        let b = Batches::new(4, Duration::from_secs(10));
        assert_eq!((b.count(), b.interval), (4, Duration::from_millis(2500)));
        assert_eq!(Batches::new(50, Duration::ZERO).count(), 1, "a zero window is one batch");
    }

    #[test]
    fn flags_beat_the_signal_default() {
        assert_eq!(Plan::from_flags(None, None, SIGTERM_DEFAULT), SIGTERM_DEFAULT);
        assert_eq!(Plan::from_flags(None, None, Plan::NOW), Plan::NOW);
        let plan = Plan::from_flags(Some(0), Some(3), SIGTERM_DEFAULT);
        assert_eq!(plan, Plan { delay: Duration::ZERO, window: Duration::from_secs(3) });
    }

    #[test]
    fn the_phase_only_moves_forward() {
        let state = DrainState::default();
        assert_eq!(state.phase(), Phase::Serving);
        state.enter(Phase::Closing);
        state.enter(Phase::Unready);
        assert_eq!(state.phase(), Phase::Closing);
    }
}
