//! RFC 6455 framing with no I/O: decoding client frames from received bytes and encoding the
//! headers of server frames.
//!
//! [`Decoder`] works on a buffer its caller owns, so that the caller decides when a buffer
//! exists at all. It resumes where it stopped when a frame arrives in pieces: payload bytes are
//! unmasked in place once, and text is checked as UTF-8 as it arrives, so invalid text is refused
//! before the rest of its frame or message. Only a fragmented message owns memory here (its
//! assembly), and only until its last fragment.

use std::io;

use crate::protocol::close;

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Longest frame header a server writes: 2 bytes, then a 64-bit length.
pub(crate) const MAX_HEADER: usize = 10;
/// Longest close reason: a control payload holds 125 bytes, two of them the code.
const MAX_CLOSE_REASON: usize = 123;

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

/// What [`Decoder::decode`] found.
#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// A data message or a pong, for the application as it is.
    Ready(Incoming),
    /// A ping: the caller answers with a pong carrying this payload.
    Ping(&'a [u8]),
    /// A valid close frame and its code: the caller answers with a close frame unless it has
    /// sent one, and reads no further.
    Close(Option<u16>),
}

/// Decoding client frames: where parsing stands in the caller's input, and the message being
/// assembled from fragments.
///
/// The input is every received byte not yet removed; the first [`parsed`](Self::take_parsed)
/// of them are done with. Between calls the caller may append to the input and remove parsed
/// bytes from its front, nothing else.
pub(crate) struct Decoder {
    parsed: usize,
    /// Bytes from `parsed` on needed to complete the frame there (a read-size hint).
    wanted: usize,
    /// Of the incomplete frame at `parsed`: payload bytes unmasked in place, and of those the
    /// ones known to be valid UTF-8.
    unmasked: usize,
    checked: usize,
    message: Option<Box<Assembly>>,
    max_payload: usize,
}

impl Decoder {
    /// Data messages above `max_payload` bytes are refused with 1009.
    pub(crate) fn new(max_payload: usize) -> Self {
        Self { parsed: 0, wanted: 0, unmasked: 0, checked: 0, message: None, max_payload }
    }

    /// Whether the next frame in `input` starts a whole data message (text or binary, FIN set)
    /// outside any fragmented one: decoding it has no side effect on the connection, unlike a
    /// ping or a close, which are answered as they are decoded.
    pub(crate) fn next_is_whole_data(&self, input: &[u8]) -> bool {
        let Some(&first) = input.get(self.parsed) else { return false };
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0f);
        self.message.is_none() && fin && matches!(opcode, OP_TEXT | OP_BINARY)
    }

    /// How many bytes of input the frame under way needs in all, counted from the first byte
    /// not parsed (0 when none is under way).
    #[inline]
    pub(crate) fn wanted(&self) -> usize {
        self.wanted
    }

    /// Answers how many bytes at the front of the input are parsed, and from now on counts the
    /// input from the byte after them: the caller removes that many before the next call.
    #[inline]
    pub(crate) fn take_parsed(&mut self) -> usize {
        std::mem::take(&mut self.parsed)
    }

    /// Forgets all progress, a message under way included (after a protocol error, when the
    /// input is only discarded).
    pub(crate) fn reset(&mut self) {
        *self = Self::new(self.max_payload);
    }

    /// Parses frames from the input until one gives something to return (continuation frames
    /// of a message do not), or the input ends inside a frame (`None`). Complete frames are
    /// parsed even when it answers `None`.
    pub(crate) fn decode<'a>(&mut self, input: &'a mut [u8]) -> Result<Option<Decoded<'a>>, Error> {
        loop {
            let Some(Frame { fin, opcode, start, end }) = self.next_frame(input)? else { return Ok(None) };
            let payload = &input[start..end];
            match opcode {
                OP_PING => return Ok(Some(Decoded::Ping(&input[start..end]))),
                OP_PONG => return Ok(Some(Decoded::Ready(Incoming::Pong))),
                OP_CLOSE => return Ok(Some(Decoded::Close(close_code(payload)?))),
                OP_TEXT | OP_BINARY if self.message.is_some() => {
                    return Err(protocol("a new message started inside a fragmented one"));
                }
                OP_TEXT if fin => {
                    return match std::str::from_utf8(payload) {
                        Ok(text) => Ok(Some(Decoded::Ready(Incoming::Text(text.to_owned())))),
                        Err(_) => Err(invalid_text()),
                    };
                }
                OP_BINARY if fin => return Ok(Some(Decoded::Ready(Incoming::Binary(payload.to_vec())))),
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
                        return Ok(Some(Decoded::Ready(if message.text {
                            // SAFETY: `check_utf8` with `fin` validated every byte.
                            Incoming::Text(unsafe { String::from_utf8_unchecked(message.data) })
                        } else {
                            Incoming::Binary(message.data)
                        })));
                    }
                }
            }
        }
    }

    /// The next complete frame in the input, unmasked in place, or `None` (setting `wanted`).
    fn next_frame(&mut self, input: &mut [u8]) -> Result<Option<Frame>, Error> {
        let buf = &mut input[self.parsed..];
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
#[inline]
pub(crate) fn write_header(header: &mut [u8; MAX_HEADER], opcode: u8, len: usize) -> usize {
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

/// The payload of a close frame with `code` and `reason`, the reason cut (at a character
/// boundary) to fit a control frame.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    payload
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
pub(crate) mod tests {
    use super::*;

    /// A client frame: final, masked with a fixed key.
    pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        client_fragment(true, opcode, payload)
    }

    fn client_fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
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

    /// Feeds `bytes` to a decoder one at a time, as the socket would (removing parsed bytes
    /// before appending), and answers what it found, pings as their payload.
    fn decode_bytewise(bytes: &[u8], max_payload: usize) -> Result<Vec<String>, Error> {
        let (mut decoder, mut input, mut found) = (Decoder::new(max_payload), Vec::new(), Vec::new());
        for byte in bytes {
            input.drain(..decoder.take_parsed());
            input.push(*byte);
            while let Some(decoded) = decoder.decode(&mut input)? {
                found.push(match decoded {
                    Decoded::Ready(Incoming::Text(text)) => text,
                    Decoded::Ping(payload) => format!("ping {}", String::from_utf8_lossy(payload)),
                    other => format!("{other:?}"),
                });
            }
            assert!(decoder.wanted() <= 2 + 8 + 4 + max_payload.max(125), "a sane read hint");
        }
        Ok(found)
    }

    #[test]
    fn frames_arriving_byte_by_byte_decode_as_when_whole() {
        let mut bytes = client_fragment(false, OP_TEXT, "hé".as_bytes());
        bytes.extend(client_frame(OP_PING, b"hi"));
        bytes.extend(client_fragment(false, OP_CONTINUATION, &[0xC3]));
        bytes.extend(client_frame(OP_CONTINUATION, &[0xA9, b'!']));
        bytes.extend(client_frame(OP_TEXT, "x".repeat(300).as_bytes()));
        bytes.extend(client_frame(OP_CLOSE, &[0x03, 0xE8]));
        let found = decode_bytewise(&bytes, 1000).unwrap();
        assert_eq!(found, ["ping hi", "héé!", &"x".repeat(300), "Close(Some(1000))"]);
    }

    #[test]
    fn invalid_text_is_refused_before_its_frame_is_complete() {
        let bytes = client_frame(OP_TEXT, &[b'a', 0xFF, b'b', b'c']);
        let mut decoder = Decoder::new(100);
        let mut partial = bytes[..bytes.len() - 2].to_vec();
        assert!(matches!(decoder.decode(&mut partial), Err(Error::Protocol(close::INVALID_UTF8, _))));
    }

    #[test]
    fn bad_frames_get_the_close_code_rfc_6455_asks_for() {
        let mut too_long = client_fragment(false, OP_BINARY, &[0; 60]);
        too_long.extend(client_frame(OP_CONTINUATION, &[0; 60]));
        let cases: [(Vec<u8>, u16); 7] = [
            (client_frame(OP_TEXT, &[b'a', 0xFF]), close::INVALID_UTF8),
            (client_frame(OP_TEXT, &[b'x'; 200]), close::TOO_LARGE),
            (too_long, close::TOO_LARGE),
            (client_frame(OP_CONTINUATION, b"orphan"), close::PROTOCOL_ERROR),
            (vec![0x81, 0x01, b'a'], close::PROTOCOL_ERROR), // unmasked
            (client_fragment(false, OP_PING, b""), close::PROTOCOL_ERROR),
            (client_frame(0x3, b""), close::PROTOCOL_ERROR),
        ];
        for (bytes, expected) in cases {
            let err = decode_bytewise(&bytes, 100).expect_err("refused");
            assert_eq!(err.close().map(|(code, _)| code), Some(expected), "{err}");
        }
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let reason = "é".repeat(100);
        let payload = close_payload(1000, &reason);
        assert_eq!(payload.len(), 2 + 122);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(close_payload(4000, "ok"), [0x0F, 0xA0, b'o', b'k']);
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
