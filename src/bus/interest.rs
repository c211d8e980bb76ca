//! Which topics a node wants, counted per local session, for a bus that subscribes by name (a
//! Redis channel, a NATS subject, a RabbitMQ binding).
//!
//! Sessions add and remove interest at any time; one task of the bus asks for the [`pending`]
//! changes, applies them to its server in batches, in order, and [`confirm`]s them. `add`
//! returns only once the server confirmed the name, which is what makes a catch-up read made
//! afterwards gapless. After the bus's connection was replaced, [`reset`] makes every wanted name
//! pending again.
//!
//! [`pending`]: Interests::pending
//! [`confirm`]: Interests::confirm
//! [`reset`]: Interests::reset

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::BusError;

struct Interest {
    /// Local sessions interested in the name.
    count: usize,
    /// Whether the server confirmed the subscription.
    active: bool,
    ready: watch::Sender<bool>,
}

/// The names a node wants, and which of them its server has.
#[derive(Default)]
pub(crate) struct Interests {
    names: Mutex<HashMap<String, Interest>>,
    /// Woken when there is something to apply.
    changed: Arc<Notify>,
}

impl Interests {
    fn names(&self) -> MutexGuard<'_, HashMap<String, Interest>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the bus's task waits on for changes to apply.
    pub(crate) fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Adds one local interest in `name` and returns once the server has it, or fails after
    /// `timeout` (naming `server` in the error).
    pub(crate) async fn add(&self, name: String, timeout: Duration, server: &str) -> Result<(), BusError> {
        let mut ready = {
            let mut names = self.names();
            let entry = names.entry(name).or_insert_with(|| Interest {
                count: 0,
                active: false,
                ready: watch::channel(false).0,
            });
            entry.count += 1;
            if entry.active {
                return Ok(());
            }
            entry.ready.subscribe()
        };
        self.changed.notify_one();
        match tokio::time::timeout(timeout, ready.wait_for(|subscribed| *subscribed)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BusError::Unavailable(format!("{server} did not confirm the subscription in time"))),
        }
    }

    /// Removes one local interest in `name`; the bus's task drops the subscription when none is
    /// left.
    pub(crate) fn remove(&self, name: &str) {
        let idle = self.names().get_mut(name).is_some_and(|i| {
            i.count = i.count.saturating_sub(1);
            i.count == 0
        });
        if idle {
            self.changed.notify_one();
        }
    }

    /// At most `batch` names each to subscribe and to unsubscribe now; forgets names nobody
    /// wants that were never subscribed.
    pub(crate) fn pending(&self, batch: usize) -> (Vec<String>, Vec<String>) {
        let mut names = self.names();
        names.retain(|_, i| i.count > 0 || i.active);
        let subscribe = names.iter().filter(|(_, i)| i.count > 0 && !i.active).map(|(n, _)| n.clone()).take(batch);
        let subscribe = subscribe.collect();
        let unsubscribe = names.iter().filter(|(_, i)| i.count == 0 && i.active).map(|(n, _)| n.clone()).take(batch);
        (subscribe, unsubscribe.collect())
    }

    /// Records that the server now has (`subscribed`) or no longer has `names`.
    pub(crate) fn confirm(&self, names: &[String], subscribed: bool) {
        let mut all = self.names();
        for name in names {
            if let Some(i) = all.get_mut(name) {
                i.active = subscribed;
                i.ready.send_replace(subscribed);
            }
        }
    }

    /// The server has none of the names any more (a new connection): every wanted name is
    /// pending again, and `add` waits for it as for a new one.
    pub(crate) fn reset(&self) {
        let mut names = self.names();
        names.retain(|_, i| i.count > 0);
        for i in names.values_mut() {
            i.active = false;
            i.ready.send_replace(false);
        }
    }

    /// The server dropped `names` (the connection to one of several servers ended, or a server
    /// moved them away): each still wanted is pending again, and `add` waits for it as for a
    /// new one; the others are forgotten.
    pub(crate) fn reset_names<S: AsRef<str>>(&self, dropped: impl IntoIterator<Item = S>) {
        let mut names = self.names();
        let mut any = false;
        for name in dropped {
            let name = name.as_ref();
            match names.get_mut(name) {
                Some(i) if i.count > 0 => {
                    i.active = false;
                    i.ready.send_replace(false);
                    any = true;
                }
                Some(_) => {
                    names.remove(name);
                }
                None => {}
            }
        }
        drop(names);
        if any {
            self.changed.notify_one();
        }
    }

    /// Whether the server has every wanted name.
    pub(crate) fn settled(&self) -> bool {
        self.names().values().all(|i| i.count == 0 || i.active)
    }

    /// Whether a local session wants `name`.
    pub(crate) fn wanted(&self, name: &str) -> bool {
        self.names().get(name).is_some_and(|i| i.count > 0)
    }

    /// Whether the server has `name` (tests).
    #[cfg(test)]
    pub(crate) fn active(&self, name: &str) -> bool {
        self.names().get(name).is_some_and(|i| i.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interest_is_counted_and_confirmed_in_batches() {
        let interests = Arc::new(Interests::default());
        let adding = tokio::spawn({
            let interests = interests.clone();
            async move { interests.add("a".into(), Duration::from_secs(5), "test").await }
        });
        tokio::task::yield_now().await;
        while interests.pending(10).0.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(interests.pending(10), (vec!["a".to_owned()], vec![]));
        interests.confirm(&["a".to_owned()], true);
        adding.await.unwrap().unwrap();
        interests.add("a".into(), Duration::from_millis(1), "test").await.expect("active: at once");
        interests.remove("a");
        assert_eq!(interests.pending(10), (vec![], vec![]), "one interest is left");
        interests.remove("a");
        assert!(!interests.wanted("a") && interests.active("a"));
        assert_eq!(interests.pending(10), (vec![], vec!["a".to_owned()]));
        interests.confirm(&["a".to_owned()], false);
        assert_eq!(interests.pending(10), (vec![], vec![]), "forgotten");
        let e = interests.add("b".into(), Duration::from_millis(10), "the server").await.unwrap_err();
        assert!(e.to_string().contains("the server did not confirm"), "{e}");
    }

    #[tokio::test]
    async fn a_reset_makes_every_wanted_name_pending_again() {
        let interests = Interests::default();
        for name in ["a", "b"] {
            let _ = interests.add(name.into(), Duration::ZERO, "test").await;
        }
        interests.confirm(&["a".to_owned(), "b".to_owned()], true);
        interests.remove("b");
        interests.reset();
        assert!(!interests.active("a"));
        assert_eq!(interests.pending(10), (vec!["a".to_owned()], vec![]), "b is no longer wanted");
    }

    #[tokio::test]
    async fn a_reset_of_some_names_leaves_the_others_confirmed() {
        let interests = Interests::default();
        for name in ["a", "b", "c"] {
            let _ = interests.add(name.into(), Duration::ZERO, "test").await;
        }
        interests.confirm(&["a".to_owned(), "b".to_owned(), "c".to_owned()], true);
        assert!(interests.settled());
        interests.remove("c");
        interests.reset_names(["a", "c", "unknown"]);
        assert!(!interests.active("a") && interests.active("b") && !interests.settled());
        assert_eq!(interests.pending(10), (vec!["a".to_owned()], vec![]), "c is forgotten, not unsubscribed");
        interests.confirm(&["a".to_owned()], true);
        assert!(interests.settled());
    }
}
