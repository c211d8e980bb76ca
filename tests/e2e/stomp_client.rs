//! A STOMP 1.2 client over WebSocket for the tests, written from the STOMP spec: frames in, frames
//! out, heart-beats seen, nothing answered on its own (a test decides when to be silent).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

/// How long a test waits for a frame.
const WAIT: Duration = Duration::from_secs(10);

/// A server frame, headers unescaped, the first of a repeated header winning.
#[derive(Clone, Debug)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The header, which must be there.
    pub fn get(&self, name: &str) -> &str {
        self.header(name).unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body of {self:?} is not JSON: {e}"))
    }

    pub fn seq(&self) -> u64 {
        self.get("seq").parse().expect("seq is a number")
    }
}

fn unescape(text: &str, escaped: bool) -> String {
    if !escaped {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            other => panic!("undefined escape \\{other:?} from the server"),
        }
    }
    out
}

pub fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace(':', "\\c")
}

/// Frames out of bytes that hold whole frames and heart-beats; `None` stands for a heart-beat.
pub fn parse(mut bytes: &[u8]) -> Vec<Option<Frame>> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        if let Some(rest) = bytes.strip_prefix(b"\r\n").or_else(|| bytes.strip_prefix(b"\n")) {
            items.push(None);
            bytes = rest;
            continue;
        }
        let end = bytes.windows(2).position(|w| w == b"\n\n").expect("a blank line after the headers");
        let head = std::str::from_utf8(&bytes[..end]).expect("UTF-8 headers");
        let mut lines = head.lines();
        let command = lines.next().expect("a command").to_owned();
        let escaped = command != "CONNECTED";
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("name:value");
                (unescape(n, escaped), unescape(v, escaped))
            })
            .collect();
        let rest = &bytes[end + 2..];
        let length = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse::<usize>().unwrap());
        let length = length.unwrap_or_else(|| rest.iter().position(|b| *b == 0).expect("a NUL"));
        assert_eq!(rest[length], 0, "a NUL after the body");
        items.push(Some(Frame { command, headers, body: rest[..length].to_vec() }));
        bytes = &rest[length + 1..];
    }
    items
}

/// Writes a client frame (escaped headers but for `CONNECT`).
pub fn frame(command: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let escaped = command != "CONNECT" && command != "STOMP";
    let mut out = format!("{command}\n").into_bytes();
    for (name, value) in headers {
        let (name, value) = if escaped { (escape(name), escape(value)) } else { (name.to_string(), value.to_string()) };
        out.extend_from_slice(format!("{name}:{value}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    out
}

pub struct StompClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `CONNECTED` frame.
    pub connected: Frame,
    frames: VecDeque<Frame>,
    /// Heart-beats received so far.
    pub beats: usize,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
}

impl StompClient {
    /// Opens `url` offering `protocols`, without sending anything.
    pub async fn open(url: &str, protocols: &[&str]) -> (WebSocketStream<MaybeTlsStream<TcpStream>>, Option<String>) {
        let mut builder = ClientBuilder::new().uri(url).expect("uri");
        if !protocols.is_empty() {
            let value = http::HeaderValue::from_str(&protocols.join(", ")).unwrap();
            builder = builder.add_header(http::header::SEC_WEBSOCKET_PROTOCOL, value).expect("header");
        }
        let (ws, response) = builder.connect().await.expect("upgrade accepted");
        let protocol =
            response.headers().get(http::header::SEC_WEBSOCKET_PROTOCOL).map(|v| v.to_str().unwrap().to_owned());
        (ws, protocol)
    }

    /// Connects to `ws://addr/stomp?query` and sends `CONNECT` with `headers`; panics unless
    /// the answer is `CONNECTED`.
    pub async fn connect(addr: std::net::SocketAddr, query: &str, headers: &[(&str, &str)]) -> Self {
        let mut client = Self::try_connect(&format!("ws://{addr}/stomp?{query}"), &[], headers).await;
        assert_eq!(client.connected.command, "CONNECTED", "{:?}", client.connected);
        client.frames.clear();
        client
    }

    /// Dev mode: `user` connected through `/stomp`, with `login` in `CONNECT`.
    pub async fn dev(addr: std::net::SocketAddr, user: &str) -> Self {
        Self::connect(addr, "", &[("accept-version", "1.2"), ("host", "switchyard"), ("login", user)]).await
    }

    /// Like `connect`, answering whatever the server said first (`CONNECTED` or `ERROR`).
    pub async fn try_connect(url: &str, protocols: &[&str], headers: &[(&str, &str)]) -> Self {
        let (ws, protocol) = Self::open(url, protocols).await;
        let mut client = Self {
            ws,
            connected: Frame { command: String::new(), headers: Vec::new(), body: Vec::new() },
            frames: VecDeque::new(),
            beats: 0,
            protocol,
        };
        client.send("CONNECT", headers, b"").await;
        client.connected = client.next().await;
        client
    }

    pub async fn send_raw(&mut self, bytes: &[u8], binary: bool) {
        let message = if binary {
            Message::binary(bytes.to_vec())
        } else {
            Message::text(String::from_utf8(bytes.to_vec()).expect("text"))
        };
        self.ws.send(message).await.expect("send");
    }

    /// Sends a frame, in a text message unless it is not UTF-8.
    pub async fn send(&mut self, command: &str, headers: &[(&str, &str)], body: &[u8]) {
        let frame = frame(command, headers, body);
        let binary = std::str::from_utf8(&frame).is_err();
        self.send_raw(&frame, binary).await;
    }

    /// Subscribes and waits for the receipt (`r-<id>`).
    pub async fn subscribe(&mut self, id: &str, destination: &str, extra: &[(&str, &str)]) -> Frame {
        let receipt = format!("r-{id}");
        let mut headers = vec![("id", id), ("destination", destination), ("receipt", &receipt)];
        headers.extend_from_slice(extra);
        self.send("SUBSCRIBE", &headers, b"").await;
        self.receipt(&receipt).await
    }

    /// Sends JSON `body` to `destination` with a receipt and answers the `RECEIPT`.
    pub async fn send_json(&mut self, destination: &str, body: &Value, receipt: &str) -> Frame {
        let headers = [("destination", destination), ("content-type", "application/json"), ("receipt", receipt)];
        self.send("SEND", &headers, body.to_string().as_bytes()).await;
        self.receipt(receipt).await
    }

    /// Waits for the `RECEIPT` of `id`; frames before it are kept for `next`.
    pub async fn receipt(&mut self, id: &str) -> Frame {
        let mut skipped = VecDeque::new();
        let receipt = loop {
            let frame = self.read().await;
            if frame.command == "RECEIPT" && frame.header("receipt-id") == Some(id) {
                break frame;
            }
            assert_ne!(frame.command, "ERROR", "waiting for receipt {id}: {frame:?}");
            skipped.push_back(frame);
        };
        for frame in skipped.into_iter().rev() {
            self.frames.push_front(frame);
        }
        receipt
    }

    /// The next frame (heart-beats counted and skipped).
    pub async fn next(&mut self) -> Frame {
        match self.frames.pop_front() {
            Some(frame) => frame,
            None => self.read().await,
        }
    }

    /// The next `MESSAGE`, skipping nothing else: any other frame fails the test.
    pub async fn message(&mut self) -> Frame {
        let frame = self.next().await;
        assert_eq!(frame.command, "MESSAGE", "{frame:?}");
        frame
    }

    async fn read(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return frame;
            }
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("valid WebSocket message");
            if message.is_ping() || message.is_pong() {
                continue;
            }
            assert!(!message.is_close(), "closed while a frame was awaited: {:?}", message.as_close());
            for item in parse(message.as_payload()) {
                match item {
                    Some(frame) => self.frames.push_back(frame),
                    None => self.beats += 1,
                }
            }
        }
    }

    /// Asserts that no frame arrives for `ms` (heart-beats aside).
    pub async fn silent(&mut self, ms: u64) {
        assert!(self.frames.is_empty(), "unexpected {:?}", self.frames);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(message) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            let message = message.expect("socket open").expect("valid message");
            if message.is_ping() || message.is_pong() {
                continue;
            }
            for item in parse(message.as_payload()) {
                assert!(item.is_none(), "unexpected {item:?}");
                self.beats += 1;
            }
        }
    }

    /// Reads until the server closes: the frames it sent before, and its close code.
    pub async fn closed(&mut self) -> (Vec<Frame>, Option<u16>) {
        let mut frames: Vec<Frame> = self.frames.drain(..).collect();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("closed within the wait") {
                None | Some(Err(_)) => return (frames, None),
                Some(Ok(message)) if message.is_close() => {
                    return (frames, message.as_close().map(|(code, _)| u16::from(code)));
                }
                Some(Ok(message)) if message.is_ping() || message.is_pong() => {}
                Some(Ok(message)) => frames.extend(parse(message.as_payload()).into_iter().flatten()),
            }
        }
    }
}
