//! The NATS backends, all on one shared client per URL ([`Nats`]): the bus on core NATS
//! (`bus.rs`; every subject named in `subjects.rs`), the store on JetStream (`store.rs`), and
//! presence and the node registry on JetStream key-value buckets (`presence.rs`, `registry.rs`;
//! their layout in `keys.rs`, the compare-and-set and listings they share in `kv.rs`). Here: the
//! client with our options, the connection's [`Status`], a round trip through the server
//! ([`Nats::round_trip`]), the limits checked at start-up, the replica count, the creation of
//! buckets, and the liveness rule of the registry.
//!
//! Core NATS delivers at most once, and async-nats keeps quiet about two losses: what is
//! published while the client reconnects never reaches it (async-nats subscribes again by itself,
//! but only to what comes next), and a message that finds a subscription's buffer full is
//! dropped, reported by nothing but a `SlowConsumer` event. [`Status`] counts both, without
//! relying on events alone (events can be dropped when async-nats's event queue is full; the
//! connect count cannot), so that the bus turns each into `Event::Resync`.
//!
//! async-nats's `Client::flush` only writes the client's buffer to the socket; it does not ask
//! the server anything. What must know that the server has processed earlier commands (a
//! subscription, before a catch-up read) uses [`Nats::round_trip`]: a message to this connection's
//! own subject, which the server handles after everything the connection sent before it.

pub(crate) mod bus;
pub(crate) mod keys;
pub(crate) mod kv;
pub(crate) mod presence;
pub(crate) mod registry;
pub(crate) mod store;
pub(crate) mod subjects;

pub(crate) use bus::NatsBus;
pub(crate) use keys::Instance;
pub(crate) use presence::NatsPresence;
pub(crate) use registry::NatsRegistry;
pub(crate) use store::NatsStore;
pub(crate) use subjects::{Subjects, validate_prefix};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::connection::State;
use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use async_nats::jetstream::{self as js, kv as nats_kv};
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};

use crate::backend::redact;

/// Longest wait for the TCP connection and the handshake with one server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the client pings a server that sent nothing: async-nats gives up on a connection
/// after the third unanswered ping, so a dead server is noticed within about 3 of these.
const PING_EVERY: Duration = Duration::from_secs(2);
/// How often a round trip whose message has not come back sends another one.
const RESEND_EVERY: Duration = Duration::from_millis(250);
/// Most bytes a record head takes beyond the body (see [`crate::message::Record`]), plus the
/// envelope's own head: `M <session> room:<name> <seq> `.
const ENVELOPE_ROOM: usize = crate::message::Record::HEAD + 256;

/// How one node connects to NATS.
#[derive(Clone, Debug)]
pub(crate) struct NatsOptions {
    /// The client's name, shown by the server's monitoring (`/connz`).
    pub name: String,
    /// Messages held per subscription before async-nats drops new ones (`None`: its default).
    pub subscription_capacity: Option<usize>,
}

/// The connection as async-nats reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    /// Whether the client holds a connection now.
    pub connected: bool,
    /// Connections made, the first included: one more means the client reconnected, and may
    /// have missed what was published meanwhile.
    pub connects: u64,
    /// `SlowConsumer` events seen: each is a message dropped because a subscription's buffer
    /// was full.
    pub slow_consumers: u64,
}

/// One client on one NATS URL, shared by the roles on it. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The URL, for messages (redacted).
    url: String,
    /// Bumped by every event of the client, to wake those watching the [`Status`].
    events: watch::Sender<u64>,
    slow_consumers: Arc<AtomicU64>,
    /// The subject of this connection's round trips, and the tokens sent and come back on it.
    ping: String,
    sent: AtomicU64,
    returned: watch::Receiver<u64>,
    /// Ends the task that reads the round trips when the last clone goes.
    _stop: oneshot::Sender<()>,
}

impl Nats {
    /// Connects to `url` (`nats://` or `tls://`, several `HOST:PORT` comma-separated, credentials
    /// as `user:password@` or `token@` before the first host) with unlimited reconnects. Fails
    /// when no server answers now, so that a wrong URL is reported at start-up; the error does
    /// not name the role nor show the URL, which the caller adds ([`Nats::url`] is redacted).
    pub(crate) async fn connect(url: &str, prefix: &str, options: &NatsOptions) -> anyhow::Result<Self> {
        let (servers, credentials) = servers(url)?;
        let (events, _) = watch::channel(0u64);
        let slow_consumers = Arc::new(AtomicU64::new(0));
        let mut connect = ConnectOptions::new()
            .name(&options.name)
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(PING_EVERY)
            .max_reconnects(None)
            .event_callback({
                let (events, slow) = (events.clone(), slow_consumers.clone());
                move |event| {
                    if matches!(event, Event::SlowConsumer(_)) {
                        slow.fetch_add(1, Ordering::Relaxed);
                    }
                    events.send_modify(|n| *n += 1);
                    std::future::ready(())
                }
            });
        if let Some(capacity) = options.subscription_capacity {
            connect = connect.subscription_capacity(capacity);
        }
        connect = match credentials {
            Credentials::None => connect,
            Credentials::Token(token) => connect.token(token),
            Credentials::UserPassword(user, password) => connect.user_and_password(user, password),
        };
        let client = connect.connect(servers).await.map_err(|e| anyhow::anyhow!("cannot connect: {e}"))?;
        let ping = Subjects::new(prefix).ping(&format!("{:016x}", fastrand::u64(..)));
        let pongs = client.subscribe(ping.clone()).await.context("subscribing to its own subject")?;
        let (returned_tx, returned) = watch::channel(0u64);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(read_round_trips(pongs, returned_tx, stopped));
        let nats = Self {
            inner: Arc::new(Inner {
                client,
                url: redact(url),
                events,
                slow_consumers,
                ping,
                sent: AtomicU64::new(0),
                returned,
                _stop: stop,
            }),
        };
        nats.round_trip(CONNECT_TIMEOUT).await.map_err(anyhow::Error::msg)?;
        Ok(nats)
    }

    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The URL, credentials redacted.
    pub(crate) fn url(&self) -> &str {
        &self.inner.url
    }

    /// The connection now.
    pub(crate) fn status(&self) -> Status {
        let client = &self.inner.client;
        Status {
            connected: client.connection_state() == State::Connected,
            connects: client.statistics().connects.load(Ordering::Relaxed),
            slow_consumers: self.inner.slow_consumers.load(Ordering::Relaxed),
        }
    }

    /// Changes whenever the client reports an event (connected, disconnected, slow consumer…):
    /// a prompt to read [`Nats::status`] again.
    pub(crate) fn events(&self) -> watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// Returns once the server has processed everything this client sent before the call, or
    /// fails after `timeout`, or at once while disconnected. A message to the connection's own
    /// subject comes back after them; one lost to a reconnect or a full buffer is sent again.
    pub(crate) async fn round_trip(&self, timeout: Duration) -> Result<(), String> {
        let inner = &self.inner;
        // Any token from here on was sent after what the caller sent before (see `read_round_trips`).
        let first = inner.sent.fetch_add(1, Ordering::AcqRel) + 1;
        let mut token = first;
        let mut returned = inner.returned.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Nothing comes back before a reconnect, and what is sent meanwhile fills the
            // client's command queue.
            if inner.client.connection_state() != State::Connected {
                return Err("nats is disconnected".into());
            }
            let sending = inner.client.publish(inner.ping.clone(), token.to_string().into());
            match tokio::time::timeout_at(deadline, sending).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("nats: {e}")),
                Err(_) => return Err("nats did not take a message in time".into()),
            }
            let wait = (tokio::time::Instant::now() + RESEND_EVERY).min(deadline);
            match tokio::time::timeout_at(wait, returned.wait_for(|back| *back >= first)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => return Err("nats connection closed".into()),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("nats did not answer within {} ms", timeout.as_millis()));
                }
                Err(_) => token = inner.sent.fetch_add(1, Ordering::AcqRel) + 1,
            }
        }
    }

    /// Refuses a `--max-message-size` whose messages would not fit in the server's
    /// `max_payload`.
    pub(crate) fn check_payload(&self, max_message_size: usize) -> anyhow::Result<()> {
        let max_payload = self.inner.client.server_info().max_payload;
        let needed = largest_envelope(max_message_size);
        if needed <= max_payload {
            return Ok(());
        }
        let lower = match max_payload.checked_sub(largest_envelope(0)) {
            Some(fits) if fits >= crate::config::MIN_MESSAGE_SIZE => {
                format!(", or lower --max-message-size to at most {fits}")
            }
            _ => String::new(),
        };
        anyhow::bail!(
            "the server takes messages of at most {max_payload} bytes (its max_payload), but --max-message-size \
             {max_message_size} makes messages of up to {needed} bytes on the bus: raise max_payload in nats-server's \
             config to at least {needed}{lower}"
        )
    }
}

/// The largest envelope of a message whose frame or API request is at most `max_message_size`
/// bytes: an API request may be [`crate::api::REQUEST_SLACK`] longer than that.
fn largest_envelope(max_message_size: usize) -> usize {
    max_message_size + crate::api::REQUEST_SLACK + ENVELOPE_ROOM
}

/// Reads the tokens that come back to this connection and publishes the highest. A token
/// `n` was sent after the caller of token `m < n` took `m`, and so after whatever that caller sent
/// before: any token at least as high as one's own proves one's earlier commands processed.
async fn read_round_trips(
    mut pongs: async_nats::Subscriber,
    returned: watch::Sender<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let message = tokio::select! {
            _ = &mut stop => return,
            message = pongs.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let token = std::str::from_utf8(&message.payload).ok().and_then(|t| t.parse::<u64>().ok());
        if let Some(token) = token {
            returned.send_if_modified(|back| {
                let higher = token > *back;
                if higher {
                    *back = token;
                }
                higher
            });
        }
    }
}

/// How a URL authenticates.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    Token(String),
    UserPassword(String, String),
}

/// The servers of a `--bus` URL and its credentials. `nats://u:p@a:1,b:2` names two servers
/// with one credential; each host may also carry its own scheme (`nats://a:1,nats://b:2`).
fn servers(url: &str) -> anyhow::Result<(Vec<ServerAddr>, Credentials)> {
    let (scheme, rest) = url.split_once("://").context("not a URL (expected nats://HOST:PORT)")?;
    let scheme = scheme.to_ascii_lowercase();
    let (credentials, hosts) = match rest.split_once(',').map_or(rest, |(first, _)| first).rfind('@') {
        Some(at) => (credentials(&rest[..at])?, &rest[at + 1..]),
        None => (Credentials::None, rest),
    };
    let mut servers = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        let full = if host.contains("://") { host.to_owned() } else { format!("{scheme}://{host}") };
        let Some((_, authority)) = full.split_once("://").filter(|(_, a)| !a.is_empty() && !a.contains('@')) else {
            anyhow::bail!("`{}` is not a HOST:PORT (give credentials once, before the first host)", redact(&full));
        };
        if authority.trim_end_matches('/').contains('/') {
            anyhow::bail!("`{host}`: a NATS URL has no path");
        }
        let server: ServerAddr = full.parse().map_err(|e| anyhow::anyhow!("`{host}`: {e}"))?;
        servers.push(server);
    }
    Ok((servers, credentials))
}

/// `user:password` or `token`, percent-decoded.
fn credentials(userinfo: &str) -> anyhow::Result<Credentials> {
    Ok(match userinfo.split_once(':') {
        Some((user, password)) => Credentials::UserPassword(percent_decoded(user)?, percent_decoded(password)?),
        None => Credentials::Token(percent_decoded(userinfo)?),
    })
}

/// `text` with every `%XX` replaced by its byte; the credentials in a URL are written so.
fn percent_decoded(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = bytes.get(at + 1..at + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(byte.context("the credentials hold a `%` that is not followed by two hex digits")?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).context("the credentials are not UTF-8 once decoded")
}

/// An instance whose last heartbeat (by the NATS server's clock) is older than this is dead:
/// presence stops counting its sessions at once and the next reap removes them. Nodes heart-beat
/// well within it; the same rule as on Redis.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

/// Longest wait for one JetStream answer of presence or the registry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens the key-value bucket `bucket`, creating it when missing, with `replicas` copies and
/// entries that expire after `max_age` (zero: never).
///
/// The bucket's stream is created here, as the key-value layer would create it, because
/// async-nats 0.52 asks the server for its account limits first and cannot read a 2.9 server's
/// answer (it lacks the `reserved_memory` and `reserved_storage` fields that came with 2.10).
pub(crate) async fn bucket(
    js: &js::Context,
    bucket: &str,
    replicas: usize,
    max_age: Duration,
) -> anyhow::Result<nats_kv::Store> {
    open_bucket(js, bucket_config(bucket, replicas, max_age)).await
}

/// Opens the key-value bucket `bucket` as [`bucket`] does, but one whose keys can be erased (see
/// `kv.rs`): its stream allows deleting messages.
pub(crate) async fn erasable_bucket(js: &js::Context, bucket: &str, replicas: usize) -> anyhow::Result<nats_kv::Store> {
    open_bucket(js, Config { deny_delete: false, ..bucket_config(bucket, replicas, Duration::ZERO) }).await
}

/// The stream of a key-value bucket as the key-value layer would configure it.
fn bucket_config(bucket: &str, replicas: usize, max_age: Duration) -> Config {
    Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// Creates the stream of `config` unless it exists, and opens it as a bucket; an existing one
/// must allow deleting messages if `config` does.
/// Opens the stream of `config`, creating it when missing, and returns once JetStream serves
/// direct gets on it. Nodes that start together race to create it, and a stream just created
/// answers its direct gets only a moment later ("no responders"): both are tried again for up to
/// [`CREATE_FOR`].
pub(crate) async fn ensure_stream(js: &js::Context, config: Config) -> anyhow::Result<js::stream::Stream> {
    use js::stream::DirectGetErrorKind;
    let deadline = tokio::time::Instant::now() + CREATE_FOR;
    let probe = config.subjects.first().map(|s| s.replace('>', "probe")).unwrap_or_default();
    let stream = loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => break stream,
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    loop {
        match stream.direct_get_last_for_subject(probe.as_str()).await {
            Ok(_) => return Ok(stream),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("stream {} does not answer direct gets: {e}", config.name)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How long opening a stream may take at start-up (see [`ensure_stream`]).
const CREATE_FOR: Duration = Duration::from_secs(10);

async fn open_bucket(js: &js::Context, config: Config) -> anyhow::Result<nats_kv::Store> {
    let bucket = config.name.strip_prefix("KV_").unwrap_or(&config.name).to_owned();
    let erasable = !config.deny_delete;
    let stream = ensure_stream(js, config).await?;
    if erasable && stream.cached_info().config.deny_delete {
        anyhow::bail!(
            "the key-value bucket {bucket} exists but forbids deleting messages, which presence needs: \
             delete the bucket (it holds presence only, which the nodes write again) or use another --prefix"
        );
    }
    Ok(js.get_key_value(bucket).await?)
}

/// The buckets of a cluster's presence and node registry (names in `keys.rs`), shared by every
/// node's [`NatsPresence`] and [`NatsRegistry`].
#[derive(Clone)]
pub(crate) struct Buckets {
    pub(crate) presence: nats_kv::Store,
    pub(crate) nodes: nats_kv::Store,
    /// To delete the buckets (tests).
    #[cfg(test)]
    js: js::Context,
}

impl Buckets {
    /// Creates (or opens) the buckets of `prefix`, `replicas` copies of each.
    pub(crate) async fn open(client: async_nats::Client, prefix: &str, replicas: usize) -> anyhow::Result<Self> {
        let mut js = js::new(client);
        js.set_timeout(REQUEST_TIMEOUT);
        let names = keys::BucketNames::new(prefix);
        let presence = erasable_bucket(&js, &names.presence, replicas).await?;
        let nodes = erasable_bucket(&js, &names.nodes, replicas).await?;
        Ok(Self {
            presence,
            nodes,
            #[cfg(test)]
            js,
        })
    }

    /// Deletes both buckets (tests).
    #[cfg(test)]
    pub(crate) async fn destroy(&self) {
        for bucket in [&self.presence, &self.nodes] {
            let _ = self.js.delete_stream(&bucket.stream_name).await;
        }
    }
}

/// Copies of each stream and bucket: 3 when the NATS cluster has at least 3 servers, else 1.
pub(crate) fn replicas(client: &async_nats::Client) -> usize {
    if client.server_info().connect_urls.len() >= 3 { 3 } else { 1 }
}

/// Whether an instance whose last heartbeat the server wrote at `beat_ms` is dead at `now_ms` (both
/// by the server's clock).
pub(crate) fn is_dead(now_ms: u64, beat_ms: u64, dead_after: Duration) -> bool {
    now_ms.saturating_sub(beat_ms) >= dead_after.as_millis() as u64
}

/// The instances that the registry in `nodes` has as dead now (see [`is_dead`]). An instance with
/// no registry entry is not among them: presence counts what it recorded until it is reaped.
pub(crate) async fn dead_instances(
    nodes: &nats_kv::Store,
    dead_after: Duration,
) -> Result<HashSet<String>, kv::KvError> {
    let (now_ms, entries) = kv::Listing::start(nodes, keys::NODES, false).await?.all().await?;
    Ok(entries
        .into_iter()
        .filter(|e| is_dead(now_ms, e.written_ms, dead_after))
        .filter_map(|e| keys::instance_of(&e.key).map(str::to_owned))
        .collect())
}

/// A plain client of the test NATS, for the suites (tests).
#[cfg(test)]
pub(crate) async fn client_for_tests(url: &str) -> anyhow::Result<Client> {
    let options = NatsOptions { name: "switchyard test".into(), subscription_capacity: None };
    Ok(Nats::connect(url, "switchyard-test", &options).await?.client().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> Vec<String> {
        servers(url).unwrap().0.iter().map(|s| format!("{}://{}:{}", s.scheme(), s.host(), s.port())).collect()
    }

    #[test]
    fn a_url_names_one_or_more_servers() {
        assert_eq!(hosts("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
        assert_eq!(hosts("nats://a:1,b:2, c:3"), ["nats://a:1", "nats://b:2", "nats://c:3"]);
        assert_eq!(hosts("tls://a:1,b:2"), ["tls://a:1", "tls://b:2"]);
        assert_eq!(hosts("nats://a:1,nats://b:2"), ["nats://a:1", "nats://b:2"]);
        assert_eq!(hosts("nats://a"), ["nats://a:4222"]);
    }

    #[test]
    fn credentials_come_from_before_the_first_host() {
        let (servers_, creds) = servers("nats://u%40x:p%2Fw:d@a:1,b:2").unwrap();
        assert_eq!(creds, Credentials::UserPassword("u@x".into(), "p/w:d".into()));
        assert_eq!(servers_.len(), 2);
        assert!(servers_.iter().all(|s| s.username().is_none()), "not left in the addresses");
        assert_eq!(servers("nats://s3cr3t@a:1").unwrap().1, Credentials::Token("s3cr3t".into()));
        assert_eq!(servers("nats://a:1").unwrap().1, Credentials::None);
    }

    #[test]
    fn a_bad_url_says_why_without_its_credentials() {
        for (url, why) in [
            ("nats://u:secret@a:1,v:secret@b:2", "credentials once"),
            ("nats://a:1,", "not a HOST:PORT"),
            ("nats://a:1/x", "no path"),
            ("nats://u:secret%zz@a:1", "two hex digits"),
            ("nats://a:notaport", "a:notaport"),
        ] {
            let e = format!("{:#}", servers(url).expect_err(url));
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: credentials printed: {e}");
        }
    }

    #[test]
    fn the_largest_message_must_fit_in_max_payload() {
        assert!(largest_envelope(65_536) < 1024 * 1024, "the defaults fit nats-server's default");
        assert!(largest_envelope(0) > crate::message::Record::HEAD + crate::api::REQUEST_SLACK);
    }

    /// A bucket of the same name that forbids deleting messages (made by hand, say) is refused at
    /// start-up with what to do, not found out by the first leave.
    #[tokio::test]
    async fn presence_refuses_a_bucket_that_cannot_erase() {
        let url = crate::store::tests::nats_url();
        let client = match client_for_tests(&url).await {
            Ok(client) => client,
            Err(e) => return crate::testing::absent("nats buckets", &format!("{e:#}")).unwrap_or(()),
        };
        let prefix = crate::testing::unique_prefix();
        let names = keys::BucketNames::new(&prefix);
        let js = js::new(client.clone());
        bucket(&js, &names.presence, 1, Duration::ZERO).await.unwrap();
        let refused = Buckets::open(client.clone(), &prefix, 1).await.err().expect("refused");
        assert!(refused.to_string().contains("forbids deleting messages"), "{refused}");
        let _ = js.delete_stream(format!("KV_{}", names.presence)).await;
        let buckets = Buckets::open(client, &prefix, 1).await.unwrap();
        buckets.destroy().await;
    }
}
