//! A private nginx per test, in front of the test's nodes, configured from the shipped
//! `deploy/nginx/switchyard.conf`: the test changes only the node addresses, the listen
//! addresses and the certificate paths (see [`render`]), so what ships is what is tested.
//!
//! nginx runs as the test's user in the foreground (`-p DIR -c DIR/nginx.conf -g 'daemon off;'`)
//! with its pid file, logs and temp files under a temp dir, on free ports of 127.0.0.1 (never 80
//! or 443), with a certificate for `localhost`/127.0.0.1 signed by a CA of the test's own
//! ([`Certificates`]). Clients reach it over `wss://127.0.0.1:PORT` trusting that CA. Tests that
//! need nginx and cannot find it skip with a printed reason, except under `CI=true`, where they
//! fail. The upstream is fixed at start: a test that restarts a node behind nginx starts it again
//! on the same port (nginx counts the refused connections meanwhile as failures of that node and
//! retries the request on the next one).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_websockets::{ClientBuilder, Connector};

use crate::support::{Client, WAIT};
use crate::tls::Certificates;

/// The shipped configuration, as the binary was built with it.
pub const SHIPPED: &str = include_str!("../../deploy/nginx/switchyard.conf");

/// How long nginx gets to bind its ports and write its pid file.
const START_WAIT: Duration = Duration::from_secs(20);

/// The `nginx` binary: on `PATH`, or where Debian puts it (`/usr/sbin`, not on a normal user's
/// `PATH`).
fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/sbin/nginx")]).find(|p| p.is_file())
}

/// Whether nginx tests can run: true when `nginx` is installed; otherwise prints SKIP and answers
/// false, except under `CI=true`, where it panics.
pub fn available() -> bool {
    if binary().is_some() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("nginx is not installed; CI must install it (apt-get install nginx)");
    }
    eprintln!("SKIP: nginx is not installed, so the tests through nginx cannot run");
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The shipped configuration with `nodes` as the upstream servers (each with the parameters of
/// the shipped first `server` line), HTTPS on 127.0.0.1:`port`, the redirect from plain HTTP on
/// 127.0.0.1:`http_port`, and the certificate and key at `cert` and `key`. Every change must
/// find the line it changes as often as the shipped file has it today, so that a change to the
/// shipped file that the test no longer covers fails here instead of passing untested.
pub fn render(shipped: &str, nodes: &[SocketAddr], port: u16, http_port: u16, cert: &Path, key: &Path) -> String {
    let mut out = String::new();
    let mut counts = [0usize; 7];
    let mut upstream_params = None;
    for line in shipped.lines() {
        let trimmed = line.trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        let replaced = match trimmed {
            "listen 443 ssl;" => Some((0, format!("listen 127.0.0.1:{port} ssl;"))),
            "listen [::]:443 ssl;" => Some((1, String::new())),
            "listen 80;" => Some((2, format!("listen 127.0.0.1:{http_port};"))),
            "listen [::]:80;" => Some((3, String::new())),
            _ if trimmed.starts_with("ssl_certificate ") => Some((4, format!("ssl_certificate {};", cert.display()))),
            _ if trimmed.starts_with("ssl_certificate_key ") => {
                Some((5, format!("ssl_certificate_key {};", key.display())))
            }
            _ if trimmed.starts_with("server ") && trimmed.ends_with(';') => {
                // An upstream server line, `server HOST:PORT params;`: all of them give way to
                // the test's nodes, written where the first one was.
                let params = trimmed.trim_end_matches(';').split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
                counts[6] += 1;
                if upstream_params.is_none() {
                    let lines: Vec<String> =
                        nodes.iter().map(|node| format!("{indent}server {node} {params};")).collect();
                    out.push_str(&lines.join("\n"));
                    out.push('\n');
                    upstream_params = Some(params);
                }
                continue;
            }
            _ => None,
        };
        match replaced {
            Some((which, text)) => {
                counts[which] += 1;
                if !text.is_empty() {
                    out.push_str(indent);
                    out.push_str(&text);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert_eq!(
        counts,
        [1, 1, 1, 1, 1, 1, 3],
        "the shipped nginx config changed shape (listen 443, [::]:443, 80, [::]:80, ssl_certificate, \
         ssl_certificate_key, upstream servers): update nginx_server::render with it"
    );
    out
}

/// A running nginx, stopped when dropped.
pub struct NginxServer {
    child: Option<Child>,
    /// The HTTPS port (the shipped `listen 443 ssl`).
    pub port: u16,
    /// The port of the redirect from plain HTTP (the shipped `listen 80`).
    pub http_port: u16,
    dir: tempfile::TempDir,
    certificates: Certificates,
    connector: Connector,
}

impl NginxServer {
    /// nginx in front of `nodes`, or `None` (after printing why) when nginx is missing outside
    /// CI. The ports are picked free and then released, so another process may take one first;
    /// nginx then fails to bind and the start is retried on new ports.
    pub fn start(nodes: &[SocketAddr]) -> Option<Self> {
        if !available() {
            return None;
        }
        let nginx = binary().expect("nginx found");
        let dir = tempfile::tempdir().expect("temp dir");
        let certificates = Certificates::localhost();
        let connector = connector(&certificates.ca);
        let mut server = Self { child: None, port: 0, http_port: 0, dir, certificates, connector };
        for _ in 0..5 {
            server.port = free_port();
            server.http_port = free_port();
            server.write_config(nodes);
            let check = server.command(&nginx).arg("-t").output().expect("nginx -t runs");
            assert!(
                check.status.success(),
                "nginx -t refuses the generated config:\n{}\n{}",
                String::from_utf8_lossy(&check.stderr),
                std::fs::read_to_string(server.dir.path().join("switchyard.conf")).unwrap_or_default()
            );
            if server.spawn(&nginx) {
                return Some(server);
            }
            eprintln!("nginx lost port {} or {} to another process; retrying on others", server.port, server.http_port);
        }
        panic!("nginx could not keep free ports in 5 tries:\n{}", server.error_log());
    }

    fn command(&self, nginx: &Path) -> Command {
        let dir = self.dir.path();
        let mut command = Command::new(nginx);
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"]);
        command
    }

    /// The main configuration around the shipped one: everything nginx writes under the temp
    /// dir, one worker (two cores here), and the rendered `switchyard.conf` in `http`.
    fn write_config(&self, nodes: &[SocketAddr]) {
        let dir = self.dir.path();
        let site = render(SHIPPED, nodes, self.port, self.http_port, &self.certificates.cert, &self.certificates.key);
        std::fs::write(dir.join("switchyard.conf"), site).expect("write switchyard.conf");
        // As root, nginx would run its workers as `nobody`, which cannot enter the temp dir.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = if unsafe { libc::geteuid() } == 0 { "user root;\n" } else { "" };
        let d = dir.display();
        let main = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log notice;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/body;\n    \
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
             scgi_temp_path {d}/scgi;\n    include {d}/switchyard.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
    }

    /// Starts nginx and waits for its pid file, which nginx writes once its ports are bound.
    /// Answers false when it exited instead because a port was taken.
    fn spawn(&mut self, nginx: &Path) -> bool {
        let pid_file = self.dir.path().join("nginx.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut child = self
            .command(nginx)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for nginx") {
                let log = self.error_log();
                if log.contains("Address already in use") {
                    return false;
                }
                panic!("nginx exited ({status}) before serving:\n{log}");
            }
            let pid = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok());
            if pid == Some(child.id()) {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nginx did not start in time:\n{}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// nginx's error log (level `notice`: starts, signals, refused upstream connections).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// nginx's access log (combined format).
    #[allow(dead_code)]
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The `wss://` URL of `path_and_query` (e.g. `/ws?user=alice`) through nginx.
    pub fn wss_url(&self, path_and_query: &str) -> String {
        format!("wss://127.0.0.1:{}{path_and_query}", self.port)
    }

    /// The TLS connector that trusts this nginx's certificate, for tests that build their own
    /// clients (`ClientBuilder::connector`).
    #[allow(dead_code)]
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// A WebSocket client through nginx to `path_and_query`, its welcome read.
    pub async fn connect(&self, path_and_query: &str) -> Client {
        let url = self.wss_url(path_and_query);
        let builder = ClientBuilder::new().uri(&url).expect("uri").connector(&self.connector);
        let (ws, _) = tokio::time::timeout(WAIT, builder.connect())
            .await
            .unwrap_or_else(|_| panic!("no upgrade through nginx in time: {url}"))
            .unwrap_or_else(|e| panic!("upgrade through nginx refused ({url}): {e}\n{}", self.error_log()));
        Client::new(ws, usize::MAX).await
    }

    /// An HTTPS request through nginx with `headers` (each ending in CRLF), read until the
    /// connection ends: the status, the response head and the body.
    pub async fn https(&self, method: &str, path: &str, headers: &str, body: &str) -> (u16, String, String) {
        let exchange = async {
            let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect to nginx");
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let Connector::Rustls(tls) = &self.connector else { unreachable!("a rustls connector") };
            let mut stream = tls.connect(name, tcp).await.expect("TLS handshake with nginx");
            // `Connection: close` unless the caller says otherwise (an upgrade), so that the
            // answer ends with the connection.
            let close = if headers.to_ascii_lowercase().contains("connection:") { "" } else { "Connection: close\r\n" };
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{close}Content-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
                self.port,
                body.len()
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = Vec::new();
            // A peer may end the TCP stream without a TLS close_notify once it has answered.
            if let Err(e) = stream.read_to_end(&mut response).await {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "reading from nginx: {e}");
            }
            response
        };
        let response = tokio::time::timeout(WAIT, exchange).await.expect("nginx answers in time");
        split_response(&String::from_utf8_lossy(&response))
    }
}

/// The status, head and (de-chunked) body of an HTTP/1.1 response.
pub fn split_response(text: &str) -> (u16, String, String) {
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("a status line: {text}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        crate::support::dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

/// A TLS connector that trusts the CA at `ca` alone.
fn connector(ca: &Path) -> Connector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA certificate added");
    }
    let config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Connector::Rustls(TlsConnector::from(Arc::new(config)))
}

impl Drop for NginxServer {
    /// SIGTERM (nginx's fast shutdown, which ends its workers too; a SIGKILL of the master
    /// would leave them serving), SIGKILL only if it is still there after 5 s.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill only sends a signal to our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            let log = self.error_log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- last lines of nginx's error log (port {}):", self.port);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
