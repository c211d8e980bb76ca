//! The server side of RFC 6455 over a TCP stream, written for a server holding many idle
//! connections: between messages a connection owns no read or write buffer at all.
//!
//! Reading waits for readiness without a buffer, reads into one sized for the frame at hand and
//! frees it as soon as every received byte has been parsed. Writing goes straight to the socket
//! with one vectored write per batch of frames (headers built on the stack next to the shared
//! payloads); only what the socket does not take at once is copied, and that copy is freed once
//! written. Both directions are cancel-safe: all progress lives in [`WebSocket`], so a caller may
//! drop [`WebSocket::next`] or a send at any await and call again.

use std::io::{self, IoSlice};

use tokio::net::TcpStream;

use crate::protocol::close;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The smallest read; a frame known to be larger is read in one go.
const READ_CHUNK: usize = 4096;
/// Frames per vectored write (two slices each, within every platform's `IOV_MAX`).
const FRAMES_PER_WRITE: usize = 32;
/// Longest frame header a server writes: 2 bytes, then a 64-bit length.
const MAX_HEADER: usize = 10;

/// A message or control frame from the client. Pings are answered before the next read.
#[derive(Debug)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    Ping,
    Pong,
    /// The client closed the connection (the code it gave, if any); the reply is already sent.
    Close(Option<u16>),
}

/// Why the connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client broke the protocol; close with this code and reason.
    #[error("{1}")]
    Protocol(u16, &'static str),
    /// The connection failed or the client went away without a close frame.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// The close code and reason to send for a protocol error; `None` when the socket is gone.
    pub fn close(&self) -> Option<(u16, &'static str)> {
        match self {
            Error::Protocol(code, reason) => Some((*code, reason)),
            Error::Io(_) => None,
        }
    }
}

fn protocol(reason: &'static str) -> Error {
    Error::Protocol(close::PROTOCOL_ERROR, reason)
}

/// A fragmented data message being put together.
struct Assembly {
    text: bool,
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8 (text only): a fragment may end inside a
    /// character, and invalid text is refused as soon as it arrives rather than at the end.
    checked: usize,
}

impl Assembly {
    fn check_utf8(&mut self, fin: bool) -> Result<(), Error> {
        if self.text {
            check_utf8(&self.data, &mut self.checked, fin)?;
        }
        Ok(())
    }
}

/// Checks `text[*checked..]`, moving `checked` past what is valid UTF-8. Unless the text is
/// `complete`, it may end inside a character (the rest is yet to come).
fn check_utf8(text: &[u8], checked: &mut usize, complete: bool) -> Result<(), Error> {
    match std::str::from_utf8(&text[*checked..]) {
        Ok(_) => *checked = text.len(),
        Err(e) if e.error_len().is_none() && !complete => *checked += e.valid_up_to(),
        Err(_) => return Err(invalid_text()),
    }
    Ok(())
}

fn invalid_text() -> Error {
    Error::Protocol(close::INVALID_UTF8, "text is not valid UTF-8")
}

/// One server-side WebSocket connection.
pub struct WebSocket {
    io: TcpStream,
    /// Received bytes; parsing resumes at `parsed`. No capacity while nothing is pending.
    input: Vec<u8>,
    parsed: usize,
    /// Bytes from `parsed` on needed to complete the frame there (a read-size hint).
    wanted: usize,
    /// Of the incomplete frame at `parsed`: payload bytes unmasked in place, and of those the
    /// ones known to be valid UTF-8.
    unmasked: usize,
    checked: usize,
    message: Option<Box<Assembly>>,
    max_payload: usize,
    /// Frames not yet written, from `written` on. No capacity while caught up.
    output: Vec<u8>,
    written: usize,
    close_sent: bool,
    close_received: Option<Option<u16>>,
}

impl WebSocket {
    /// Wraps a stream whose upgrade handshake is done; `read_ahead` holds bytes already read
    /// past the handshake. Data messages above `max_payload` bytes are refused with 1009.
    pub fn new(io: TcpStream, read_ahead: &[u8], max_payload: usize) -> Self {
        Self {
            io,
            input: read_ahead.to_vec(),
            parsed: 0,
            wanted: 0,
            unmasked: 0,
            checked: 0,
            message: None,
            max_payload,
            output: Vec::new(),
            written: 0,
            close_sent: false,
            close_received: None,
        }
    }

    /// The next message or control frame. After the client's close frame, every call answers
    /// [`Incoming::Close`].
    pub async fn next(&mut self) -> Result<Incoming, Error> {
        loop {
            self.flush().await?;
            if let Some(code) = self.close_received {
                return Ok(Incoming::Close(code));
            }
            if let Some(incoming) = self.parse()? {
                return Ok(incoming);
            }
            self.fill().await?;
        }
    }

    /// Writes text frames, one per payload, as far as the socket takes them now, in as few
    /// writes as it allows; the rest waits for [`flush`](Self::flush).
    pub fn push_text<'a>(&mut self, payloads: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        self.push(OP_TEXT, payloads)
    }

    pub fn push_ping(&mut self) -> io::Result<()> {
        self.push(OP_PING, [&b""[..]])
    }

    /// Whether pushed frames are still waiting for the socket.
    pub fn pending(&self) -> bool {
        self.written < self.output.len()
    }

    /// Sends a data message back as it came (the conformance echo).
    pub async fn echo(&mut self, incoming: &Incoming) -> io::Result<()> {
        match incoming {
            Incoming::Text(text) => self.push(OP_TEXT, [text.as_bytes()])?,
            Incoming::Binary(data) => self.push(OP_BINARY, [data.as_slice()])?,
            _ => return Ok(()),
        }
        self.flush().await
    }

    /// Sends a close frame (once; later calls only flush). `reason` is cut to fit 123 bytes.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if !self.close_sent {
            let mut cut = reason.len().min(123);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(&reason.as_bytes()[..cut]);
            self.push(OP_CLOSE, [payload.as_slice()])?;
            self.close_sent = true;
        }
        self.flush().await
    }

    /// After our close frame: waits for the client's, skipping anything else it still sends.
    ///
    /// When the client broke the protocol its input cannot be parsed any more, and closing a
    /// socket that holds unread input resets the connection, which throws away whatever output
    /// has not left yet, our close frame included. So our side is shut down first (FIN after
    /// the close frame) and the client's input discarded until it closes its side, the orderly
    /// close of RFC 6455 §7.1.1. Callers bound the wait.
    pub async fn closed(&mut self) {
        loop {
            match self.next().await {
                Ok(Incoming::Close(_)) | Err(Error::Io(_)) => return,
                Ok(_) => {}
                Err(Error::Protocol(..)) => break,
            }
        }
        // Boxed: rare, and kept out of the future every idle session's task carries.
        Box::pin(self.linger()).await;
    }

    /// Sends FIN after what is written, then discards input until the client's FIN.
    async fn linger(&mut self) {
        if self.flush().await.is_err() || tokio::io::AsyncWriteExt::shutdown(&mut self.io).await.is_err() {
            return;
        }
        (self.parsed, self.message) = (0, None);
        loop {
            self.input.clear();
            self.input.reserve(READ_CHUNK);
            match self.io.try_read_buf(&mut self.input) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.io.readable().await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Writes what is pending, waiting while the socket is full.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            self.io.writable().await?;
            match self.io.try_write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if self.output.capacity() > 0 {
            self.output = Vec::new();
            self.written = 0;
        }
        Ok(())
    }

    /// Frames each payload and writes them now as far as the socket takes them; the rest goes to
    /// `output` for [`flush`](Self::flush). Nothing goes out after our close frame.
    fn push<'a>(&mut self, opcode: u8, payloads: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        if self.close_sent {
            return Ok(());
        }
        let mut payloads = payloads.into_iter().peekable();
        while payloads.peek().is_some() {
            let mut headers = [[0u8; MAX_HEADER]; FRAMES_PER_WRITE];
            let mut lens = [0usize; FRAMES_PER_WRITE];
            let mut bodies: [&[u8]; FRAMES_PER_WRITE] = [&[]; FRAMES_PER_WRITE];
            let mut n = 0;
            for payload in payloads.by_ref().take(FRAMES_PER_WRITE) {
                lens[n] = write_header(&mut headers[n], opcode, payload.len());
                bodies[n] = payload;
                n += 1;
            }
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            for i in 0..n {
                slices[2 * i] = IoSlice::new(&headers[i][..lens[i]]);
                slices[2 * i + 1] = IoSlice::new(bodies[i]);
            }
            self.write_slices(&slices[..2 * n])?;
        }
        Ok(())
    }

    /// One vectored write if nothing is pending before it; what remains is copied to `output`.
    fn write_slices(&mut self, slices: &[IoSlice<'_>]) -> io::Result<()> {
        let mut done = 0;
        if self.written == self.output.len() {
            done = match self.io.try_write_vectored(slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        }
        for slice in slices {
            let skip = done.min(slice.len());
            done -= skip;
            self.output.extend_from_slice(&slice[skip..]);
        }
        Ok(())
    }

    /// Reads more input, waiting without a buffer while there is none.
    async fn fill(&mut self) -> Result<(), Error> {
        if self.parsed > 0 {
            self.input.drain(..self.parsed);
            self.parsed = 0;
        }
        loop {
            // Read first, wait after: the buffer reserved here is freed again if nothing came.
            let room = self.wanted.saturating_sub(self.input.len()).max(READ_CHUNK);
            self.input.reserve(room);
            match self.io.try_read_buf(&mut self.input) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.input.is_empty() {
                        self.input = Vec::new();
                    }
                    self.io.readable().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Parses frames from the input until one gives something to return (continuation frames
    /// of a message do not), or the input ends inside a frame.
    fn parse(&mut self) -> Result<Option<Incoming>, Error> {
        loop {
            let Some(frame) = self.next_frame()? else { return Ok(None) };
            let Frame { fin, opcode, start, end } = frame;
            let payload = &self.input[start..end];
            match opcode {
                OP_PING => {
                    let payload = payload.to_vec();
                    self.push(OP_PONG, [payload.as_slice()])?;
                    return Ok(Some(Incoming::Ping));
                }
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => {
                    let code = close_code(payload)?;
                    if !self.close_sent {
                        let reply = code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec());
                        self.push(OP_CLOSE, [reply.as_slice()])?;
                        self.close_sent = true;
                    }
                    self.close_received = Some(code);
                    return Ok(Some(Incoming::Close(code)));
                }
                OP_TEXT | OP_BINARY if self.message.is_some() => {
                    return Err(protocol("a new message started inside a fragmented one"));
                }
                OP_TEXT if fin => {
                    return match std::str::from_utf8(payload) {
                        Ok(text) => Ok(Some(Incoming::Text(text.to_owned()))),
                        Err(_) => Err(invalid_text()),
                    };
                }
                OP_BINARY if fin => return Ok(Some(Incoming::Binary(payload.to_vec()))),
                OP_TEXT | OP_BINARY => {
                    let mut message =
                        Box::new(Assembly { text: opcode == OP_TEXT, data: payload.to_vec(), checked: 0 });
                    message.check_utf8(false)?;
                    self.message = Some(message);
                }
                _ => {
                    let Some(message) = self.message.as_mut() else {
                        return Err(protocol("a continuation frame without a message"));
                    };
                    message.data.extend_from_slice(payload);
                    message.check_utf8(fin)?;
                    if fin {
                        let Some(message) = self.message.take() else { unreachable!("checked above") };
                        return Ok(Some(if message.text {
                            // SAFETY: `check_utf8` with `fin` validated every byte.
                            Incoming::Text(unsafe { String::from_utf8_unchecked(message.data) })
                        } else {
                            Incoming::Binary(message.data)
                        }));
                    }
                }
            }
        }
    }

    /// The next complete frame in the input, unmasked in place, or `None` (setting `wanted`).
    fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let buf = &mut self.input[self.parsed..];
        if buf.len() < 2 {
            self.wanted = 2;
            return Ok(None);
        }
        let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0F);
        if buf[0] & 0x70 != 0 {
            return Err(protocol("reserved bits set without an extension"));
        }
        if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
            return Err(protocol("unknown opcode"));
        }
        if buf[1] & 0x80 == 0 {
            return Err(protocol("client frames must be masked"));
        }
        let control = opcode & 0x08 != 0;
        let (len, offset) = match buf[1] & 0x7F {
            126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let len = u64::from_be_bytes(buf[2..10].try_into().unwrap_or_default());
                if len >> 63 != 0 {
                    return Err(protocol("frame length has its top bit set"));
                }
                (len, 10)
            }
            126 | 127 => {
                self.wanted = 10;
                return Ok(None);
            }
            len => (u64::from(len), 2),
        };
        if control && (!fin || len > 125) {
            return Err(protocol("control frames must be whole and at most 125 bytes"));
        }
        let so_far = self.message.as_ref().map_or(0, |m| m.data.len()) as u64;
        if !control && so_far + len > self.max_payload as u64 {
            return Err(Error::Protocol(close::TOO_LARGE, "message too large"));
        }
        let len = len as usize;
        let total = offset + 4 + len;
        if buf.len() < offset + 4 {
            self.wanted = total;
            return Ok(None);
        }
        let mask: [u8; 4] = buf[offset..offset + 4].try_into().unwrap_or_default();
        let end = total.min(buf.len());
        let payload = &mut buf[offset + 4..end];
        unmask(&mut payload[self.unmasked..], mask, self.unmasked);
        self.unmasked = payload.len();
        if payload.len() < len {
            // Text that is already invalid is refused now, not when the rest has arrived.
            let whole_chars = match &self.message {
                None => opcode == OP_TEXT,
                Some(m) => m.text && opcode == OP_CONTINUATION && m.checked == m.data.len(),
            };
            if whole_chars {
                check_utf8(payload, &mut self.checked, false)?;
            }
            self.wanted = total;
            return Ok(None);
        }
        let start = self.parsed + offset + 4;
        self.parsed += total;
        (self.wanted, self.unmasked, self.checked) = (0, 0, 0);
        Ok(Some(Frame { fin, opcode, start, end: start + len }))
    }
}

/// Where a complete frame's payload lies in the input.
struct Frame {
    fin: bool,
    opcode: u8,
    start: usize,
    end: usize,
}

/// Writes a server frame header (final, unmasked) and answers its length.
fn write_header(header: &mut [u8; MAX_HEADER], opcode: u8, len: usize) -> usize {
    header[0] = 0x80 | opcode;
    if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The code of a close frame's payload, checked as RFC 6455 §7.4 asks.
fn close_code(payload: &[u8]) -> Result<Option<u16>, Error> {
    match payload {
        [] => Ok(None),
        [_] => Err(protocol("a close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Error::Protocol(close::INVALID_UTF8, "close reason is not valid UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

/// XORs a payload, starting `from` bytes into it, with its masking key, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4], from: usize) {
    let mut mask = mask;
    mask.rotate_left(from % 4);
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().unwrap_or_default()) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A client frame: final, masked with a fixed key.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    /// A server connection and the raw client socket talking to it.
    async fn pair(max_payload: usize) -> (WebSocket, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (WebSocket::new(server, &[], max_payload), client)
    }

    #[tokio::test]
    async fn frames_chopped_into_bytes_arrive_whole_and_idle_holds_no_buffer() {
        let (mut ws, mut client) = pair(1 << 20).await;
        let text = "héllo ".repeat(40);
        let bytes = client_frame(OP_TEXT, text.as_bytes());
        let writer = std::thread::spawn(move || {
            for byte in bytes {
                client.write_all(&[byte]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            client.write_all(&client_frame(OP_PING, b"hi")).unwrap();
            client
        });
        match ws.next().await.unwrap() {
            Incoming::Text(got) => assert_eq!(got, text),
            other => panic!("expected the text, got {other:?}"),
        }
        assert!(matches!(ws.next().await.unwrap(), Incoming::Ping));
        let mut client = writer.join().unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), ws.next()).await.is_err(), "nothing more was sent");
        assert_eq!((ws.input.capacity(), ws.output.capacity()), (0, 0), "an idle connection holds no buffer");
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).unwrap();
        assert_eq!(pong, [0x8A, 2, b'h', b'i']);
    }

    #[tokio::test]
    async fn bad_input_gets_the_close_code_rfc_6455_asks_for() {
        let cases: [(Vec<u8>, u16); 4] = [
            (client_frame(OP_TEXT, &[b'a', 0xFF]), close::INVALID_UTF8),
            (client_frame(OP_TEXT, &[b'x'; 200]), close::TOO_LARGE),
            (client_frame(OP_CONTINUATION, b"orphan"), close::PROTOCOL_ERROR),
            (vec![0x81, 0x01, b'a'], close::PROTOCOL_ERROR), // unmasked
        ];
        for (bytes, expected) in cases {
            let (mut ws, mut client) = pair(100).await;
            client.write_all(&bytes).unwrap();
            let err = ws.next().await.expect_err("refused");
            assert_eq!(err.close().map(|(code, _)| code), Some(expected), "{err}");
        }
    }

    #[tokio::test]
    async fn a_protocol_error_ends_in_an_orderly_close_though_input_is_left_unread() {
        let (mut ws, mut client) = pair(1 << 20).await;
        // An unmasked frame, then more than the server reads before it gives up.
        let mut bytes = vec![0x81, 0x01, b'a'];
        bytes.extend(client_frame(OP_TEXT, &[b' '; 60_000]));
        client.write_all(&bytes).unwrap();
        let (code, reason) = ws.next().await.expect_err("refused").close().expect("a protocol error");
        ws.close(code, reason).await.unwrap();
        let server = tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(5), ws.closed()).await });
        let client = tokio::task::spawn_blocking(move || {
            client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let end = client.read_to_end(&mut got).map_err(|e| e.kind());
            (end, got, client)
        });
        let (end, got, client) = client.await.unwrap();
        // A reset (closing with that input unread) could have taken the close frame with it.
        assert_eq!(end, Ok(got.len()), "FIN after the close frame, not a reset");
        assert_eq!(&got[..4], &[0x88, 2 + reason.len() as u8, 0x03, 0xEA]);
        drop(client);
        assert!(server.await.unwrap().is_ok(), "closed() returns once the client has closed too");
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in [0, 1, 7, 8, 9, 16, 31] {
            let original: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let slow: Vec<u8> = original.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            let mut fast = original.clone();
            unmask(&mut fast, mask, 0);
            assert_eq!(fast, slow, "length {len}");
            // In two pieces, as when a frame arrives in two reads.
            let mut pieces = original.clone();
            let cut = len / 3;
            unmask(&mut pieces[..cut], mask, 0);
            unmask(&mut pieces[cut..], mask, cut);
            assert_eq!(pieces, slow, "length {len} cut at {cut}");
        }
    }

    #[test]
    fn headers_use_the_shortest_length_form() {
        let mut header = [0u8; MAX_HEADER];
        assert_eq!(write_header(&mut header, OP_TEXT, 125), 2);
        assert_eq!(&header[..2], &[0x81, 125]);
        assert_eq!(write_header(&mut header, OP_TEXT, 126), 4);
        assert_eq!(&header[..4], &[0x81, 126, 0, 126]);
        assert_eq!(write_header(&mut header, OP_BINARY, 70_000), 10);
        assert_eq!(&header[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn close_codes_are_checked() {
        assert_eq!(close_code(&[]).unwrap(), None);
        assert_eq!(close_code(&[0x03, 0xE8]).unwrap(), Some(1000));
        assert_eq!(close_code(&[0x0F, 0xA0, b'o', b'k']).unwrap(), Some(4000));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(close_code(&bad.to_be_bytes()).is_err(), "{bad} accepted");
        }
        assert!(close_code(&[0x03]).is_err());
        assert!(matches!(close_code(&[0x03, 0xE8, 0xFF]), Err(Error::Protocol(close::INVALID_UTF8, _))));
    }

    #[test]
    fn split_utf8_across_fragments_is_accepted_and_invalid_text_refused_early() {
        let mut message = Assembly { text: true, data: vec![b'a', 0xE2, 0x82], checked: 0 };
        message.check_utf8(false).unwrap();
        assert_eq!(message.checked, 1);
        message.data.push(0xAC);
        message.check_utf8(true).unwrap();
        let mut bad = Assembly { text: true, data: vec![b'a', 0xFF], checked: 0 };
        assert!(bad.check_utf8(false).is_err());
        let mut cut = Assembly { text: true, data: vec![0xE2, 0x82], checked: 0 };
        assert!(cut.check_utf8(true).is_err());
    }
}
