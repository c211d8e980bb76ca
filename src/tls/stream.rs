//! [`TlsStream`]: a server-side TLS connection on a `TcpStream`, on rustls's unbuffered API,
//! which leaves every buffer to the caller, so that an idle session holds none.
//!
//! - Reading: TLS records are read into `incoming`, which exists only while a record is
//!   incomplete (and during the handshake); rustls decrypts them and the plaintext goes
//!   straight to the caller's buffer. What does not fit there (a record larger than the read)
//!   waits in `plaintext` and is handed out first.
//! - Writing: plaintext is gathered (up to one record) and encrypted in a per-thread scratch
//!   buffer, then written; the ciphertext the `TcpStream` does not take is kept in `remainder`
//!   and counted as written. Nothing more is encrypted while it holds anything: a write answers
//!   `WouldBlock` and write readiness waits for it to drain. Handshake records, alerts, session
//!   tickets and key updates go out through the same remainder.
//! - A remainder left when the caller goes back to waiting for input is drained by
//!   [`Transport::poll_read_ready`], which also waits for the socket to take it.
//!
//! Renegotiation does not exist in TLS 1.3 and rustls refuses it in TLS 1.2; a key update from
//! the client is answered as rustls asks. The peer's `close_notify` reads as the end of the
//! stream; [`AsyncWrite::poll_shutdown`] sends ours, then the TCP FIN.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::ws::Transport;

/// Ciphertext read per call at least; a record known to be larger is read whole.
const READ_CHUNK: usize = 4096;
/// The largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;
/// Room for a record's header, padding and tag, in TLS 1.2 and 1.3.
const RECORD_OVERHEAD: usize = 64;
/// The TLS record header: type, version, length.
const HEADER: usize = 5;
/// The first read with nothing pending goes to the stack, this large.
const PROBE: usize = 512;

thread_local! {
    /// Plaintext gathered for one record and its ciphertext, per worker thread: encrypting
    /// borrows it for the length of one call, so sessions hold no write buffer.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> =
        RefCell::new((vec![0; MAX_RECORD], vec![0; MAX_RECORD + RECORD_OVERHEAD]));
}

/// A TLS server connection over TCP, past or during its handshake.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed (an incomplete record, or handshake messages
    /// rustls asked to keep). No capacity while empty.
    incoming: Vec<u8>,
    /// Decrypted bytes that did not fit the caller's read. No capacity while empty.
    plaintext: Vec<u8>,
    /// Ciphertext the socket has not taken yet, from `sent` on. No capacity while empty.
    remainder: Vec<u8>,
    sent: usize,
    /// The peer sent `close_notify` (or the connection closed): reads answer the end.
    eof: bool,
    close_notify_sent: bool,
}

/// An error of rustls as an I/O error.
fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {e}"))
}

impl TlsStream {
    /// Starts a server connection on `tcp`; the handshake goes on as the stream is read, or
    /// through [`handshake`](Self::handshake).
    pub fn new(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(Self {
            tcp,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            remainder: Vec::new(),
            sent: 0,
            eof: false,
            close_notify_sent: false,
        })
    }

    /// Drives the handshake to its end and writes the server's last flight (callers bound the
    /// wait). Application data that came with the client's last flight stays for the reader.
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let progress = self.process()?;
            ready!(self.poll_drain(cx))?;
            match progress {
                Progress::Established if self.conn.is_handshaking() => {}
                Progress::Handshaking => {}
                Progress::Established | Progress::Data => return Poll::Ready(Ok(())),
                Progress::End => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
            match self.read_tls() {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_read_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn remainder_is_empty(&self) -> bool {
        self.sent == self.remainder.len()
    }

    /// Hands rustls what has been received and does what it asks until it needs more input or
    /// has application data: encodes handshake records into the remainder (sent later, before
    /// anything else), moves decrypted data into `plaintext`.
    fn process(&mut self) -> io::Result<Progress> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.send_alert();
                    return Err(tls_error(e));
                }
            };
            let progress = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        self.plaintext.extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                    Some(Progress::Data)
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut encode, &mut self.remainder)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Progress::Handshaking),
                ConnectionState::WriteTraffic(_) => Some(Progress::Established),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.eof = true;
                    Some(Progress::End)
                }
                _ => return Err(tls_error("unexpected connection state (early data?)")),
            };
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if let Some(progress) = progress {
                if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                    self.incoming = Vec::new();
                }
                return Ok(progress);
            }
        }
    }

    /// Reads what the socket has into `incoming`: at least a chunk, or the rest of the record
    /// under way when it is larger. With nothing pending the read goes to the stack first and
    /// only what came is copied: a session is woken for every delivery and then usually finds
    /// nothing to read, which this way costs no allocation.
    fn read_tls(&mut self) -> io::Result<usize> {
        if self.incoming.capacity() == 0 {
            let mut probe = [0u8; PROBE];
            let n = self.tcp.try_read(&mut probe)?;
            self.incoming.reserve_exact(self.wanted(&probe[..n]).max(n));
            self.incoming.extend_from_slice(&probe[..n]);
            return Ok(n);
        }
        let room = self.wanted(&self.incoming).saturating_sub(self.incoming.len()).max(READ_CHUNK);
        self.incoming.reserve(room);
        self.tcp.try_read_buf(&mut self.incoming)
    }

    /// How many bytes `received` must hold for its first record to be whole (0: unknown yet).
    fn wanted(&self, received: &[u8]) -> usize {
        match received.get(..HEADER) {
            Some(header) => HEADER + usize::from(u16::from_be_bytes([header[3], header[4]])),
            None => 0,
        }
    }

    /// Whether `incoming` holds a whole record not processed yet.
    fn holds_a_record(&self) -> bool {
        let wanted = self.wanted(&self.incoming);
        wanted > 0 && self.incoming.len() >= wanted
    }

    /// After a TLS error: sends the alert rustls queued for it, as far as the socket takes it
    /// now (best effort: the connection is closed next).
    fn send_alert(&mut self) {
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut encode, &mut self.remainder).is_err() {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
        }
        let _ = self.drain_now();
    }

    /// Writes the remainder as far as the socket takes it; `Pending` until it has all gone
    /// (waking the task once the socket can take more).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.remainder_is_empty() {
            match self.tcp.try_write(&self.remainder[self.sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if self.remainder.capacity() > 0 {
            self.remainder = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the remainder as far as the socket takes it now; whether it all went.
    fn drain_now(&mut self) -> io::Result<bool> {
        match self.poll_drain(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(result) => result.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }

    /// Moves up to `room` decrypted bytes into `out`: first those waiting, then those of the
    /// records received, reading the socket as long as it has something.
    fn read_plain(&mut self, room: usize, out: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        if room == 0 {
            return Ok(0);
        }
        loop {
            if !self.plaintext.is_empty() {
                let n = room.min(self.plaintext.len());
                out(&self.plaintext[..n]);
                self.plaintext.drain(..n);
                if self.plaintext.is_empty() {
                    self.plaintext = Vec::new();
                }
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            let progress = self.process()?;
            // Handshake records, a key update or an alert may be waiting to go out.
            self.drain_now()?;
            match progress {
                Progress::Data => continue,
                Progress::End => return Ok(0),
                Progress::Handshaking | Progress::Established => {}
            }
            if self.read_tls()? == 0 {
                self.eof = true;
                return Ok(0);
            }
        }
    }

    /// Encrypts the start of `bufs` and writes it, a record at a time, until the socket is
    /// full; answers how many plaintext bytes went, all counted as written once encrypted.
    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.drain_now()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.close_notify_sent {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tls: closed for writing"));
        }
        let mut total = 0;
        loop {
            // A key update answer or a session ticket goes out first.
            let status = self.conn.process_tls_records(&mut []);
            match status.state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let written = seal(&mut traffic, bufs, total, &self.tcp, &mut self.remainder)?;
                    total += written;
                    if written == 0 || self.sent < self.remainder.len() {
                        break;
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => encode_into(&mut encode, &mut self.remainder)?,
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    if !self.drain_now()? {
                        break;
                    }
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    // The client will send no more but may still read: only ours ends writing.
                    self.eof = true;
                }
                ConnectionState::ReadTraffic(_) | ConnectionState::BlockedHandshake => break,
                _ => return Err(tls_error("unexpected connection state (early data?)")),
            }
        }
        if total == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(total)
    }

    /// Queues our `close_notify` (once) into the remainder.
    fn queue_close_notify(&mut self) -> io::Result<()> {
        if self.close_notify_sent {
            return Ok(());
        }
        self.close_notify_sent = true;
        let status = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            let mut alert = [0u8; RECORD_OVERHEAD];
            let n = traffic.queue_close_notify(&mut alert).map_err(tls_error)?;
            self.remainder.extend_from_slice(&alert[..n]);
        }
        Ok(())
    }
}

/// Appends the handshake record rustls hands out to `out`.
fn encode_into(encode: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) -> io::Result<()> {
    let at = out.len();
    match encode.encode(&mut []) {
        Ok(_) => Ok(()),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(at + required_size, 0);
            encode.encode(&mut out[at..]).map_err(tls_error)?;
            Ok(())
        }
        Err(e) => Err(tls_error(e)),
    }
}

/// Encrypts one record of `bufs`' bytes past `skip` in the thread's scratch buffers and writes
/// it to `tcp`, appending what it does not take to `remainder`; answers the plaintext length.
fn seal(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    bufs: &[IoSlice<'_>],
    mut skip: usize,
    tcp: &TcpStream,
    remainder: &mut Vec<u8>,
) -> io::Result<usize> {
    SCRATCH.with_borrow_mut(|(plain, cipher)| {
        let mut len = 0;
        for buf in bufs {
            if skip >= buf.len() {
                skip -= buf.len();
                continue;
            }
            let take = (buf.len() - skip).min(MAX_RECORD - len);
            plain[len..len + take].copy_from_slice(&buf[skip..skip + take]);
            skip = 0;
            len += take;
            if len == MAX_RECORD {
                break;
            }
        }
        if len == 0 {
            return Ok(0);
        }
        let sealed = match traffic.encrypt(&plain[..len], cipher) {
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                cipher.resize(required_size, 0);
                traffic.encrypt(&plain[..len], cipher)
            }
            other => other,
        }
        .map_err(tls_error)?;
        let sent = match tcp.try_write(&cipher[..sealed]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        remainder.extend_from_slice(&cipher[sent..sealed]);
        Ok(len)
    })
}

/// How far [`TlsStream::process`] got.
enum Progress {
    /// The handshake needs more input.
    Handshaking,
    /// Application data may flow; nothing was received.
    Established,
    /// Decrypted data waits in `plaintext`.
    Data,
    /// The peer closed.
    End,
}

impl Transport for TlsStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.plaintext.is_empty() || self.eof || self.holds_a_record() {
            return Poll::Ready(Ok(()));
        }
        // Ciphertext left from the last write goes out while the session waits for input.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        self.tcp.poll_read_ready(cx)
    }

    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        self.read_plain(room, &mut |bytes| buf.extend_from_slice(bytes))
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut at = 0;
        self.read_plain(buf.len(), &mut |bytes| {
            buf[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        })
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Poll::Ready(Ok(()))
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_plain(bufs)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(Transport::poll_read_ready(this, cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            ready!(Transport::poll_write_ready(this, cx))?;
            match this.write_plain(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.queue_close_notify()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("peer", &self.tcp.peer_addr().ok()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::future::poll_fn;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CA: &[u8] = include_bytes!("testdata/ca.pem");

    fn server_config() -> Arc<rustls::ServerConfig> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/tls/testdata");
        let tls = super::super::Tls::new(format!("{dir}/cert.pem").as_ref(), format!("{dir}/key.pem").as_ref());
        tls.expect("the test certificate loads").config
    }

    fn client_config(version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(CA).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(super::super::provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A server stream past its handshake and the TCP socket of its client.
    async fn accept(client: impl FnOnce(std::net::TcpStream) + Send + 'static) -> TlsStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || client(std::net::TcpStream::connect(addr).unwrap()));
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = TlsStream::new(tcp, server_config()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server.handshake()).await.unwrap().unwrap();
        server
    }

    /// Reads through the `Transport` side until `n` bytes came, as the WebSocket does.
    async fn read_exactly(server: &mut TlsStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            got.reserve(4096);
            match server.try_read_buf(&mut got) {
                Ok(0) => panic!("the stream ended after {} bytes", got.len()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fn(|cx| Transport::poll_read_ready(server, cx)).await.unwrap();
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    }

    fn holds_no_buffer(server: &TlsStream) -> bool {
        server.incoming.capacity() == 0 && server.plaintext.capacity() == 0 && server.remainder.capacity() == 0
    }

    #[tokio::test]
    async fn records_split_at_every_byte_arrive_whole_and_idle_holds_no_buffer() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let message: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
            let sent = message.clone();
            let (done, finished) = std::sync::mpsc::channel();
            let mut server = accept(move |mut tcp| {
                let name = ServerName::try_from("localhost").unwrap();
                let mut conn = rustls::ClientConnection::new(client_config(version), name).unwrap();
                while conn.is_handshaking() {
                    conn.complete_io(&mut tcp).unwrap();
                }
                conn.writer().write_all(&sent).unwrap();
                let mut records = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut records).unwrap();
                }
                tcp.set_nodelay(true).unwrap();
                for byte in records {
                    tcp.write_all(&[byte]).unwrap();
                    std::thread::sleep(Duration::from_micros(50));
                }
                let _ = finished.recv();
            })
            .await;
            assert_eq!(read_exactly(&mut server, message.len()).await, message, "{version:?}");
            assert!(holds_no_buffer(&server), "an idle stream holds no buffer ({version:?})");
            let _ = done.send(());
        }
    }

    #[tokio::test]
    async fn large_messages_go_both_ways_through_a_full_socket() {
        let big: Vec<u8> = (0..(4 << 20) as u32).map(|i| (i * 7 % 253) as u8).collect();
        // Small socket buffers on both sides (an accepted socket takes the listener's), so that
        // 4 MiB cannot fit in them whatever the kernel's autotuning would allow.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(32 << 10).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let expected = big.clone();
        let client = tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(32 << 10).unwrap();
            let tcp = socket.connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_config(&rustls::version::TLS13));
            let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            tls.write_all(&expected).await.unwrap();
            tls.flush().await.unwrap();
            // Read late, so that the server's writes fill the socket first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut back = vec![0u8; expected.len()];
            tls.read_exact(&mut back).await.unwrap();
            assert!(back == expected, "the echo came back whole");
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = TlsStream::new(tcp, server_config()).unwrap();
        server.handshake().await.unwrap();
        let got = read_exactly(&mut server, big.len()).await;
        assert!(got == big, "the client's message came whole");
        let mut at = 0;
        let mut would_block = 0;
        while at < got.len() {
            // Uneven slices, as the WebSocket writes headers and payloads.
            let end = (at + 70_001).min(got.len());
            let mid = (at + 3).min(end);
            match server.try_write_vectored(&[IoSlice::new(&got[at..mid]), IoSlice::new(&got[mid..end])]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    would_block += 1;
                    poll_fn(|cx| server.poll_write_ready(cx)).await.unwrap();
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        poll_fn(|cx| server.poll_write_ready(cx)).await.unwrap();
        assert!(would_block > 0, "the socket filled up at least once");
        assert!(holds_no_buffer(&server));
        tokio::time::timeout(Duration::from_secs(20), client).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn close_notify_reads_as_the_end_and_shutdown_sends_ours() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_config(&rustls::version::TLS12));
            let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            tls.write_all(b"bye").await.unwrap();
            // close_notify, and the TCP connection stays open for the server's answer.
            tls.get_mut().1.send_close_notify();
            tls.flush().await.unwrap();
            let mut rest = Vec::new();
            // Ends without an error only after the server's close_notify.
            tls.read_to_end(&mut rest).await.map(|_| rest)
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = TlsStream::new(tcp, server_config()).unwrap();
        server.handshake().await.unwrap();
        assert_eq!(read_exactly(&mut server, 3).await, b"bye");
        let mut end = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut end)).await.unwrap().unwrap();
        assert_eq!(n, 0, "close_notify reads as the end");
        server.write_all(b"ok").await.unwrap();
        server.shutdown().await.unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(5), client).await.unwrap().unwrap();
        assert_eq!(rest.expect("a clean close, not a truncation"), b"ok");
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_followed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_config(&rustls::version::TLS13));
            let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            let mut reply = [0u8; 5];
            for round in 0..3 {
                tls.get_mut().1.refresh_traffic_keys().unwrap();
                tls.write_all(format!("ping{round}").as_bytes()).await.unwrap();
                tls.read_exact(&mut reply).await.unwrap();
                assert_eq!(reply, *format!("pong{round}").as_bytes());
            }
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = TlsStream::new(tcp, server_config()).unwrap();
        server.handshake().await.unwrap();
        for round in 0..3 {
            assert_eq!(read_exactly(&mut server, 5).await, format!("ping{round}").as_bytes());
            server.write_all(format!("pong{round}").as_bytes()).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), client).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn plain_http_on_the_tls_port_fails_the_handshake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer);
            answer
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = TlsStream::new(tcp, server_config()).unwrap();
        let err = server.handshake().await.expect_err("not TLS");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(server);
        let answer = client.join().unwrap();
        assert!(!answer.starts_with(b"HTTP"), "no HTTP answer");
    }
}
