//! What RFC 6455 and PROTOCOL.md say a server does with a stream of client bytes: a reference
//! parser, written from the RFC and independent of the server's, that predicts the answers owed
//! (replies to commands with an id, pongs) and how the connection ends. The oracle holds the
//! server to the prediction.
//!
//! Where the RFC leaves a choice, the prediction allows each: several close codes for a frame
//! that breaks several rules, waiting or closing when a broken rule is visible before a frame is
//! whole, accepting or refusing a length that is not in its shortest form.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use super::frame::{
    OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, known_opcode, sendable_close_code,
};

pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_UTF8: u16 = 1007;
pub const TOO_LARGE: u16 = 1009;

/// Something the server owes, in the order the input asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owed {
    /// Exactly one `reply` or `error` carrying this id (its JSON text, as sent).
    Answer(String),
    /// At most one answer with one of these ids (an object naming `id` more than once, which
    /// JSON leaves undefined).
    MaybeAnswer(Vec<String>),
    /// A pong with this payload (RFC 6455 §5.5.3 lets a server answer only the latest of
    /// several pings).
    Pong(Vec<u8>),
}

/// How the connection ends after the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Everything was read; the session goes on.
    Open,
    /// Everything was read, but a fragmented message is still open.
    OpenFragment,
    /// The input stops inside a frame: the server waits for the rest, or closes with one of
    /// `close_ok` (rules already visibly broken).
    Partial { close_ok: Vec<u16> },
    /// The server must close the connection with one of these codes.
    Close(Vec<u16>),
    /// The client's close frame (with this code): the server answers with a close frame and
    /// ends the connection.
    ClientClose(Option<u16>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub owed: Vec<Owed>,
    pub end: End,
    /// Data messages the server receives whole (each one counts against its rate limit).
    pub messages: usize,
    /// Close codes the server may also choose where the prediction goes on (a rule it may or
    /// may not enforce, such as the shortest length form).
    pub lenient: Vec<u16>,
    /// Bytes the server reads before the end (what follows a close frame is ignored).
    pub consumed: usize,
    /// Rooms that whole `join` commands name (their events may come, with or without a reply).
    pub rooms: Vec<String>,
}

impl Prediction {
    /// The ids of answers owed (exactly once each) and those allowed (at most once).
    pub fn answer_ids(&self) -> (Vec<&str>, Vec<&str>) {
        let (mut owed, mut maybe) = (Vec::new(), Vec::new());
        for o in &self.owed {
            match o {
                Owed::Answer(id) => owed.push(id.as_str()),
                Owed::MaybeAnswer(ids) => maybe.extend(ids.iter().map(String::as_str)),
                Owed::Pong(_) => {}
            }
        }
        (owed, maybe)
    }

    pub fn pings(&self) -> Vec<&[u8]> {
        self.owed
            .iter()
            .filter_map(|o| match o {
                Owed::Pong(p) => Some(p.as_slice()),
                _ => None,
            })
            .collect()
    }
}

/// Predicts what a server with `max_message` (its largest data message) does with `input`, the
/// client's bytes after the upgrade.
pub fn predict(input: &[u8], max_message: usize) -> Prediction {
    let mut p = Prediction {
        owed: Vec::new(),
        end: End::Open,
        messages: 0,
        lenient: Vec::new(),
        consumed: 0,
        rooms: Vec::new(),
    };
    // The fragmented message being put together: text or binary, and its data.
    let mut message: Option<(bool, Vec<u8>)> = None;
    let mut pos = 0;
    p.end = loop {
        let buf = &input[pos..];
        if buf.is_empty() {
            break if message.is_some() { End::OpenFragment } else { End::Open };
        }
        if buf.len() < 2 {
            break End::Partial { close_ok: Vec::new() };
        }
        let (fin, rsv, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x70, buf[0] & 0x0F);
        let (masked, len7) = (buf[1] & 0x80 != 0, buf[1] & 0x7F);
        let control = opcode & 0x08 != 0;
        // Rules the header breaks: the server can tell without the payload.
        let mut bad = Vec::new();
        if rsv != 0 || !known_opcode(opcode) || !masked || (control && !fin) {
            bad.push(PROTOCOL_ERROR);
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if buf.len() < 2 + ext {
            break End::Partial { close_ok: bad };
        }
        let len = match len7 {
            126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            127 => u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        if len >> 63 != 0 {
            bad.extend([PROTOCOL_ERROR, TOO_LARGE]);
        }
        if (len7 == 126 && len < 126) || (len7 == 127 && len < 65536) {
            p.lenient.push(PROTOCOL_ERROR);
        }
        if control && len > 125 {
            bad.push(PROTOCOL_ERROR);
        }
        let data = matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY);
        let so_far = message.as_ref().map_or(0, |(_, d)| d.len()) as u64;
        if data && so_far.saturating_add(len) > max_message as u64 {
            bad.push(TOO_LARGE);
        }
        // Rules broken by where the frame comes: known once it is whole.
        let out_of_order = match opcode {
            OP_CONTINUATION => message.is_none(),
            OP_TEXT | OP_BINARY => message.is_some(),
            _ => false,
        };
        if !bad.is_empty() {
            if out_of_order {
                bad.push(PROTOCOL_ERROR);
            }
            break End::Close(dedup(bad));
        }
        let header = 2 + ext + 4;
        let available = (buf.len() - header.min(buf.len())) as u64;
        if buf.len() < header || available < len {
            let mut close_ok = Vec::new();
            if out_of_order {
                close_ok.push(PROTOCOL_ERROR);
            }
            if buf.len() > header {
                let mask: [u8; 4] = buf[2 + ext..header].try_into().expect("4 bytes");
                let partial = unmask(&buf[header..], mask);
                let invalid = match (&message, opcode) {
                    (None, OP_TEXT) => definitely_invalid(&partial),
                    (Some((true, d)), OP_CONTINUATION) => definitely_invalid(&[d.as_slice(), &partial].concat()),
                    _ => false,
                };
                if invalid {
                    close_ok.push(INVALID_UTF8);
                }
            }
            break End::Partial { close_ok };
        }
        let mask: [u8; 4] = buf[2 + ext..header].try_into().expect("4 bytes");
        let payload = unmask(&buf[header..header + len as usize], mask);
        pos += header + len as usize;
        p.consumed = pos;
        if out_of_order {
            break End::Close(vec![PROTOCOL_ERROR]);
        }
        match opcode {
            OP_PING => p.owed.push(Owed::Pong(payload)),
            OP_PONG => {}
            OP_CLOSE => break close_end(&payload, &mut p.lenient),
            OP_TEXT | OP_BINARY if fin => {
                if let Some(end) = complete(opcode == OP_TEXT, payload, &mut p) {
                    break end;
                }
            }
            OP_TEXT | OP_BINARY => {
                if opcode == OP_TEXT && definitely_invalid(&payload) {
                    break End::Close(vec![INVALID_UTF8]);
                }
                message = Some((opcode == OP_TEXT, payload));
            }
            _ => {
                let (text, data) = message.as_mut().expect("out_of_order checked");
                data.extend_from_slice(&payload);
                if fin {
                    let (text, data) = message.take().expect("just used");
                    if let Some(end) = complete(text, data, &mut p) {
                        break end;
                    }
                } else if *text && definitely_invalid(data) {
                    break End::Close(vec![INVALID_UTF8]);
                }
            }
        }
    };
    p.lenient = dedup(std::mem::take(&mut p.lenient));
    p
}

/// A whole data message: text must be UTF-8; a command with an id is owed an answer.
fn complete(text: bool, data: Vec<u8>, p: &mut Prediction) -> Option<End> {
    p.messages += 1;
    if !text {
        return None;
    }
    match String::from_utf8(data) {
        Err(_) => Some(End::Close(vec![INVALID_UTF8])),
        Ok(text) => {
            p.owed.extend(owed_answer(&text));
            p.rooms.extend(joined_room(&text));
            None
        }
    }
}

fn close_end(payload: &[u8], lenient: &mut Vec<u16>) -> End {
    match payload {
        [] => End::ClientClose(None),
        [_] => End::Close(vec![PROTOCOL_ERROR]),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !sendable_close_code(code) {
                return End::Close(vec![PROTOCOL_ERROR]);
            }
            if std::str::from_utf8(reason).is_err() {
                return End::Close(vec![PROTOCOL_ERROR, INVALID_UTF8]);
            }
            if (1012..=1014).contains(&code) {
                // Registered after RFC 6455: a server that predates them may refuse them.
                lenient.push(PROTOCOL_ERROR);
            }
            End::ClientClose(Some(code))
        }
    }
}

/// Whether `bytes` hold a sequence that is not UTF-8 whatever follows (not merely cut short).
fn definitely_invalid(bytes: &[u8]) -> bool {
    matches!(std::str::from_utf8(bytes), Err(e) if e.error_len().is_some())
}

fn unmask(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect()
}

fn dedup(mut codes: Vec<u16>) -> Vec<u16> {
    codes.sort_unstable();
    codes.dedup();
    codes
}

/// What PROTOCOL.md §3 owes a text frame: a command is one JSON object; if it names an `id` (a
/// number or a string), exactly one answer carries it, whatever else is wrong with the object.
pub fn owed_answer(text: &str) -> Option<Owed> {
    let entries = object_entries(text)?;
    let ids: Vec<String> = entries.iter().filter(|(k, _)| k == "id").map(|(_, v)| v.get().to_owned()).collect();
    match ids.len() {
        0 => None,
        1 => valid_id(&ids[0]).then(|| Owed::Answer(ids[0].clone())),
        // Named twice (even once as null): JSON leaves it undefined which one counts.
        _ => {
            let valid: Vec<String> = ids.into_iter().filter(|id| valid_id(id)).collect();
            (!valid.is_empty()).then_some(Owed::MaybeAnswer(valid))
        }
    }
}

/// The room a `join` command names, if the text is one.
pub fn joined_room(text: &str) -> Option<String> {
    let entries = object_entries(text)?;
    let string = |v: &RawValue| serde_json::from_str::<String>(v.get()).ok();
    entries.iter().find(|(k, v)| k == "type" && string(v).as_deref() == Some("join"))?;
    entries.iter().find(|(k, _)| k == "room").and_then(|(_, v)| string(v))
}

/// A JSON number or string.
fn valid_id(raw: &str) -> bool {
    matches!(raw.as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// The members of a JSON object as raw JSON, duplicates kept; `None` for anything else.
fn object_entries(text: &str) -> Option<Vec<(String, Box<RawValue>)>> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, Box<RawValue>)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = (&mut de).deserialize_map(Entries).ok()?;
    de.end().ok()?;
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::frame::{FrameSpec, Length, close_payload};

    const M: [u8; 4] = [9, 8, 7, 6];
    const MAX: usize = 100;

    fn frame(opcode: u8, payload: &[u8]) -> FrameSpec {
        FrameSpec::new(opcode, payload.to_vec(), M)
    }

    fn stream(frames: &[FrameSpec]) -> Vec<u8> {
        frames.iter().flat_map(FrameSpec::encode).collect()
    }

    fn end(frames: &[FrameSpec]) -> End {
        predict(&stream(frames), MAX).end
    }

    #[test]
    fn commands_with_an_id_are_owed_one_answer() {
        let p = predict(&stream(&[frame(OP_TEXT, br#"{"type":"ping","id":7}"#), frame(OP_PING, b"x")]), MAX);
        assert_eq!(p.end, End::Open);
        assert_eq!(p.owed, vec![Owed::Answer("7".into()), Owed::Pong(b"x".to_vec())]);
        assert_eq!(p.messages, 1);
        assert_eq!(owed_answer(r#"{"id":"a","type":5}"#), Some(Owed::Answer(r#""a""#.into())), "wrong types keep it");
        assert_eq!(owed_answer(r#"{"id":{"x":1}}"#), None, "not a number or a string");
        assert_eq!(owed_answer(r#"{"id":null}"#), None);
        assert_eq!(owed_answer(r#"["ping",1]"#), None, "a command is an object");
        assert_eq!(owed_answer(r#"{"id":1} x"#), None, "trailing garbage");
        assert_eq!(owed_answer(r#"{"id":1,"id":2}"#), Some(Owed::MaybeAnswer(vec!["1".into(), "2".into()])));
        assert_eq!(owed_answer(r#"{"id":null,"id":-5}"#), Some(Owed::MaybeAnswer(vec!["-5".into()])));
        assert_eq!(owed_answer(r#"{"\u0069d":-1.5e3}"#), Some(Owed::Answer("-1.5e3".into())));
        assert_eq!(joined_room(r#"{"type":"j\u006fin","room":"fz-r1","id":3}"#), Some("fz-r1".into()));
        assert_eq!(joined_room(r#"{"type":"leave","room":"fz-r1"}"#), None);
        let binary = predict(&stream(&[frame(OP_BINARY, br#"{"id":1}"#)]), MAX);
        assert_eq!((binary.owed.len(), binary.messages), (0, 1));
    }

    #[test]
    fn header_rules_close_with_1002() {
        let mut rsv = frame(OP_TEXT, b"{}");
        rsv.rsv = 0b100;
        let mut unmasked = frame(OP_TEXT, b"{}");
        unmasked.mask = None;
        let long_ping = frame(OP_PING, &[0; 126]);
        let split_ping = frame(OP_PING, b"").fin(false);
        for (what, f) in [
            ("rsv", rsv),
            ("unmasked", unmasked),
            ("reserved opcode", frame(0x3, b"")),
            ("reserved control", frame(0xB, b"")),
            ("long ping", long_ping),
            ("fragmented ping", split_ping),
        ] {
            assert_eq!(end(&[f]), End::Close(vec![PROTOCOL_ERROR]), "{what}");
        }
        let mut top = frame(OP_BINARY, b"");
        top.length = Length::Declared64(1 << 63);
        assert_eq!(end(&[top]), End::Close(vec![PROTOCOL_ERROR, TOO_LARGE]));
    }

    #[test]
    fn fragments_are_put_together_in_order() {
        let text = "{\"id\":1,\"b\":\"\u{e9}\u{1d11e}\"}".as_bytes();
        let (a, b) = text.split_at(16); // inside the four-byte character
        let ok = [frame(OP_TEXT, a).fin(false), frame(OP_PING, b"p"), frame(OP_CONTINUATION, b)];
        let p = predict(&stream(&ok), MAX);
        assert_eq!(p.end, End::Open);
        assert_eq!(p.owed, vec![Owed::Pong(b"p".to_vec()), Owed::Answer("1".into())]);
        assert_eq!(end(&ok[..1]), End::OpenFragment);
        assert_eq!(end(&[frame(OP_CONTINUATION, b"x")]), End::Close(vec![PROTOCOL_ERROR]));
        assert_eq!(end(&[frame(OP_TEXT, a).fin(false), frame(OP_TEXT, b)]), End::Close(vec![PROTOCOL_ERROR]));
        assert_eq!(
            end(&[frame(OP_TEXT, a).fin(false), frame(OP_CONTINUATION, b"")]),
            End::Close(vec![INVALID_UTF8]),
            "cut character at the end"
        );
        assert_eq!(end(&[frame(OP_TEXT, b"ok\xFF").fin(false)]), End::Close(vec![INVALID_UTF8]), "refused early");
    }

    #[test]
    fn size_is_checked_on_the_header_and_over_fragments() {
        assert_eq!(end(&[frame(OP_TEXT, &[b' '; MAX])]), End::Open);
        assert_eq!(end(&[frame(OP_TEXT, &[b' '; MAX + 1])]), End::Close(vec![TOO_LARGE]));
        let mut declared = frame(OP_BINARY, b"");
        declared.length = Length::Declared(1 << 40);
        assert_eq!(end(&[declared]), End::Close(vec![TOO_LARGE]), "no payload needed");
        let half = [b' '; 60];
        assert_eq!(
            end(&[frame(OP_TEXT, &half).fin(false), frame(OP_CONTINUATION, &half)]),
            End::Close(vec![TOO_LARGE])
        );
    }

    #[test]
    fn partial_frames_wait_unless_a_rule_is_already_broken() {
        let whole = frame(OP_TEXT, br#"{"id":1}"#).encode();
        for cut in 1..whole.len() {
            assert_eq!(predict(&whole[..cut], MAX).end, End::Partial { close_ok: vec![] }, "cut at {cut}");
        }
        let empty_ping = frame(OP_PING, b"").encode();
        assert_eq!(predict(&empty_ping[..4], MAX).end, End::Partial { close_ok: vec![] }, "mask cut short");
        let mut longer = frame(OP_TEXT, b"abc");
        longer.length = Length::Declared(50);
        assert_eq!(end(&[longer]), End::Partial { close_ok: vec![] });
        let bad = frame(OP_TEXT, b"a\xFFbcdef").encode();
        assert_eq!(predict(&bad[..8], MAX).end, End::Partial { close_ok: vec![INVALID_UTF8] });
        let orphan = frame(OP_CONTINUATION, b"abcdef").encode();
        assert_eq!(predict(&orphan[..8], MAX).end, End::Partial { close_ok: vec![PROTOCOL_ERROR] });
    }

    #[test]
    fn a_shorter_length_makes_the_rest_of_the_payload_the_next_frame() {
        // Declared 2 of "ab\x81\x80....": the server reads "ab", then a frame header from the rest.
        let mut short = frame(OP_BINARY, b"ab\x89\x80");
        short.length = Length::Declared(2);
        short.mask = Some([0; 4]);
        let mut bytes = short.encode();
        bytes.extend_from_slice(&[0, 0, 0, 0]); // the ping's mask
        let p = predict(&bytes, MAX);
        assert_eq!((p.end, p.owed), (End::Open, vec![Owed::Pong(vec![])]));
    }

    #[test]
    fn close_frames() {
        assert_eq!(end(&[frame(OP_CLOSE, b"")]), End::ClientClose(None));
        assert_eq!(end(&[frame(OP_CLOSE, &close_payload(Some(4000), b"bye"))]), End::ClientClose(Some(4000)));
        assert_eq!(end(&[frame(OP_CLOSE, &[3])]), End::Close(vec![PROTOCOL_ERROR]));
        for bad in [0, 999, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(
                end(&[frame(OP_CLOSE, &close_payload(Some(bad), b""))]),
                End::Close(vec![PROTOCOL_ERROR]),
                "{bad}"
            );
        }
        assert_eq!(
            end(&[frame(OP_CLOSE, &close_payload(Some(1000), b"\xC0\xAF"))]),
            End::Close(vec![PROTOCOL_ERROR, INVALID_UTF8])
        );
        let after = predict(&stream(&[frame(OP_CLOSE, b""), frame(0x3, b"ignored")]), MAX);
        assert_eq!(after.end, End::ClientClose(None), "nothing after a close frame is read");
        assert_eq!(after.consumed, 6);
        let mut non_minimal = frame(OP_PING, b"x");
        non_minimal.length = Length::Form16;
        let p = predict(&non_minimal.encode(), MAX);
        assert_eq!((p.end, p.lenient), (End::Open, vec![PROTOCOL_ERROR]));
    }
}
