//! RFC 6455 framing as the fuzzer needs it: client frames built field by field (any opcode,
//! reserved bits, a mask or none, any declared length, whatever payload), and a strict reader of
//! the server's frames that names the first rule a server frame breaks.

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Whether `opcode` is one RFC 6455 defines (the others are reserved).
pub fn known_opcode(opcode: u8) -> bool {
    matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG)
}

/// Close codes an endpoint may put on the wire (RFC 6455 §7.4, and the IANA registry's
/// 1012-1014); 1004-1006, 1015 and anything below 1000 or in 1016-2999 may not be sent.
pub fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// How a frame's length field is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// The payload's length in the shortest form.
    Exact,
    /// The payload's length in the 16-bit form, even when it is below 126 (not minimal).
    Form16,
    /// The payload's length in the 64-bit form, even when it would fit 16 bits (not minimal).
    Form64,
    /// This value, in the shortest form that holds it, whatever the payload's length.
    Declared(u64),
    /// This value in the 64-bit form, top bit and all.
    Declared64(u64),
}

/// One client frame, every field chosen by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    pub fin: bool,
    /// RSV1-3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    /// `None` sends the frame unmasked (a client must not).
    pub mask: Option<[u8; 4]>,
    pub length: Length,
    pub payload: Vec<u8>,
}

impl FrameSpec {
    /// A final, masked frame with its exact length.
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>, mask: [u8; 4]) -> Self {
        Self { fin: true, rsv: 0, opcode, mask: Some(mask), length: Length::Exact, payload: payload.into() }
    }

    pub fn fin(mut self, fin: bool) -> Self {
        self.fin = fin;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + self.payload.len());
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push((if self.fin { 0x80 } else { 0 }) | (self.rsv & 0x7) << 4 | (self.opcode & 0x0F));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let n = self.payload.len() as u64;
        let (form, value) = match self.length {
            Length::Exact => (shortest(n), n),
            Length::Form16 => (16, n),
            Length::Form64 => (64, n),
            Length::Declared(v) => (shortest(v), v),
            Length::Declared64(v) => (64, v),
        };
        match form {
            7 => out.push(mask_bit | value as u8),
            16 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(value as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
        match self.mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
    }
}

/// The length form (7, 16 or 64 bits) RFC 6455 asks for `len`.
fn shortest(len: u64) -> u8 {
    match len {
        0..=125 => 7,
        126..=65535 => 16,
        _ => 64,
    }
}

/// A close frame's payload: the code (if any) and the reason bytes as given.
pub fn close_payload(code: Option<u16>, reason: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(code) = code {
        out.extend_from_slice(&code.to_be_bytes());
    }
    out.extend_from_slice(reason);
    out
}

/// A frame (or a whole fragmented message) from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// The close code (none for an empty payload) and the reason.
    Close(Option<u16>, String),
}

/// Largest message the reader puts together (history answers can be large, but not this).
const MAX_SERVER_MESSAGE: usize = 256 << 20;

/// Reads server frames strictly: everything RFC 6455 asks of a server's frames, and nothing
/// after its close frame.
#[derive(Default)]
pub struct ServerReader {
    buf: Vec<u8>,
    pos: usize,
    message: Option<(u8, Vec<u8>)>,
    closed: bool,
}

impl ServerReader {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet parsed into a frame.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The next frame or message; `None` until more bytes arrive; the rule broken otherwise.
    pub fn next(&mut self) -> Result<Option<ServerFrame>, String> {
        loop {
            let buf = &self.buf[self.pos..];
            if self.closed && !buf.is_empty() {
                return Err("bytes after the server's close frame".into());
            }
            if buf.len() < 2 {
                return Ok(None);
            }
            let (fin, rsv, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x70, buf[0] & 0x0F);
            if rsv != 0 {
                return Err(format!("server frame with reserved bits {:#x}", rsv >> 4));
            }
            if !known_opcode(opcode) {
                return Err(format!("server frame with reserved opcode {opcode:#x}"));
            }
            if buf[1] & 0x80 != 0 {
                return Err("masked server frame".into());
            }
            let (len, header) = match buf[1] & 0x7F {
                126 if buf.len() >= 4 => {
                    let len = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
                    if len < 126 {
                        return Err(format!("non-minimal 16-bit length {len}"));
                    }
                    (len, 4)
                }
                127 if buf.len() >= 10 => {
                    let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                    if len >> 63 != 0 {
                        return Err("64-bit length with the top bit set".into());
                    }
                    if len < 65536 {
                        return Err(format!("non-minimal 64-bit length {len}"));
                    }
                    (len, 10)
                }
                126 | 127 => return Ok(None),
                len => (u64::from(len), 2),
            };
            let control = opcode & 0x08 != 0;
            if control && (!fin || len > 125) {
                return Err(format!("control frame {opcode:#x} fragmented or longer than 125 bytes ({len})"));
            }
            let so_far = self.message.as_ref().map_or(0, |(_, d)| d.len()) as u64;
            if so_far + len > MAX_SERVER_MESSAGE as u64 {
                return Err(format!("server message longer than {MAX_SERVER_MESSAGE} bytes"));
            }
            let end = header + len as usize;
            if buf.len() < end {
                return Ok(None);
            }
            let payload = buf[header..end].to_vec();
            self.pos += end;
            match opcode {
                OP_PING => return Ok(Some(ServerFrame::Ping(payload))),
                OP_PONG => return Ok(Some(ServerFrame::Pong(payload))),
                OP_CLOSE => {
                    self.closed = true;
                    return parse_close(&payload).map(Some);
                }
                OP_TEXT | OP_BINARY if self.message.is_some() => {
                    return Err("server started a message inside a fragmented one".into());
                }
                OP_TEXT | OP_BINARY if fin => return finish(opcode, payload).map(Some),
                OP_TEXT | OP_BINARY => self.message = Some((opcode, payload)),
                _ => {
                    let Some((_, data)) = self.message.as_mut() else {
                        return Err("server continuation frame without a message".into());
                    };
                    data.extend_from_slice(&payload);
                    if fin {
                        let (opcode, data) = self.message.take().expect("checked above");
                        return finish(opcode, data).map(Some);
                    }
                }
            }
        }
    }
}

fn finish(opcode: u8, data: Vec<u8>) -> Result<ServerFrame, String> {
    if opcode == OP_BINARY {
        return Ok(ServerFrame::Binary(data));
    }
    String::from_utf8(data).map(ServerFrame::Text).map_err(|e| format!("server text is not UTF-8: {e}"))
}

fn parse_close(payload: &[u8]) -> Result<ServerFrame, String> {
    match payload {
        [] => Ok(ServerFrame::Close(None, String::new())),
        [_] => Err("server close frame with a one-byte payload".into()),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let reason =
                std::str::from_utf8(reason).map_err(|_| format!("server close reason ({code}) is not UTF-8"))?;
            Ok(ServerFrame::Close(Some(code), reason.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn builds_masked_frames_with_the_shortest_length() {
        let f = FrameSpec::new(OP_TEXT, b"abcd".to_vec(), MASK).encode();
        assert_eq!(f, vec![0x81, 0x84, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3, b'd' ^ 4]);
        let long = FrameSpec::new(OP_BINARY, vec![0; 300], MASK).encode();
        assert_eq!(&long[..4], &[0x82, 0x80 | 126, 0x01, 0x2C]);
        assert_eq!(long.len(), 4 + 4 + 300);
        let huge = FrameSpec::new(OP_BINARY, vec![0; 70_000], MASK).encode();
        assert_eq!(&huge[..10], &[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn every_field_can_be_wrong() {
        let mut f = FrameSpec::new(OP_PING, b"hi".to_vec(), MASK).fin(false);
        f.rsv = 0b101;
        f.mask = None;
        assert_eq!(f.encode(), vec![0x59, 0x02, b'h', b'i']);
        f.opcode = 0xB;
        f.length = Length::Form16;
        assert_eq!(f.encode(), vec![0x5B, 126, 0, 2, b'h', b'i']);
        f.length = Length::Form64;
        assert_eq!(f.encode()[1..10], [127, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.length = Length::Declared(1000);
        assert_eq!(f.encode(), vec![0x5B, 126, 0x03, 0xE8, b'h', b'i'], "the payload stays as it is");
        f.length = Length::Declared64(1 << 63);
        assert_eq!(f.encode()[1..10], [127, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(close_payload(Some(1000), b"ok"), vec![0x03, 0xE8, b'o', b'k']);
        assert_eq!(close_payload(None, b""), Vec::<u8>::new());
    }

    fn server(opcode_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![opcode_byte];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_server_frames_split_anywhere() {
        let mut stream = server(0x81, br#"{"type":"welcome"}"#);
        stream.extend(server(0x01, "h\u{e9}".as_bytes()));
        stream.extend(server(0x8A, b"p"));
        stream.extend(server(0x80, b"llo"));
        stream.extend(server(0x89, b""));
        stream.extend(server(0x88, &close_payload(Some(1002), b"bad")));
        let mut r = ServerReader::default();
        let mut got = Vec::new();
        for byte in stream {
            r.push(&[byte]);
            while let Some(f) = r.next().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                ServerFrame::Text(r#"{"type":"welcome"}"#.into()),
                ServerFrame::Pong(b"p".to_vec()),
                ServerFrame::Text("h\u{e9}llo".into()),
                ServerFrame::Ping(vec![]),
                ServerFrame::Close(Some(1002), "bad".into()),
            ]
        );
    }

    #[test]
    fn names_what_a_server_frame_breaks() {
        let bad: [(Vec<u8>, &str); 9] = [
            (vec![0x81, 0x81, 0, 0, 0, 0, b'x'], "masked"),
            (vec![0xC1, 0x00], "reserved bits"),
            (vec![0x83, 0x00], "reserved opcode"),
            (vec![0x09, 0x00], "control frame"),
            (vec![0x81, 126, 0, 5, 1, 2, 3, 4, 5], "non-minimal"),
            (vec![0x81, 0x02, 0xC3, 0x28], "not UTF-8"),
            (vec![0x88, 0x01, 0x03], "one-byte"),
            (vec![0x80, 0x00], "without a message"),
            ([server(0x88, &[0x03, 0xE8]), server(0x81, b"x")].concat(), "after the server's close"),
        ];
        for (bytes, what) in bad {
            let mut r = ServerReader::default();
            r.push(&bytes);
            let err = loop {
                match r.next() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("{what}: accepted {bytes:?}"),
                    Err(e) => break e,
                }
            };
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn close_codes_that_may_be_sent() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4001, 4999] {
            assert!(sendable_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!sendable_close_code(bad), "{bad}");
        }
    }
}
