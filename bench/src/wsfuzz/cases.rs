//! Test cases: what one fuzzing connection does next, drawn from a seeded generator. A case is
//! a list of steps (writes, pauses, the client's FIN or a reset) or an HTTP upgrade request.

use std::time::Duration;

use fastrand::Rng;
use serde::Serialize;

use super::frame::{FrameSpec, Length, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, close_payload};
use super::json::{self, Names, Text};
use super::upgrade;

/// One thing the client does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Write(Vec<u8>),
    /// Written one byte per write.
    Trickle(Vec<u8>),
    Pause(Duration),
    /// `shutdown(SHUT_WR)`: the client sends nothing more.
    Fin,
    /// An abortive close (RST).
    Reset,
}

/// The room of the largest messages.
const BIG_ROOM: &str = "fz-big";

/// The generators, as counted in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    JsonValid,
    JsonMutated,
    JsonInvalidUtf8,
    JsonBurst,
    Binary,
    Fragmented,
    FrameRandom,
    Control,
    Close,
    Oversized,
    Length,
    PingFlood,
    Trickle,
    Reset,
    Upgrade,
    StompValid,
    StompRefused,
    StompMutated,
    StompHeartBeat,
    StompSplit,
    StompBatch,
    StompOversized,
    StompConnect,
    StompFlood,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::JsonValid => "json-valid",
            Kind::JsonMutated => "json-mutated",
            Kind::JsonInvalidUtf8 => "json-invalid-utf8",
            Kind::JsonBurst => "json-burst",
            Kind::Binary => "binary",
            Kind::Fragmented => "fragmented",
            Kind::FrameRandom => "frame-random",
            Kind::Control => "control",
            Kind::Close => "close",
            Kind::Oversized => "oversized",
            Kind::Length => "length",
            Kind::PingFlood => "ping-flood",
            Kind::Trickle => "trickle",
            Kind::Reset => "reset",
            Kind::Upgrade => "upgrade",
            Kind::StompValid => "stomp-valid",
            Kind::StompRefused => "stomp-refused",
            Kind::StompMutated => "stomp-mutated",
            Kind::StompHeartBeat => "stomp-heart-beat",
            Kind::StompSplit => "stomp-split",
            Kind::StompBatch => "stomp-batch",
            Kind::StompOversized => "stomp-oversized",
            Kind::StompConnect => "stomp-connect",
            Kind::StompFlood => "stomp-flood",
        }
    }
}

/// Relative weights of the generators.
const WEIGHTS: [(Kind, u32); 15] = [
    (Kind::JsonValid, 12),
    (Kind::JsonMutated, 22),
    (Kind::JsonInvalidUtf8, 3),
    (Kind::JsonBurst, 4),
    (Kind::Binary, 2),
    (Kind::Fragmented, 10),
    (Kind::FrameRandom, 10),
    (Kind::Control, 5),
    (Kind::Close, 4),
    (Kind::Oversized, 3),
    (Kind::Length, 5),
    (Kind::PingFlood, 3),
    (Kind::Trickle, 3),
    (Kind::Reset, 3),
    (Kind::Upgrade, 8),
];

#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    pub steps: Vec<Step>,
    /// What the generator did, for the anomaly report.
    pub note: String,
    /// For [`Kind::Upgrade`]: the request, sent on a connection of its own.
    pub http: Option<upgrade::Request>,
}

/// What the generators need to know of the server.
#[derive(Clone, Debug)]
pub struct Params {
    pub max_message: usize,
    /// `host:port` for Host headers.
    pub host: String,
}

/// The next case of a connection.
pub fn generate(rng: &mut Rng, names: &Names, params: &Params, case_id: &str) -> Case {
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut pick = rng.u32(..total);
    let kind = WEIGHTS
        .iter()
        .find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .map(|(k, _)| *k)
        .expect("weights cover the range");
    let mut b = Builder { rng, names, max: params.max_message, steps: Vec::new(), note: String::new() };
    let kind = match kind {
        Kind::JsonValid | Kind::JsonMutated | Kind::JsonInvalidUtf8 => {
            let text = match kind {
                Kind::JsonValid => json::valid(b.rng, names),
                Kind::JsonMutated => json::mutated(b.rng, names),
                _ => json::invalid_utf8(b.rng, names),
            };
            let kind = if !text.is_utf8() {
                Kind::JsonInvalidUtf8
            } else if kind == Kind::JsonInvalidUtf8 {
                Kind::JsonMutated
            } else {
                kind
            };
            b.note = text.note.clone();
            let frame = b.frame(OP_TEXT, text.bytes);
            b.write_maybe_split(frame);
            kind
        }
        Kind::Upgrade => {
            let req = upgrade::generate(b.rng, &params.host, &names.me, case_id);
            return Case { kind, steps: Vec::new(), note: req.note.clone(), http: Some(req) };
        }
        Kind::JsonBurst => b.burst(),
        Kind::Binary => {
            let text = b.any_text();
            b.note = format!("binary: {}", text.note);
            let frame = b.frame(OP_BINARY, text.bytes);
            b.steps.push(Step::Write(frame));
            kind
        }
        Kind::Fragmented => b.fragmented(),
        Kind::FrameRandom => b.random_frames(),
        Kind::Control => b.control(),
        Kind::Close => b.close(),
        Kind::Oversized => b.oversized(),
        Kind::Length => b.length(),
        Kind::PingFlood => b.ping_flood(),
        Kind::Trickle => b.trickle(),
        Kind::Reset => b.reset(),
        _ => unreachable!("STOMP kinds come from stomp::cases"),
    };
    Case { kind, steps: b.steps, note: b.note, http: None }
}

struct Builder<'a> {
    rng: &'a mut Rng,
    names: &'a Names,
    max: usize,
    steps: Vec<Step>,
    note: String,
}

impl Builder<'_> {
    fn mask(&mut self) -> [u8; 4] {
        if self.rng.u8(..20) == 0 { [0; 4] } else { self.rng.u32(..).to_be_bytes() }
    }

    fn spec(&mut self, opcode: u8, payload: Vec<u8>) -> FrameSpec {
        let mask = self.mask();
        FrameSpec::new(opcode, payload, mask)
    }

    fn frame(&mut self, opcode: u8, payload: Vec<u8>) -> Vec<u8> {
        self.spec(opcode, payload).encode()
    }

    fn any_text(&mut self) -> Text {
        if self.rng.bool() { json::valid(self.rng, self.names) } else { json::mutated(self.rng, self.names) }
    }

    fn small_payload(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.usize(0..=max);
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    /// Writes `bytes`, sometimes in two writes cut anywhere.
    fn write_maybe_split(&mut self, bytes: Vec<u8>) {
        if bytes.len() > 1 && self.rng.u8(..10) == 0 {
            let cut = self.rng.usize(1..bytes.len());
            self.steps.push(Step::Write(bytes[..cut].to_vec()));
            self.steps.push(Step::Pause(Duration::from_millis(self.rng.u64(1..30))));
            self.steps.push(Step::Write(bytes[cut..].to_vec()));
            self.note.push_str(&format!(" (written in two at {cut})"));
        } else {
            self.steps.push(Step::Write(bytes));
        }
    }

    fn burst(&mut self) -> Kind {
        let n = self.rng.usize(2..=30);
        let mut out = Vec::new();
        let mut notes = Vec::new();
        for _ in 0..n {
            let text = if self.rng.u8(..3) == 0 {
                json::mutated(self.rng, self.names)
            } else {
                json::valid(self.rng, self.names)
            };
            notes.push(text.note.clone());
            let f = self.frame(OP_TEXT, text.bytes);
            out.extend(f);
        }
        self.note = format!("{n} commands in one write: {}", notes.join(" | "));
        self.steps.push(Step::Write(out));
        Kind::JsonBurst
    }

    fn control_frame(&mut self) -> (Vec<u8>, &'static str) {
        match self.rng.u8(..3) {
            0 => {
                let p = self.small_payload(20);
                (self.frame(OP_PONG, p), "pong")
            }
            _ => {
                let p = self.small_payload(20);
                (self.frame(OP_PING, p), "ping")
            }
        }
    }

    fn fragmented(&mut self) -> Kind {
        let mut text = self.any_text();
        if self.rng.bool() {
            // Multi-byte characters, so that cuts fall inside them.
            text.bytes
                .splice(text.bytes.len().min(1)..text.bytes.len().min(1), "\"\u{e9}\u{1F600}\u{2028}\":0,".bytes());
        }
        let data = text.bytes;
        let len = data.len();
        let pieces = if len <= 200 && self.rng.u8(..8) == 0 { len.max(1) } else { self.rng.usize(2..=8) };
        let mut cuts: Vec<usize> = (0..pieces - 1).map(|_| self.rng.usize(0..=len)).collect();
        cuts.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(len);
        let binary = self.rng.u8(..10) == 0;
        let variant = self.rng.u8(..10);
        let mut notes = vec![format!("{} fragments of {}", bounds.len() - 1, text.note)];
        if binary {
            notes.push("binary".into());
        }
        let mut out = Vec::new();
        let last = bounds.len() - 2;
        for i in 0..=last {
            let piece = data[bounds[i]..bounds[i + 1]].to_vec();
            let mut opcode = if i == 0 { if binary { OP_BINARY } else { OP_TEXT } } else { OP_CONTINUATION };
            let mut fin = i == last;
            if i == 0 && variant == 0 {
                opcode = OP_CONTINUATION;
                notes.push("no start".into());
            }
            if i == last && i > 0 && variant == 1 {
                opcode = OP_TEXT;
                notes.push("new message for the last".into());
            }
            if i == last && variant == 2 {
                fin = false;
                notes.push("never finished".into());
            }
            let mut spec = self.spec(opcode, piece);
            spec.fin = fin;
            out.extend(spec.encode());
            if i < last {
                if self.rng.u8(..3) == 0 {
                    let (f, what) = self.control_frame();
                    out.extend(f);
                    notes.push(format!("{what} after {i}"));
                }
                if variant == 3 && i == 0 {
                    let p = self.small_payload(10);
                    let mut ping = self.spec(OP_PING, p);
                    ping.fin = false;
                    out.extend(ping.encode());
                    notes.push("fragmented ping inside".into());
                }
                if variant == 4 && self.rng.bool() {
                    let empty = self.spec(OP_CONTINUATION, Vec::new()).fin(false);
                    out.extend(empty.encode());
                    notes.push("empty fragment".into());
                }
            }
        }
        self.note = notes.join(", ");
        self.write_maybe_split(out);
        Kind::Fragmented
    }

    fn random_frames(&mut self) -> Kind {
        let n = self.rng.usize(1..=4);
        let mut out = Vec::new();
        let mut notes = Vec::new();
        for _ in 0..n {
            let fin = self.rng.u8(..5) != 0;
            let rsv = if self.rng.u8(..7) == 0 { self.rng.u8(1..8) } else { 0 };
            let opcode = if self.rng.u8(..10) < 7 {
                [OP_TEXT, OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_CLOSE][self.rng.usize(..7)]
            } else {
                self.rng.u8(..16)
            };
            let payload = if self.rng.u8(..10) < 6 { self.any_text().bytes } else { self.small_payload(200) };
            let mut spec = self.spec(opcode, payload);
            spec.fin = fin;
            spec.rsv = rsv;
            if self.rng.u8(..12) == 0 {
                spec.mask = None;
            }
            let plen = spec.payload.len() as u64;
            spec.length = match self.rng.u8(..100) {
                0..=84 => Length::Exact,
                85..=88 => Length::Form16,
                89..=91 => Length::Form64,
                92..=95 => Length::Declared(plen.saturating_sub(self.rng.u64(1..=plen.max(1)))),
                _ => Length::Declared(plen + self.rng.u64(1..50)),
            };
            notes.push(format!(
                "[fin={} rsv={} op={:#x} mask={} len={:?} payload={}]",
                fin as u8,
                rsv,
                opcode,
                spec.mask.is_some() as u8,
                spec.length,
                plen
            ));
            out.extend(spec.encode());
        }
        self.note = notes.join(" ");
        self.write_maybe_split(out);
        Kind::FrameRandom
    }

    fn control(&mut self) -> Kind {
        let (frame, note) = match self.rng.u8(..7) {
            0 => {
                let p = self.small_payload(125);
                (self.frame(OP_PING, p), "ping with up to 125 bytes".to_owned())
            }
            1 => {
                let n = self.rng.usize(126..=300);
                let p = vec![b'p'; n];
                (self.frame(OP_PING, p), format!("ping of {n} bytes"))
            }
            2 => {
                let p = self.small_payload(10);
                (self.spec(OP_PING, p).fin(false).encode(), "ping without FIN".to_owned())
            }
            3 => {
                let p = self.small_payload(125);
                (self.frame(OP_PONG, p), "unsolicited pong".to_owned())
            }
            4 => {
                let p = self.small_payload(125);
                let mut s = self.spec(OP_PING, p);
                s.length = if self.rng.bool() { Length::Form16 } else { Length::Form64 };
                (s.encode(), format!("ping with a {:?} length", s.length))
            }
            5 => {
                let op = self.rng.u8(0xB..=0xF);
                let p = self.small_payload(10);
                (self.frame(op, p), format!("reserved control opcode {op:#x}"))
            }
            _ => {
                let n = self.rng.usize(126..=2000);
                let p = vec![b'q'; n];
                (self.frame(OP_PONG, p), format!("pong of {n} bytes"))
            }
        };
        self.note = note;
        self.steps.push(Step::Write(frame));
        if self.rng.bool() {
            let text = json::valid(self.rng, self.names);
            self.note.push_str(&format!(", then {}", text.note));
            let f = self.frame(OP_TEXT, text.bytes);
            self.steps.push(Step::Write(f));
        }
        Kind::Control
    }

    fn close(&mut self) -> Kind {
        const VALID: [u16; 17] =
            [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4001, 4999];
        const INVALID: [u16; 13] = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535];
        let mut out = Vec::new();
        let mut notes = Vec::new();
        if self.rng.bool() {
            let text = json::valid(self.rng, self.names);
            notes.push(format!("{} first", text.note));
            out.extend(self.frame(OP_TEXT, text.bytes));
        }
        let payload = match self.rng.u8(..7) {
            0 => {
                notes.push("empty close".into());
                Vec::new()
            }
            1 => {
                notes.push("one-byte close".into());
                vec![self.rng.u8(..)]
            }
            2 | 3 => {
                let code = VALID[self.rng.usize(..VALID.len())];
                let reason = ["", "bye", "\u{e9}t\u{e9} \u{1F600}", "x"][self.rng.usize(..4)];
                notes.push(format!("close {code} {reason:?}"));
                close_payload(Some(code), reason.as_bytes())
            }
            4 => {
                let code = INVALID[self.rng.usize(..INVALID.len())];
                notes.push(format!("close with invalid code {code}"));
                close_payload(Some(code), b"")
            }
            5 => {
                let bad: &[u8] = [&b"\xFF"[..], b"\xC0\xAF", b"ok\xED\xA0\x80", b"\xE2\x82"][self.rng.usize(..4)];
                notes.push(format!("close 1000 with a reason not UTF-8 {bad:02x?}"));
                close_payload(Some(1000), bad)
            }
            _ => {
                notes.push("close 1000 with a 124-byte reason".into());
                close_payload(Some(1000), &[b'r'; 124])
            }
        };
        out.extend(self.frame(OP_CLOSE, payload));
        if self.rng.bool() {
            let text = json::valid(self.rng, self.names);
            notes.push(format!("then {} (must be ignored)", text.note));
            out.extend(self.frame(OP_TEXT, text.bytes));
        }
        self.note = notes.join(", ");
        self.write_maybe_split(out);
        Kind::Close
    }

    /// A publish padded to exactly `len` bytes (at least ~60), to a room of its own (its
    /// backlog would make every history and catch-up of a shared room megabytes long).
    fn padded_command(&mut self, len: usize) -> Vec<u8> {
        let head = format!(r#"{{"type":"publish","id":"big{}","room":"{BIG_ROOM}","body":""#, self.rng.u32(..));
        let mut out = head.into_bytes();
        out.resize(len.saturating_sub(2).max(out.len()), b'x');
        out.extend_from_slice(b"\"}");
        out
    }

    fn oversized(&mut self) -> Kind {
        let max = self.max;
        match self.rng.u8(..6) {
            0 => {
                let len = max + self.rng.usize(1..5000);
                let p = self.padded_command(len);
                self.note = format!("one text frame of {len} bytes (limit {max})");
                let f = self.frame(OP_TEXT, p);
                self.steps.push(Step::Write(f));
            }
            1 => {
                let join = format!(r#"{{"type":"join","id":"j{}","room":"{BIG_ROOM}"}}"#, self.rng.u32(..));
                let mut out = self.frame(OP_TEXT, join.into_bytes());
                let p = self.padded_command(max);
                self.note = format!("join {BIG_ROOM}, one text frame of exactly {max} bytes");
                out.extend(self.frame(OP_TEXT, p));
                self.steps.push(Step::Write(out));
            }
            2 => {
                let declared = [1 << 20, 1 << 32, 1 << 62, u64::MAX >> 1][self.rng.usize(..4)];
                let mut s = self.spec(OP_BINARY, b"abc".to_vec());
                s.length = Length::Declared(declared);
                self.note = format!("a binary frame declaring {declared} bytes");
                self.steps.push(Step::Write(s.encode()));
                self.steps.push(Step::Pause(Duration::from_millis(100)));
            }
            3 | 4 => {
                let total = if self.rng.bool() { max + self.rng.usize(1..3000) } else { max };
                let p = self.padded_command(total);
                let pieces = self.rng.usize(2..=6);
                let step = total.div_ceil(pieces);
                let mut out = Vec::new();
                for (i, chunk) in p.chunks(step).enumerate() {
                    let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                    let last = (i + 1) * step >= p.len();
                    out.extend(self.spec(op, chunk.to_vec()).fin(last).encode());
                }
                self.note = format!("a text message of {total} bytes in {pieces} fragments (limit {max})");
                self.steps.push(Step::Write(out));
            }
            _ => {
                let len = [1 << 20, 4 << 20][self.rng.usize(..2)];
                self.note = format!("a binary frame of {len} bytes, written whole");
                let f = self.frame(OP_BINARY, vec![0xAB; len]);
                self.steps.push(Step::Write(f));
            }
        }
        Kind::Oversized
    }

    fn length(&mut self) -> Kind {
        let text = json::valid(self.rng, self.names);
        match self.rng.u8(..7) {
            0..=2 => {
                let extra = [1, 10, 1000, 60_000][self.rng.usize(..4)];
                let full = text.bytes.clone();
                let declared = (full.len() + extra) as u64;
                let mut s = self.spec(OP_TEXT, full.clone());
                s.length = Length::Declared(declared);
                let bytes = s.encode();
                let stall = Duration::from_millis(self.rng.u64(100..600));
                self.steps.push(Step::Write(bytes));
                self.steps.push(Step::Pause(stall));
                match self.rng.u8(..3) {
                    0 => {
                        self.steps.push(Step::Fin);
                        self.note = format!("{} declared {extra} bytes too long, stall, FIN", text.note);
                    }
                    1 => {
                        self.steps.push(Step::Reset);
                        self.note = format!("{} declared {extra} bytes too long, stall, reset", text.note);
                    }
                    _ => {
                        // The rest of the payload: spaces after the JSON, masked as the frame is.
                        let mask = s.mask.unwrap_or_default();
                        let rest: Vec<u8> = (full.len()..full.len() + extra).map(|i| b' ' ^ mask[i % 4]).collect();
                        self.steps.push(Step::Write(rest));
                        self.note = format!("{} declared {extra} bytes too long, stall, then the rest", text.note);
                    }
                }
            }
            3 => {
                let mut s = self.spec(OP_TEXT, text.bytes.clone());
                let short = self.rng.usize(0..text.bytes.len());
                s.length = Length::Declared(short as u64);
                self.note = format!("{} declared {short} of {} bytes", text.note, text.bytes.len());
                self.write_maybe_split(s.encode());
            }
            4 => {
                let mut s = self.spec(OP_TEXT, text.bytes.clone());
                s.length = Length::Declared64((1 << 63) | text.bytes.len() as u64);
                self.note = format!("{} with the 64-bit length's top bit set", text.note);
                self.steps.push(Step::Write(s.encode()));
            }
            5 => {
                let mut s = self.spec(OP_TEXT, text.bytes.clone());
                s.length = if self.rng.bool() { Length::Form16 } else { Length::Form64 };
                self.note = format!("{} with a {:?} length", text.note, s.length);
                self.write_maybe_split(s.encode());
            }
            _ => {
                let s = self.spec(OP_TEXT, text.bytes.clone());
                let bytes = s.encode();
                let cut = self.rng.usize(1..bytes.len().min(6));
                self.note = format!("{}: the first {cut} header bytes, stall, FIN", text.note);
                self.steps.push(Step::Write(bytes[..cut].to_vec()));
                self.steps.push(Step::Pause(Duration::from_millis(self.rng.u64(100..400))));
                self.steps.push(Step::Fin);
            }
        }
        Kind::Length
    }

    fn ping_flood(&mut self) -> Kind {
        let n = self.rng.usize(20..=400);
        let mut out = Vec::new();
        for i in 0..n {
            let mut p = (i as u32).to_be_bytes().to_vec();
            let most = if self.rng.u8(..10) == 0 { 121 } else { 8 };
            let extra = self.small_payload(most);
            p.extend(extra);
            out.extend(self.frame(OP_PING, p));
        }
        if self.rng.bool() {
            self.note = format!("{n} pings in one write");
            self.steps.push(Step::Write(out));
        } else {
            let text = json::valid(self.rng, self.names);
            let cut = text.bytes.len() / 2;
            let mut all = self.spec(OP_TEXT, text.bytes[..cut].to_vec()).fin(false).encode();
            all.extend(out);
            all.extend(self.frame(OP_CONTINUATION, text.bytes[cut..].to_vec()));
            self.note = format!("{n} pings inside a fragmented {}", text.note);
            self.steps.push(Step::Write(all));
        }
        Kind::PingFlood
    }

    fn trickle(&mut self) -> Kind {
        let mut text = self.any_text();
        if text.bytes.len() > 300 {
            text = json::valid(self.rng, self.names);
        }
        let mut out = if self.rng.bool() {
            self.note = format!("{}, one byte per write", text.note);
            self.frame(OP_TEXT, text.bytes)
        } else {
            let cut = text.bytes.len() / 2;
            self.note = format!("{} in two fragments, one byte per write", text.note);
            let mut f = self.spec(OP_TEXT, text.bytes[..cut].to_vec()).fin(false).encode();
            f.extend(self.frame(OP_CONTINUATION, text.bytes[cut..].to_vec()));
            f
        };
        out.truncate(2000);
        self.steps.push(Step::Trickle(out));
        Kind::Trickle
    }

    fn reset(&mut self) -> Kind {
        let text = self.any_text();
        let bytes = self.frame(OP_TEXT, text.bytes);
        match self.rng.u8(..4) {
            0 => {
                self.note = format!("{}, whole, then reset at once", text.note);
                self.steps.push(Step::Write(bytes));
                self.steps.push(Step::Reset);
            }
            1 => {
                let cut = self.rng.usize(0..bytes.len());
                self.note = format!("{}, cut at {cut}, then FIN", text.note);
                self.steps.push(Step::Write(bytes[..cut].to_vec()));
                self.steps.push(Step::Fin);
            }
            _ => {
                let cut = self.rng.usize(0..bytes.len());
                self.note = format!("{}, cut at {cut}, then reset", text.note);
                self.steps.push(Step::Write(bytes[..cut].to_vec()));
                self.steps.push(Step::Reset);
            }
        }
        Kind::Reset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::model::{End, predict};

    fn names() -> Names {
        Names { me: "fz-0".into(), users: vec!["fz-0".into(), "fz-1".into()], rooms: vec!["fz-lobby".into()] }
    }

    fn params() -> Params {
        Params { max_message: 65536, host: "127.0.0.1:1".into() }
    }

    fn written(case: &Case) -> Vec<u8> {
        case.steps
            .iter()
            .flat_map(|s| match s {
                Step::Write(b) | Step::Trickle(b) => b.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn every_generator_runs_and_cases_repeat_from_their_seed() {
        let mut kinds = std::collections::HashSet::new();
        for seed in 0..3000u64 {
            let case = generate(&mut Rng::with_seed(seed), &names(), &params(), "c0.0");
            let again = generate(&mut Rng::with_seed(seed), &names(), &params(), "c0.0");
            assert_eq!(case.steps, again.steps);
            assert_eq!(case.note, again.note);
            kinds.insert(case.kind);
            assert_eq!(case.http.is_some(), case.kind == Kind::Upgrade);
            if let Some(pos) = case.steps.iter().position(|s| matches!(s, Step::Fin | Step::Reset)) {
                assert_eq!(pos, case.steps.len() - 1, "FIN or reset comes last: {}", case.note);
            }
        }
        assert_eq!(kinds.len(), WEIGHTS.len());
    }

    #[test]
    fn generators_produce_what_they_say() {
        for seed in 0..3000u64 {
            let case = generate(&mut Rng::with_seed(seed), &names(), &params(), "c0.0");
            let p = predict(&written(&case), 65536);
            let note = &case.note;
            match case.kind {
                Kind::JsonValid => assert_eq!(p.end, End::Open, "{note}"),
                Kind::JsonInvalidUtf8 => {
                    assert!(p.end == End::Close(vec![1007]) || p.end == End::Close(vec![1009]), "{note}: {p:?}")
                }
                Kind::Oversized if note.contains("(limit") && !note.contains(" of 65536 bytes in") => {
                    assert!(matches!(&p.end, End::Close(c) if c.contains(&1009)), "{note}: {p:?}")
                }
                Kind::Oversized if note.contains("exactly") || note.contains(" of 65536 bytes in") => {
                    assert_eq!(p.end, End::Open, "{note}")
                }
                Kind::Close
                    if note.contains("invalid code") || note.contains("one-byte") || note.contains("124-byte") =>
                {
                    assert_eq!(p.end, End::Close(vec![1002]), "{note}")
                }
                Kind::Close if note.contains("not UTF-8") => {
                    assert!(matches!(&p.end, End::Close(c) if c.contains(&1007)), "{note}")
                }
                Kind::Control
                    if note.contains("ping of")
                        || note.contains("without FIN")
                        || note.contains("reserved")
                        || note.contains("pong of") =>
                {
                    assert_eq!(p.end, End::Close(vec![1002]), "{note}")
                }
                Kind::Length if note.contains("too long, stall, FIN") || note.contains("header bytes") => {
                    assert!(matches!(p.end, End::Partial { .. }), "{note}: {p:?}")
                }
                Kind::Length if note.contains("top bit") => {
                    assert!(matches!(&p.end, End::Close(c) if c.contains(&1002)), "{note}")
                }
                Kind::PingFlood => {
                    let n: usize = note.split(' ').next().unwrap().parse().unwrap();
                    assert_eq!(p.pings().len(), n, "{note}");
                }
                Kind::Fragmented
                    if note.contains("no start")
                        || note.contains("fragmented ping")
                        || note.contains("new message") =>
                {
                    assert!(matches!(&p.end, End::Close(c) if c.contains(&1002) || c.contains(&1007)), "{note}: {p:?}")
                }
                _ => {}
            }
        }
    }
}
