//! The STOMP frame decoder (`stomp::frame::Decoder`) on any bytes a client may send, pushed in
//! pieces cut where the input says, as WebSocket messages would bring them.
//!
//! Invariants: the items (frames, heart-beats, and the refusal that ends them) and the bytes
//! left pending are the same whatever the pieces, compared with one push of everything. Once
//! `next` answers `Ok(None)`, the decoder holds at most `max_frame` bytes (1, a CR, when that is
//! more), in a buffer at most twice that, and no buffer at all when nothing is pending. A
//! refusal is answered again and frees everything. Every frame has at most 64 headers, no NUL
//! and in `CONNECT` / `STOMP` no CR, LF or name colon in them, and a `content-length` equal to
//! its body's length or a body without NUL; written back with `write_frame` (adding a
//! `content-length` when it has none and room for it) it decodes to the same frame.
//!
//! Input layout: byte 0 picks `max_frame`; byte 1 how many piece lengths follow (none: one
//! byte at a time), each byte a length of 1-256, used in turn until the stream ends; then the
//! stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::stomp::frame::{Command, Decoder, Frame, FrameError, Item, MAX_HEADERS, write_frame};

const MAX_FRAMES: [usize; 8] = [0, 1, 16, 64, 100, 256, 1024, 65_536];

fuzz_target!(|data: &[u8]| {
    let [pick, count, rest @ ..] = data else { return };
    let max_frame = MAX_FRAMES[usize::from(*pick) % MAX_FRAMES.len()];
    let count = usize::from(*count % 16).min(rest.len());
    let (lengths, stream) = rest.split_at(count);
    let lengths: Vec<usize> =
        if lengths.is_empty() { vec![1] } else { lengths.iter().map(|&b| usize::from(b) + 1).collect() };

    let whole = decode(stream, max_frame, &[stream.len().max(1)]);
    let pieces = decode(stream, max_frame, &lengths);
    assert_eq!(pieces, whole, "max_frame {max_frame}, pieces of {lengths:?}");

    for item in &whole.0 {
        if let Ok(Item::Frame(frame)) = item {
            check_frame(frame);
        }
    }
});

/// Pushes `stream` in pieces of `lengths` in turn, taking every item after each push: the items
/// up to the first refusal, and how many bytes are left pending.
fn decode(stream: &[u8], max_frame: usize, lengths: &[usize]) -> (Vec<Result<Item, FrameError>>, usize) {
    let mut decoder = Decoder::new(max_frame);
    let mut items = Vec::new();
    let mut rest = stream;
    for &length in lengths.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, after) = rest.split_at(length.min(rest.len()));
        rest = after;
        decoder.push(piece);
        loop {
            match decoder.next() {
                Ok(Some(item)) => items.push(Ok(item)),
                Ok(None) => break,
                Err(error) => {
                    decoder.push(b"\nSEND\n\n\0");
                    assert_eq!(decoder.next(), Err(error), "a refusal is answered again");
                    assert_eq!((decoder.buffered(), decoder.capacity()), (0, 0), "a refused decoder holds nothing");
                    items.push(Err(error));
                    return (items, 0);
                }
            }
        }
        let pending = decoder.buffered();
        assert!(pending <= max_frame.max(1), "{pending} bytes pending, max_frame {max_frame}");
        let capacity = decoder.capacity();
        assert!(capacity <= 2 * max_frame.max(8), "a buffer of {capacity} for {pending} bytes");
        assert!(pending > 0 || capacity == 0, "an idle decoder holds a buffer of {capacity}");
    }
    (items, decoder.buffered())
}

fn check_frame(frame: &Frame) {
    assert!(frame.headers.len() <= MAX_HEADERS);
    let escaped = !matches!(frame.command, Command::Connect | Command::Stomp);
    for (name, value) in &frame.headers {
        assert!(!name.is_empty());
        assert!(!name.contains('\0') && !value.contains('\0'), "{name:?}: {value:?}");
        if !escaped {
            assert!(!name.contains([':', '\r', '\n']) && !value.contains(['\r', '\n']), "{name:?}: {value:?}");
        }
    }
    match frame.headers.get("content-length") {
        Some(length) => assert_eq!(length.parse::<usize>(), Ok(frame.body.len())),
        None => assert!(!frame.body.contains(&0)),
    }

    let length = frame.body.len().to_string();
    let mut headers: Vec<(&str, &str)> = frame.headers.iter().collect();
    if frame.headers.get("content-length").is_none() && headers.len() < MAX_HEADERS {
        headers.push(("content-length", &length));
    }
    let mut bytes = Vec::new();
    write_frame(&mut bytes, frame.command.as_str(), &headers, &frame.body);
    let mut decoder = Decoder::new(usize::MAX);
    decoder.push(&bytes);
    let again = match decoder.next() {
        Ok(Some(Item::Frame(again))) => again,
        other => panic!("{frame:?} written as {:?} decodes to {other:?}", String::from_utf8_lossy(&bytes)),
    };
    assert_eq!(again.command, frame.command);
    assert_eq!(again.headers.iter().collect::<Vec<_>>(), headers);
    assert_eq!(again.body, frame.body);
    assert_eq!((decoder.next(), decoder.buffered()), (Ok(None), 0));
}
