//! A reference decoder of STOMP 1.2 client frames, written from the spec and the node's documented
//! limits, independent of the server's: a frame of at most `--max-message-size` bytes from its
//! command to its NUL, 64 headers, escapes (but in `CONNECT` and `STOMP`), a `content-length`
//! that is a plain decimal and ends at the NUL, EOLs between frames as heart-beats. Each refusal
//! is decided at the byte that makes it certain, so what a stream decodes to does not depend on
//! how it is split.

use super::frame::unescape;

/// Most headers a client frame may carry.
pub const MAX_HEADERS: usize = 64;

const CLIENT_COMMANDS: [&str; 11] =
    ["CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"];

/// A client frame as the reference decoder read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    /// Unescaped (but in `CONNECT` and `STOMP`), in order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    /// The first header called `name`: STOMP 1.2 ignores later repeats.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why bytes are not a STOMP 1.2 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// More than the frame size limit, or a `content-length` that cannot fit in it.
    TooLarge,
    TooManyHeaders,
    UnknownCommand,
    NoColon,
    EmptyName,
    CarriageReturn,
    BadEscape,
    InvalidUtf8,
    BadContentLength,
    NoNulAfterBody,
    NulInHeaders,
}

/// Where an incomplete input stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Between frames.
    Idle,
    /// A CR that may start a heart-beat.
    Cr,
    Command,
    Headers,
    /// In the body: the bytes still needed to complete it (with the NUL) when it has a
    /// `content-length`.
    Body {
        needed: Option<usize>,
    },
}

/// One thing the decoder takes from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    HeartBeat,
}

enum Step {
    Item(Item, usize),
    Wait(Pending),
}

/// The reference decoder: bytes in, items out, a fault ends it.
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Decoder {
    pub fn new(max: usize) -> Self {
        Decoder { buf: Vec::new(), max }
    }

    /// The items the bytes complete, or those before the fault and the fault.
    pub fn push(&mut self, bytes: &[u8]) -> (Vec<Item>, Option<Fault>) {
        self.buf.extend_from_slice(bytes);
        let mut items = Vec::new();
        loop {
            match step(&self.buf, self.max) {
                Ok(Step::Item(item, len)) => {
                    self.buf.drain(..len);
                    items.push(item);
                }
                Ok(Step::Wait(_)) => return (items, None),
                Err(fault) => return (items, Some(fault)),
            }
        }
    }

    pub fn pending(&self) -> Pending {
        match step(&self.buf, self.max) {
            Ok(Step::Wait(p)) => p,
            _ => Pending::Idle,
        }
    }
}

/// The first item of `b`.
fn step(b: &[u8], max: usize) -> Result<Step, Fault> {
    match b {
        [] => return Ok(Step::Wait(Pending::Idle)),
        [b'\r'] => return Ok(Step::Wait(Pending::Cr)),
        [b'\n', ..] => return Ok(Step::Item(Item::HeartBeat, 1)),
        [b'\r', b'\n', ..] => return Ok(Step::Item(Item::HeartBeat, 2)),
        _ => {}
    }
    // A line ends at LF; a NUL before it ends the frame too early. Both must lie within the
    // frame's first `max` bytes.
    let line_end = |from: usize| -> Result<Option<usize>, Fault> {
        let window = b.len().min(max);
        match b.get(from..window).and_then(|w| w.iter().position(|&c| c == b'\n' || c == 0)) {
            Some(at) => Ok(Some(from + at)),
            None if b.len() > max => Err(Fault::TooLarge),
            None => Ok(None),
        }
    };
    let Some(end) = line_end(0)? else { return Ok(Step::Wait(Pending::Command)) };
    if b[end] == 0 {
        return Err(Fault::NulInHeaders);
    }
    let command = std::str::from_utf8(strip_cr(&b[..end]))
        .ok()
        .filter(|c| CLIENT_COMMANDS.contains(c))
        .ok_or(Fault::UnknownCommand)?
        .to_owned();
    let escaped = !matches!(command.as_str(), "CONNECT" | "STOMP");
    let mut pos = end + 1;
    let mut headers = Vec::new();
    let mut content_length = None;
    loop {
        let Some(end) = line_end(pos)? else { return Ok(Step::Wait(Pending::Headers)) };
        if b[end] == 0 {
            return Err(Fault::NulInHeaders);
        }
        let line = strip_cr(&b[pos..end]);
        pos = end + 1;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(Fault::TooManyHeaders);
        }
        if line.contains(&b'\r') {
            return Err(Fault::CarriageReturn);
        }
        let colon = line.iter().position(|&c| c == b':').ok_or(Fault::NoColon)?;
        if colon == 0 {
            return Err(Fault::EmptyName);
        }
        let line = std::str::from_utf8(line).map_err(|_| Fault::InvalidUtf8)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (name, value) = if escaped {
            (unescape(name).ok_or(Fault::BadEscape)?, unescape(value).ok_or(Fault::BadEscape)?)
        } else {
            (name.to_owned(), value.to_owned())
        };
        if content_length.is_none() && name == "content-length" {
            content_length = Some(length(&value, max)?);
        }
        headers.push((name, value));
    }
    let body = pos;
    let (nul, len) = match content_length {
        Some(n) => {
            // The frame would end at byte body + n + 1.
            if body + n >= max {
                return Err(Fault::TooLarge);
            }
            match b.get(body + n) {
                None => return Ok(Step::Wait(Pending::Body { needed: Some(body + n + 1 - b.len()) })),
                Some(0) => (body + n, body + n + 1),
                Some(_) => return Err(Fault::NoNulAfterBody),
            }
        }
        None => match b[body..b.len().min(max)].iter().position(|&c| c == 0) {
            Some(at) => (body + at, body + at + 1),
            None if b.len() > max => return Err(Fault::TooLarge),
            None => return Ok(Step::Wait(Pending::Body { needed: None })),
        },
    };
    Ok(Step::Item(Item::Frame(Frame { command, headers, body: b[body..nul].to_vec() }), len))
}

/// A `content-length`: decimal digits, at most `max`.
fn length(value: &str, max: usize) -> Result<usize, Fault> {
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Fault::BadContentLength);
    }
    value.parse::<usize>().ok().filter(|&n| n <= max).ok_or(Fault::TooLarge)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 200;

    fn decode(bytes: &[u8]) -> (Vec<Item>, Option<Fault>, Pending) {
        let mut d = Decoder::new(MAX);
        let (items, fault) = d.push(bytes);
        (items, fault, d.pending())
    }

    fn fault(bytes: &[u8]) -> Option<Fault> {
        decode(bytes).1
    }

    #[test]
    fn decodes_frames_heart_beats_and_splits_alike() {
        let stream = b"\n\r\nSEND\r\ndestination:/user/a\\cb\n\nhi\0\nACK\nid:1\ncontent-length:3\n\na\0b\0";
        let (items, f, p) = decode(stream);
        assert_eq!((f, p), (None, Pending::Idle));
        assert_eq!(items.len(), 5);
        let Item::Frame(send) = &items[2] else { panic!() };
        assert_eq!((send.get("destination"), &send.body[..]), (Some("/user/a:b"), &b"hi"[..]));
        let Item::Frame(ack) = &items[4] else { panic!() };
        assert_eq!(&ack.body[..], b"a\0b");
        let mut d = Decoder::new(MAX);
        let mut split = Vec::new();
        for &b in stream.iter() {
            split.extend(d.push(&[b]).0);
        }
        assert_eq!(split, items);
        let connect = decode(b"CONNECT\nlogin:a\\c\n\n\0").0;
        assert!(matches!(&connect[0], Item::Frame(f) if f.get("login") == Some("a\\c")), "CONNECT is not escaped");
    }

    #[test]
    fn refuses_what_stomp_and_the_limits_refuse() {
        assert_eq!(fault(b"SEND\nx:1\0\n\n\0"), Some(Fault::NulInHeaders));
        assert_eq!(fault(b"send\n\n\0"), Some(Fault::UnknownCommand));
        assert_eq!(fault(b"MESSAGE\n\n\0"), Some(Fault::UnknownCommand));
        assert_eq!(fault(b"SEND\nnocolon\n\n\0"), Some(Fault::NoColon));
        assert_eq!(fault(b"SEND\n:v\n\n\0"), Some(Fault::EmptyName));
        assert_eq!(fault(b"SEND\na\rb:v\n\n\0"), Some(Fault::CarriageReturn));
        assert_eq!(fault(b"SEND\na:\\t\n\n\0"), Some(Fault::BadEscape));
        assert_eq!(fault(b"SEND\na:\xff\n\n\0"), Some(Fault::InvalidUtf8));
        assert_eq!(fault(b"SEND\ncontent-length:x\n\n\0"), Some(Fault::BadContentLength));
        assert_eq!(fault(b"SEND\ncontent-length:1\n\nab\0"), Some(Fault::NoNulAfterBody));
        assert_eq!(fault(b"SEND\ncontent-length:999\n\n"), Some(Fault::TooLarge), "before the body");
        assert_eq!(fault(b"SEND\ncontent-length:1\ncontent-length:x\n\na\0"), None, "the first wins");
        let many: Vec<u8> = [&b"SEND\n"[..], &b"a:b\n".repeat(65), b"\n\0"].concat();
        assert_eq!(Decoder::new(1000).push(&many).1, Some(Fault::TooManyHeaders));
        let enough: Vec<u8> = [&b"SEND\n"[..], &b"a:b\n".repeat(64), b"\n\0"].concat();
        assert_eq!(Decoder::new(1000).push(&enough).1, None);
        let endless = [&b"SEND\nx:"[..], &[b'a'; MAX]].concat();
        assert_eq!(fault(&endless), Some(Fault::TooLarge));
        assert_eq!(decode(&endless[..MAX]).2, Pending::Headers, "not yet");
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_taken() {
        let head = b"SEND\n\n";
        let exact = [&head[..], &vec![b'x'; MAX - head.len() - 1], b"\0"].concat();
        assert_eq!(exact.len(), MAX);
        assert!(fault(&exact).is_none());
        let over = [&head[..], &vec![b'x'; MAX - head.len()], b"\0"].concat();
        assert_eq!(fault(&over), Some(Fault::TooLarge));
        let cl = |n: usize| format!("SEND\ncontent-length:{n}\n\n").into_bytes();
        let fits = MAX - cl(100).len() - 1;
        assert!(matches!(decode(&cl(fits)).2, Pending::Body { needed: Some(_) }));
        assert_eq!(fault(&cl(fits + 1)), Some(Fault::TooLarge));
    }

    #[test]
    fn pending_input_says_what_completes_it() {
        assert_eq!(decode(b"\r").2, Pending::Cr);
        assert_eq!(decode(b"SEN").2, Pending::Command);
        assert_eq!(decode(b"SEND\na:b").2, Pending::Headers);
        assert_eq!(decode(b"SEND\n\nbody").2, Pending::Body { needed: None });
        assert_eq!(decode(b"SEND\ncontent-length:5\n\nab").2, Pending::Body { needed: Some(4) });
    }
}
