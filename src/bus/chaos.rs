//! A bus that misbehaves on purpose, to prove that sessions repair: between any bus and the
//! node's hub, it drops, duplicates and delays (and so reorders) stream messages, the way real
//! buses do around reconnects. Like them, it does not stay silent about a drop: a while later it
//! reports a loss ([`Event::Resync`]), as a reconnect or a slow-consumer event does, so that a
//! message dropped at the end of a stream is repaired too. Presence frames, disconnects and
//! broadcasts pass untouched: only stream messages carry seqs to repair from.
//!
//! Tests turn it on with the hidden `--test-bus-faults drop=P,dup=P,delay=P,max-delay=MS`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};

use super::{Event, Sink, Topic};

/// How often each fault strikes a stream message, and how late a delayed one arrives at most.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    pub delay: f64,
    pub max_delay: Duration,
}

impl Faults {
    /// Parses `drop=0.1,dup=0.1,delay=0.3,max-delay=50` (probabilities, and milliseconds).
    pub(crate) fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut faults = Self { drop: 0.0, duplicate: 0.0, delay: 0.0, max_delay: Duration::from_millis(50) };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').with_context(|| format!("--test-bus-faults: `{part}`"))?;
            let number: f64 = value.parse().with_context(|| format!("--test-bus-faults: `{part}`"))?;
            let probability = || {
                if (0.0..=1.0).contains(&number) { Ok(number) } else { bail!("--test-bus-faults: {name} is 0 to 1") }
            };
            match name {
                "drop" => faults.drop = probability()?,
                "dup" => faults.duplicate = probability()?,
                "delay" => faults.delay = probability()?,
                "max-delay" => faults.max_delay = Duration::from_millis(number as u64),
                _ => bail!("--test-bus-faults: unknown fault `{name}` (drop, dup, delay, max-delay)"),
            }
        }
        Ok(faults)
    }
}

/// How long after a drop the loss is reported, like a reconnect noticed.
const LOSS_NOTICED: Duration = Duration::from_millis(300);

/// A [`Sink`] that passes events to `inner` with [`Faults`].
pub(crate) struct ChaosSink {
    inner: Arc<dyn Sink>,
    faults: Faults,
    rng: Mutex<fastrand::Rng>,
}

impl ChaosSink {
    pub(crate) fn new(inner: Arc<dyn Sink>, faults: Faults) -> Self {
        Self { inner, faults, rng: Mutex::new(fastrand::Rng::new()) }
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().unwrap_or_else(|e| e.into_inner()).f64() < p
    }

    fn late(&self, topic: &Topic, event: &Event, after: Duration) {
        let (inner, topic, event) = (self.inner.clone(), topic.clone(), event.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(after).await;
                    inner.deliver(&topic, &event);
                });
            }
            Err(_) => inner.deliver(&topic, &event),
        }
    }

    fn some_delay(&self) -> Duration {
        let ms = self.faults.max_delay.as_millis() as u64;
        Duration::from_millis(self.rng.lock().unwrap_or_else(|e| e.into_inner()).u64(0..=ms))
    }
}

impl Sink for ChaosSink {
    fn deliver(&self, topic: &Topic, event: &Event) {
        let Event::Message(delivery) = event else { return self.inner.deliver(topic, event) };
        if delivery.position.is_none() {
            return self.inner.deliver(topic, event);
        }
        if self.roll(self.faults.drop) {
            self.late(&Topic::All, &Event::Resync, LOSS_NOTICED);
            return;
        }
        if self.roll(self.faults.delay) {
            self.late(topic, event, self.some_delay());
        } else {
            self.inner.deliver(topic, event);
        }
        if self.roll(self.faults.duplicate) {
            self.late(topic, event, self.some_delay());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_refuse_nonsense() {
        let f = Faults::parse("drop=0.1,dup=0.2,delay=0.3,max-delay=20").unwrap();
        assert_eq!((f.drop, f.duplicate, f.delay, f.max_delay), (0.1, 0.2, 0.3, Duration::from_millis(20)));
        assert!(Faults::parse("drop=2").is_err());
        assert!(Faults::parse("lose=0.1").is_err());
        assert!(Faults::parse("drop").is_err());
    }
}
