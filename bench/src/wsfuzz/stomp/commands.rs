//! STOMP client frames for the cases, each from the case's seeded generator: valid frames with
//! receipts (`SEND` to users and rooms with JSON or text bodies, `SUBSCRIBE`, `UNSUBSCRIBE`, `ACK`,
//! `NACK`), frames the node must refuse (names outside PROTOCOL.md §1, rooms not subscribed, the
//! private room, bodies that are not JSON or not UTF-8, bad keys, deep nesting, bad `since`), and
//! frames mutated in one way (no NUL, a NUL in the head, too many headers, endless lines, bad
//! escapes, `content-length` lies, invalid UTF-8, unknown commands and destinations,
//! transactions, missing or repeated headers, NULs in bodies, CRLF lines).

use fastrand::Rng;

use super::frame::Frame;
use super::model::{BROADCAST, ERRORS, TOPIC, USER_QUEUE};
use crate::wsfuzz::json::{self, BAD_UTF8, Names};

/// A room nobody subscribes to.
const NOWHERE: &str = "fz-nowhere";
/// A user nobody connects as: where large and flooded messages go.
pub(super) const SINK: &str = "fz-sink";

/// The generator of one case: its random source, the names it uses, and what it did.
pub(super) struct Gen<'a> {
    pub(super) rng: &'a mut Rng,
    pub(super) names: &'a Names,
    pub(super) max: usize,
    pub(super) case: String,
    pub(super) receipts: usize,
    pub(super) notes: Vec<String>,
}
impl Gen<'_> {
    pub(super) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub(super) fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    /// A receipt id unique in the run; now and then with characters that must be escaped.
    pub(super) fn receipt(&mut self) -> String {
        self.receipts += 1;
        if self.rng.u8(..6) == 0 {
            format!("r:{}.{}\n\\", self.case, self.receipts)
        } else {
            format!("r{}.{}", self.case, self.receipts)
        }
    }

    pub(super) fn with_receipt(&mut self, frame: Frame, percent: u8) -> Frame {
        if self.rng.u8(..100) < percent {
            let r = self.receipt();
            frame.header("receipt", &r)
        } else {
            frame
        }
    }

    /// A subscription id: one per destination, plain or with `:`, a newline and a backslash.
    pub(super) fn sub_id(&mut self, destination: &str) -> String {
        if self.rng.u8(..4) == 0 { format!("x:{destination}\n\\") } else { format!("s-{destination}") }
    }

    pub(super) fn destination(&mut self) -> String {
        match self.rng.u8(..20) {
            0 | 1 => USER_QUEUE.to_owned(),
            2 | 3 => BROADCAST.to_owned(),
            4..=6 => ERRORS.to_owned(),
            _ => format!("{TOPIC}{}", self.names.room(self.rng)),
        }
    }

    pub(super) fn json_body(&mut self) -> Vec<u8> {
        serde_json::to_vec(&json::body(self.rng, 3)).expect("a value serializes")
    }

    /// A body and its content type: JSON, or text of any kind (stored as a JSON string).
    pub(super) fn body(&mut self, frame: Frame) -> Frame {
        let (frame, body) = match self.rng.u8(..7) {
            0..=2 => {
                let ct = self.pick(&[
                    "application/json",
                    "application/json;charset=utf-8",
                    "Application/JSON",
                    " application/json ; q=1",
                ]);
                let body = self.json_body();
                (frame.header("content-type", ct), body)
            }
            3 => (frame, format!("hello {}", self.rng.u16(..)).into_bytes()),
            4 => (frame.header("content-type", "text/plain"), "h\u{e9}llo \u{1F600} \u{2028}".as_bytes().to_vec()),
            5 => (frame, Vec::new()),
            _ => (frame, b"a:b\nc\\d {not json".to_vec()),
        };
        let frame = frame.body(body);
        if self.rng.u8(..10) < 3 {
            let len = frame.body.len().to_string();
            frame.header("content-length", &len)
        } else {
            frame
        }
    }

    pub(super) fn send(&mut self) -> Frame {
        let destination = if self.rng.u8(..10) < 6 {
            format!("/user/{}", self.names.user(self.rng))
        } else {
            format!("{TOPIC}{}", self.names.room(self.rng))
        };
        let mut f = Frame::new("SEND").header("destination", &destination);
        if self.rng.u8(..7) == 0 {
            let key = format!("k{}", self.rng.u8(..20));
            f = f.header("key", &key);
        }
        let f = self.body(f);
        self.with_receipt(f, 85)
    }

    pub(super) fn subscribe(&mut self) -> Frame {
        let destination = self.destination();
        let id = self.sub_id(&destination);
        let mut f = Frame::new("SUBSCRIBE").header("id", &id).header("destination", &destination);
        if destination.starts_with(TOPIC) && self.rng.u8(..4) == 0 {
            let since = self.rng.u64(0..30).to_string();
            f = f.header("since", &since);
        }
        if self.rng.u8(..5) == 0 {
            let ack = self.pick(&["auto", "client", "client-individual"]);
            f = f.header("ack", ack);
        }
        self.with_receipt(f, 85)
    }

    pub(super) fn unsubscribe(&mut self) -> Frame {
        let id = if self.rng.u8(..6) == 0 {
            format!("nope-{}", self.rng.u8(..10))
        } else {
            let d = self.destination();
            self.sub_id(&d)
        };
        let f = Frame::new("UNSUBSCRIBE").header("id", &id);
        self.with_receipt(f, 85)
    }

    pub(super) fn ack(&mut self) -> Frame {
        let command = if self.rng.u8(..4) == 0 { "NACK" } else { "ACK" };
        let id = match self.rng.u8(..6) {
            0 => format!("room:{}/{}", self.names.room(self.rng), self.rng.u8(..50)),
            1 => "18446744073709551615".to_owned(),
            2 => format!("user:{}/-1", self.names.me),
            _ => format!("user:{}/{}", self.names.me, self.rng.u8(..40)),
        };
        let name = if self.rng.u8(..4) == 0 { "message-id" } else { "id" };
        let f = Frame::new(command).header(name, &id);
        self.with_receipt(f, 85)
    }

    pub(super) fn valid(&mut self) -> Frame {
        match self.rng.u8(..20) {
            0..=7 => self.send(),
            8..=12 => self.subscribe(),
            13..=15 => self.unsubscribe(),
            _ => self.ack(),
        }
    }

    /// A frame the node must refuse (on `/user/queue/errors`), and what is wrong with it.
    pub(super) fn refused(&mut self) -> (Frame, &'static str) {
        let send = |to: &str| Frame::new("SEND").header("destination", to);
        let (f, what) = match self.rng.u8(..11) {
            0 => {
                let long = "u".repeat(129);
                let user = self.pick(&["a b", "bob!", long.as_str(), "", "\u{e9}", "a\tb", "fz-1 "]).to_owned();
                (send(&format!("/user/{user}")).body("x"), "bad user")
            }
            1 => {
                let long = "y".repeat(129);
                let room = self.pick(&["lobby!", "", "a b", long.as_str(), "a\nb", "#"]).to_owned();
                (send(&format!("{TOPIC}{room}")).body("x"), "bad room")
            }
            2 => (send(&format!("{TOPIC}{NOWHERE}")).body("x"), "room not subscribed"),
            3 => {
                let bad = self.pick(&["{oops", "", "[1,]", "'x'", "NaN", "1 2", "{\"a\":}", "tru", "\"open"]);
                let to = format!("/user/{}", self.names.user(self.rng));
                (send(&to).header("content-type", "application/json").body(bad), "not JSON")
            }
            4 => {
                let bad = self.pick(&BAD_UTF8);
                let to = format!("/user/{}", self.names.user(self.rng));
                (send(&to).body([b"ok", bad].concat()), "body not UTF-8")
            }
            5 => {
                let key = if self.rng.bool() { String::new() } else { "k".repeat(257) };
                (send(&format!("/user/{SINK}")).header("key", &key).body("x"), "bad key")
            }
            6 => {
                let deep = if self.rng.bool() { 65 } else { 64 };
                let body = format!("{}{}", "[".repeat(deep), "]".repeat(deep));
                let f = send(&format!("/user/{SINK}")).header("content-type", "application/json").body(body);
                (f, if deep == 65 { "nested 65 deep" } else { "nested 64 deep (taken)" })
            }
            7 => {
                let room = self.pick(&["private:fz", "private:", "private:x:y"]);
                let d = format!("{TOPIC}{room}");
                let id = self.sub_id(&d);
                (Frame::new("SUBSCRIBE").header("id", &id).header("destination", &d), "private room")
            }
            8 => {
                let room = self.pick(&["lobby!", "", "a b", "a\nb"]);
                let d = format!("{TOPIC}{room}");
                let id = self.sub_id(&d);
                (Frame::new("SUBSCRIBE").header("id", &id).header("destination", &d), "bad room")
            }
            _ => {
                let since = self.pick(&["-1", "abc", "", "1.5", "99999999999999999999999", " 3", "0x10"]);
                let d = if self.rng.bool() {
                    USER_QUEUE.to_owned()
                } else {
                    format!("{TOPIC}{}", self.names.room(self.rng))
                };
                let id = self.sub_id(&d);
                (
                    Frame::new("SUBSCRIBE").header("id", &id).header("destination", &d).header("since", since),
                    "bad since",
                )
            }
        };
        (self.with_receipt(f, 85), what)
    }

    /// A frame mutated in one way (fatal or not: the model says), what was done, and whether
    /// its message must be text even if the bytes are not UTF-8.
    pub(super) fn mutated(&mut self) -> (Vec<u8>, String, bool) {
        let mut f = if self.rng.u8(..3) == 0 { self.valid() } else { self.send() };
        let mut text_anyway = false;
        let note = match self.rng.u8(..17) {
            0 => {
                f.nul = false;
                "no NUL".to_owned()
            }
            1 => {
                let mut bytes = f.render();
                let head = bytes.windows(2).position(|w| w == b"\n\n").unwrap_or(0);
                let at = self.rng.usize(0..=head);
                bytes.insert(at, 0);
                return (bytes, format!("NUL in the head at {at}"), false);
            }
            2 => {
                let total = self.pick(&[64usize, 65, 66, 100, 1000]);
                let have = f.headers.len();
                for i in have..total {
                    f.raw.push(format!("x-{i}:v").into_bytes());
                }
                format!("{total} headers")
            }
            3 => {
                let len = self.pick(&[1000, self.max.saturating_sub(400), self.max + 100]);
                f.raw.push([&b"x-long:"[..], &vec![b'l'; len]].concat());
                format!("a header line of {len} bytes")
            }
            4 => {
                let bad = self.pick(&["\\t", "a\\", "\\x41", "\\C", "\\\\\\", "\\ "]);
                let line = if self.rng.bool() { format!("x-esc:{bad}") } else { format!("x{bad}:v") };
                f.raw.push(line.clone().into_bytes());
                format!("bad escape {line:?}")
            }
            5 => {
                let len = f.body.len();
                let lie = match self.rng.u8(..4) {
                    0 => (len + self.pick(&[1usize, 2, 10, 1000])).to_string(),
                    1 => len.saturating_sub(self.rng.usize(1..=len.max(1))).to_string(),
                    2 => self.pick(&["abc", "-1", " 3", "3 ", "0x1", "", "1e3", "+3", "٣"]).to_owned(),
                    _ => self.pick(&["99999999999999999999", "18446744073709551616", "4294967296"]).to_owned(),
                };
                f.headers.retain(|(n, _)| n != "content-length");
                let at = self.rng.usize(0..=f.headers.len());
                f.headers.insert(at, ("content-length".into(), lie.clone()));
                format!("content-length {lie:?} for {len} bytes")
            }
            6 => {
                let bad = self.pick(&BAD_UTF8);
                let line = if self.rng.bool() { [b"x-bad:", bad].concat() } else { [bad, b":v"].concat() };
                f.raw.push(line);
                text_anyway = self.rng.u8(..3) == 0;
                format!("invalid UTF-8 header {bad:02x?}{}", if text_anyway { " in a text message" } else { "" })
            }
            7 => {
                let command = self.pick(&[
                    "send",
                    "SEND ",
                    " SEND",
                    "SENDX",
                    "MESSAGE",
                    "RECEIPT",
                    "ERROR",
                    "CONNECTED",
                    "FROB",
                    "SE\rND",
                    "\u{e9}",
                ]);
                f.command = command.to_owned();
                format!("command {command:?}")
            }
            8 => {
                let command = self.pick(&["BEGIN", "COMMIT", "ABORT", "CONNECT", "STOMP"]);
                f = Frame::new(command).header("transaction", "t1");
                f = self.with_receipt(f, 70);
                format!("{command} in a session")
            }
            9 => {
                let name = self.pick(&["destination", "id", "message-id"]);
                f.headers.retain(|(n, _)| n != name);
                format!("{} without {name}", f.command)
            }
            10 => {
                let d = self.pick(&[
                    "/queue/x",
                    "/user/a/b",
                    "/topic",
                    "",
                    "/user/queue/messages",
                    "/exchange/x",
                    "/user/queue/other",
                    "/user/fz-1",
                    "topic/fz-lobby",
                ]);
                let command = if self.rng.bool() { "SEND" } else { "SUBSCRIBE" };
                f = Frame::new(command).header("destination", d).header("id", "s-odd").body("x");
                f = self.with_receipt(f, 80);
                format!("{command} to {d:?}")
            }
            11 => {
                let at = self.rng.usize(0..=f.body.len());
                f.body.insert(at, 0);
                f.headers.retain(|(n, _)| n != "content-length");
                if self.rng.bool() {
                    let len = f.body.len().to_string();
                    f.headers.push(("content-length".into(), len));
                    format!("NUL in the body at {at}, with content-length")
                } else {
                    format!("NUL in the body at {at}, no content-length")
                }
            }
            12 => {
                let line = self.pick(&["nocolon", ":v", "a\rb:c", "x:y\r\r"]);
                f.raw.push(line.as_bytes().to_vec());
                format!("header line {line:?}")
            }
            13 => {
                let name = self.pick(&["destination", "receipt", "content-length", "id"]);
                let odd = self.pick(&["/queue/odd", "x", "999", ""]);
                let first = self.rng.bool();
                if first {
                    f.headers.insert(0, (name.to_owned(), odd.to_owned()));
                } else {
                    f.headers.push((name.to_owned(), odd.to_owned()));
                }
                format!("{name} repeated ({odd:?} {})", if first { "first" } else { "last" })
            }
            14 => {
                let bytes = f.render();
                let head = bytes.windows(2).position(|w| w == b"\n\n").map_or(0, |p| p + 2);
                let mut out = Vec::new();
                for &b in &bytes[..head] {
                    if b == b'\n' {
                        out.push(b'\r');
                    }
                    out.push(b);
                }
                out.extend_from_slice(&bytes[head..]);
                return (out, "CRLF lines".to_owned(), false);
            }
            15 => {
                let bad = self.pick(&["<xml/>", "{oops", "plain words"]);
                f = Frame::new("SEND").header("destination", &format!("/user/{SINK}"));
                f = f.header("content-type", "application/json").body(bad);
                f = self.with_receipt(f, 85);
                format!("non-JSON body {bad:?} as application/json")
            }
            _ => format!("plain {}", f.command),
        };
        (f.render(), note, text_anyway)
    }
    pub(super) fn describe(&mut self, f: &Frame) {
        let target = f.get("destination").or_else(|| f.get("id")).unwrap_or("");
        let r = if f.get("receipt").is_some() { " +receipt" } else { "" };
        self.note(format!("{} {target:?}{r}", f.command));
    }
}
