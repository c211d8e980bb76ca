//! STOMP cases, drawn from a seeded generator: frames of `commands` (valid with receipts, refused,
//! mutated) packed into messages one each, several to a message or cut byte by byte, text or
//! binary, now and then fragmented; heart-beat floods; oversized frames; a rate-limit flood; and
//! handshakes (`CONNECT` in every form, with frames pipelined behind it). A case is a list of
//! WebSocket messages; the exec adds what the oracle needs to know it is over.

use std::time::Duration;

use fastrand::Rng;

use super::commands::{Gen, SINK};
use super::frame::Frame;
use super::model::TOPIC;
use crate::wsfuzz::cases::Kind;
use crate::wsfuzz::frame::{FrameSpec, OP_BINARY, OP_CONTINUATION, OP_TEXT};
use crate::wsfuzz::json::Names;

/// One WebSocket message of a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub payload: Vec<u8>,
    pub binary: bool,
    /// How many WebSocket frames carry it (1: not fragmented).
    pub fragments: usize,
    pub mask: [u8; 4],
}

impl Msg {
    pub fn new(payload: Vec<u8>, binary: bool) -> Msg {
        Msg { payload, binary, fragments: 1, mask: [0x37, 0x5A, 0x91, 0x0C] }
    }

    /// Its WebSocket frames, fragments cut at even points.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.fragments.clamp(1, self.payload.len().max(1));
        let len = self.payload.len();
        let mut out = Vec::with_capacity(len + 14 * n);
        for i in 0..n {
            let piece = self.payload[i * len / n..(i + 1) * len / n].to_vec();
            let opcode = match (i, self.binary) {
                (0, true) => OP_BINARY,
                (0, false) => OP_TEXT,
                _ => OP_CONTINUATION,
            };
            FrameSpec::new(opcode, piece, self.mask).fin(i == n - 1).encode_into(&mut out);
        }
        out
    }
}

/// One thing the client does in a STOMP case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// These messages, in one write.
    Write(Vec<Msg>),
    Pause(Duration),
}

/// A handshake case's upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Path and query.
    pub target: String,
    /// `Sec-WebSocket-Protocol` offered.
    pub protocols: Option<String>,
    /// 101, or the HTTP error a bad `?user=` gets.
    pub status: u16,
    /// The subprotocol a 101 must echo.
    pub echo: Option<&'static str>,
    /// The user named at the upgrade.
    pub user: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    pub steps: Vec<Step>,
    pub note: String,
    /// For [`Kind::StompConnect`]: the upgrade of a connection of its own, whose first frame the
    /// steps send.
    pub upgrade: Option<Upgrade>,
    /// A rate-limit flood: the steps are not paced, and any frame may be refused `rate_limited`.
    pub flood: bool,
}

/// The room of the largest messages (the JSON cases' too).
const BIG_ROOM: &str = "fz-big";

const WEIGHTS: [(Kind, u32); 9] = [
    (Kind::StompValid, 20),
    (Kind::StompRefused, 12),
    (Kind::StompMutated, 26),
    (Kind::StompHeartBeat, 6),
    (Kind::StompSplit, 8),
    (Kind::StompBatch, 8),
    (Kind::StompOversized, 4),
    (Kind::StompConnect, 8),
    (Kind::StompFlood, 1),
];

/// The next STOMP case of a connection of user `names.me`, for frames of at most `max` bytes.
pub fn generate(rng: &mut Rng, names: &Names, max: usize, case_id: &str) -> Case {
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
    let mut g = Gen { rng, names, max, case: case_id.to_owned(), receipts: 0, notes: Vec::new() };
    let mut upgrade = None;
    let steps = match kind {
        Kind::StompValid => g.valid_case(),
        Kind::StompRefused => g.refused_case(),
        Kind::StompMutated => g.mutated_case(),
        Kind::StompHeartBeat => g.heart_beats(),
        Kind::StompSplit => g.split(),
        Kind::StompBatch => g.batch(),
        Kind::StompOversized => g.oversized(),
        Kind::StompConnect => {
            let (u, steps) = g.connect();
            upgrade = Some(u);
            steps
        }
        Kind::StompFlood => g.flood(),
        _ => unreachable!("not a STOMP kind"),
    };
    Case { kind, steps, note: g.notes.join("; "), upgrade, flood: kind == Kind::StompFlood }
}

impl Gen<'_> {
    /// Frames into messages: one each, all in one, or in groups, with heart-beats between now and
    /// then; text when the bytes allow it (binary now and then), a message over the frame limit
    /// cut in pieces.
    fn pack(&mut self, frames: Vec<Vec<u8>>, text_anyway: bool) -> Vec<Step> {
        let n = frames.len();
        let groups = match self.rng.u8(..10) {
            0..=5 => n,
            6 | 7 => 1,
            _ => self.rng.usize(1..=n.max(1)),
        };
        let mut payloads = vec![Vec::new(); groups.max(1)];
        for (i, frame) in frames.into_iter().enumerate() {
            let g = i * payloads.len() / n.max(1);
            if self.rng.u8(..8) == 0 {
                let eol: &[u8] = self.pick(&[&b"\n"[..], b"\r\n", b"\n\n\n"]);
                payloads[g].extend_from_slice(eol);
            }
            payloads[g].extend(frame);
        }
        let mut msgs = Vec::new();
        for p in payloads {
            if p.len() > self.max {
                let piece = self.max / 2;
                self.note(format!("a message of {} bytes sent in pieces of {piece}", p.len()));
                for chunk in p.chunks(piece) {
                    msgs.push(self.msg(chunk.to_vec(), false));
                }
            } else {
                msgs.push(self.msg(p, text_anyway));
            }
        }
        self.writes(msgs)
    }

    /// A message: text when the bytes are UTF-8 (or `text_anyway`), else binary; binary now and
    /// then anyway; fragmented now and then.
    fn msg(&mut self, payload: Vec<u8>, text_anyway: bool) -> Msg {
        let utf8 = std::str::from_utf8(&payload).is_ok();
        let binary = !text_anyway && (!utf8 || self.rng.u8(..5) == 0);
        let fragments = if payload.len() > 1 && self.rng.u8(..10) == 0 { self.rng.usize(2..=3) } else { 1 };
        Msg { payload, binary, fragments, mask: self.rng.u32(..).to_be_bytes() }
    }

    /// Messages as writes: one each, or all in one.
    fn writes(&mut self, msgs: Vec<Msg>) -> Vec<Step> {
        if msgs.len() > 1 && self.rng.u8(..5) == 0 {
            vec![Step::Write(msgs)]
        } else {
            msgs.into_iter().map(|m| Step::Write(vec![m])).collect()
        }
    }

    fn valid_case(&mut self) -> Vec<Step> {
        let n = self.rng.usize(1..=5);
        let mut frames = Vec::new();
        for _ in 0..n {
            let f = self.valid();
            self.describe(&f);
            frames.push(f.render());
        }
        if self.rng.u8(..30) == 0 {
            let f = self.with_receipt(Frame::new("DISCONNECT"), 80);
            self.describe(&f);
            frames.push(f.render());
        }
        self.pack(frames, false)
    }

    fn refused_case(&mut self) -> Vec<Step> {
        let n = self.rng.usize(1..=4);
        let mut frames = Vec::new();
        for _ in 0..n {
            if self.rng.u8(..3) == 0 {
                let f = self.valid();
                self.describe(&f);
                frames.push(f.render());
            } else {
                let (f, what) = self.refused();
                self.note(what);
                frames.push(f.render());
            }
        }
        self.pack(frames, false)
    }

    fn mutated_case(&mut self) -> Vec<Step> {
        let mut frames = Vec::new();
        for _ in 0..self.rng.usize(0..=2) {
            let f = self.valid();
            self.describe(&f);
            frames.push(f.render());
        }
        let (bytes, what, text_anyway) = self.mutated();
        self.note(format!("mutated: {what}"));
        frames.push(bytes);
        for _ in 0..self.rng.usize(0..=2) {
            let f = self.valid();
            self.describe(&f);
            frames.push(f.render());
        }
        self.pack(frames, text_anyway)
    }

    fn eols(&mut self, n: usize) -> Vec<u8> {
        let style = self.rng.u8(..3);
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let crlf = match style {
                0 => false,
                1 => true,
                _ => self.rng.bool(),
            };
            if crlf {
                out.push(b'\r');
            }
            out.push(b'\n');
        }
        out
    }

    fn heart_beats(&mut self) -> Vec<Step> {
        match self.rng.u8(..6) {
            0 => {
                let n = self.rng.usize(1..=(self.max / 2).min(30_000));
                self.note(format!("{n} EOLs in one message"));
                let eols = self.eols(n);
                vec![Step::Write(vec![self.msg(eols, false)])]
            }
            1 => {
                let mut payload = Vec::new();
                for _ in 0..self.rng.usize(1..=5) {
                    let n = self.rng.usize(1..=200);
                    payload.extend(self.eols(n));
                    let f = self.valid();
                    self.describe(&f);
                    payload.extend(f.render());
                }
                self.note("frames with EOL runs between them, in one message");
                vec![Step::Write(vec![self.msg(payload, false)])]
            }
            2 => {
                let k = self.rng.usize(2..=30);
                self.note(format!("{k} messages of EOLs"));
                let msgs = (0..k)
                    .map(|_| {
                        let n = self.rng.usize(1..=20);
                        let eols = self.eols(n);
                        self.msg(eols, false)
                    })
                    .collect();
                self.writes(msgs)
            }
            3 => {
                let f = self.valid();
                self.describe(&f);
                self.note("CRLF cut between two messages");
                let mut first = b"\n\r".to_vec();
                let mut second = b"\n".to_vec();
                if self.rng.bool() {
                    first = [f.render(), first].concat();
                } else {
                    second.extend(f.render());
                }
                let (a, b) = (self.msg(first, false), self.msg(second, false));
                vec![Step::Write(vec![a]), Step::Pause(Duration::from_millis(5)), Step::Write(vec![b])]
            }
            4 => {
                let f = self.valid();
                self.describe(&f);
                let (cr, what) = self.pick(&[(&b"\r"[..], "a CR, then"), (b"\r\r\n", "CR CR LF, then")]);
                self.note(what);
                let a = self.msg(cr.to_vec(), false);
                let b = self.msg(f.render(), false);
                vec![Step::Write(vec![a]), Step::Write(vec![b])]
            }
            _ => {
                let mut frames = Vec::new();
                for _ in 0..self.rng.usize(1..=4) {
                    let f = self.valid();
                    self.describe(&f);
                    let n = self.rng.usize(1..=50);
                    frames.push([f.render(), self.eols(n)].concat());
                }
                self.note("EOLs after every NUL");
                self.pack(frames, false)
            }
        }
    }

    fn split(&mut self) -> Vec<Step> {
        let mut bytes = Vec::new();
        for _ in 0..self.rng.usize(1..=3) {
            let f = if self.rng.u8(..4) == 0 { self.refused().0 } else { self.valid() };
            self.describe(&f);
            bytes.extend(f.render());
            if self.rng.u8(..4) == 0 {
                bytes.extend_from_slice(b"\r\n");
            }
        }
        let all_binary = self.rng.u8(..3) == 0;
        let pieces: Vec<Vec<u8>> = if bytes.len() <= 400 && self.rng.bool() {
            self.note(format!("{} bytes, one per message", bytes.len()));
            bytes.iter().map(|&b| vec![b]).collect()
        } else {
            let k = self.rng.usize(2..=16).min(bytes.len().max(1));
            let mut cuts: Vec<usize> = (0..k - 1).map(|_| self.rng.usize(0..=bytes.len())).collect();
            cuts.sort_unstable();
            let mut bounds = vec![0];
            bounds.extend(cuts);
            bounds.push(bytes.len());
            self.note(format!("{} bytes in {k} messages", bytes.len()));
            bounds.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
        };
        let msgs: Vec<Msg> = pieces
            .into_iter()
            .map(|p| {
                let mut m = self.msg(p, false);
                m.binary |= all_binary;
                m
            })
            .collect();
        self.writes(msgs)
    }

    fn batch(&mut self) -> Vec<Step> {
        let n = self.rng.usize(2..=25);
        let mut frames = Vec::new();
        for _ in 0..n {
            let f = if self.rng.u8(..10) < 3 { self.refused().0 } else { self.valid() };
            frames.push(f.render());
        }
        let groups = self.rng.usize(1..=3).min(n);
        self.note(format!("{n} frames in {groups} messages"));
        let mut payloads = vec![Vec::new(); groups];
        for (i, f) in frames.into_iter().enumerate() {
            if self.rng.u8(..6) == 0 {
                payloads[i * groups / n].extend_from_slice(b"\n");
            }
            payloads[i * groups / n].extend(f);
        }
        let msgs = payloads.into_iter().map(|p| self.msg(p, false)).collect();
        vec![Step::Write(msgs)]
    }

    /// A `SEND` of exactly `len` bytes, command to NUL.
    fn send_of(&mut self, destination: &str, len: usize, json: bool) -> Vec<u8> {
        let mut f = Frame::new("SEND").header("destination", destination);
        if json {
            f = f.header("content-type", "application/json");
        }
        let f = self.with_receipt(f, 90);
        let head = f.render().len();
        f.body(vec![b'x'; len.saturating_sub(head)]).render()
    }

    fn oversized(&mut self) -> Vec<Step> {
        let max = self.max;
        match self.rng.u8(..6) {
            0 => {
                let len = max + self.rng.usize(1..2000);
                self.note(format!("a SEND of {len} bytes in one message (limit {max})"));
                let bytes = self.send_of(&format!("/user/{SINK}"), len, false);
                vec![Step::Write(vec![Msg::new(bytes, false)])]
            }
            1 => {
                let len = max + self.rng.usize(1..2000);
                let k = self.rng.usize(2..=4);
                self.note(format!("a SEND of {len} bytes in {k} messages (limit {max})"));
                let bytes = self.send_of(&format!("/user/{SINK}"), len, false);
                let piece = len.div_ceil(k);
                let msgs = bytes.chunks(piece).map(|c| self.msg(c.to_vec(), false)).collect();
                self.writes(msgs)
            }
            2 => {
                let d = format!("{TOPIC}{BIG_ROOM}");
                let id = self.sub_id(&d);
                let sub = self.with_receipt(Frame::new("SUBSCRIBE").header("id", &id).header("destination", &d), 90);
                let json = self.rng.u8(..3) == 0;
                self.note(format!(
                    "SUBSCRIBE {d}, a SEND there of exactly {max} bytes{}",
                    if json { " (not JSON, as JSON)" } else { "" }
                ));
                let big = self.send_of(&d, max, json);
                let a = self.msg(sub.render(), false);
                vec![Step::Write(vec![a]), Step::Write(vec![Msg::new(big, false)])]
            }
            3 => {
                let declared = self.pick(&[max, max + 1, 10 * max, max - 20]);
                let f = Frame::new("SEND")
                    .header("destination", &format!("/user/{SINK}"))
                    .header("content-length", &declared.to_string())
                    .body("short");
                let f = self.with_receipt(f, 90);
                self.note(format!("content-length {declared} (limit {max}) with a 5-byte body"));
                vec![Step::Write(vec![self.msg(f.render(), false)])]
            }
            4 => {
                let len = max + self.rng.usize(1..3000);
                let mut f = Frame::new("SEND").header("destination", &format!("/user/{SINK}"));
                f.raw.push([&b"x-endless:"[..], &vec![b'e'; len]].concat());
                let bytes = f.render();
                let k = self.rng.usize(2..=5);
                self.note(format!("a header line of {len} bytes in {k} messages"));
                let msgs = bytes.chunks(bytes.len().div_ceil(k)).map(|c| self.msg(c.to_vec(), false)).collect();
                self.writes(msgs)
            }
            _ => {
                let f = Frame::new("SEND").header("destination", &format!("/user/{SINK}"));
                let f = self.with_receipt(f, 90);
                let head = f.clone().header("content-length", "00000").render().len();
                let body_len = max - head;
                let f = f.header("content-length", &format!("{body_len:05}")).body(vec![b'\0'; body_len]);
                self.note(format!("a SEND of exactly {max} bytes, its body all NULs by content-length"));
                vec![Step::Write(vec![Msg::new(f.render(), true)])]
            }
        }
    }

    fn flood(&mut self) -> Vec<Step> {
        let n = self.rng.usize(220..=420);
        let per = self.rng.usize(10..=40);
        self.note(format!("{n} SENDs with receipts in messages of {per}"));
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let r = self.receipt();
                Frame::new("SEND")
                    .header("destination", &format!("/user/{SINK}"))
                    .header("receipt", &r)
                    .body(format!("f{i}"))
                    .render()
            })
            .collect();
        let msgs = frames.chunks(per).map(|c| self.msg(c.concat(), false)).collect();
        vec![Step::Write(msgs)]
    }

    /// A handshake on a connection of its own: the upgrade, `CONNECT` in some form, frames
    /// pipelined behind it.
    fn connect(&mut self) -> (Upgrade, Vec<Step>) {
        let me = self.names.me.clone();
        let upgrade = match self.rng.u8(..12) {
            0..=3 => Upgrade { target: "/stomp".into(), protocols: None, status: 101, echo: None, user: None },
            4 | 5 => Upgrade {
                target: format!("/stomp?user={me}&device=fz"),
                protocols: None,
                status: 101,
                echo: None,
                user: Some(me.clone()),
            },
            6 | 7 => Upgrade {
                target: format!("/ws?user={me}"),
                protocols: Some("v12.stomp".into()),
                status: 101,
                echo: Some("v12.stomp"),
                user: Some(me.clone()),
            },
            8 | 9 => Upgrade {
                target: "/ws".into(),
                protocols: Some("v10.stomp, v11.stomp, v12.stomp".into()),
                status: 101,
                echo: Some("v12.stomp"),
                user: None,
            },
            10 => Upgrade {
                target: "/stomp".into(),
                protocols: Some("v11.stomp".into()),
                status: 101,
                echo: Some("v11.stomp"),
                user: None,
            },
            _ => Upgrade { target: "/stomp?user=a%20b".into(), protocols: None, status: 400, echo: None, user: None },
        };
        self.note(format!("upgrade {} {:?}", upgrade.target, upgrade.protocols));
        if upgrade.status != 101 {
            return (upgrade, Vec::new());
        }
        if self.rng.u8(..40) == 0 {
            let n = self.rng.usize(0..=3);
            self.note(format!("no CONNECT, {n} EOLs"));
            let eols = self.eols(n);
            let steps = if n == 0 { Vec::new() } else { vec![Step::Write(vec![self.msg(eols, false)])] };
            return (upgrade, steps);
        }
        let mut f = Frame::new(if self.rng.u8(..4) == 0 { "STOMP" } else { "CONNECT" });
        let version =
            self.pick(&[None, None, Some("1.2"), Some("1.0,1.1,1.2"), Some("1.1, 1.2 "), Some("1.0,1.1"), Some("2.0")]);
        if let Some(v) = version {
            f = f.header("accept-version", v);
        }
        let long = "l".repeat(129);
        let login = match self.rng.u8(..10) {
            0 => None,
            1 => Some(self.pick(&["a b", "", long.as_str(), "fz\\c1", "fz-0 "]).to_owned()),
            2 => Some(format!("fz-other-{}", self.rng.u8(..3))),
            _ => Some(me.clone()),
        };
        if let Some(l) = &login {
            f = f.header("login", l);
        }
        if self.rng.u8(..4) == 0 {
            f = f.header("passcode", "not-a-token");
        }
        let beats = self.pick(&[
            None,
            None,
            Some("0,0"),
            Some("1000,1000"),
            Some("10000, 0"),
            Some("1000"),
            Some("a,b"),
            Some("-1,0"),
            Some("1,2,3"),
        ]);
        if let Some(b) = beats {
            f = f.header("heart-beat", b);
        }
        if self.rng.bool() {
            f = f.header("host", "127.0.0.1:9");
        }
        if self.rng.u8(..15) == 0 {
            f = Frame::new("SEND").header("destination", &format!("/user/{SINK}")).body("before CONNECT");
        }
        self.note(format!("{} {:?}", f.command, f.headers));
        let mut flight = Vec::new();
        if self.rng.u8(..5) == 0 {
            flight.extend_from_slice(b"\n\r\n");
        }
        let mut connect = f.render();
        if self.rng.u8(..12) == 0 {
            let at = self.rng.usize(0..connect.len() - 2);
            connect.insert(at, 0);
            self.note(format!("a NUL in CONNECT at {at}"));
        }
        flight.extend(connect);
        let pipelined = if self.rng.bool() { self.rng.usize(1..=3) } else { 0 };
        for _ in 0..pipelined {
            let f = self.valid();
            self.describe(&f);
            flight.extend(f.render());
        }
        let pieces: Vec<Vec<u8>> = if flight.len() <= 200 && self.rng.u8(..4) == 0 {
            self.note("one byte per message");
            flight.iter().map(|&b| vec![b]).collect()
        } else {
            vec![flight]
        };
        let msgs: Vec<Msg> = pieces.into_iter().map(|p| self.msg(p, false)).collect();
        (upgrade, vec![Step::Write(msgs)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsfuzz::stomp::model::{End, Phase, View, predict};

    fn names() -> Names {
        Names { me: "fz-0".into(), users: vec!["fz-0".into(), "fz-1".into()], rooms: vec!["fz-lobby".into()] }
    }

    fn msgs(case: &Case) -> Vec<Msg> {
        case.steps
            .iter()
            .flat_map(|s| match s {
                Step::Write(m) => m.clone(),
                Step::Pause(_) => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn every_generator_runs_and_cases_repeat_from_their_seed() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..3000u64 {
            let case = generate(&mut Rng::with_seed(seed), &names(), 65536, "c0.0");
            let again = generate(&mut Rng::with_seed(seed), &names(), 65536, "c0.0");
            assert_eq!(case.steps, again.steps);
            assert_eq!(case.note, again.note);
            seen.insert(case.kind);
            assert_eq!(case.upgrade.is_some(), case.kind == Kind::StompConnect);
        }
        assert_eq!(seen.len(), WEIGHTS.len());
    }

    #[test]
    fn generators_produce_what_they_say() {
        let max = 65536;
        for seed in 0..3000u64 {
            let case = generate(&mut Rng::with_seed(seed), &names(), max, "c0.0");
            if case.upgrade.is_some() {
                continue;
            }
            let msgs = msgs(&case);
            let p = predict(Phase::Session(View::new("fz-0")), &msgs, max, case.flood);
            let note = &case.note;
            match case.kind {
                Kind::StompValid => {
                    assert!(matches!(p.end, End::Open(_) | End::Disconnect), "{note}: {:?}", p.end);
                    assert!(p.expected.iter().all(|e| !matches!(e.answer, crate::wsfuzz::stomp::model::Answer::Fault)));
                }
                Kind::StompOversized if note.contains("in one message (limit") => {
                    assert_eq!(p.end, End::Ws(1009), "{note}")
                }
                Kind::StompOversized if note.contains("messages (limit") || note.contains("header line of") => {
                    assert!(matches!(p.end, End::Malformed(..)), "{note}: {:?}", p.end)
                }
                Kind::StompOversized if note.contains("exactly") => {
                    assert!(matches!(p.end, End::Open(_)), "{note}: {:?}", p.end);
                    assert!(msgs.iter().all(|m| m.payload.len() <= max));
                }
                Kind::StompFlood => assert!(p.expected.len() >= 220, "{note}"),
                _ => {}
            }
            if case.kind != Kind::StompOversized {
                assert!(msgs.iter().all(|m| m.payload.len() <= max), "{note}");
            }
        }
    }

    #[test]
    fn messages_encode_as_websocket_frames() {
        let mut m = Msg::new(b"abcdef".to_vec(), false);
        m.mask = [0; 4];
        assert_eq!(m.encode(), [&[0x81, 0x86, 0, 0, 0, 0][..], b"abcdef"].concat());
        m.fragments = 2;
        m.binary = true;
        assert_eq!(m.encode(), [&[0x02, 0x83, 0, 0, 0, 0][..], b"abc", &[0x80, 0x83, 0, 0, 0, 0], b"def"].concat());
    }
}
