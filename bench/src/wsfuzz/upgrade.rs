//! The HTTP upgrade request (RFC 6455 §4.1), written byte by byte so that any part of it can be
//! wrong, and what the server's answer to each wrong one may be (§4.2: a request that is not a
//! proper handshake gets an HTTP error, never `101`).

use base64::Engine;
use fastrand::Rng;

use super::frame::{FrameSpec, OP_TEXT};

/// The GUID of RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What the server may answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `101` and a session (a proper handshake).
    Upgrade,
    /// An HTTP error status (the request breaks RFC 6455 §4.1 or PROTOCOL.md §2).
    Refuse,
    /// `101` or an HTTP error: the RFC leaves it open.
    Either,
    /// An HTTP error status, or the connection closed without one (not HTTP at all).
    RefuseOrDrop,
    /// Nothing until the server's handshake timeout, then the connection closed (with or
    /// without an HTTP error).
    TimeoutDrop,
}

/// How the request goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Whole,
    /// One byte per write.
    Trickle,
    /// Part of it, then the client's FIN.
    HalfThenFin,
    /// Part of it, then nothing.
    HalfThenWait,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub bytes: Vec<u8>,
    pub expect: Expect,
    pub delivery: Delivery,
    pub note: String,
    /// The `Sec-WebSocket-Accept` a `101` must carry (when the request has one proper key).
    pub accept: Option<String>,
    /// The user a `welcome` must name.
    pub user: String,
    /// The id of a command pipelined right after the request (owed a reply after `welcome`).
    pub pipelined: Option<String>,
    /// Whether a `101` may carry `Sec-WebSocket-Protocol` / `-Extensions` (never: none is
    /// offered that the server supports).
    pub offered_extras: bool,
    /// The request names a WebSocket version other than 13: the refusal must say which version
    /// the server speaks (RFC 6455 §4.4).
    pub other_version: bool,
}

/// `Sec-WebSocket-Accept` for `key`.
pub fn accept_for(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// A proper key: 16 random bytes in base64.
pub fn random_key(rng: &mut Rng) -> String {
    b64(&(0..16).map(|_| rng.u8(..)).collect::<Vec<_>>())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The request a well-behaved client sends.
pub fn proper(host: &str, user: &str, key: &str) -> Vec<u8> {
    format!(
        "GET /ws?user={user}&device=fz HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Parts of a request, to be damaged and then written.
struct Parts {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Parts {
    fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.remove(name);
        self.headers.push((name.to_owned(), value.into()));
    }

    fn render(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A random upgrade request for `user` (mostly damaged) and what may answer it.
pub fn generate(rng: &mut Rng, host: &str, user: &str, case_id: &str) -> Request {
    let key = random_key(rng);
    let mut parts = Parts {
        method: "GET".into(),
        target: format!("/ws?user={user}&device=fz"),
        version: "HTTP/1.1".into(),
        headers: vec![
            ("Host".into(), host.into()),
            ("Upgrade".into(), b"websocket".to_vec()),
            ("Connection".into(), b"Upgrade".to_vec()),
            ("Sec-WebSocket-Key".into(), key.clone().into_bytes()),
            ("Sec-WebSocket-Version".into(), b"13".to_vec()),
        ],
        body: Vec::new(),
    };
    let mut req = Request {
        bytes: Vec::new(),
        expect: Expect::Upgrade,
        delivery: Delivery::Whole,
        note: String::new(),
        accept: Some(accept_for(&key)),
        user: user.to_owned(),
        pipelined: None,
        offered_extras: false,
        other_version: false,
    };
    let note = match rng.u8(..13) {
        0 => {
            if rng.bool() {
                req.delivery = Delivery::Trickle;
                "proper, one byte per write".to_owned()
            } else {
                "proper".to_owned()
            }
        }
        1 => {
            let name = ["Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Host"][rng.usize(..5)];
            parts.remove(name);
            req.expect = if name == "Host" { Expect::Either } else { Expect::Refuse };
            format!("without {name}")
        }
        2 => {
            let (what, bad): (&str, Vec<u8>) = match rng.u8(..8) {
                0 => ("empty", Vec::new()),
                1 => ("short", b"abc".to_vec()),
                2 => ("15 bytes", b64(&[7; 15]).into_bytes()),
                3 => ("17 bytes", b64(&[7; 17]).into_bytes()),
                4 => ("not base64", b"!!!!not*base64!!!!!!!!==".to_vec()),
                5 => ("10 KB", vec![b'A'; 10_000]),
                6 => ("24 chars of padding", b"========================".to_vec()),
                _ => {
                    // Two key lines: the header may appear once (RFC 6455 §11.3.1).
                    parts.headers.push(("Sec-WebSocket-Key".into(), random_key(rng).into_bytes()));
                    ("twice", key.clone().into_bytes())
                }
            };
            if what != "twice" {
                parts.set("Sec-WebSocket-Key", bad);
            }
            req.expect = Expect::Refuse;
            req.accept = None;
            format!("Sec-WebSocket-Key {what}")
        }
        3 => {
            let v = ["8", "12", "14", "", "13x", "abc", "0", "13, 8", "013"][rng.usize(..9)];
            parts.set("Sec-WebSocket-Version", v);
            req.expect = if v == "13, 8" { Expect::Either } else { Expect::Refuse };
            req.other_version = v != "13, 8";
            format!("Sec-WebSocket-Version {v:?}")
        }
        4 => {
            let m = ["POST", "PUT", "HEAD", "OPTIONS", "DELETE", "get", "GETX", "CONNECT"][rng.usize(..8)];
            parts.method = m.into();
            req.expect = if m == "CONNECT" { Expect::RefuseOrDrop } else { Expect::Refuse };
            format!("method {m}")
        }
        5 => {
            let v = ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/1.1x", "", "http/1.1"][rng.usize(..7)];
            parts.version = v.into();
            req.expect = if v == "HTTP/1.0" { Expect::Refuse } else { Expect::RefuseOrDrop };
            format!("version {v:?}")
        }
        6 => {
            let long = "x".repeat(129);
            let (target, expect) = match rng.u8(..10) {
                0 => ("/ws/".to_owned(), Expect::Refuse),
                1 => ("/WS".to_owned(), Expect::Refuse),
                2 => ("/ws?user=".to_owned(), Expect::Refuse),
                3 => ("/ws?user=bad%20name".to_owned(), Expect::Refuse),
                4 => (format!("/ws?user={long}"), Expect::Refuse),
                5 => ("/ws".to_owned(), Expect::Refuse),
                6 => (format!("/ws?user={user}&user=other"), Expect::Either),
                7 => (format!("/ws?user={user}&device={}", "d".repeat(2000)), Expect::Either),
                8 => (format!("/ws?user={}", user.replace('-', "%2D")), Expect::Upgrade),
                _ => (format!("/ws?user={user}&token=not.a.jwt"), Expect::Either),
            };
            parts.target = target;
            req.expect = expect;
            format!("target {}", &parts.target[..parts.target.len().min(40)])
        }
        7 => {
            let (name, value, expect): (&str, &str, Expect) = match rng.u8(..9) {
                0 => ("Upgrade", "h2c", Expect::Refuse),
                1 => ("Upgrade", "WebSocket", Expect::Upgrade),
                2 => ("Connection", "keep-alive", Expect::Refuse),
                3 => ("Connection", "keep-alive, Upgrade", Expect::Upgrade),
                4 => ("Connection", "close", Expect::Refuse),
                5 => ("Sec-WebSocket-Protocol", "chat, superchat", Expect::Upgrade),
                6 => ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits", Expect::Upgrade),
                7 => ("Origin", "http://evil.example", Expect::Upgrade),
                _ => ("Authorization", "Bearer not.a.jwt", Expect::Either),
            };
            parts.set(name, value);
            req.expect = expect;
            req.offered_extras = name.starts_with("Sec-WebSocket-P") || name.starts_with("Sec-WebSocket-E");
            format!("{name}: {value}")
        }
        8 => {
            if rng.bool() {
                let size = [1000, 8000, 60_000, 200_000, 1_000_000][rng.usize(..5)];
                parts.headers.push(("X-Huge".into(), vec![b'h'; size]));
                // hyper reads heads up to ~400 KB by default; larger ones are refused.
                req.expect = match size {
                    ..=8000 => Expect::Upgrade,
                    8001..=200_000 => Expect::Either,
                    _ => Expect::RefuseOrDrop,
                };
                format!("one {size}-byte header")
            } else {
                let n = [50, 90, 101, 500][rng.usize(..4)];
                for i in 0..n {
                    parts.headers.push((format!("X-H{i}"), b"v".to_vec()));
                }
                req.expect = if n <= 90 { Expect::Upgrade } else { Expect::RefuseOrDrop };
                format!("{n} extra headers")
            }
        }
        9 => {
            req.expect = Expect::RefuseOrDrop;
            req.accept = None;
            let (what, bytes): (&str, Vec<u8>) = match rng.u8(..7) {
                0 => ("random bytes", (0..rng.usize(1..500)).map(|_| rng.u8(..)).collect()),
                1 => ("empty lines", b"\r\n\r\n".to_vec()),
                2 => ("a TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
                3 => ("a folded header", {
                    let mut b = parts.render();
                    let at = b.len() - 2;
                    b.splice(at..at, b" folded\r\n".iter().copied());
                    b.splice(at..at, b"X-Fold: a\r\n".iter().copied());
                    b
                }),
                4 => ("a header without a colon", {
                    parts.headers.push(("X-No-Colon-Here".into(), Vec::new()));
                    let mut b = parts.render();
                    let needle = b"X-No-Colon-Here: ";
                    if let Some(i) = b.windows(needle.len()).position(|w| w == needle) {
                        b.drain(i + 15..i + 17);
                    }
                    b
                }),
                5 => ("a NUL in a header", {
                    parts.headers.push(("X-Nul".into(), b"a\0b".to_vec()));
                    parts.render()
                }),
                _ => ("a bare LF", {
                    let b = parts.render();
                    String::from_utf8_lossy(&b).replace("\r\n", "\n").into_bytes()
                }),
            };
            req.bytes = bytes;
            if what == "empty lines" {
                // Empty lines before a request are skipped (RFC 9112 §2.2): still waiting for one.
                req.expect = Expect::TimeoutDrop;
            }
            if what == "a bare LF" {
                // Bare LF line ends are tolerated by many servers (RFC 9112 §2.2 allows it).
                req.expect = Expect::Either;
                req.accept = Some(accept_for(&key));
            }
            format!("garbage: {what}")
        }
        10 => {
            let id = format!("\"~{case_id}-pipelined\"");
            let mut mask = [0u8; 4];
            mask.iter_mut().for_each(|b| *b = rng.u8(..));
            parts.body = FrameSpec::new(OP_TEXT, format!(r#"{{"type":"ping","id":{id}}}"#).into_bytes(), mask).encode();
            req.pipelined = Some(id);
            "a ping frame right behind the request".to_owned()
        }
        11 => {
            if rng.u8(..8) == 0 {
                req.delivery = Delivery::HalfThenWait;
                req.expect = Expect::TimeoutDrop;
                "half a request, then nothing (handshake timeout)".to_owned()
            } else {
                req.delivery = Delivery::HalfThenFin;
                req.expect = Expect::RefuseOrDrop;
                "half a request, then FIN".to_owned()
            }
        }
        _ => {
            if rng.bool() {
                parts.headers.push(("Content-Length".into(), b"5".to_vec()));
                parts.body = b"hello".to_vec();
                req.expect = Expect::Either;
                "a 5-byte body".to_owned()
            } else {
                parts.headers.push(("Transfer-Encoding".into(), b"chunked".to_vec()));
                parts.body = b"0\r\n\r\n".to_vec();
                req.expect = Expect::Either;
                "a chunked body".to_owned()
            }
        }
    };
    if req.bytes.is_empty() {
        req.bytes = parts.render();
    }
    if matches!(req.delivery, Delivery::HalfThenFin | Delivery::HalfThenWait) {
        let cut = rng.usize(1..req.bytes.len() - 4);
        req.bytes.truncate(cut);
    }
    req.note = note;
    req
}

/// An HTTP response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes of the head.
    pub len: usize,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The response head at the start of `buf`, once complete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(Head {
            status: resp.code.unwrap_or(0),
            headers: resp
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
            len,
        })),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed HTTP response: {e}")),
    }
}

/// What is wrong with a `101` to a proper request, if anything.
pub fn check_switching(head: &Head, req: &Request) -> Vec<String> {
    let mut wrong = Vec::new();
    let has_token = |name: &str, token: &str| {
        head.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") {
        wrong.push("101 without Upgrade: websocket".to_owned());
    }
    if !has_token("connection", "upgrade") {
        wrong.push("101 without Connection: upgrade".to_owned());
    }
    if let Some(accept) = &req.accept
        && head.header("sec-websocket-accept") != Some(accept.as_str())
    {
        wrong.push(format!(
            "Sec-WebSocket-Accept {:?}, RFC 6455 §4.2.2 asks for {accept:?}",
            head.header("sec-websocket-accept")
        ));
    }
    for extra in ["sec-websocket-protocol", "sec-websocket-extensions"] {
        if let Some(v) = head.header(extra) {
            wrong.push(format!("101 with {extra}: {v} (nothing it supports was offered)"));
        }
    }
    wrong
}

/// What is wrong with an error answer's body, if anything: the server's own errors are
/// `{"error":{"code","message"}}` with the code PROTOCOL.md §5 maps to the status.
pub fn check_error_body(status: u16, content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if body.is_empty() || !content_type.is_some_and(|t| t.starts_with("application/json")) {
        return None;
    }
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Some(format!("HTTP {status} with a JSON body that does not parse: {e}")),
    };
    let code = v["error"]["code"].as_str();
    let expected: &[&str] = match status {
        400 => &["bad_request"],
        401 => &["unauthorized"],
        403 => &["forbidden", "not_member"],
        404 => &["not_found"],
        413 => &["too_large"],
        429 => &["rate_limited"],
        500 => &["internal"],
        503 => &["unavailable"],
        _ => return None,
    };
    match code {
        Some(c) if expected.contains(&c) && v["error"]["message"].is_string() => None,
        _ => Some(format!("HTTP {status} with body {v}: PROTOCOL.md §5 asks for code {expected:?} and a message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut rng = Rng::with_seed(3);
        let key = random_key(&mut rng);
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&key).unwrap().len(), 16);
    }

    #[test]
    fn damaged_requests_say_what_they_expect() {
        let mut rng = Rng::with_seed(4);
        let mut expects = std::collections::HashSet::new();
        for i in 0..2000 {
            let r = generate(&mut rng, "127.0.0.1:1", "fz-1", &format!("c0.{i}"));
            expects.insert(format!("{:?}", r.expect));
            assert!(!r.bytes.is_empty(), "{}", r.note);
            if r.note.starts_with("without Sec-WebSocket-Key") {
                assert!(!r.bytes.windows(17).any(|w| w.eq_ignore_ascii_case(b"sec-websocket-key")));
                assert_eq!(r.expect, Expect::Refuse);
            }
            if r.note == "proper" {
                assert_eq!(r.expect, Expect::Upgrade);
                let text = String::from_utf8(r.bytes.clone()).unwrap();
                assert!(text.starts_with("GET /ws?user=fz-1&device=fz HTTP/1.1\r\n") && text.ends_with("\r\n\r\n"));
            }
            if r.note.starts_with("half a request") {
                assert!(!r.bytes.ends_with(b"\r\n\r\n"));
            }
            if r.pipelined.is_some() {
                assert!(r.bytes.windows(4).any(|w| w == b"\r\n\r\n"));
                assert_eq!(r.bytes[r.bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4], 0x81);
            }
        }
        assert_eq!(expects.len(), 5, "{expects:?}");
    }

    #[test]
    fn response_heads_and_bodies() {
        let head = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: x\r\n\r\n\x81\x00").unwrap().unwrap();
        assert_eq!((head.status, head.header("Upgrade")), (101, Some("websocket")));
        assert_eq!(head.len, 102);
        assert_eq!(parse_head(b"HTTP/1.1 400 Bad").unwrap(), None);
        assert!(parse_head(b"\x16\x03 nonsense\r\n\r\n").is_err());
        let req = Request {
            bytes: Vec::new(),
            expect: Expect::Upgrade,
            delivery: Delivery::Whole,
            note: String::new(),
            accept: Some("y".into()),
            user: "u".into(),
            pipelined: None,
            offered_extras: false,
            other_version: false,
        };
        assert_eq!(check_switching(&head, &req).len(), 1, "wrong accept");
        let ok = br#"{"error":{"code":"bad_request","message":"x"}}"#;
        assert_eq!(check_error_body(400, Some("application/json"), ok), None);
        assert!(check_error_body(401, Some("application/json"), ok).is_some());
        assert_eq!(check_error_body(405, None, b""), None);
    }
}
