//! One server-side WebSocket connection on any [`Transport`], written for a server holding many
//! idle connections: between messages a connection owns no read or write buffer at all.
//!
//! Reading waits for readiness without a buffer, reads into one sized for the frame at hand and
//! frees it as soon as every received byte has been parsed. Writing goes straight to the stream
//! with one vectored write per batch of frames (headers built on the stack next to the shared
//! payloads); only what the stream does not take at once is copied, and that copy is freed once
//! written. Both directions are cancel-safe: all progress lives in [`WebSocket`], so a caller may
//! drop [`WebSocket::next`] or a send at any await and call again.

use std::future::poll_fn;
use std::io::{self, IoSlice};

use tokio::net::TcpStream;

use super::frame::{
    self, Decoded, Decoder, Error, Incoming, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};
use super::transport::Transport;

/// The smallest read; a frame known to be larger is read in one go.
const READ_CHUNK: usize = 4096;
/// The first read with nothing pending goes to the stack, this large (a client's command fits).
const READ_PROBE: usize = 512;
/// Frames per vectored write (two slices each, within every platform's `IOV_MAX`).
const FRAMES_PER_WRITE: usize = 32;
/// Two-part frames per vectored write (two slices each; five at most, for a head that does not
/// fit in [`HEAD_ROOM`]).
const PARTS_PER_WRITE: usize = 32;
/// Room for a two-part frame's head behind its header: a STOMP `MESSAGE` head with an id of up
/// to 18 bytes (clients' are like `sub-0`). The stack arrays are zeroed at every write, so they
/// are kept small.
const HEAD_ROOM: usize = 40;

/// One server-side WebSocket connection over the stream `S`: a plain `TcpStream` unless said
/// otherwise.
pub struct WebSocket<S = TcpStream> {
    io: S,
    /// Received bytes; the decoder knows how far they are parsed. No capacity while nothing is
    /// pending.
    input: Vec<u8>,
    decoder: Decoder,
    /// Frames not yet written, from `written` on. No capacity while caught up.
    output: Vec<u8>,
    written: usize,
    close_sent: bool,
    close_received: Option<Option<u16>>,
}

impl<S: Transport> WebSocket<S> {
    /// Wraps a stream whose upgrade handshake is done; `read_ahead` holds bytes already read
    /// past the handshake. Data messages above `max_payload` bytes are refused with 1009.
    pub fn new(io: S, read_ahead: &[u8], max_payload: usize) -> Self {
        Self {
            io,
            input: read_ahead.to_vec(),
            decoder: Decoder::new(max_payload),
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

    /// The next data message if the client already sent it whole and nothing else comes first:
    /// never reads from the stream nor waits, and leaves control frames (a close is answered
    /// as it is decoded, which would go out ahead of replies still to write) to [`next`].
    ///
    /// [`next`]: Self::next
    pub fn next_buffered(&mut self) -> Result<Option<Incoming>, Error> {
        if self.close_received.is_some() || !self.decoder.next_is_whole_data(&self.input) {
            return Ok(None);
        }
        self.parse()
    }

    /// Writes text frames, one per payload, as far as the stream takes them now, in as few
    /// writes as it allows; the rest waits for [`flush`](Self::flush).
    pub fn push_text<'a>(&mut self, payloads: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        self.push(OP_TEXT, payloads)
    }

    /// Like [`push_text`](Self::push_text), each message's payload in two parts written one
    /// after the other without an allocation: a small head of the session's own, in up to three
    /// pieces, before bytes shared with other sessions (a STOMP `MESSAGE`'s command and
    /// `subscription` before the rest). The head is copied behind the frame's header on the
    /// stack, so a message costs the write two slices, as a JSON one does; a head above
    /// [`HEAD_ROOM`] bytes goes out as slices of its own. Apart from `push`, whose stack arrays
    /// would grow for every JSON write (3 % more instructions per delivery, measured).
    pub fn push_text_parts<'a>(
        &mut self,
        messages: impl IntoIterator<Item = ([&'a [u8]; 3], &'a [u8])>,
    ) -> io::Result<()> {
        if self.close_sent {
            return Ok(());
        }
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let mut heads = [[0u8; MAX_HEADER + HEAD_ROOM]; PARTS_PER_WRITE];
            let mut slices = [IoSlice::new(&[]); 3 * PARTS_PER_WRITE];
            let mut used = 0;
            for buf in &mut heads {
                // Room for the largest message: its header, three pieces and its body.
                if used + 5 > slices.len() {
                    break;
                }
                let Some((head, body)) = messages.next() else { break };
                let head_len: usize = head.iter().map(|piece| piece.len()).sum();
                let header: &mut [u8; MAX_HEADER] = (&mut buf[..MAX_HEADER]).try_into().expect("MAX_HEADER bytes");
                let mut len = frame::write_header(header, OP_TEXT, head_len + body.len());
                let fits = head_len <= HEAD_ROOM;
                if fits {
                    for piece in head {
                        buf[len..len + piece.len()].copy_from_slice(piece);
                        len += piece.len();
                    }
                }
                slices[used] = IoSlice::new(&buf[..len]);
                used += 1;
                if !fits {
                    for piece in head {
                        slices[used] = IoSlice::new(piece);
                        used += 1;
                    }
                }
                slices[used] = IoSlice::new(body);
                used += 1;
            }
            self.write_slices(&slices[..used])?;
        }
        Ok(())
    }

    pub fn push_ping(&mut self) -> io::Result<()> {
        self.push(OP_PING, [&b""[..]])
    }

    /// Whether pushed frames are still waiting for the stream.
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
            let payload = frame::close_payload(code, reason);
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
        self.decoder.reset();
        loop {
            self.input.clear();
            self.input.reserve(READ_CHUNK);
            match self.io.try_read_buf(&mut self.input) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if poll_fn(|cx| self.io.poll_read_ready(cx)).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Writes what is pending, waiting while the stream is full.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            poll_fn(|cx| self.io.poll_write_ready(cx)).await?;
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

    /// Frames each payload and writes them now as far as the stream takes them; the rest goes
    /// to `output` for [`flush`](Self::flush). Nothing goes out after our close frame.
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
                lens[n] = frame::write_header(&mut headers[n], opcode, payload.len());
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
        let parsed = self.decoder.take_parsed();
        if parsed > 0 {
            self.input.drain(..parsed);
        }
        loop {
            // Read first, wait after: a buffer reserved here is freed again if nothing came.
            match self.read_now() {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.input.is_empty() {
                        self.input = Vec::new();
                    }
                    poll_fn(|cx| self.io.poll_read_ready(cx)).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads what the stream has now. With no input buffer the read goes to the stack first and
    /// only what came is copied: a session is woken for every delivery, and then usually finds
    /// nothing to read, which this way costs no allocation. A larger frame is read on into the
    /// buffer by the next call.
    fn read_now(&mut self) -> io::Result<usize> {
        if self.input.capacity() == 0 {
            let mut probe = [0u8; READ_PROBE];
            let n = self.io.try_read(&mut probe)?;
            self.input.extend_from_slice(&probe[..n]);
            return Ok(n);
        }
        let room = self.decoder.wanted().saturating_sub(self.input.len()).max(READ_CHUNK);
        self.input.reserve(room);
        self.io.try_read_buf(&mut self.input)
    }

    /// Decodes what the input holds, answering pings and the client's close frame.
    fn parse(&mut self) -> Result<Option<Incoming>, Error> {
        match self.decoder.decode(&mut self.input)? {
            None => Ok(None),
            Some(Decoded::Ready(incoming)) => Ok(Some(incoming)),
            Some(Decoded::Ping(payload)) => {
                let payload = payload.to_vec();
                self.push(OP_PONG, [payload.as_slice()])?;
                Ok(Some(Incoming::Ping))
            }
            Some(Decoded::Close(code)) => {
                if !self.close_sent {
                    let reply = code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec());
                    self.push(OP_CLOSE, [reply.as_slice()])?;
                    self.close_sent = true;
                }
                self.close_received = Some(code);
                Ok(Some(Incoming::Close(code)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::close;
    use crate::ws::frame::OP_CONTINUATION;
    use crate::ws::frame::tests::client_frame;
    use std::io::{Read, Write};
    use std::time::Duration;

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
    async fn two_part_messages_arrive_as_one_frame_each_whatever_the_head() {
        let (mut ws, mut client) = pair(1 << 20).await;
        let long = vec![b'h'; HEAD_ROOM + 1];
        let body = vec![b'b'; 300];
        let mut expected = Vec::new();
        let mut messages: Vec<([&[u8]; 3], &[u8])> = Vec::new();
        for i in 0..(PARTS_PER_WRITE + 5) {
            let head: [&[u8]; 3] = match i % 3 {
                0 => [b"MESSAGE\nsubscription:", b"sub-0", b"\n"],
                1 => [b"MESSAGE\n", b"", b""],
                _ => [b"MESSAGE\nsubscription:", &long, b"\n"],
            };
            let body = if i % 2 == 0 { &body[..] } else { &b"x"[..] };
            expected.push([&head.concat()[..], body].concat());
            messages.push((head, body));
        }
        ws.push_text_parts(messages).unwrap();
        tokio::time::timeout(Duration::from_secs(5), ws.flush()).await.unwrap().unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            for payload in &expected {
                let mut header = [0u8; 2];
                client.read_exact(&mut header).unwrap();
                assert_eq!(header[0], 0x81, "a whole text frame");
                let len = match header[1] {
                    126 => {
                        let mut ext = [0u8; 2];
                        client.read_exact(&mut ext).unwrap();
                        u16::from_be_bytes(ext) as usize
                    }
                    n => n as usize,
                };
                let mut data = vec![0u8; len];
                client.read_exact(&mut data).unwrap();
                assert_eq!(&data, payload);
                got.push(data);
            }
            got.len()
        });
        assert_eq!(reader.await.unwrap(), PARTS_PER_WRITE + 5);
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
}
