//! The NATS subjects of a cluster, in one place. Every subject starts with the cluster's
//! `--prefix` (P below), so several clusters or test runs share one NATS.
//!
//! | subject | carries |
//! |---|---|
//! | `P.u.<user>` | events for a user's sessions (direct messages, disconnects) |
//! | `P.r.<room>` | events for a room's members (messages, presence) |
//! | `P.all` | broadcasts |
//! | `P.ping.<id>` | round trips of one connection to the server (see `Nats::round_trip`) |
//!
//! A name may hold `.`, which separates a subject's tokens: it is written `%2E`, and `%` never
//! appears in a name (PROTOCOL.md §1), so every name has a subject of its own, one token long,
//! and no name can address, or wildcard-match, another's messages. No name holds whitespace, `*`
//! or `>`.

use crate::bus::Topic;
use crate::protocol::{RoomName, UserId};

/// How a `.` in a name is written in a subject.
const DOT: &str = "%2E";

/// A name as one subject token: its dots written [`DOT`].
pub(crate) fn token(name: &str) -> String {
    name.replace('.', DOT)
}

/// The name a [`token`] stands for.
pub(crate) fn name_of(token: &str) -> String {
    token.replace(DOT, ".")
}

#[derive(Clone, Debug)]
pub(crate) struct Subjects {
    prefix: String,
}

impl Subjects {
    /// The subjects under `prefix`, which [`validate_prefix`] accepted.
    pub(crate) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// The subject of `topic`'s events.
    pub(crate) fn topic_subject(&self, topic: &Topic) -> String {
        let (kind, name) = match topic {
            Topic::User(user) => ("u", user.as_str()),
            Topic::Room(room) => ("r", room.as_str()),
            Topic::All => return format!("{}.all", self.prefix),
        };
        format!("{}.{kind}.{}", self.prefix, token(name))
    }

    /// The topic a subject stands for, if it is one of this cluster's topic subjects.
    pub(crate) fn topic(&self, subject: &str) -> Option<Topic> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        if rest == "all" {
            return Some(Topic::All);
        }
        let (kind, encoded) = rest.split_once('.')?;
        if encoded.contains('.') {
            return None;
        }
        let name = name_of(encoded);
        match kind {
            "u" => UserId::parse(&name).ok().map(Topic::User),
            "r" => RoomName::parse(&name).ok().map(Topic::Room),
            _ => None,
        }
    }

    /// The subject of one connection's round trips; `id` is unique to the connection.
    pub(crate) fn ping(&self, id: &str) -> String {
        format!("{}.ping.{id}", self.prefix)
    }
}

/// Checks that `prefix` makes valid, literal subjects: tokens separated by single dots, none of
/// them empty or a wildcard (`*`, `>`), and no whitespace.
pub(crate) fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    let why = if prefix.is_empty() {
        Some("it is empty")
    } else if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it holds whitespace")
    } else if prefix.split('.').any(str::is_empty) {
        Some("it has an empty token (a leading, trailing or doubled `.`)")
    } else if prefix.split('.').any(|token| token == "*" || token == ">") {
        Some("it has a wildcard token (`*` or `>`)")
    } else {
        None
    };
    match why {
        Some(why) => anyhow::bail!(
            "--prefix {prefix:?} cannot start a NATS subject: {why}; give tokens of letters, digits, _ or - separated by ."
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bus::tests::{room_topic as room, user_topic as user};

    #[test]
    fn subjects_follow_the_layout() {
        let subjects = Subjects::new("sy");
        assert_eq!(subjects.topic_subject(&user("alice")), "sy.u.alice");
        assert_eq!(subjects.topic_subject(&room("a:b.c")), "sy.r.a:b%2Ec");
        assert_eq!(subjects.topic_subject(&room(".x..")), "sy.r.%2Ex%2E%2E");
        assert_eq!(subjects.topic_subject(&Topic::All), "sy.all");
        assert_eq!(subjects.ping("abc"), "sy.ping.abc");
    }

    #[test]
    fn every_topic_comes_back_from_its_subject() {
        let subjects = Subjects::new("sy.test");
        let topics = [
            user("alice"),
            user("a.b"),
            user("a_2Eb"),
            room("a:b.c"),
            room("..."),
            room("x@y-z_1"),
            room(&"r.".repeat(64)),
            Topic::All,
        ];
        for topic in topics {
            let subject = subjects.topic_subject(&topic);
            assert!(!subject.contains(char::is_whitespace), "{subject}");
            assert_eq!(subject.split('.').count(), if topic == Topic::All { 3 } else { 4 }, "{subject}");
            assert_eq!(subjects.topic(&subject), Some(topic), "{subject}");
        }
        for foreign in ["other.u.alice", "sy.test.x.alice", "sy.test.u.a.b", "sy.test.u.", "sy.test.all.x", "sy.test"] {
            assert_eq!(subjects.topic(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn no_two_names_share_a_subject() {
        // Every name of up to three characters from the ones that matter: `.` and its neighbours.
        let alphabet = ['.', 'a', '2', 'E', ':', '_'];
        let mut names = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..3 {
            names = names.iter().flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}"))).collect();
            all.extend(names.iter().cloned());
        }
        let subjects = Subjects::new("p");
        let mut seen = std::collections::HashSet::new();
        for name in &all {
            for topic in [user(name), room(name)] {
                assert!(seen.insert(subjects.topic_subject(&topic)), "{topic:?} shares its subject");
            }
        }
        assert!(!seen.contains(&subjects.topic_subject(&Topic::All)));
    }

    #[test]
    fn a_prefix_must_make_literal_subjects() {
        for ok in ["switchyard", "sy.test", "a-b_c", "t_0123456789abcdef"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            (".a", "empty token"),
            ("a.", "empty token"),
            ("a..b", "empty token"),
            ("a.*.b", "wildcard"),
            ("a.>", "wildcard"),
            ("*", "wildcard"),
        ] {
            let e = validate_prefix(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--prefix") && e.contains(why), "{bad:?}: {e}");
        }
    }
}
