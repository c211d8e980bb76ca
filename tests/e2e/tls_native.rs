//! Native TLS (`--tls-cert`, `--tls-key`): `wss://` sessions and the HTTPS API on `--listen`,
//! TLS refusals, certificate reload (files changed, SIGHUP) and bad files at start-up. The
//! certificates are made by `openssl` (see `tls.rs`); without it a test prints SKIP, except
//! under `CI=true`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_websockets::Connector;

use crate::cli::binary;
use crate::support::{Client, TestNode, connect_with};
use crate::tls::Certificates;

/// Whether `openssl` can make the test certificates; prints SKIP if not (fails under CI).
fn have_openssl() -> bool {
    if Command::new("openssl").arg("version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("openssl is needed to make the TLS test certificates; CI must install it");
    }
    eprintln!("SKIP: openssl is not installed, no test certificates");
    false
}

/// A client configuration trusting only the test CA, with the given protocol versions.
fn client_config(ca: &Path, versions: &[&'static tokio_rustls::rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    #[allow(deprecated)] // ring lacks post-quantum key exchange; aws-lc is kept out of the tree
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn connector(ca: &Path) -> TlsConnector {
    TlsConnector::from(client_config(ca, tokio_rustls::rustls::ALL_VERSIONS))
}

const API_KEY: &str = "test-api-key-1";

async fn node_with(certs: &Certificates) -> TestNode {
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    TestNode::start(&["--tls-cert", cert, "--tls-key", key, "--api-key", API_KEY]).await
}

async fn wss(addr: SocketAddr, ca: &Path, user: &str) -> Client {
    let url = format!("wss://localhost:{}/ws?user={user}", addr.port());
    connect_with(&url, &Connector::Rustls(connector(ca))).await
}

/// A TLS connection to the node, and the end-entity certificate it was shown.
async fn tls_connect(addr: SocketAddr, ca: &Path) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(ca).connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
    (tls, cert)
}

/// An HTTPS request; answers the status and the body.
async fn https(addr: SocketAddr, ca: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let (mut tls, _) = tls_connect(addr, ca).await;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await.expect("in time");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

#[tokio::test]
async fn wss_clients_exchange_direct_and_room_messages_and_https_answers() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let node = node_with(&certs).await;
    let mut alice = wss(node.addr, &certs.ca, "alice").await;
    let mut bob = wss(node.addr, &certs.ca, "bob").await;
    alice.ok(json!({"type": "send", "to": "bob", "body": {"text": "hi bob"}})).await;
    assert_eq!(bob.next_message().await["body"]["text"], "hi bob");
    alice.ok(json!({"type": "join", "room": "lobby"})).await;
    bob.ok(json!({"type": "join", "room": "lobby"})).await;
    let big = "x".repeat(40_000);
    bob.ok(json!({"type": "publish", "room": "lobby", "body": {"text": big}})).await;
    assert_eq!(alice.next_message().await["body"]["text"], big, "a message of several TLS records");
    let (status, body) = https(node.addr, &certs.ca, "GET", "/healthz", "").await;
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    let (status, body) = https(node.addr, &certs.ca, "GET", "/api/v1/nodes", "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = https(node.addr, &certs.ca, "POST", "/api/v1/users/bob/messages", r#"{"body":{"n":1}}"#).await;
    assert!((200..300).contains(&status), "{status} {body}");
    assert_eq!(bob.next_message().await["body"]["n"], 1, "the API's message reached the wss client");
}

#[tokio::test]
async fn tls_1_1_and_plain_http_are_refused() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let node = node_with(&certs).await;
    // A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions extension), by hand:
    // rustls clients cannot offer it.
    let mut hello = vec![0x03, 0x02];
    hello.extend([7u8; 32]);
    hello.extend([0, 0, 4, 0xC0, 0x13, 0x00, 0x2F, 1, 0]);
    let mut handshake = vec![1, 0, 0, hello.len() as u8];
    handshake.extend(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend(&handshake);
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await.expect("closed in time");
    assert!(!answer.contains(&0x02) || answer.first() == Some(&0x15), "no ServerHello: {answer:?}");
    assert_eq!(answer.first(), Some(&0x15), "an alert: {answer:?}");
    // Plain HTTP: the connection closes with no HTTP answer.
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await.expect("closed in time");
    assert!(!answer.starts_with(b"HTTP"), "no HTTP answer on the TLS port");
    // TLS 1.2 alone is still served.
    let tls12 = TlsConnector::from(client_config(&certs.ca, &[&tokio_rustls::rustls::version::TLS12]));
    let url = format!("wss://localhost:{}/ws?user=old", node.addr.port());
    let mut old = connect_with(&url, &Connector::Rustls(tls12)).await;
    let mut peer = wss(node.addr, &certs.ca, "peer").await;
    old.ok(json!({"type": "send", "to": "peer", "body": 1})).await;
    assert_eq!(peer.next_message().await["body"], 1);
    peer.ok(json!({"type": "send", "to": "old", "body": 2})).await;
    assert_eq!(old.next_message().await["body"], 2);
}

#[tokio::test]
async fn a_silent_or_slow_tls_handshake_is_dropped_and_others_connect() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let node = TestNode::start(&["--tls-cert", cert, "--tls-key", key, "--handshake-timeout", "1"]).await;
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let mut slow = TcpStream::connect(node.addr).await.unwrap();
    // The start of a ClientHello record, and then nothing.
    slow.write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]).await.unwrap();
    let mut alice = wss(node.addr, &certs.ca, "alice").await;
    let mut bob = wss(node.addr, &certs.ca, "bob").await;
    for stream in [&mut silent, &mut slow] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "dropped after --handshake-timeout");
    }
    alice.ok(json!({"type": "send", "to": "bob", "body": "fine"})).await;
    assert_eq!(bob.next_message().await["body"], "fine");
}

/// Makes a new certificate for the same name, signed by the same CA, and its key, as
/// `new.pem` and `new.key` beside the node's.
fn new_pair(certs: &Certificates) -> (std::path::PathBuf, std::path::PathBuf) {
    certs.issue("new")
}

/// Moves a new pair over the node's files (the key first: a reload between the two renames
/// fails and keeps the old pair) and answers the new certificate.
fn install(certs: &Certificates, (cert, key): (std::path::PathBuf, std::path::PathBuf)) -> Vec<u8> {
    std::fs::rename(key, &certs.key).unwrap();
    std::fs::rename(cert, &certs.cert).unwrap();
    CertificateDer::from_pem_slice(&std::fs::read(&certs.cert).unwrap()).unwrap().to_vec()
}

/// Replaces the node's certificate and key with a new pair.
fn renew(certs: &Certificates) -> Vec<u8> {
    install(certs, new_pair(certs))
}

/// Waits (bounded) until a new connection is shown `expected`.
async fn shown(addr: SocketAddr, ca: &Path, expected: &[u8]) -> bool {
    for _ in 0..100 {
        if tls_connect(addr, ca).await.1 == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_changed_certificate_is_served_to_new_connections_and_old_sessions_stay() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let node = node_with(&certs).await;
    let (_, before) = tls_connect(node.addr, &certs.ca).await;
    let mut alice = wss(node.addr, &certs.ca, "alice").await;
    let mut bob = wss(node.addr, &certs.ca, "bob").await;
    let after = renew(&certs);
    assert_ne!(before, after);
    assert!(shown(node.addr, &certs.ca, &after).await, "new connections get the new certificate");
    alice.ok(json!({"type": "send", "to": "bob", "body": "still here"})).await;
    assert_eq!(bob.next_message().await["body"], "still here", "sessions opened before stay");
    let mut carol = wss(node.addr, &certs.ca, "carol").await;
    carol.ok(json!({"type": "send", "to": "alice", "body": "new"})).await;
    assert_eq!(alice.next_message().await["body"], "new");
}

/// Starts the binary with `args` and answers its address (from the banner) and the child, whose
/// stdout is read to its end by a thread (a closed pipe would fail the node's next print).
fn spawn(args: &[&std::ffi::OsStr]) -> (std::process::Child, SocketAddr, String) {
    use std::io::{BufRead, BufReader};
    let mut child = binary().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("binary runs");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = banner
        .split("https://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("banner names an https:// address: {banner}"));
    (child, addr, banner)
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_the_banner_says_https() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let data = tempfile::tempdir().unwrap();
    let args: Vec<&std::ffi::OsStr> = vec![
        "serve".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        data.path().as_os_str(),
        "--tls-cert".as_ref(),
        certs.cert.as_os_str(),
        "--tls-key".as_ref(),
        certs.key.as_os_str(),
    ];
    let (mut child, addr, banner) = spawn(&args);
    assert!(banner.contains(&format!("wss://{addr}/ws")), "{banner}");
    let mut alice = wss(addr, &certs.ca, "alice").await;
    let mut bob = wss(addr, &certs.ca, "bob").await;
    // A new pair with the sizes and file times of the old one, so that only SIGHUP can tell
    // (ECDSA signatures vary in length: a few tries find one of the same size).
    let size = |path: &Path| std::fs::metadata(path).unwrap().len();
    let times = |path: &Path| std::fs::metadata(path).unwrap().modified().unwrap();
    let mut same_size = false;
    let mut pair = new_pair(&certs);
    for _ in 0..20 {
        same_size = (size(&pair.0), size(&pair.1)) == (size(&certs.cert), size(&certs.key));
        if same_size {
            break;
        }
        pair = new_pair(&certs);
    }
    for (new, old) in [(&pair.0, &certs.cert), (&pair.1, &certs.key)] {
        std::fs::File::options().write(true).open(new).unwrap().set_modified(times(old)).unwrap();
    }
    let after = install(&certs, pair);
    if same_size {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_ne!(tls_connect(addr, &certs.ca).await.1, after, "files that look unchanged are not read again");
    } else {
        eprintln!("no new certificate of the old size: the reload below may come from the poll");
    }
    Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(shown(addr, &certs.ca, &after).await, "SIGHUP reloads the certificate");
    alice.ok(json!({"type": "send", "to": "bob", "body": "after hup"})).await;
    assert_eq!(bob.next_message().await["body"], "after hup");
    // A bad file on reload keeps the old pair.
    std::fs::write(&certs.cert, "not a certificate").unwrap();
    Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tls_connect(addr, &certs.ca).await.1, after, "a bad new file keeps the old certificate");
    Command::new("kill").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn bad_files_are_refused_at_start_up_with_a_message_naming_them() {
    if !have_openssl() {
        return;
    }
    let certs = Certificates::localhost();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let other = Certificates::localhost();
    let missing = dir.path().join("missing.pem");
    let cases: [(&Path, &Path, &str); 5] = [
        (&missing, &certs.key, "missing.pem: cannot read it"),
        (&garbage, &certs.key, "garbage.pem: no certificate in it"),
        (&certs.key, &certs.key, "no certificate in it"),
        (&certs.cert, &certs.cert, "no private key in it"),
        (&certs.cert, &other.key, "does not match the certificate"),
    ];
    for (cert, key, expected) in cases {
        let out = binary()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
    }
    let out = binary().args(["serve", "--tls-cert"]).arg(&certs.cert).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"), "both or neither");
}
