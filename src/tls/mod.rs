//! Native TLS on `--listen` (`--tls-cert`, `--tls-key`): HTTPS and `wss://` with rustls on
//! `ring`, TLS 1.2 and 1.3 with rustls's default (modern) suites, ALPN `http/1.1`.
//!
//! - [`stream`]: [`TlsStream`], the connection, on rustls's unbuffered API so that an idle
//!   session holds no buffer (see `ws::transport`); it is the `ws::Transport` of TLS sessions.
//! - [`CertPair`]: a certificate chain and its key, read from PEM files and checked together;
//!   every failure names the file.
//! - [`Tls`]: the server's TLS side: the `ServerConfig`, whose certificate resolver hands every
//!   new handshake the pair loaded last. [`Tls::reload`] reads the files again (on SIGHUP, and
//!   when [`Tls::watch`] sees them change); a pair that fails to load leaves the old one in
//!   place, and sessions already open keep theirs.

mod stream;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub use stream::TlsStream;

use crate::shutdown::Shutdown;

/// How often [`Tls::watch`] looks at the files.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// rustls on `ring` (as async-nats and lapin; aws-lc is kept out of the tree). rustls 0.23.48
/// deprecates ring's provider for lacking post-quantum key exchange, which aws-lc has.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, checked to belong together.
pub struct CertPair;

impl CertPair {
    /// Reads both PEM files and checks them: a certificate, a key rustls can sign with, and the
    /// key matching the certificate. Errors name the file and say what is wrong.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
        let cert_pem = std::fs::read(cert).with_context(|| format!("--tls-cert {}: cannot read it", cert.display()))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--tls-cert {}: not a PEM certificate chain: {e}", cert.display()))?;
        if chain.is_empty() {
            bail!("--tls-cert {}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\")", cert.display());
        }
        let key_pem = std::fs::read(key).with_context(|| format!("--tls-key {}: cannot read it", key.display()))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            anyhow::anyhow!("--tls-key {}: no private key in it (PEM PKCS#8, PKCS#1 or SEC1): {e}", key.display())
        })?;
        let signing = provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| anyhow::anyhow!("--tls-key {}: not a usable private key: {e}", key.display()))?;
        let pair = CertifiedKey::new(chain, signing);
        match pair.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(pair)),
            Err(rustls::Error::InconsistentKeys(_)) => {
                bail!("--tls-key {} does not match the certificate in --tls-cert {}", key.display(), cert.display())
            }
            Err(e) => bail!("--tls-cert {}: not a usable certificate: {e}", cert.display()),
        }
    }
}

/// Hands every handshake the pair loaded last.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The server's TLS side: its configuration and where its certificate comes from.
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    resolver: Arc<Resolver>,
    cert: PathBuf,
    key: PathBuf,
    /// What the files looked like when last read (modification time and size of each).
    seen: std::sync::Mutex<Fingerprint>,
}

type Fingerprint = [Option<(SystemTime, u64)>; 2];

fn fingerprint(cert: &Path, key: &Path) -> Fingerprint {
    [cert, key].map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
}

impl Tls {
    /// Loads the pair and builds the configuration; errors name the file.
    pub fn new(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let seen = fingerprint(cert, key);
        let resolver = Arc::new(Resolver { current: RwLock::new(CertPair::load(cert, key)?) });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS configuration")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            resolver,
            cert: cert.to_owned(),
            key: key.to_owned(),
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// Reads the files again: new handshakes get the new pair; if it fails to load, the old
    /// one stays, and the error is logged.
    pub fn reload(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint(&self.cert, &self.key);
        match CertPair::load(&self.cert, &self.key) {
            Ok(pair) => {
                *self.resolver.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "TLS certificate not reloaded, keeping the old one"),
        }
    }

    /// Reloads whenever the files' modification time or size changes, until shutdown.
    pub async fn watch(self: Arc<Self>, mut stop: Shutdown) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait() => return,
            }
            let now = fingerprint(&self.cert, &self.key);
            let changed = *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
            if changed {
                self.reload();
            }
        }
    }
}
