//! TLS in tests: a certificate for `localhost` signed by a CA of the test's own, made with the
//! `openssl` command, and a proxy that terminates TLS in front of a plain TCP server (the
//! machine's RabbitMQ), so that a node's `amqps://` connection is a real TLS session whose
//! peer is verified against that CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a server certificate for `localhost` and 127.0.0.1 that it signed, as PEM files.
pub struct Certificates {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Certificates {
    pub fn localhost() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=switchyard test CA"],
            ]
            .concat(),
        );
        std::fs::write(path("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        let (cert, key) = issue(dir.path(), "server");
        Self { ca: path("ca.pem"), cert, key, _dir: dir }
    }

    /// Another certificate for `localhost` signed by the same CA (a renewal), as `<name>.pem`
    /// and `<name>.key` beside the others.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        issue(self._dir.path(), name)
    }
}

/// Signs a new `localhost` key and certificate with the CA in `dir` (`ca.pem`, `ca.key`,
/// `san.ext`): `<name>.pem` and `<name>.key`.
fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]].concat());
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        &pem,
    ]);
    (dir.join(pem), dir.join(key))
}

/// Accepts TLS on 127.0.0.1 with a certificate and relays the plain bytes to `upstream`.
pub struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(cert: &Path, key: &Path, upstream: SocketAddr) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        // rustls here has ring alone (as the node's async-nats and lapin), its default provider.
        let config = ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends its handshake: nothing to relay.
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut plain) = TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { addr, handshakes, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
