//! The WebSocket frame decoder (`ws::WebSocket::next`) on any bytes a client may send, compared
//! with a plain reference decoder of RFC 6455 written below.
//!
//! `WebSocket` reads from a `TcpStream`, so each input goes through a real loopback connection:
//! part of it as `read_ahead` (bytes read past the handshake), the rest written by the client,
//! which then shuts its side. Frames larger than the decoder's first read arrive in pieces, which
//! exercises the resumable parsing. The server side first writes a handshake response, as hyper
//! does before the upgrade.
//!
//! Invariants: the messages, pings, pongs and close codes, and the close code of a refusal, are
//! the reference's; text is valid UTF-8 (the decoder builds strings with `from_utf8_unchecked`);
//! every ping is answered with a pong of its payload and a close with a close of its code. The
//! decoder may refuse invalid text (1007) before the rest of its frame has arrived.
//!
//! Input layout: byte 0 picks the largest message, bytes 1-2 where the read-ahead ends.

#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchyard::ws::{Error, Incoming, WebSocket};
use tokio::io::AsyncWriteExt;

/// What the server writes before the WebSocket starts.
const HANDSHAKE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
const MAX_PAYLOADS: [usize; 6] = [0, 1, 125, 200, 5000, 65_536];

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap());
static LISTENER: LazyLock<TcpListener> = LazyLock::new(|| TcpListener::bind("127.0.0.1:0").unwrap());

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    /// Refused with this close code.
    Refused(u16),
    /// The input ended. `invalid_text`: inside a text frame whose bytes so far are not UTF-8.
    End {
        invalid_text: bool,
    },
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max_payload = MAX_PAYLOADS[usize::from(data[0]) % MAX_PAYLOADS.len()];
    let stream = &data[3..];
    let ahead = usize::from(u16::from_le_bytes([data[1], data[2]])) % (stream.len() + 1);

    let expected = reference(stream, max_payload);
    let (got, written) = decode(&stream[..ahead], &stream[ahead..], max_payload);

    // The real decoder does not hand out ping payloads; it answers them (checked below).
    let shown: Vec<Event> =
        expected.iter().map(|e| if let Event::Ping(_) = e { Event::Ping(Vec::new()) } else { e.clone() }).collect();
    let early_end = matches!(
        (got.last(), shown.last()),
        (Some(Event::Refused(1007)), Some(Event::End { invalid_text: true }))
            | (Some(Event::End { .. }), Some(Event::End { .. }))
    );
    let matched = if early_end { got.len() - 1 } else { got.len() };
    assert_eq!(got[..matched], shown[..shown.len().min(matched)], "max_payload {max_payload}");
    assert_eq!(got.len(), shown.len(), "max_payload {max_payload}: {got:?} vs {shown:?}");

    let mut replies = Vec::new();
    for event in &expected[..matched] {
        match event {
            Event::Ping(payload) => {
                replies.extend([0x8A, payload.len() as u8]);
                replies.extend_from_slice(payload);
            }
            Event::Close(None) => replies.extend([0x88, 0]),
            Event::Close(Some(code)) => {
                replies.extend([0x88, 2]);
                replies.extend(code.to_be_bytes());
            }
            _ => {}
        }
    }
    assert_eq!(written, replies, "the server's pongs and close replies");
});

/// Runs the real decoder: `ahead` as read-ahead, `rest` sent by the client. Answers what it
/// decoded and what it wrote back.
fn decode(ahead: &[u8], rest: &[u8], max_payload: usize) -> (Vec<Event>, Vec<u8>) {
    let mut client = TcpStream::connect(LISTENER.local_addr().unwrap()).unwrap();
    let (server, _) = LISTENER.accept().unwrap();
    client.write_all(rest).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    server.set_nonblocking(true).unwrap();
    RUNTIME.block_on(async {
        let mut io = tokio::net::TcpStream::from_std(server).unwrap();
        // As in the server, where hyper has written this on the socket before handing it over
        // (which also tells tokio the socket is writable, so replies go out at once).
        io.write_all(HANDSHAKE).await.unwrap();
        let mut ws = WebSocket::new(io, ahead, max_payload);
        let mut events = Vec::new();
        loop {
            let event = match ws.next().await {
                Ok(Incoming::Text(text)) => {
                    assert!(std::str::from_utf8(text.as_bytes()).is_ok(), "text that is not UTF-8: {text:?}");
                    Event::Text(text.into_bytes())
                }
                Ok(Incoming::Binary(data)) => Event::Binary(data),
                Ok(Incoming::Ping) => Event::Ping(Vec::new()),
                Ok(Incoming::Pong) => Event::Pong,
                Ok(Incoming::Close(code)) => Event::Close(code),
                Err(Error::Protocol(code, _)) => Event::Refused(code),
                Err(Error::Io(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
                    Event::End { invalid_text: false }
                }
            };
            let last = !matches!(event, Event::Text(_) | Event::Binary(_) | Event::Ping(_) | Event::Pong);
            events.push(event);
            if last {
                break;
            }
        }
        // What the server wrote is in the client's receive queue by now (loopback delivers
        // during the write); read it before the server side closes.
        client.set_nonblocking(true).unwrap();
        let mut written = Vec::new();
        let _ = client.read_to_end(&mut written);
        drop(ws);
        assert!(written.starts_with(HANDSHAKE), "{written:?}");
        (events, written.split_off(HANDSHAKE.len()))
    })
}

/// RFC 6455 §5 for frames from a client, one whole input at a time. Pings carry their payload
/// here (the real decoder answers it itself); the comparison ignores it.
fn reference(mut input: &[u8], max_payload: usize) -> Vec<Event> {
    let mut events = Vec::new();
    // A fragmented message in progress: whether it is text, and its bytes so far.
    let mut message: Option<(bool, Vec<u8>)> = None;
    loop {
        let event = match frame(input, message.as_ref(), max_payload) {
            Err(event) => event,
            Ok((fin, opcode, payload, size)) => {
                input = &input[size..];
                match opcode {
                    0x9 => Event::Ping(payload),
                    0xA => Event::Pong,
                    0x8 => close(&payload),
                    0x1 | 0x2 if message.is_some() => Event::Refused(1002),
                    0x1 if fin => match String::from_utf8(payload) {
                        Ok(text) => Event::Text(text.into_bytes()),
                        Err(_) => Event::Refused(1007),
                    },
                    0x2 if fin => Event::Binary(payload),
                    0x1 | 0x2 => {
                        if opcode == 0x1 && utf8(&payload) == Utf8::Invalid {
                            Event::Refused(1007)
                        } else {
                            message = Some((opcode == 0x1, payload));
                            continue;
                        }
                    }
                    _ => match message.take() {
                        None => Event::Refused(1002),
                        Some((text, mut data)) => {
                            data.extend_from_slice(&payload);
                            let bad = text && (utf8(&data) == Utf8::Invalid || (fin && utf8(&data) != Utf8::Valid));
                            if bad {
                                Event::Refused(1007)
                            } else if !fin {
                                message = Some((text, data));
                                continue;
                            } else if text {
                                Event::Text(data)
                            } else {
                                Event::Binary(data)
                            }
                        }
                    },
                }
            }
        };
        let last = !matches!(event, Event::Text(_) | Event::Binary(_) | Event::Ping(_) | Event::Pong);
        events.push(event);
        if last {
            return events;
        }
    }
}

/// The frame at the start of `input`: (fin, opcode, unmasked payload, bytes taken), or the event
/// that ends decoding there.
fn frame(
    input: &[u8],
    message: Option<&(bool, Vec<u8>)>,
    max_payload: usize,
) -> Result<(bool, u8, Vec<u8>, usize), Event> {
    let end = Event::End { invalid_text: false };
    let [b0, b1, ..] = *input else { return Err(end) };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b0 & 0x70 != 0 || !matches!(opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xA) || b1 & 0x80 == 0 {
        return Err(Event::Refused(1002));
    }
    let (len, header) = match b1 & 0x7F {
        126 => (u64::from(u16::from_be_bytes(input.get(2..4).ok_or(end)?.try_into().unwrap())), 4),
        127 => {
            let len = u64::from_be_bytes(input.get(2..10).ok_or(end)?.try_into().unwrap());
            if len >= 1 << 63 {
                return Err(Event::Refused(1002));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let control = opcode >= 0x8;
    if control && (!fin || len > 125) {
        return Err(Event::Refused(1002));
    }
    let so_far = message.map_or(0, |(_, data)| data.len() as u64);
    if !control && so_far + len > max_payload as u64 {
        return Err(Event::Refused(1009));
    }
    let Some(mask) = input.get(header..header + 4) else { return Err(Event::End { invalid_text: false }) };
    let body = &input[header + 4..];
    let available = body.len().min(len as usize);
    let payload: Vec<u8> = body[..available].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    if available < len as usize {
        // Incomplete: is what came of a text message already not UTF-8?
        let text = match (opcode, message) {
            (0x1, None) => Some(payload),
            (0x0, Some((true, data))) => Some([data.as_slice(), &payload].concat()),
            _ => None,
        };
        let invalid_text = text.is_some_and(|t| utf8(&t) == Utf8::Invalid);
        return Err(Event::End { invalid_text });
    }
    Ok((fin, opcode, payload, header + 4 + len as usize))
}

#[derive(PartialEq, Eq)]
enum Utf8 {
    Valid,
    /// Valid so far, but ends inside a character.
    Cut,
    Invalid,
}

fn utf8(bytes: &[u8]) -> Utf8 {
    match std::str::from_utf8(bytes) {
        Ok(_) => Utf8::Valid,
        Err(e) if e.error_len().is_none() => Utf8::Cut,
        Err(_) => Utf8::Invalid,
    }
}

/// A close frame's payload (RFC 6455 §5.5.1, §7.4).
fn close(payload: &[u8]) -> Event {
    match payload {
        [] => Event::Close(None),
        [_] => Event::Refused(1002),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                Event::Refused(1002)
            } else if std::str::from_utf8(reason).is_err() {
                Event::Refused(1007)
            } else {
                Event::Close(Some(code))
            }
        }
    }
}
