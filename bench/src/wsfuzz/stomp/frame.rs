//! STOMP 1.2 frames as the fuzzer needs them: client frames rendered from their parts (escaped
//! or raw, any `content-length`, with or without the NUL), and a strict reader of the server's
//! frames that names the first rule of STOMP 1.2 (and of PROTOCOL.md §7) a server frame breaks.

/// A client frame to render: headers as logical values, escaped on the wire unless the command
/// is `CONNECT` or `STOMP`. `raw` lines go after the headers exactly as given.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub raw: Vec<Vec<u8>>,
    pub body: Vec<u8>,
    /// Ends with the NUL (a mutation may leave it out).
    pub nul: bool,
}

impl Frame {
    pub fn new(command: &str) -> Self {
        Frame { command: command.to_owned(), nul: true, ..Frame::default() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn render(&self) -> Vec<u8> {
        let escaped = !matches!(self.command.as_str(), "CONNECT" | "STOMP");
        let mut out = Vec::with_capacity(self.command.len() + self.body.len() + 64);
        out.extend_from_slice(self.command.as_bytes());
        out.push(b'\n');
        for (name, value) in &self.headers {
            if escaped {
                out.extend_from_slice(escape(name).as_bytes());
                out.push(b':');
                out.extend_from_slice(escape(value).as_bytes());
            } else {
                out.extend_from_slice(name.as_bytes());
                out.push(b':');
                out.extend_from_slice(value.as_bytes());
            }
            out.push(b'\n');
        }
        for line in &self.raw {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        if self.nul {
            out.push(0);
        }
        out
    }
}

/// A header name or value escaped as STOMP 1.2 asks (`\\`, `\n`, `\r`, `\c`).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    crate::stomp::push_escaped(&mut out, text);
    out
}

/// Decodes the escapes of STOMP 1.2; `None` for an undefined one.
pub fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            'n' => '\n',
            'r' => '\r',
            'c' => ':',
            _ => return None,
        });
    }
    Some(out)
}

/// A frame from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub command: String,
    /// In order, repeats kept, unescaped.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ServerFrame {
    /// The first header called `name` (STOMP 1.2: later repeats are ignored).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A short form for transcripts: the command and its headers.
    pub fn summary(&self) -> String {
        let headers: Vec<String> = self.headers.iter().map(|(n, v)| format!("{n}:{v:?}")).collect();
        format!("{} [{}] {} bytes", self.command, headers.join(" "), self.body.len())
    }
}

/// What the reader takes from the server's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    Frame(ServerFrame),
    /// An EOL between frames (a server heart-beat).
    HeartBeat,
}

/// Largest server frame the reader puts together.
const MAX_SERVER_FRAME: usize = 64 << 20;

/// Reads the server's frames from the payloads of its WebSocket messages, in order (a frame
/// may span messages), strictly: a command the server may send, header lines `name:value` in
/// UTF-8 with STOMP 1.2's escapes and no raw `:` in values (but in `CONNECTED`, which is not
/// escaped), a `content-length` that matches the body (required on `MESSAGE`, PROTOCOL.md §7),
/// and the NUL.
#[derive(Default)]
pub struct ServerReader {
    buf: Vec<u8>,
}

impl ServerReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet read as a frame.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next frame or heart-beat; `None` until more bytes come; the rule broken otherwise.
    pub fn next(&mut self) -> Result<Option<Read>, String> {
        let b = &self.buf[..];
        match b {
            [] | [b'\r'] => return Ok(None),
            [b'\n', ..] => {
                self.buf.drain(..1);
                return Ok(Some(Read::HeartBeat));
            }
            [b'\r', b'\n', ..] => {
                self.buf.drain(..2);
                return Ok(Some(Read::HeartBeat));
            }
            _ => {}
        }
        let Some((frame, len)) = parse_server_frame(b)? else {
            if b.len() > MAX_SERVER_FRAME {
                return Err(format!("a server frame of more than {MAX_SERVER_FRAME} bytes"));
            }
            return Ok(None);
        };
        self.buf.drain(..len);
        Ok(Some(Read::Frame(frame)))
    }
}

/// One server frame from the start of `b` and its length, `None` if it is not complete yet.
fn parse_server_frame(b: &[u8]) -> Result<Option<(ServerFrame, usize)>, String> {
    let mut lines = Lines { b, pos: 0 };
    let Some(command) = lines.next()? else { return Ok(None) };
    let command = match command {
        b"CONNECTED" | b"MESSAGE" | b"RECEIPT" | b"ERROR" => String::from_utf8(command.to_vec()).expect("ASCII"),
        other => return Err(format!("server frame with command {:?}", String::from_utf8_lossy(other))),
    };
    let escaped = command != "CONNECTED";
    let mut headers = Vec::new();
    let mut content_length = None;
    loop {
        let Some(line) = lines.next()? else { return Ok(None) };
        if line.is_empty() {
            break;
        }
        let line = std::str::from_utf8(line).map_err(|_| format!("{command} header line is not UTF-8"))?;
        if line.contains('\r') {
            return Err(format!("{command} header line with a carriage return: {line:?}"));
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| format!("{command} header line without a colon: {line:?}"))?;
        if name.is_empty() {
            return Err(format!("{command} header with an empty name"));
        }
        let (name, value) = if escaped {
            if value.contains(':') {
                return Err(format!("{command} header {name:?} with an unescaped colon in its value"));
            }
            let unescape = |s: &str| unescape(s).ok_or_else(|| format!("{command} header {line:?}: undefined escape"));
            (unescape(name)?, unescape(value)?)
        } else {
            (name.to_owned(), value.to_owned())
        };
        if name == "content-length" && content_length.is_none() {
            if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("{command} content-length {value:?} is not a number"));
            }
            content_length =
                Some(value.parse::<usize>().map_err(|_| format!("{command} content-length {value:?} overflows"))?);
        }
        headers.push((name, value));
    }
    let start = lines.pos;
    let (body, end) = match content_length {
        Some(len) => {
            let Some(&after) = b.get(start + len) else { return Ok(None) };
            if after != 0 {
                return Err(format!("{command} content-length {len} is not followed by the NUL"));
            }
            (b[start..start + len].to_vec(), start + len)
        }
        None => {
            if command == "MESSAGE" {
                return Err("MESSAGE without content-length (PROTOCOL.md §7)".into());
            }
            let Some(at) = b[start..].iter().position(|&c| c == 0) else { return Ok(None) };
            (b[start..start + at].to_vec(), start + at)
        }
    };
    Ok(Some((ServerFrame { command, headers, body }, end + 1)))
}

/// The lines of a frame's head: each ends at LF (a CR before it is dropped); a NUL before the
/// head's end is an error.
struct Lines<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Result<Option<&'a [u8]>, String> {
        let rest = &self.b[self.pos..];
        let Some(end) = rest.iter().position(|&c| c == b'\n' || c == 0) else { return Ok(None) };
        if rest[end] == 0 {
            return Err("a NUL inside a server frame's command or header lines".into());
        }
        self.pos += end + 1;
        let line = &rest[..end];
        Ok(Some(line.strip_suffix(b"\r").unwrap_or(line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Result<Vec<Read>, String> {
        let mut r = ServerReader::default();
        let mut out = Vec::new();
        for &b in bytes {
            r.push(&[b]);
            while let Some(item) = r.next()? {
                out.push(item);
            }
        }
        Ok(out)
    }

    #[test]
    fn renders_escaped_headers_but_in_connect() {
        let f = Frame::new("SEND").header("destination", "/user/a").header("id", "x:y\n\\").body("hi");
        assert_eq!(f.render(), b"SEND\ndestination:/user/a\nid:x\\cy\\n\\\\\n\nhi\0");
        let c = Frame::new("CONNECT").header("host", "h:1");
        assert_eq!(c.render(), b"CONNECT\nhost:h:1\n\n\0");
        let mut raw = Frame::new("ACK");
        raw.raw.push(b"bad\\t:1".to_vec());
        raw.nul = false;
        assert_eq!(raw.render(), b"ACK\nbad\\t:1\n\n");
        assert_eq!(unescape("a\\cb\\n\\r\\\\"), Some("a:b\n\r\\".into()));
        assert_eq!(unescape("a\\t"), None);
        assert_eq!(unescape("a\\"), None);
    }

    #[test]
    fn reads_server_frames_split_anywhere() {
        let stream = b"CONNECTED\nversion:1.2\nsession:a:b\n\n\0\n\r\nMESSAGE\nsubscription:x\\cy\ncontent-length:3\n\na\0b\0RECEIPT\r\nreceipt-id:r\n\n\0";
        let got = read_all(stream).unwrap();
        let frames: Vec<&ServerFrame> = got
            .iter()
            .filter_map(|r| match r {
                Read::Frame(f) => Some(f),
                Read::HeartBeat => None,
            })
            .collect();
        assert_eq!(got.len(), 5);
        assert_eq!(frames[0].get("session"), Some("a:b"), "CONNECTED is not escaped");
        assert_eq!((frames[1].get("subscription"), &frames[1].body[..]), (Some("x:y"), &b"a\0b"[..]));
        assert_eq!(frames[2].get("receipt-id"), Some("r"));
    }

    #[test]
    fn names_what_a_server_frame_breaks() {
        for (bytes, what) in [
            (&b"SEND\n\n\0"[..], "command"),
            (b"RECEIPT\nreceipt-id\n\n\0", "without a colon"),
            (b"RECEIPT\n:x\n\n\0", "empty name"),
            (b"RECEIPT\nreceipt-id:a:b\n\n\0", "unescaped colon"),
            (b"RECEIPT\nreceipt-id:a\\tb\n\n\0", "undefined escape"),
            (b"RECEIPT\nreceipt-id:\xff\n\n\0", "not UTF-8"),
            (b"ERROR\ncontent-length:2\n\nabc\0", "not followed by the NUL"),
            (b"ERROR\ncontent-length:x\n\n\0", "not a number"),
            (b"MESSAGE\ndestination:/broadcast\n\n{}\0", "without content-length"),
            (b"RECEIPT\nreceipt-id:r\0\n\n\0", "NUL inside"),
            (b"RECEIPT\nreceipt-id:a\rb\n\n\0", "carriage return"),
        ] {
            let err = read_all(bytes).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
    }
}
