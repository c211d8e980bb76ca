//! STOMP 1.2 frames with no I/O: client frames decoded from received bytes, server frames
//! encoded.
//!
//! [`Decoder`] takes the bytes of WebSocket messages as they come: a message may hold several
//! frames, a frame may span several messages, and a bare EOL between frames is a heart-beat. Each
//! line is parsed once, as soon as it is complete, and the decoder remembers how far it has
//! searched, so the work is linear in the input however it is split.
//!
//! A frame's size counts its bytes from the first of its command to its NUL, both included. The
//! limit holds while bytes arrive: a frame is refused as soon as it has more than `max_frame`
//! bytes without being complete, or declares a `content-length` that cannot fit. An incomplete
//! frame therefore never holds more than `max_frame` bytes, and between frames the decoder owns
//! no heap memory at all. Every refusal is decided at the byte that makes it certain, so what a
//! stream decodes to does not depend on how it was split.
//!
//! Header names and values are escaped (`\r`, `\n`, `\c`, `\\`) in every frame but `CONNECT`,
//! `STOMP` and `CONNECTED`, which STOMP 1.2 leaves as they were in 1.0. A raw CR is refused
//! inside a header line in every frame: the grammar allows CR only before the LF that ends it.

use std::fmt;

use bytes::{Bytes, BytesMut};

/// Most headers a client frame may carry.
pub const MAX_HEADERS: usize = 64;

/// A client command. The server's own (`CONNECTED`, `MESSAGE`, `RECEIPT`, `ERROR`) are refused
/// from a client like any unknown word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
}

impl Command {
    const ALL: [Command; 11] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
    ];

    /// The command as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
        }
    }

    /// Commands are case-sensitive and allow no surrounding space.
    fn parse(line: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|command| command.as_str().as_bytes() == line)
    }

    /// Whether its headers are escaped: all but the frames that open a session.
    fn escaped(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp)
    }
}

/// The headers of a frame, in the order they came, repeats kept. Names and values share one
/// string, so a frame's headers cost two allocations however many there are.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    text: String,
    /// Per header, where its name and its value end in `text`; each starts where the one
    /// before it ends.
    ends: Vec<(usize, usize)>,
}

impl Headers {
    /// The value of the first header called `name`: STOMP 1.2 ignores later repeats.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|&(n, _)| n == name).map(|(_, value)| value)
    }

    /// Every header as `(name, value)`, in order, repeats included.
    pub fn iter(&self) -> Iter<'_> {
        Iter { text: &self.text, ends: self.ends.iter(), start: 0 }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends a header given as received, unescaping it when `escaped`.
    fn push(&mut self, name: &str, value: &str, escaped: bool) -> Result<(), FrameError> {
        push_text(&mut self.text, name, escaped)?;
        let name_end = self.text.len();
        push_text(&mut self.text, value, escaped)?;
        self.ends.push((name_end, self.text.len()));
        Ok(())
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The headers of a frame as `(name, value)`, in order.
pub struct Iter<'a> {
    text: &'a str,
    ends: std::slice::Iter<'a, (usize, usize)>,
    start: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let &(name_end, value_end) = self.ends.next()?;
        let header = (self.text.get(self.start..name_end)?, self.text.get(name_end..value_end)?);
        self.start = value_end;
        Some(header)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.ends.size_hint()
    }
}

/// Appends `raw` to `out`, decoding its escapes when `escaped`.
fn push_text(out: &mut String, raw: &str, escaped: bool) -> Result<(), FrameError> {
    if !escaped {
        out.push_str(raw);
        return Ok(());
    }
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        out.push(match rest.as_bytes().get(at + 1) {
            Some(b'r') => '\r',
            Some(b'n') => '\n',
            Some(b'c') => ':',
            Some(b'\\') => '\\',
            _ => return Err(FrameError::BadEscape),
        });
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Ok(())
}

/// A complete client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub headers: Headers,
    /// Exactly `content-length` bytes when the frame has that header (NULs included), else
    /// everything up to the first NUL. A slice of the received bytes, not a copy: it keeps
    /// them in memory while it lives.
    pub body: Bytes,
}

/// What the decoder takes from the input, one at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    /// A bare EOL between frames: the client is alive.
    HeartBeat,
}

/// Why a client's bytes are not a STOMP 1.2 frame. The message is the `message` header of the
/// `ERROR` frame that answers it (short, lower case, one line); the connection then closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than `max_frame` bytes, or a `content-length` that cannot fit in them.
    #[error("frame too large")]
    TooLarge,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("unknown command")]
    UnknownCommand,
    #[error("header line without a colon")]
    NoColon,
    #[error("empty header name")]
    EmptyHeaderName,
    #[error("carriage return inside a header line")]
    CarriageReturn,
    /// A backslash not followed by `r`, `n`, `c` or another backslash, in a frame that escapes.
    #[error("undefined escape sequence in a header")]
    BadEscape,
    #[error("header is not valid utf-8")]
    InvalidUtf8,
    /// A `content-length` that is not a plain decimal number of bytes.
    #[error("invalid content-length")]
    BadContentLength,
    /// The byte after `content-length` bytes of body is not the frame's NUL.
    #[error("content-length does not end at a nul byte")]
    NoNulAfterBody,
    /// A NUL in the command or header lines: the frame ended before its blank line.
    #[error("frame ends before its headers do")]
    NulInHeaders,
}

/// Client frames out of the bytes of WebSocket messages (text or binary alike).
///
/// Feed it with [`push`](Self::push) and call [`next`](Self::next) until it answers `Ok(None)`.
/// After a refusal it answers that refusal again and ignores further input: a STOMP stream that
/// went wrong cannot be resynchronized, and the session closes.
pub struct Decoder {
    /// The input under way, boxed and only while there is some: an idle session holds a
    /// decoder, so it costs a pointer then.
    input: Option<Box<Input>>,
    max_frame: u32,
    failed: Option<FrameError>,
}

/// Received bytes not yet returned as items, and how far they are parsed.
struct Input {
    /// The first byte is the first of the next item.
    buf: BytesMut,
    /// How much of `buf` was searched for the end of the current line or body.
    scanned: usize,
    /// Where the current header line starts in `buf`.
    line: usize,
    /// The frame under way, once its command line is complete.
    partial: Option<Box<Partial>>,
    /// Whether `buf` shares its allocation with items split off its front since it was last
    /// compacted.
    split: bool,
    max_frame: usize,
}

/// What is known of the frame under way.
struct Partial {
    command: Command,
    headers: Headers,
    /// The first `content-length` header's value, once read.
    content_length: Option<usize>,
    /// Where the body starts in the decoder's buffer, once the blank line is read.
    body: Option<usize>,
}

impl Decoder {
    /// Frames of more than `max_frame` bytes (command line to NUL) are refused; a limit above
    /// 4 GiB counts as 4 GiB.
    pub fn new(max_frame: usize) -> Self {
        Self { input: None, max_frame: u32::try_from(max_frame).unwrap_or(u32::MAX), failed: None }
    }

    /// Appends the bytes of a received message.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() && !bytes.is_empty() {
            let max_frame = self.max_frame as usize;
            let input = self.input.get_or_insert_with(|| {
                Box::new(Input { buf: BytesMut::new(), scanned: 0, line: 0, partial: None, split: false, max_frame })
            });
            input.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete item, `Ok(None)` when the input ends before one, or why the input is
    /// not STOMP.
    #[allow(clippy::should_implement_trait, reason = "not an iterator: it fails, and resumes after a push")]
    pub fn next(&mut self) -> Result<Option<Item>, FrameError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        let Some(input) = &mut self.input else { return Ok(None) };
        match input.parse() {
            Ok(None) if input.buf.is_empty() => {
                self.input = None;
                Ok(None)
            }
            Ok(None) => {
                input.compact();
                Ok(None)
            }
            Ok(item) => Ok(item),
            Err(error) => {
                (self.input, self.failed) = (None, Some(error));
                Err(error)
            }
        }
    }

    /// Bytes received and not yet returned as items: at most `max_frame` once `next` has
    /// answered `Ok(None)` (or 1, a CR that may start a heart-beat).
    pub fn buffered(&self) -> usize {
        self.input.as_ref().map_or(0, |input| input.buf.len())
    }

    /// The size of the buffer holding them once `next` has answered `Ok(None)`: 0 whenever
    /// nothing is buffered.
    pub fn capacity(&self) -> usize {
        self.input.as_ref().map_or(0, |input| input.buf.capacity())
    }
}

impl Input {
    fn parse(&mut self) -> Result<Option<Item>, FrameError> {
        let mut partial = match self.partial.take() {
            Some(partial) => partial,
            None => {
                if self.scanned == 0 {
                    match self.buf[..] {
                        [] | [b'\r'] => return Ok(None),
                        [b'\n', ..] => return Ok(Some(self.take_heart_beat(1))),
                        [b'\r', b'\n', ..] => return Ok(Some(self.take_heart_beat(2))),
                        _ => {}
                    }
                }
                let Some(end) = self.search(is_line_end)? else { return Ok(None) };
                if self.buf[end] == 0 {
                    return Err(FrameError::NulInHeaders);
                }
                let command = Command::parse(strip_cr(&self.buf[..end])).ok_or(FrameError::UnknownCommand)?;
                self.line = end + 1;
                Box::new(Partial { command, headers: Headers::default(), content_length: None, body: None })
            }
        };
        let Some((body, nul)) = self.read_frame(&mut partial)? else {
            self.partial = Some(partial);
            return Ok(None);
        };
        let frame = self.take(nul + 1).freeze();
        let Partial { command, headers, .. } = *partial;
        Ok(Some(Item::Frame(Frame { command, headers, body: frame.slice(body..nul) })))
    }

    /// Reads `partial`'s header lines and body as far as the input goes: where its body starts
    /// and its NUL lies, once it is complete.
    fn read_frame(&mut self, partial: &mut Partial) -> Result<Option<(usize, usize)>, FrameError> {
        let body = loop {
            if let Some(body) = partial.body {
                break body;
            }
            let Some(end) = self.search(is_line_end)? else { return Ok(None) };
            if self.buf[end] == 0 {
                return Err(FrameError::NulInHeaders);
            }
            let line = strip_cr(&self.buf[self.line..end]);
            self.line = end + 1;
            if !line.is_empty() {
                partial.add_header(line, self.max_frame)?;
                continue;
            }
            if partial.content_length.is_some_and(|len| self.line.saturating_add(len) >= self.max_frame) {
                return Err(FrameError::TooLarge);
            }
            partial.body = Some(self.line);
        };
        match partial.content_length {
            Some(len) => match self.buf.get(body + len) {
                None => Ok(None),
                Some(0) => Ok(Some((body, body + len))),
                Some(_) => Err(FrameError::NoNulAfterBody),
            },
            None => Ok(self.search(|b| b == 0)?.map(|nul| (body, nul))),
        }
    }

    /// The first byte from where the last search stopped that `is_end` accepts, among the
    /// frame's first `max_frame` bytes; past it is where the next search starts. With no such
    /// byte, the frame is too large once the input goes beyond those bytes.
    fn search(&mut self, is_end: impl Fn(u8) -> bool) -> Result<Option<usize>, FrameError> {
        let window = self.buf.len().min(self.max_frame);
        let from = self.scanned.min(window);
        match self.buf[from..window].iter().position(|&b| is_end(b)) {
            Some(at) => {
                self.scanned = from + at + 1;
                Ok(Some(from + at))
            }
            None if self.buf.len() > self.max_frame => Err(FrameError::TooLarge),
            None => {
                self.scanned = window;
                Ok(None)
            }
        }
    }

    fn take_heart_beat(&mut self, eol: usize) -> Item {
        self.take(eol);
        Item::HeartBeat
    }

    /// Splits the next item's `len` bytes off the input. Once the input is used up, the decoder
    /// lets go of its buffer.
    fn take(&mut self, len: usize) -> BytesMut {
        let item = self.buf.split_to(len);
        (self.scanned, self.line) = (0, 0);
        if self.buf.is_empty() {
            (self.buf, self.split) = (BytesMut::new(), false);
        } else {
            self.split = true;
        }
        item
    }

    /// Moves an incomplete frame left behind items into a buffer of its own, so that it does not
    /// keep their (possibly large) allocation alive while the client is idle.
    fn compact(&mut self) {
        if std::mem::take(&mut self.split) {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }
}

impl Partial {
    fn add_header(&mut self, line: &[u8], max_frame: usize) -> Result<(), FrameError> {
        if self.headers.len() == MAX_HEADERS {
            return Err(FrameError::TooManyHeaders);
        }
        if line.contains(&b'\r') {
            return Err(FrameError::CarriageReturn);
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(FrameError::NoColon)?;
        if colon == 0 {
            return Err(FrameError::EmptyHeaderName);
        }
        let line = std::str::from_utf8(line).map_err(|_| FrameError::InvalidUtf8)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        self.headers.push(name, value, self.command.escaped())?;
        // No escape decodes to a digit or a letter of the name, so the raw text decides.
        if self.content_length.is_none() && name == "content-length" {
            self.content_length = Some(parse_length(value, max_frame)?);
        }
        Ok(())
    }
}

/// A `content-length`: decimal digits only, and at most `max_frame`.
fn parse_length(value: &str, max_frame: usize) -> Result<usize, FrameError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FrameError::BadContentLength);
    }
    let len = value.bytes().try_fold(0usize, |len, digit| len.checked_mul(10)?.checked_add(usize::from(digit - b'0')));
    len.filter(|&len| len <= max_frame).ok_or(FrameError::TooLarge)
}

/// The end of a command or header line, or a NUL that ends the frame too early.
fn is_line_end(byte: u8) -> bool {
    byte == b'\n' || byte == 0
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Appends a frame: `command`, `headers` in order, a blank line, `body` and the NUL. It adds no
/// `content-length`: a body that may hold a NUL needs the caller to give one.
///
/// Headers are escaped, but for `CONNECTED` (and `CONNECT`, `STOMP`), whose names must then
/// hold no CR, LF or `:` and whose values no CR or LF. No header may hold a NUL.
pub fn write_frame(out: &mut Vec<u8>, command: &str, headers: &[(&str, &str)], body: &[u8]) {
    let escaped = !matches!(command, "CONNECTED" | "CONNECT" | "STOMP");
    let lines: usize = headers.iter().map(|(name, value)| name.len() + value.len() + 2).sum();
    out.reserve(command.len() + lines + body.len() + 3);
    out.extend_from_slice(command.as_bytes());
    out.push(b'\n');
    for (name, value) in headers {
        if escaped {
            write_header(out, name, value);
        } else {
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
}

/// Appends one escaped header line, for frames built in pieces (a `MESSAGE` whose
/// `subscription` differs per session while the rest is shared). Not for `CONNECTED`.
pub fn write_header(out: &mut Vec<u8>, name: &str, value: &str) {
    write_escaped(out, name);
    out.push(b':');
    write_escaped(out, value);
    out.push(b'\n');
}

/// Appends `text` with STOMP 1.2's escapes.
pub(crate) fn write_escaped(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    // Most values need no escape: one pass without branches (which compilers vectorize), then
    // one copy.
    let special = bytes.iter().fold(false, |any, &b| any | (b == b'\\') | (b == b'\n') | (b == b'\r') | (b == b':'));
    if !special {
        out.extend_from_slice(bytes);
        return;
    }
    let mut from = 0;
    for (at, byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b':' => b"\\c",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..at]);
        out.extend_from_slice(escape);
        from = at + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

#[cfg(test)]
mod tests;
