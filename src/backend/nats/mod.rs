//! The NATS backends: the store on JetStream (`store.rs`).

pub(crate) mod store;

use std::time::Duration;

use anyhow::Context as _;

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use async_nats::jetstream::{self as js, kv};

pub(crate) use store::NatsStore;

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
) -> anyhow::Result<kv::Store> {
    let config = Config {
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
    };
    js.get_or_create_stream(config).await?;
    Ok(js.get_key_value(bucket).await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_of_a_url_gets_the_scheme_and_the_credentials() {
        let servers = servers("nats://u:p@a:1,b:2").unwrap();
        let hosts: Vec<(String, u16)> = servers.iter().map(|s| (s.host().to_owned(), s.port())).collect();
        assert_eq!(hosts, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
        assert!(servers.iter().all(|s| s.has_user_pass()));
        assert!(servers("127.0.0.1:4222").is_err());
    }
}

/// Copies of each stream and bucket: 3 when the NATS cluster has at least 3 servers, else 1.
pub(crate) fn replicas(client: &async_nats::Client) -> usize {
    if client.server_info().connect_urls.len() >= 3 { 3 } else { 1 }
}
