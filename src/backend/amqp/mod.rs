//! RabbitMQ as the cluster bus (`--bus amqp://…`), and what the bus needs of it: the names it
//! declares, the connection, and the limits checked at start-up.
//!
//! | name | what | holds |
//! |---|---|---|
//! | `P.bus` | topic exchange, auto-delete | every event of the cluster, routed by key |
//! | (server-named) | exclusive auto-delete queue, one per node | what the node's bindings route to it |
//! | `u.<user>` | routing key | events for a user's sessions (direct messages, disconnects) |
//! | `r.<room>` | routing key | events for a room's members (messages, presence) |
//! | `all` | routing key | broadcasts |
//!
//! P is the cluster's `--prefix`. A topic exchange splits keys into words at `.`, and user and
//! room names may hold dots, so a name's dots are written as `%` (never in a name, see
//! [`crate::protocol::valid_name`]): `a.b` is `u.a%b`, two words, and no name can be written as
//! another's key. One byte per dot keeps the longest key (128 characters and `u.`) within the
//! 255 bytes AMQP allows for a routing key, which `%2E` would not. Keys are bound as they are,
//! never as patterns: `*` and `#` are not in names either.
//!
//! The URL's credentials are never printed (see [`redact`](super::redact)).
//!
//! `amqps://` connects over TLS (rustls), trusting the system's CAs and those of a `cacertfile`;
//! `certfile` and `keyfile` give a client certificate. The parameters are RabbitMQ's own URI
//! query names, read from the URL here because lapin ignores them.

pub(crate) mod bus;

pub(crate) use bus::AmqpBus;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::bus::Topic;
use crate::protocol::{RoomName, UserId};

/// Longest wait for a connection, its channels and its declarations.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// RabbitMQ's `max_message_size` by default (3.8 and later): the largest message it takes.
pub(crate) const RABBITMQ_MAX_MESSAGE: usize = 128 << 20;
/// What a bus message adds to the largest body a node accepts: the envelope and record heads
/// (stream, seq, mid, names: a few hundred bytes) and the 4 KiB more the HTTP API allows for
/// the JSON around a body.
pub(crate) const ENVELOPE_ROOM: usize = 8 << 10;

/// The names one cluster uses on RabbitMQ.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    exchange: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Self { exchange: format!("{prefix}.bus") }
    }

    /// The topic exchange every node publishes to.
    pub(crate) fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key of `topic`.
    pub(crate) fn routing_key(&self, topic: &Topic) -> String {
        let (kind, name) = match topic {
            Topic::User(user) => ("u.", user.as_str()),
            Topic::Room(room) => ("r.", room.as_str()),
            Topic::All => return "all".to_owned(),
        };
        let mut key = String::with_capacity(kind.len() + name.len());
        key.push_str(kind);
        key.extend(name.chars().map(|c| if c == '.' { '%' } else { c }));
        key
    }

    /// The topic a routing key stands for; `None` when it is not one of [`Names::routing_key`]'s.
    pub(crate) fn topic(&self, key: &str) -> Option<Topic> {
        if key == "all" {
            return Some(Topic::All);
        }
        let (kind, name) = key.split_once('.')?;
        if name.contains('.') {
            return None;
        }
        // Read for every message a node receives: most names have no dot to restore.
        let name = match name.contains('%') {
            true => std::borrow::Cow::Owned(name.replace('%', ".")),
            false => std::borrow::Cow::Borrowed(name),
        };
        match kind {
            "u" => UserId::parse(&name).ok().map(Topic::User),
            "r" => RoomName::parse(&name).ok().map(Topic::Room),
            _ => None,
        }
    }
}

/// Checks `--prefix` against what an exchange name takes: RabbitMQ keeps names that start with
/// `amq.` to itself, and `<prefix>.bus` is one when the prefix is `amq`. (The general rule for
/// a prefix, letters, digits, `_` and `-`, is checked with the other options.)
pub(crate) fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix == "amq" {
        bail!("--prefix amq: RabbitMQ reserves exchange names that start with `amq.`; choose another --prefix");
    }
    Ok(())
}

/// Checks a `--bus` URL at start-up: that it parses, and that the files of its TLS parameters
/// can be read and hold what they should.
pub(crate) fn validate_url(url: &str) -> anyhow::Result<()> {
    let shown = super::redact(url);
    // Not the parser's message: it may quote the URL, whose redacted form alone is shown.
    if url.parse::<AMQPUri>().is_err() {
        bail!("--bus {shown}: not a valid AMQP URL (amqp://USER:PASSWORD@HOST:PORT/VHOST)");
    }
    let files = TlsFiles::of(url).map_err(|e| anyhow::anyhow!("--bus {shown}: {e}"))?;
    files.config().map_err(|e| anyhow::anyhow!("--bus {shown}: {e}"))?;
    Ok(())
}

/// The TLS parameters of an `amqps://` URL's query, under RabbitMQ's names.
#[derive(Debug, Default, PartialEq)]
struct TlsFiles {
    /// PEM certificates of CAs trusted beside the system's.
    ca: Option<PathBuf>,
    /// A PEM client certificate chain and its PEM (PKCS#8, PKCS#1 or SEC1) key, given together.
    identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn of(url: &str) -> Result<Self, String> {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| "its query does not parse".to_owned())?;
        let param = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| PathBuf::from(v));
        let (ca, cert, key) = (param("cacertfile"), param("certfile"), param("keyfile"));
        let tls = url.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("amqps:"));
        if !tls && (ca.is_some() || cert.is_some() || key.is_some()) {
            return Err("cacertfile, certfile and keyfile are for TLS: use amqps://".into());
        }
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("certfile and keyfile go together: give both or neither".into()),
        };
        Ok(Self { ca, identity })
    }

    /// Reads the files, so that a certificate renewed on disk is used by the next connection.
    fn config(&self) -> Result<OwnedTLSConfig, String> {
        let read = |path: &PathBuf, what: &str| -> Result<Vec<u8>, String> {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("{what} {} is not PEM", path.display()));
            }
            Ok(pem)
        };
        let cert_chain = match &self.ca {
            Some(path) => Some(
                String::from_utf8(read(path, "cacertfile")?)
                    .map_err(|_| format!("cacertfile {} is not PEM", path.display()))?,
            ),
            None => None,
        };
        let identity = match &self.identity {
            Some((cert, key)) => {
                Some(OwnedIdentity::PKCS8 { pem: read(cert, "certfile")?, key: read(key, "keyfile")? })
            }
            None => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

/// Checks that the largest message a node accepts, in its envelope, fits in a RabbitMQ
/// message of the default size limit.
pub(crate) fn validate_message_size(max_message_size: usize) -> anyhow::Result<()> {
    let most = RABBITMQ_MAX_MESSAGE - ENVELOPE_ROOM;
    if max_message_size > most {
        bail!(
            "--max-message-size {max_message_size} is more than the RabbitMQ bus carries: RabbitMQ takes \
             messages of up to 128 MiB by default (its max_message_size) and a bus message needs {ENVELOPE_ROOM} \
             bytes beside the body, so lower --max-message-size to at most {most}"
        );
    }
    Ok(())
}

/// Connects to the RabbitMQ at `url`, naming the connection after the node, within
/// [`CONNECT_TIMEOUT`]; over TLS for `amqps://`.
pub(crate) async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(format!("switchyard {name}").into());
    let io = |e: String| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
    let tls = TlsFiles::of(url).and_then(|files| files.config()).map_err(io)?;
    let runtime = lapin::runtime::default_runtime()?;
    let connecting = Connection::connect_with_config(url, properties, tls, runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting to rabbitmq timed out",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bus::tests::{room_topic as room, user_topic as user};

    #[test]
    fn routing_keys_round_trip_and_dots_never_split_a_name() {
        let names = Names::new("sy");
        assert_eq!(names.exchange(), "sy.bus");
        for (topic, key) in [
            (user("alice"), "u.alice"),
            (user("a.b"), "u.a%b"),
            (room("..."), "r.%%%"),
            (room("a:b@c-d_e"), "r.a:b@c-d_e"),
            (Topic::All, "all"),
        ] {
            assert_eq!(names.routing_key(&topic), key);
            assert_eq!(names.topic(key), Some(topic));
        }
        for stray in ["x.alice", "u.", "u.a b", "alice", "all.x", "u.a*", "r.a.b"] {
            assert_eq!(names.topic(stray), None, "{stray}");
        }
    }

    #[test]
    fn routing_keys_are_injective_and_fit_in_a_short_string() {
        // Every name of up to three characters drawn from the ones that matter here: dots, a
        // letter, and the `:` and `-` that other encodings use as separators.
        let alphabet = ['.', 'a', ':', '-'];
        let mut names = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> =
                names.iter().flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}"))).collect();
            names.extend(longer);
        }
        names.retain(|n| !n.is_empty());
        names.sort();
        names.dedup();
        let layout = Names::new("sy");
        let mut keys = std::collections::HashSet::new();
        for name in &names {
            for topic in [user(name), room(name)] {
                let key = layout.routing_key(&topic);
                assert!(!key[2..].contains('.'), "{key}: a name is one word");
                assert!(keys.insert(key.clone()), "{key} is the key of two topics");
                assert_eq!(layout.topic(&key), Some(topic));
            }
        }
        assert!(!keys.contains("all"));
        let longest = layout.routing_key(&user(&".".repeat(128)));
        assert!(longest.len() <= 255, "{} bytes", longest.len());
    }

    #[test]
    fn tls_parameters_are_read_from_the_query_and_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").unwrap();
        let url = format!("amqps://g:g@mq:5671/%2f?heartbeat=10&cacertfile={}", ca.display());
        let files = TlsFiles::of(&url).unwrap();
        assert_eq!(files, TlsFiles { ca: Some(ca.clone()), identity: None });
        assert!(files.config().unwrap().cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        let encoded = format!("amqps://mq/?certfile={}&keyfile=%2Fk%20ey.pem", ca.display());
        assert_eq!(TlsFiles::of(&encoded).unwrap().identity, Some((ca.clone(), PathBuf::from("/k ey.pem"))));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = TlsFiles::of(&format!("amqps://mq/?cacertfile={}", junk.display())).unwrap().config().unwrap_err();
        assert!(e.contains("is not PEM"), "{e}");
        assert_eq!(TlsFiles::of("amqp://g:g@mq/%2f").unwrap(), TlsFiles::default());
    }

    #[test]
    fn start_up_checks_name_what_to_change() {
        assert!(validate_prefix("switchyard").is_ok());
        let e = validate_prefix("amq").unwrap_err().to_string();
        assert!(e.contains("--prefix") && e.contains("amq."), "{e}");
        assert!(validate_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(validate_url("amqps://u:secret@mq:5671/%2f").is_ok());
        let e = validate_url("amqp://u:secret@mq:notaport/%2f").unwrap_err().to_string();
        assert!(e.contains("not a valid AMQP URL") && !e.contains("secret"), "{e}");
        let e = validate_url("amqps://u:secret@mq/%2f?cacertfile=/nowhere/ca.pem").unwrap_err().to_string();
        assert!(e.contains("cannot read cacertfile /nowhere/ca.pem") && !e.contains("secret"), "{e}");
        let e = validate_url("amqp://u:secret@mq/%2f?cacertfile=/ca.pem").unwrap_err().to_string();
        assert!(e.contains("use amqps://") && !e.contains("secret"), "{e}");
        let e = validate_url("amqps://u:secret@mq/%2f?certfile=/c.pem").unwrap_err().to_string();
        assert!(e.contains("certfile and keyfile go together"), "{e}");
        assert!(validate_message_size(65_536).is_ok());
        assert!(validate_message_size(RABBITMQ_MAX_MESSAGE - ENVELOPE_ROOM).is_ok());
        let e = validate_message_size(RABBITMQ_MAX_MESSAGE).unwrap_err().to_string();
        assert!(e.contains("lower --max-message-size") && e.contains("max_message_size"), "{e}");
    }
}
