//! Connections: targets on loopback only, TCP from a chosen source address, the WebSocket
//! upgrade, and each protocol's opening handshake and join.
//!
//! Latency is computed from timestamps taken by this machine's clock at both ends, so the tool
//! only ever targets loopback addresses (which also keeps load on this machine).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

use crate::clock::now_us;
use crate::socketio;
use crate::wire::{Frame, Protocol, QUEUE_RECEIPT};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The environment variable naming the PEM file of the CA that `wss://` targets' certificates
/// are checked against (the system's roots are not used: targets are on loopback).
pub const TLS_CA_ENV: &str = "SWITCHYARD_BENCH_TLS_CA";

/// The TLS client of `wss://` targets (TLS 1.2 and 1.3, rustls on ring), trusting the CA of
/// `SWITCHYARD_BENCH_TLS_CA`; read once per process (worker processes inherit it).
fn tls_connector() -> Result<&'static tokio_rustls::TlsConnector, Failure> {
    use std::sync::OnceLock;
    use tokio_rustls::rustls;
    static CONNECTOR: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    let made = CONNECTOR.get_or_init(|| {
        use rustls::pki_types::pem::PemObject;
        let path = std::env::var(TLS_CA_ENV).map_err(|_| format!("wss:// needs {TLS_CA_ENV}=CA.pem"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&path).map_err(|e| format!("{path}: {e}"))? {
            roots.add(cert.map_err(|e| format!("{path}: {e}"))?).map_err(|e| format!("{path}: {e}"))?;
        }
        #[allow(deprecated)] // ring lacks post-quantum key exchange; aws-lc is kept out of the tree
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    });
    made.as_ref().map_err(Clone::clone)
}

/// A target's socket address from its URL (`ws://` or `http://`); refuses anything but
/// loopback.
pub fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.host().with_context(|| format!("no host in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse().with_context(|| format!("{url}: give the host as an IP address"))?
    };
    if !ip.is_loopback() {
        bail!("{url}: only loopback targets are allowed (latency uses one clock for both ends)");
    }
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("wss") { 443 } else { 80 });
    Ok(SocketAddr::new(ip, port))
}

/// The `n`-th extra source address: 127.0.0.2, 127.0.0.3, …
pub fn source_ip(n: usize) -> Ipv4Addr {
    let v = u32::from(Ipv4Addr::new(127, 0, 0, 2)) + n as u32;
    Ipv4Addr::from(v)
}

/// A TCP connection, from `source` when given. The source port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), so each source address offers the whole ephemeral range per
/// destination.
pub async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let (Some(ip), true) = (source, addr.is_ipv4()) {
        set_bind_no_port(&socket);
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn set_bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size. Failing is harmless: the
    // port is then reserved at bind time instead.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A short, countable name for why something failed.
pub fn io_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "too many open files".into(),
        Some(libc::EADDRNOTAVAIL) => return "no free source port".into(),
        _ => {}
    }
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        BrokenPipe => "broken pipe".into(),
        UnexpectedEof => "unexpected eof".into(),
        TimedOut => "timeout".into(),
        k => format!("io {k:?}"),
    }
}

pub fn ws_error_kind(e: &tokio_websockets::Error) -> String {
    match e {
        tokio_websockets::Error::Io(io) => io_kind(io),
        tokio_websockets::Error::Upgrade(tokio_websockets::upgrade::Error::DidNotSwitchProtocols(status)) => {
            format!("http {status}")
        }
        other => other.to_string(),
    }
}

/// One client connection speaking `proto`.
pub struct Conn {
    pub ws: Ws,
    pub proto: Protocol,
    /// STOMP frames that came in one message with the frame last returned by `next_text`.
    pending: VecDeque<String>,
}

/// How a connection ended or failed, as a countable label.
pub type Failure = String;

impl Conn {
    /// TCP, upgrade and the protocol's opening handshake (Switchyard `welcome`; Socket.IO open
    /// packet, `40`, namespace connected; STOMP `CONNECT`, `CONNECTED`, then the subscription to
    /// the user's own queue and its `RECEIPT`), all within `timeout`.
    pub async fn open(
        proto: Protocol,
        base: &str,
        addr: SocketAddr,
        user: &str,
        source: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Conn, Failure> {
        let url = proto.ws_url(base, user);
        let attempt = async {
            let tcp = tcp_connect(addr, source).await.map_err(|e| io_kind(&e))?;
            let builder = ClientBuilder::new().uri(&url).map_err(|e| format!("bad url: {e}"))?;
            let stream = if url.starts_with("wss://") {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                let tls = tls_connector()?.connect(name, tcp).await.map_err(|e| format!("tls: {}", io_kind(&e)))?;
                MaybeTlsStream::Rustls(tls)
            } else {
                MaybeTlsStream::Plain(tcp)
            };
            let (ws, _) = builder.connect_on(stream).await.map_err(|e| ws_error_kind(&e))?;
            let mut conn = Conn { ws, proto, pending: VecDeque::new() };
            conn.handshake(user).await?;
            Ok(conn)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err("connect timeout".into()),
        }
    }

    async fn handshake(&mut self, user: &str) -> Result<(), Failure> {
        match self.proto {
            Protocol::Stomp | Protocol::StompRabbitmq => {
                self.send(self.proto.stomp_connect(user)).await?;
                loop {
                    let text = self.next_text().await?;
                    match self.proto.parse(&text) {
                        Frame::Welcome => break,
                        Frame::Error { code, .. } => return Err(format!("error {code}")),
                        _ => {}
                    }
                }
                // A JSON session gets its own stream live from the welcome on; a STOMP one once it
                // subscribes to it.
                self.send(self.proto.stomp_own_queue(user)).await?;
                self.await_answer(QUEUE_RECEIPT, None, &mut |_: &Frame<'_>, _| {}).await?;
                Ok(())
            }
            Protocol::Relay => Ok(()),
            Protocol::Switchyard => loop {
                let text = self.next_text().await?;
                match self.proto.parse(&text) {
                    Frame::Welcome => return Ok(()),
                    Frame::Error { code, .. } => return Err(format!("error {code}")),
                    Frame::Disconnect { code } => return Err(close_label(code)),
                    _ => {}
                }
            },
            Protocol::Socketio => {
                loop {
                    let text = self.next_text().await?;
                    match self.proto.parse(&text) {
                        Frame::Open => break,
                        Frame::Disconnect { .. } => return Err("engine.io close".into()),
                        _ => {}
                    }
                }
                self.send(socketio::CONNECT.to_string()).await?;
                loop {
                    let text = self.next_text().await?;
                    match self.proto.parse(&text) {
                        Frame::Connected => return Ok(()),
                        Frame::Ping => self.send(socketio::PONG.to_string()).await?,
                        Frame::ConnectError(e) => return Err(format!("connect error {e}")),
                        Frame::Disconnect { .. } => return Err("socket.io disconnect".into()),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Joins `room` and waits for the answer (Switchyard `reply` to `id`, a peer's `joined`).
    /// Returns the room's seq from Switchyard's reply. Frames that arrive meanwhile go to
    /// `other` with their receive time.
    pub async fn join(
        &mut self,
        room: &str,
        since: Option<u64>,
        id: u64,
        mut other: impl FnMut(&Frame<'_>, u64),
    ) -> Result<Option<u64>, Failure> {
        self.send(self.proto.join(id, room, since)).await?;
        self.await_answer(id, Some(room), &mut other).await
    }

    /// Switchyard `sync` and wait for its reply; returns the stream's seq.
    pub async fn sync(
        &mut self,
        since: Option<u64>,
        id: u64,
        mut other: impl FnMut(&Frame<'_>, u64),
    ) -> Result<Option<u64>, Failure> {
        self.send(crate::wire::sync(id, since)).await?;
        self.await_answer(id, None, &mut other).await
    }

    async fn await_answer(
        &mut self,
        id: u64,
        room: Option<&str>,
        other: &mut impl FnMut(&Frame<'_>, u64),
    ) -> Result<Option<u64>, Failure> {
        loop {
            let text = self.next_text().await?;
            let at = now_us();
            let frame = self.proto.parse(&text);
            match &frame {
                Frame::Reply { id: Some(i), seq } if *i == id => return Ok(*seq),
                Frame::Error { id: Some(i), code } if *i == id => {
                    return Err(format!("error {code}"));
                }
                // A STOMP `ERROR` ends the connection, whatever it answers.
                Frame::Error { id: None, code } if self.proto.is_stomp() => return Err(format!("error {code}")),
                Frame::Joined { room: r } if Some(r.as_str()) == room => return Ok(None),
                Frame::Ping => self.send(socketio::PONG.to_string()).await?,
                Frame::Disconnect { code } => return Err(close_label(*code)),
                _ => other(&frame, at),
            }
        }
    }

    pub async fn send(&mut self, text: String) -> Result<(), Failure> {
        self.ws.send(Message::text(text)).await.map_err(|e| ws_error_kind(&e))
    }

    /// The next text frame (STOMP: the next STOMP frame); a close or the end of the stream is
    /// an error labelled with the close code.
    pub async fn next_text(&mut self) -> Result<String, Failure> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        loop {
            match self.ws.next().await {
                None => return Err("eof".into()),
                Some(Err(e)) => return Err(ws_error_kind(&e)),
                Some(Ok(m)) => {
                    if let Some(t) = m.as_text() {
                        if self.proto.is_stomp() {
                            self.pending.extend(split_stomp(t));
                            match self.pending.pop_front() {
                                Some(frame) => return Ok(frame),
                                None => continue,
                            }
                        }
                        return Ok(t.to_string());
                    }
                    if let Some((code, _)) = m.as_close() {
                        return Err(format!("close {}", u16::from(code)));
                    }
                }
            }
        }
    }

    /// Closes with 1000 and waits (briefly) for the server's close.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if self.ws.send(Message::close(None, "")).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// A STOMP message as one string per frame (heart-beats dropped; a malformed rest kept whole,
/// for the parser to call malformed).
fn split_stomp(mut text: &str) -> Vec<String> {
    let mut frames = Vec::new();
    loop {
        match crate::stomp::next_frame(text) {
            Ok(Some((_, rest))) => {
                frames.push(text[..text.len() - rest.len()].to_string());
                text = rest;
            }
            Ok(None) => return frames,
            Err(_) => {
                frames.push(text.to_string());
                return frames;
            }
        }
    }
}

pub fn close_label(code: Option<u16>) -> String {
    match code {
        Some(c) => format!("disconnect {c}"),
        None => "disconnect".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_loopback_only() {
        assert_eq!(resolve("ws://127.0.0.1:9100/ws").unwrap(), "127.0.0.1:9100".parse().unwrap());
        assert_eq!(resolve("http://localhost:8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(resolve("ws://127.0.0.3").unwrap(), "127.0.0.3:80".parse().unwrap());
        assert_eq!(resolve("ws://[::1]:9/").unwrap(), "[::1]:9".parse().unwrap());
        assert!(resolve("ws://10.0.0.1:9100").is_err());
        assert!(resolve("ws://example.com:9100").is_err());
    }

    #[test]
    fn source_ips_count_up_from_127_0_0_2() {
        assert_eq!(source_ip(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(3), Ipv4Addr::new(127, 0, 0, 5));
        assert_eq!(source_ip(254), Ipv4Addr::new(127, 0, 1, 0));
    }
}
