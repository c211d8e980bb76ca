//! Commands of PROTOCOL.md §3, valid and mutated: wrong and missing fields, wrong types, huge
//! numbers, deep nesting, long strings, unknown fields and commands, then byte-level damage
//! (flips, truncation, splicing, invalid UTF-8). Every choice comes from the caller's seeded
//! generator, so a case is reproduced from its seed.

use fastrand::Rng;
use serde_json::{Map, Value, json};

/// The names one fuzzing connection uses: its own user, the other fuzzing users, a few rooms.
#[derive(Clone, Debug)]
pub struct Names {
    pub me: String,
    pub users: Vec<String>,
    pub rooms: Vec<String>,
}

impl Names {
    pub(super) fn user(&self, rng: &mut Rng) -> String {
        match rng.u8(..10) {
            0 => self.me.clone(),
            1 => format!("fz-offline-{}", rng.u8(..4)),
            _ => self.users[rng.usize(..self.users.len())].clone(),
        }
    }

    pub(super) fn room(&self, rng: &mut Rng) -> String {
        self.rooms[rng.usize(..self.rooms.len())].clone()
    }
}

/// Command text and what was done to it.
#[derive(Clone, Debug)]
pub struct Text {
    pub bytes: Vec<u8>,
    pub note: String,
}

impl Text {
    pub fn is_utf8(&self) -> bool {
        std::str::from_utf8(&self.bytes).is_ok()
    }
}

/// Fields a command may carry, in the order of the table in PROTOCOL.md §3.
const FIELDS: [&str; 12] =
    ["type", "id", "to", "body", "key", "room", "since", "before", "limit", "seq", "users", "stream"];

/// A valid command (an id on most).
pub fn valid(rng: &mut Rng, names: &Names) -> Text {
    let cmd = command(rng, names);
    let note = cmd["type"].as_str().unwrap_or("?").to_owned();
    Text { bytes: serde_json::to_vec(&cmd).expect("a map serializes"), note }
}

/// A command with invalid UTF-8 put in somewhere.
pub fn invalid_utf8(rng: &mut Rng, names: &Names) -> Text {
    let mut text = if rng.bool() { valid(rng, names) } else { mutated(rng, names) };
    let bad = BAD_UTF8[rng.usize(..BAD_UTF8.len())];
    let i = rng.usize(0..=text.bytes.len());
    text.bytes.splice(i..i, bad.iter().copied());
    text.note.push_str(&format!(" invalid-utf8@{i}({bad:02x?})"));
    text
}

/// A command with one to three mutations, structural then byte-level.
pub fn mutated(rng: &mut Rng, names: &Names) -> Text {
    let mut cmd = command(rng, names);
    let mut note = cmd["type"].as_str().unwrap_or("?").to_owned();
    let mut raws = Vec::new();
    let structural = rng.usize(0..=2);
    let bytewise = if structural == 0 { rng.usize(1..=2) } else { rng.usize(0..=1) };
    for _ in 0..structural {
        if cmd.contains_key("@array") {
            break;
        }
        note.push(' ');
        note.push_str(&mutate_structure(rng, names, &mut cmd, &mut raws));
    }
    let mut bytes = render(&cmd, &raws);
    if let Some(m) = cmd.get("@array").cloned() {
        // `array` turned the command into a list: render that instead.
        bytes = render_array(&m, &raws);
    }
    for _ in 0..bytewise {
        note.push(' ');
        note.push_str(&mutate_bytes(rng, names, &mut bytes));
    }
    Text { bytes, note }
}

/// A valid command of a random type.
pub fn command(rng: &mut Rng, names: &Names) -> Map<String, Value> {
    let kind = ["send", "join", "leave", "publish", "sync", "ack", "presence", "history", "ping"][rng.usize(..9)];
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    if rng.u8(..10) < 8 {
        m.insert("id".into(), id(rng));
    }
    match kind {
        "send" => {
            m.insert("to".into(), names.user(rng).into());
            m.insert("body".into(), body(rng, 3));
            if rng.bool() {
                m.insert("key".into(), format!("k{}", rng.u8(..20)).into());
            }
        }
        "join" | "leave" => {
            m.insert("room".into(), names.room(rng).into());
            if kind == "join" && rng.bool() {
                m.insert("since".into(), rng.u64(0..30).into());
            }
        }
        "publish" => {
            m.insert("room".into(), names.room(rng).into());
            m.insert("body".into(), body(rng, 3));
            if rng.bool() {
                m.insert("key".into(), format!("k{}", rng.u8(..20)).into());
            }
        }
        "sync" if rng.bool() => {
            m.insert("since".into(), rng.u64(0..30).into());
        }
        "ack" => {
            m.insert("seq".into(), rng.u64(0..30).into());
        }
        "presence" => {
            if rng.bool() {
                let users: Vec<Value> = (0..rng.usize(1..5)).map(|_| names.user(rng).into()).collect();
                m.insert("users".into(), users.into());
            } else {
                m.insert("room".into(), names.room(rng).into());
            }
        }
        "history" => {
            let stream = if rng.bool() { format!("user:{}", names.me) } else { format!("room:{}", names.room(rng)) };
            m.insert("stream".into(), stream.into());
            match rng.u8(..3) {
                0 => {
                    m.insert("since".into(), rng.u64(0..30).into());
                }
                1 => {
                    m.insert("before".into(), rng.u64(0..30).into());
                }
                _ => {}
            }
            if rng.bool() {
                m.insert("limit".into(), rng.u64(0..=1000).into());
            }
        }
        _ => {}
    }
    m
}

fn id(rng: &mut Rng) -> Value {
    match rng.u8(..6) {
        0 => format!("i{}", rng.u32(..)).into(),
        1 => json!(-(rng.i64(1..1000))),
        2 => json!(rng.f64() * 1000.0),
        _ => rng.u32(..).into(),
    }
}

pub(super) fn body(rng: &mut Rng, depth: u8) -> Value {
    match rng.u8(..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => rng.bool().into(),
        2 => json!(rng.i64(..)),
        3 => short_string(rng).into(),
        4 => json!(rng.f64() * 1e6),
        5 => (0..rng.usize(0..4)).map(|_| body(rng, depth - 1)).collect::<Vec<_>>().into(),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.usize(0..4) {
                m.insert(short_string(rng), body(rng, depth - 1));
            }
            m.into()
        }
    }
}

fn short_string(rng: &mut Rng) -> String {
    const PIECES: [&str; 10] = ["a", "hello", " ", "\u{e9}", "\u{1F600}", "\"", "\\", "\n", "\u{0}", "\u{2028}"];
    (0..rng.usize(0..6)).map(|_| PIECES[rng.usize(..PIECES.len())]).collect()
}

/// Stands for raw JSON text put in after serializing (numbers and nesting `Value` cannot hold).
fn raw_slot(raws: &mut Vec<String>, raw: String) -> Value {
    raws.push(raw);
    Value::String(format!("@@raw{}@@", raws.len() - 1))
}

fn render(cmd: &Map<String, Value>, raws: &[String]) -> Vec<u8> {
    substitute(serde_json::to_string(cmd).expect("a map serializes"), raws)
}

fn render_array(list: &Value, raws: &[String]) -> Vec<u8> {
    substitute(serde_json::to_string(list).expect("a list serializes"), raws)
}

fn substitute(mut text: String, raws: &[String]) -> Vec<u8> {
    for (i, raw) in raws.iter().enumerate().rev() {
        text = text.replace(&format!("\"@@raw{i}@@\""), raw);
    }
    text.into_bytes()
}

/// A field to damage: one the command has, or any field of the protocol.
fn pick_field(rng: &mut Rng, cmd: &Map<String, Value>) -> String {
    if rng.bool() && !cmd.is_empty() {
        let keys: Vec<&String> = cmd.keys().collect();
        keys[rng.usize(..keys.len())].clone()
    } else {
        FIELDS[rng.usize(..FIELDS.len())].to_owned()
    }
}

const HUGE_NUMBERS: [&str; 20] = [
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "-9223372036854775809",
    "1e400",
    "-1e400",
    "1e-400",
    "1.5",
    "-0",
    "0",
    "9007199254740993",
    "340282366920938463463374607431768211456",
    "1E2",
    "0.0",
    "4294967296",
    "00",
    "+1",
    "NaN",
    "Infinity",
    "0x10",
];

const INVALID_NAMES: [&str; 12] =
    ["", "a b", "\u{e9}mile", "a/b", "user:", "room:", "..", "\u{0}", "a\nb", "private:x", "a.b:c@d-e_F9", "%2e%2e"];

/// One structural mutation; answers its name for the case's note.
fn mutate_structure(rng: &mut Rng, names: &Names, cmd: &mut Map<String, Value>, raws: &mut Vec<String>) -> String {
    match rng.u8(..10) {
        0 => {
            let field = pick_field(rng, cmd);
            let raw = HUGE_NUMBERS[rng.usize(..HUGE_NUMBERS.len())];
            cmd.insert(field.clone(), raw_slot(raws, raw.to_owned()));
            format!("huge-number({field}={raw})")
        }
        1 => {
            let field = if rng.bool() { "body".to_owned() } else { pick_field(rng, cmd) };
            let depth = [8, 63, 64, 65, 100, 127, 128, 129, 200, 1000, 4000][rng.usize(..11)];
            let raw = if rng.bool() {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            };
            cmd.insert(field.clone(), raw_slot(raws, raw));
            format!("deep({field},{depth})")
        }
        2 => {
            let field = pick_field(rng, cmd);
            let len = [128, 129, 256, 257, 1024, 8000, 30_000, 65_000, 70_000][rng.usize(..9)];
            let piece = ["a", "\u{e9}", "\u{1F600}", "\"", "\\", "\u{1}"][rng.usize(..6)];
            let long = piece.repeat(len);
            let value = if field == "users" { json!([long]) } else { long.into() };
            cmd.insert(field.clone(), value);
            format!("long-string({field},{len}x{piece:?})")
        }
        3 => {
            let field = pick_field(rng, cmd);
            let values = [
                json!(null),
                json!(true),
                json!(0),
                json!(-7),
                json!(2.5),
                json!(""),
                json!("x"),
                json!([]),
                json!({}),
                json!([1, "a"]),
                json!({"a": null}),
            ];
            let v = values[rng.usize(..values.len())].clone();
            let note = format!("wrong-type({field}={v})");
            cmd.insert(field, v);
            note
        }
        4 => {
            let field =
                ["__proto__", "constructor", "Type", "ID", "", "zz", "\u{e9}", "id "][rng.usize(..8)].to_owned();
            let field = if field == "zz" { format!("zz{}", rng.u16(..)) } else { field };
            cmd.insert(field.clone(), body(rng, 2));
            format!("unknown-field({field:?})")
        }
        5 => {
            let kind = match rng.u8(..8) {
                0 => "pong".to_owned(),
                1 => "SEND".to_owned(),
                2 => "send ".to_owned(),
                3 => String::new(),
                4 => "subscribe".to_owned(),
                5 => "x".repeat(rng.usize(1..2000)),
                6 => "\u{1F600}ping".to_owned(),
                _ => format!("c{}", rng.u32(..)),
            };
            let shown: String = kind.chars().take(12).collect();
            cmd.insert("type".into(), kind.into());
            format!("unknown-command({shown:?})")
        }
        6 => {
            let field = pick_field(rng, cmd);
            cmd.remove(&field);
            format!("missing({field})")
        }
        7 => {
            // The command as a list of its values in the protocol's field order.
            let len = rng.usize(0..=14);
            let list: Vec<Value> =
                (0..len).map(|i| FIELDS.get(i).and_then(|f| cmd.get(*f)).cloned().unwrap_or(Value::Null)).collect();
            cmd.insert("@array".into(), list.into());
            format!("array-form({len})")
        }
        8 => {
            let field = ["to", "room", "stream", "users"][rng.usize(..4)];
            let bad = INVALID_NAMES[rng.usize(..INVALID_NAMES.len())];
            let value = match field {
                "users" => json!([names.user(rng), bad]),
                "stream" => format!("{}{bad}", ["user:", "room:", ""][rng.usize(..3)]).into(),
                _ => bad.into(),
            };
            cmd.insert(field.into(), value);
            format!("bad-name({field}={bad:?})")
        }
        _ => {
            let users: Vec<Value> =
                (0..[0, 1000, 1001, 5000][rng.usize(..4)]).map(|i| format!("fz-{i}").into()).collect();
            let n = users.len();
            cmd.insert("users".into(), users.into());
            cmd.remove("room");
            format!("many-users({n})")
        }
    }
}

pub(super) const BAD_UTF8: [&[u8]; 8] =
    [b"\xFF", b"\xC0\xAF", b"\xED\xA0\x80", b"\xF4\x90\x80\x80", b"\x80", b"\xE2\x82", b"\xF0\x9F\x98", b"\xFE\xFF"];

/// One byte-level mutation; answers its name for the case's note.
fn mutate_bytes(rng: &mut Rng, names: &Names, bytes: &mut Vec<u8>) -> String {
    let at = |rng: &mut Rng, bytes: &Vec<u8>| rng.usize(0..=bytes.len());
    match rng.u8(..9) {
        0 => {
            let n = rng.usize(1..=4);
            for _ in 0..n {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.usize(..bytes.len());
                if rng.bool() {
                    bytes[i] ^= 1 << rng.u8(..8);
                } else {
                    bytes[i] = rng.u8(..);
                }
            }
            format!("flip({n})")
        }
        1 => {
            let cut = at(rng, bytes);
            bytes.truncate(cut);
            format!("truncate@{cut}")
        }
        2 => {
            let other = valid(rng, names).bytes;
            let (a, b) = (at(rng, bytes), rng.usize(0..=other.len()));
            bytes.truncate(a);
            bytes.extend_from_slice(&other[b..]);
            format!("splice@{a}+{b}")
        }
        3 => {
            let bad = BAD_UTF8[rng.usize(..BAD_UTF8.len())];
            // Inside a string when there is one, else anywhere.
            let quotes: Vec<usize> =
                bytes.iter().enumerate().filter(|(_, b)| **b == b'"').map(|(i, _)| i + 1).collect();
            let i = if !quotes.is_empty() && rng.bool() { quotes[rng.usize(..quotes.len())] } else { at(rng, bytes) };
            bytes.splice(i..i, bad.iter().copied());
            format!("invalid-utf8@{i}({bad:02x?})")
        }
        4 => {
            let raw = [r#""dup""#, "1", "null", "{}", "-5"][rng.usize(..5)];
            let key = ["id", "type", "room", "body"][rng.usize(..4)];
            let insert = format!("\"{key}\":{raw},");
            if bytes.first() == Some(&b'{') {
                bytes.splice(1..1, insert.bytes());
            }
            format!("duplicate-key({key}={raw})")
        }
        5 => {
            let (what, garbage): (&str, &[u8]) = [
                ("bom", &b"\xEF\xBB\xBF"[..]),
                ("nul", b"\0"),
                ("comment", b"/*x*/"),
                ("trailing", b"}"),
                ("space", b"   \t\r\n"),
                ("comma", b","),
            ][rng.usize(..6)];
            if rng.bool() {
                bytes.splice(0..0, garbage.iter().copied());
                format!("prepend-{what}")
            } else {
                bytes.extend_from_slice(garbage);
                format!("append-{what}")
            }
        }
        6 => {
            let other = valid(rng, names).bytes;
            bytes.extend_from_slice(&other);
            "two-objects".into()
        }
        7 => {
            let escape = [r"\ud800", r"\udfff", r"\u0000", r"\ud83d\ude00", r"\uZZZZ", r"\x41", r"\"][rng.usize(..7)];
            let quotes: Vec<usize> =
                bytes.iter().enumerate().filter(|(_, b)| **b == b'"').map(|(i, _)| i + 1).collect();
            let i = if quotes.is_empty() { 0 } else { quotes[rng.usize(..quotes.len())] };
            bytes.splice(i..i, escape.bytes());
            format!("escape({escape})")
        }
        _ => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    *bytes = serde_json::to_vec_pretty(&v).expect("a value serializes");
                    "pretty".into()
                }
                Err(_) => {
                    bytes.clear();
                    "empty".into()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names { me: "fz-0".into(), users: vec!["fz-0".into(), "fz-1".into()], rooms: vec!["fz-lobby".into()] }
    }

    #[test]
    fn valid_commands_follow_the_protocol() {
        let mut rng = Rng::with_seed(1);
        for _ in 0..500 {
            let t = valid(&mut rng, &names());
            let v: Value = serde_json::from_slice(&t.bytes).expect("valid JSON");
            let kind = v["type"].as_str().expect("a type");
            assert_eq!(kind, t.note);
            let needs: &[&str] = match kind {
                "send" => &["to", "body"],
                "join" | "leave" => &["room"],
                "publish" => &["room", "body"],
                "ack" => &["seq"],
                "history" => &["stream"],
                _ => &[],
            };
            for field in needs {
                assert!(v.get(*field).is_some(), "{kind} without {field}: {v}");
            }
            if let Some(id) = v.get("id") {
                assert!(id.is_number() || id.is_string());
            }
        }
    }

    #[test]
    fn mutations_do_what_they_say() {
        let mut rng = Rng::with_seed(2);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let t = mutated(&mut rng, &names());
            for word in t.note.split(' ').skip(1) {
                let name = word.split(['(', '@']).next().unwrap_or(word);
                seen.insert(name.to_owned());
                if let Some(inner) = word.strip_prefix("huge-number(").and_then(|w| w.strip_suffix(')')) {
                    let raw = inner.split_once('=').map(|(_, r)| r).unwrap();
                    let needle = format!(":{raw}");
                    if t.note.split(' ').count() == 2 {
                        assert!(t.bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{}", t.note);
                    }
                }
                if word.starts_with("invalid-utf8") && t.note.split(' ').count() == 2 {
                    assert!(!t.is_utf8(), "{}", t.note);
                }
                if word.starts_with("deep(") && t.note.split(' ').count() == 2 {
                    assert!(
                        t.bytes.windows(8).any(|w| w.iter().all(|b| *b == b'['))
                            || t.bytes.windows(5).any(|w| w == b"{\"a\":")
                    );
                }
                if word.starts_with("array-form") && t.note.split(' ').count() == 2 {
                    assert_eq!(t.bytes.first(), Some(&b'['), "{}", t.note);
                }
            }
        }
        for name in [
            "huge-number",
            "deep",
            "long-string",
            "wrong-type",
            "unknown-field",
            "unknown-command",
            "missing",
            "array-form",
            "bad-name",
            "many-users",
            "flip",
            "truncate",
            "splice",
            "invalid-utf8",
            "duplicate-key",
            "two-objects",
            "escape",
        ] {
            assert!(seen.contains(name), "{name} never chosen: {seen:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_text() {
        let a: Vec<Vec<u8>> = (0..50)
            .map({
                let mut rng = Rng::with_seed(42);
                move |_| mutated(&mut rng, &names()).bytes
            })
            .collect();
        let mut rng = Rng::with_seed(42);
        let b: Vec<Vec<u8>> = (0..50).map(|_| mutated(&mut rng, &names()).bytes).collect();
        assert_eq!(a, b);
    }
}
