//! The NATS backends: the store on JetStream (`store.rs`), presence and the node registry on
//! JetStream key-value buckets (`presence.rs`, `registry.rs`; their layout in `keys.rs`, the
//! compare-and-set and listings they share in `kv.rs`), and the plumbing they share: the
//! connection, the replica count, the creation of buckets, and the liveness rule of the registry.

pub(crate) mod keys;
pub(crate) mod kv;
pub(crate) mod presence;
pub(crate) mod registry;
pub(crate) mod store;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use async_nats::jetstream::{self as js, kv as nats_kv};

pub(crate) use keys::Instance;
pub(crate) use presence::NatsPresence;
pub(crate) use registry::NatsRegistry;
pub(crate) use store::NatsStore;

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
async fn open_bucket(js: &js::Context, config: Config) -> anyhow::Result<nats_kv::Store> {
    let bucket = config.name.strip_prefix("KV_").unwrap_or(&config.name).to_owned();
    let erasable = !config.deny_delete;
    let stream = js.get_or_create_stream(config).await?;
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

/// How long connecting to NATS may take at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the NATS servers of `url` (`nats://[user:pass@]host:port[,host:port…]`).
pub(crate) async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let options =
        async_nats::ConnectOptions::new().name("switchyard").connection_timeout(CONNECT_TIMEOUT).max_reconnects(None);
    let redacted = super::redact(url);
    let servers = servers(url).with_context(|| format!("{redacted}: not a NATS URL"))?;
    options.connect(servers).await.with_context(|| format!("connecting to NATS at {redacted}"))
}

/// Each server of a URL that names several (`nats://u:p@a:1,b:2`), with the scheme and the
/// credentials, which async-nats wants on each.
fn servers(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let (scheme, rest) = url.split_once("://").context("no scheme")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let (credentials, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    hosts
        .split(',')
        .map(|host| Ok(format!("{scheme}://{credentials}{host}").parse::<async_nats::ServerAddr>()?))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_of_a_url_gets_the_scheme_and_the_credentials() {
        let parsed = servers("nats://u:p@a:1,b:2").unwrap();
        let hosts: Vec<(String, u16)> = parsed.iter().map(|s| (s.host().to_owned(), s.port())).collect();
        assert_eq!(hosts, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
        assert!(parsed.iter().all(|s| s.has_user_pass()));
        assert!(servers("127.0.0.1:4222").is_err());
    }

    /// A bucket of the same name that forbids deleting messages (made by hand, say) is refused at
    /// start-up with what to do, not found out by the first leave.
    #[tokio::test]
    async fn presence_refuses_a_bucket_that_cannot_erase() {
        let url = crate::store::tests::nats_url();
        let client = match connect(&url).await {
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
