//! Checks shared by the targets that see JSON, written independently of the code under test so
//! that they can disagree with it. Each target uses part of it.

#![allow(dead_code)]

use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The error codes of PROTOCOL.md §4.
pub const ERROR_CODES: [&str; 9] = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "not_member",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
];

/// The nesting depth of `text` if it is exactly one JSON value by the grammar of RFC 8259
/// (scalars are depth 0), else `None`. A recursive-descent reader of its own: it shares no code
/// with serde_json or with `checked_body`'s byte scan. Lone surrogate escapes and numbers beyond
/// f64 are grammatical, so they are accepted.
pub fn json_depth(text: &str) -> Option<usize> {
    let mut reader = Reader { bytes: text.as_bytes(), pos: 0 };
    reader.ws();
    let depth = reader.value(0)?;
    reader.ws();
    (reader.pos == reader.bytes.len()).then_some(depth)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        self.pos += usize::from(hit);
        hit
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<usize> {
        self.bytes[self.pos..].starts_with(word).then(|| {
            self.pos += word.len();
            0
        })
    }

    /// One value; `level` is how many containers enclose it (bounded, so the reader itself cannot
    /// overflow the stack).
    fn value(&mut self, level: usize) -> Option<usize> {
        if level > 512 {
            return None;
        }
        match self.peek()? {
            b'{' => {
                self.pos += 1;
                self.ws();
                let mut deepest = 0;
                if self.eat(b'}') {
                    return Some(1);
                }
                loop {
                    self.string()?;
                    self.ws();
                    if !self.eat(b':') {
                        return None;
                    }
                    self.ws();
                    deepest = deepest.max(self.value(level + 1)?);
                    self.ws();
                    if self.eat(b'}') {
                        return Some(deepest + 1);
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                    self.ws();
                }
            }
            b'[' => {
                self.pos += 1;
                self.ws();
                let mut deepest = 0;
                if self.eat(b']') {
                    return Some(1);
                }
                loop {
                    deepest = deepest.max(self.value(level + 1)?);
                    self.ws();
                    if self.eat(b']') {
                        return Some(deepest + 1);
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                    self.ws();
                }
            }
            b'"' => self.string().map(|()| 0),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(|()| 0),
        }
    }

    fn string(&mut self) -> Option<()> {
        if !self.eat(b'"') {
            return None;
        }
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => {
                    self.pos += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 1,
                        b'u' => {
                            let hex = self.bytes.get(self.pos + 1..self.pos + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.pos += 5;
                        }
                        _ => return None,
                    }
                }
                0x00..=0x1F => return None,
                _ => self.pos += 1,
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }
}

/// The members of a JSON object in order, duplicates kept, values raw; `None` if `text` is not
/// one JSON object (or a key does not decode to a string).
pub fn object_members(text: &str) -> Option<Vec<(String, Box<RawValue>)>> {
    struct Members(Vec<(String, Box<RawValue>)>);
    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                    let mut members = Vec::new();
                    while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                        members.push(member);
                    }
                    Ok(Members(members))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Members>(text).ok().map(|m| m.0)
}

/// Whether serde_json (what Switchyard's own parsers use) takes `bytes` as one JSON value.
pub fn serde_accepts(bytes: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(bytes).is_ok()
}

/// A frame the server writes to a client, read back.
#[derive(Deserialize)]
pub struct FrameBack<'a> {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub body: Option<&'a RawValue>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Reads back an encoded frame, failing the run if it is not JSON.
pub fn read_back(frame: &[u8]) -> FrameBack<'_> {
    match serde_json::from_slice(frame) {
        Ok(back) => back,
        Err(e) => panic!("the server wrote a frame that is not JSON ({e}): {}", String::from_utf8_lossy(frame)),
    }
}
