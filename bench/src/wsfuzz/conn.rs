//! A raw client connection: TCP, the upgrade written by hand, a reader task that turns every
//! byte the server sends into [`Event`]s, and writes of exactly the bytes a case asks for,
//! including a half-close and an abortive reset.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::frame::{FrameSpec, OP_CLOSE, ServerFrame, ServerReader, close_payload};
use super::oracle::{Event, Out, SessionView, classify};
use super::upgrade::{self, Head};
use crate::net::io_kind;

/// A TCP connection shared by the reader task and the writer (tokio's readiness calls take
/// `&self`), so that the writer can reset it while the reader still runs.
pub struct Raw {
    pub stream: Arc<TcpStream>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Raw, String> {
        let stream = tokio::time::timeout(timeout, crate::net::tcp_connect(addr, None))
            .await
            .map_err(|_| "connect timeout".to_owned())?
            .map_err(|e| format!("connect: {}", io_kind(&e)))?;
        Ok(Raw { stream: Arc::new(stream) })
    }

    /// Writes all of `bytes`; an error names what stopped it.
    pub async fn write(&self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            self.stream.writable().await.map_err(|e| io_kind(&e))?;
            match self.stream.try_write(bytes) {
                Ok(0) => return Err("write zero".into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_kind(&e)),
            }
        }
        Ok(())
    }

    /// One byte per write, with a short pause now and then so that bytes go out one by one.
    pub async fn trickle(&self, bytes: &[u8]) -> Result<(), String> {
        for (i, b) in bytes.iter().enumerate() {
            self.write(std::slice::from_ref(b)).await?;
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// The client's FIN: nothing more will be written.
    pub fn fin(&self) {
        // SAFETY: shutdown on an fd this stream owns; a failure only means it is gone already.
        unsafe {
            libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR);
        }
    }

    /// Makes the close that follows the last drop an abortive one (RST, RFC 793 §3.5).
    pub fn arm_reset(&self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt with a linger struct of the right size on an fd this stream owns.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Reads the HTTP response head; answers it and the bytes read past it. `Ok(None)` when
    /// the server closed the connection first.
    pub async fn read_head(&self, timeout: Duration) -> Result<Option<(Head, Vec<u8>)>, String> {
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        loop {
            if let Some(head) = upgrade::parse_head(&buf)? {
                let rest = buf[head.len..].to_vec();
                return Ok(Some((head, rest)));
            }
            if buf.len() > 256 * 1024 {
                return Err("HTTP response head over 256 KiB".into());
            }
            let ready = tokio::time::timeout_at(deadline, self.stream.readable()).await;
            match ready {
                Err(_) => return Err("timeout".into()),
                Ok(Err(e)) => return Err(io_kind(&e)),
                Ok(Ok(())) => {}
            }
            let mut chunk = [0u8; 8192];
            match self.stream.try_read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Ok(None),
                Ok(0) => return Err(format!("connection closed inside the response head ({} bytes)", buf.len())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(io_kind(&e)),
            }
        }
    }

    /// Reads the body of a response with `Content-Length` (at most 64 KiB); best effort.
    pub async fn read_body(&self, mut have: Vec<u8>, len: usize, timeout: Duration) -> Vec<u8> {
        let len = len.min(64 * 1024);
        let deadline = Instant::now() + timeout;
        while have.len() < len {
            if tokio::time::timeout_at(deadline, self.stream.readable()).await.is_err() {
                break;
            }
            let mut chunk = [0u8; 8192];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => have.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        have.truncate(len);
        have
    }
}

/// A WebSocket session over a [`Raw`] connection: the reader task reports events on a channel.
pub struct Session {
    pub raw: Raw,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
    pub view: SessionView,
    /// Our close frame went out (nothing more may).
    pub close_sent: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Starts reading a connection whose upgrade is done; `rest` holds bytes read past the
    /// response head.
    pub fn start(raw: Raw, rest: Vec<u8>, user: &str) -> Session {
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_events(raw.stream.clone(), rest, tx));
        Session {
            raw,
            events,
            reader,
            view: SessionView { user: user.to_owned(), ..Default::default() },
            close_sent: false,
        }
    }

    /// Opens a proper session for `user` and waits for its `welcome`.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        user: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<Session, String> {
        let raw = Raw::connect(addr, timeout).await?;
        raw.write(&upgrade::proper(host, user, key)).await.map_err(|e| format!("writing the upgrade: {e}"))?;
        let (head, rest) = match raw.read_head(timeout).await {
            Ok(Some(got)) => got,
            Ok(None) => return Err("connection closed before an HTTP response".into()),
            Err(e) => return Err(format!("reading the upgrade response: {e}")),
        };
        if head.status != 101 {
            return Err(format!("HTTP {} to a proper upgrade", head.status));
        }
        if head.header("sec-websocket-accept") != Some(upgrade::accept_for(key).as_str()) {
            return Err(format!("wrong Sec-WebSocket-Accept {:?}", head.header("sec-websocket-accept")));
        }
        let mut session = Session::start(raw, rest, user);
        session.welcome(user, timeout).await?;
        Ok(session)
    }

    /// Waits for the first frame, which must be a `welcome` naming `user`.
    pub async fn welcome(&mut self, user: &str, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Err(_) => Err("no welcome within the timeout".into()),
            Ok(None) => Err("reader ended".into()),
            Ok(Some(Event::Frame(ServerFrame::Text(t)))) => match classify(&t) {
                Ok(Out::Welcome { user: u }) if u == user => Ok(()),
                _ => Err(format!("first frame is not a welcome for {user}: {t}")),
            },
            Ok(Some(other)) => Err(format!("first event is not a welcome: {other:?}")),
        }
    }

    /// The next event, or `None` at the deadline.
    pub async fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        tokio::time::timeout_at(deadline, self.events.recv()).await.ok().flatten()
    }

    /// An event that is already there.
    pub fn try_event(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Answers the server's close frame with ours (once), as RFC 6455 §5.5.1 asks.
    pub async fn answer_close(&mut self, code: Option<u16>) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        let frame = FrameSpec::new(OP_CLOSE, close_payload(code, b""), [0x5A, 0xC3, 0x11, 0x7E]).encode();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.raw.write(&frame)).await;
    }

    /// Closes the session politely (1000) and waits briefly for the server's close and EOF.
    pub async fn close(mut self) {
        self.answer_close(Some(1000)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(e) = self.next_event(deadline).await {
            if matches!(e, Event::Eof | Event::Error(_)) {
                break;
            }
        }
    }
}

async fn read_events(stream: Arc<TcpStream>, rest: Vec<u8>, tx: mpsc::UnboundedSender<Event>) {
    let mut reader = ServerReader::default();
    reader.push(&rest);
    let mut broken = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while !broken {
            match reader.next() {
                Ok(Some(frame)) => {
                    let _ = tx.send(Event::Frame(frame));
                }
                Ok(None) => break,
                Err(why) => {
                    let at: Vec<u8> = reader.pending().iter().take(32).copied().collect();
                    let _ = tx.send(Event::Bad(format!("{why} (bytes there: {at:02x?})")));
                    broken = true;
                }
            }
        }
        if stream.readable().await.is_err() {
            let _ = tx.send(Event::Error("readiness failed".into()));
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => {
                if !broken && !reader.pending().is_empty() {
                    let _ = tx.send(Event::Bad(format!(
                        "the connection ended inside a server frame ({} bytes)",
                        reader.pending().len()
                    )));
                }
                let _ = tx.send(Event::Eof);
                return;
            }
            Ok(n) => {
                if !broken {
                    reader.push(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                let _ = tx.send(Event::Error(io_kind(&e)));
                return;
            }
        }
    }
}
