use super::*;

const MAX: usize = 1024;

/// Pushes `bytes` in pieces of `piece` bytes, taking every item after each push, and answers
/// the items up to the first refusal, then what is left buffered.
fn decode_in_pieces(bytes: &[u8], max_frame: usize, piece: usize) -> (Vec<Result<Item, FrameError>>, usize) {
    let mut decoder = Decoder::new(max_frame);
    let mut items = Vec::new();
    for chunk in bytes.chunks(piece.max(1)) {
        decoder.push(chunk);
        loop {
            match decoder.next() {
                Ok(Some(item)) => items.push(Ok(item)),
                Ok(None) => break,
                Err(error) => {
                    items.push(Err(error));
                    return (items, decoder.buffered());
                }
            }
        }
    }
    (items, decoder.buffered())
}

fn decode(bytes: &[u8]) -> Vec<Result<Item, FrameError>> {
    decode_in_pieces(bytes, MAX, bytes.len()).0
}

/// The single frame `bytes` decode to.
fn only_frame(bytes: &[u8]) -> Frame {
    match &decode(bytes)[..] {
        [Ok(Item::Frame(frame))] => frame.clone(),
        other => panic!("{} decoded to {other:?}", String::from_utf8_lossy(bytes)),
    }
}

/// The refusal `bytes` end in.
fn refusal(bytes: &[u8], max_frame: usize) -> FrameError {
    match decode_in_pieces(bytes, max_frame, bytes.len()).0.pop() {
        Some(Err(error)) => error,
        other => panic!("{} was not refused: {other:?}", String::from_utf8_lossy(bytes)),
    }
}

fn headers(frame: &Frame) -> Vec<(&str, &str)> {
    frame.headers.iter().collect()
}

/// Frames of every kind: LF and CRLF lines, heart-beats, escapes, unescaped CONNECT, a body
/// with NULs under content-length, an empty body.
const MIXED: &[u8] = b"\r\nCONNECT\r\naccept-version:1.2\r\nhost:a:b\r\n\r\n\0\n\n\
SUBSCRIBE\nid:0\ndestination:/topic/r\\c1\n\n\0\r\n\
SEND\ndestination:/user/bob\ncontent-length:5\n\nh\0\0i\n\0\
SEND\r\ndestination:/topic/r\\c1\r\nk\\\\ey:v\\nw\r\n\r\nhello\0\
DISCONNECT\nreceipt:77\n\n\0\n";

#[test]
fn several_frames_in_one_push_come_out_one_at_a_time() {
    let mut decoder = Decoder::new(MAX);
    decoder.push(b"SEND\ndestination:/topic/a\n\nhello\0SUBSCRIBE\nid:1\n\n\0DISCONNECT\n\n\0");
    let Ok(Some(Item::Frame(send))) = decoder.next() else { panic!("no SEND") };
    assert_eq!(
        (send.command, headers(&send), &send.body[..]),
        (Command::Send, vec![("destination", "/topic/a")], &b"hello"[..])
    );
    let Ok(Some(Item::Frame(subscribe))) = decoder.next() else { panic!("no SUBSCRIBE") };
    assert_eq!(
        (subscribe.command, subscribe.headers.get("id"), subscribe.body.len()),
        (Command::Subscribe, Some("1"), 0)
    );
    let Ok(Some(Item::Frame(disconnect))) = decoder.next() else { panic!("no DISCONNECT") };
    assert_eq!((disconnect.command, disconnect.headers.len()), (Command::Disconnect, 0));
    assert_eq!(decoder.next(), Ok(None));
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn a_stream_split_anywhere_decodes_as_when_whole() {
    let (whole, left) = decode_in_pieces(MIXED, MAX, MIXED.len());
    assert_eq!(left, 0);
    let shown: Vec<String> = whole
        .iter()
        .map(|item| match item {
            Ok(Item::Frame(f)) => format!("{} {:?} {:?}", f.command.as_str(), headers(f), f.body),
            other => format!("{other:?}"),
        })
        .collect();
    let beat = "Ok(HeartBeat)";
    let expected = [
        beat,
        r#"CONNECT [("accept-version", "1.2"), ("host", "a:b")] b"""#,
        beat,
        beat,
        r#"SUBSCRIBE [("id", "0"), ("destination", "/topic/r:1")] b"""#,
        beat,
        r#"SEND [("destination", "/user/bob"), ("content-length", "5")] b"h\0\0i\n""#,
        r#"SEND [("destination", "/topic/r:1"), ("k\\ey", "v\nw")] b"hello""#,
        r#"DISCONNECT [("receipt", "77")] b"""#,
        beat,
    ];
    assert_eq!(shown, expected);
    assert_eq!(decode_in_pieces(MIXED, MAX, 1), (whole.clone(), 0), "one byte at a time");
    for cut in 1..MIXED.len() {
        let mut decoder = Decoder::new(MAX);
        let mut items = Vec::new();
        for piece in [&MIXED[..cut], &MIXED[cut..]] {
            decoder.push(piece);
            while let Some(item) = decoder.next().unwrap() {
                items.push(Ok(item));
            }
        }
        assert_eq!(items, whole, "cut at {cut}");
    }
}

#[test]
fn lf_and_crlf_lines_decode_alike() {
    let lf = only_frame(b"SEND\ndestination:/a\nx:y\n\nbody\r\n\0");
    let crlf = only_frame(b"SEND\r\ndestination:/a\r\nx:y\r\n\r\nbody\r\n\0");
    let mixed = only_frame(b"SEND\r\ndestination:/a\nx:y\r\n\nbody\r\n\0");
    assert_eq!(headers(&lf), [("destination", "/a"), ("x", "y")]);
    assert_eq!(lf.body, "body\r\n", "the body is kept byte for byte");
    assert_eq!(crlf, lf);
    assert_eq!(mixed, lf);
}

#[test]
fn every_eol_between_frames_is_a_heart_beat() {
    let items = decode(b"\n\r\n\nSEND\nd:1\n\n\0\n\r\n\n\nDISCONNECT\n\n\0\r");
    let beat = |n| vec![Item::HeartBeat; n];
    let kinds: Vec<Item> = items.into_iter().map(Result::unwrap).collect();
    assert_eq!(kinds[..3], beat(3)[..]);
    assert!(matches!(&kinds[3], Item::Frame(f) if f.command == Command::Send));
    assert_eq!(kinds[4..8], beat(4)[..]);
    assert!(matches!(&kinds[8], Item::Frame(f) if f.command == Command::Disconnect));
    assert_eq!(kinds.len(), 9);

    // A CR may start a heart-beat: it waits for the next byte.
    let mut decoder = Decoder::new(MAX);
    decoder.push(b"\r");
    assert_eq!((decoder.next(), decoder.buffered()), (Ok(None), 1));
    decoder.push(b"\n");
    assert_eq!((decoder.next(), decoder.next(), decoder.capacity()), (Ok(Some(Item::HeartBeat)), Ok(None), 0));
}

#[test]
fn escapes_decode_in_every_frame_but_connect_and_stomp() {
    let send = only_frame(b"SEND\na\\cb\\\\c:\\r\\n\\c\\\\x\n\n\0");
    assert_eq!(headers(&send), [("a:b\\c", "\r\n:\\x")]);
    for command in ["CONNECT", "STOMP"] {
        let frame = only_frame(format!("{command}\nlogin:a\\cb\npasscode:x:y\\n\n\n\0").as_bytes());
        assert_eq!(headers(&frame), [("login", "a\\cb"), ("passcode", "x:y\\n")], "{command}");
    }
    // Undefined escapes (a tab, a letter, a backslash at the end of a name or value) are refused;
    // only in frames that escape.
    for line in ["a:\\t", "a:x\\", "a\\:b", "a:\\C", "\\x:y"] {
        let bytes = format!("SEND\n{line}\n\n\0");
        assert_eq!(refusal(bytes.as_bytes(), MAX), FrameError::BadEscape, "{line}");
        assert!(decode(format!("CONNECT\n{line}\n\n\0").as_bytes())[0].is_ok(), "{line}");
    }
}

#[test]
fn the_first_of_repeated_headers_wins_and_all_are_kept() {
    let frame = only_frame(b"SEND\ndestination:/first\nx:1\ndestination:/second\n\n\0");
    assert_eq!(frame.headers.get("destination"), Some("/first"));
    assert_eq!(frame.headers.get("x"), Some("1"));
    assert_eq!(frame.headers.get("missing"), None);
    assert_eq!(headers(&frame), [("destination", "/first"), ("x", "1"), ("destination", "/second")]);
    // A value may be empty and hold colons; names are exact, case included.
    let frame = only_frame(b"SEND\nempty:\nurl:http://h:1/p\n\n\0");
    assert_eq!((frame.headers.get("empty"), frame.headers.get("url")), (Some(""), Some("http://h:1/p")));
    assert_eq!(frame.headers.get("URL"), None);
}

#[test]
fn content_length_bodies_may_hold_nul_bytes() {
    let frame = only_frame(b"SEND\ncontent-length:6\n\n\0a\0\0b\0\0");
    assert_eq!(frame.body, &b"\0a\0\0b\0"[..]);
    // Only the first content-length counts; a later one may even be invalid.
    let frame = only_frame(b"SEND\ncontent-length:2\ncontent-length:x\n\n\0\0\0");
    assert_eq!(frame.body, &b"\0\0"[..]);
    assert_eq!(only_frame(b"SEND\ncontent-length:0\n\n\0").body.len(), 0);
    assert_eq!(only_frame(b"SEND\ncontent-length:003\n\nabc\0").body, "abc");
}

#[test]
fn content_length_must_end_at_the_nul() {
    // The body is longer than announced: the byte after it is not the NUL.
    assert_eq!(refusal(b"SEND\ncontent-length:3\n\nabcd\0", MAX), FrameError::NoNulAfterBody);
    // Shorter: the decoder waits for the rest, the NUL included.
    let mut decoder = Decoder::new(MAX);
    decoder.push(b"SEND\ncontent-length:5\n\nab\0");
    assert_eq!(decoder.next(), Ok(None));
    decoder.push(b"d");
    assert_eq!(decoder.next(), Ok(None));
    decoder.push(b"e");
    assert_eq!(decoder.next(), Ok(None));
    decoder.push(b"\0");
    let Ok(Some(Item::Frame(frame))) = decoder.next() else { panic!("not complete") };
    assert_eq!(frame.body, &b"ab\0de"[..]);
}

#[test]
fn content_length_must_be_a_plain_decimal() {
    for value in ["", "-1", "+1", " 1", "1 ", "1a", "0x10", "½"] {
        let bytes = format!("SEND\ncontent-length:{value}\n\n\0");
        assert_eq!(refusal(bytes.as_bytes(), MAX), FrameError::BadContentLength, "{value:?}");
    }
}

#[test]
fn a_content_length_beyond_the_limit_is_refused_before_its_body() {
    assert_eq!(refusal(b"SEND\ncontent-length:1025\n", MAX), FrameError::TooLarge);
    assert_eq!(refusal(b"SEND\ncontent-length:99999999999999999999999999\n", MAX), FrameError::TooLarge);
    // One that fits the limit alone but not with the headers before it: at the blank line.
    let head = b"SEND\ncontent-length:1000\n\n";
    assert_eq!(refusal(head, MAX), FrameError::TooLarge);
    let fits = MAX - head.len() - 1;
    let mut exact = format!("SEND\ncontent-length:{fits:04}\n\n").into_bytes();
    exact.extend(std::iter::repeat_n(b'x', fits));
    exact.push(0);
    assert_eq!(exact.len(), MAX);
    assert_eq!(only_frame(&exact).body.len(), fits, "a frame of exactly max_frame bytes fits");
}

#[test]
fn a_frame_without_its_nul_stays_pending_until_it_is_too_large() {
    let mut decoder = Decoder::new(64);
    decoder.push(b"SEND\ndestination:/a\n\n");
    assert_eq!(decoder.next(), Ok(None));
    let so_far = decoder.buffered();
    decoder.push(&vec![b'x'; 64 - so_far]);
    assert_eq!((decoder.next(), decoder.buffered()), (Ok(None), 64), "64 bytes may still end in a NUL");
    decoder.push(b"x");
    assert_eq!(decoder.next(), Err(FrameError::TooLarge));
    // From then on it keeps refusing and holds nothing.
    decoder.push(b"\0SEND\n\n\0");
    assert_eq!((decoder.next(), decoder.capacity()), (Err(FrameError::TooLarge), 0));
}

#[test]
fn endless_command_and_header_lines_are_too_large() {
    let (items, left) = decode_in_pieces(&[b'S'; 100], 64, 7);
    assert_eq!((items, left), (vec![Err(FrameError::TooLarge)], 0));
    let mut header = b"SEND\nx:".to_vec();
    header.extend([b'y'; 100]);
    let (items, _) = decode_in_pieces(&header, 64, 1);
    assert_eq!(items, [Err(FrameError::TooLarge)]);
    // Whatever the split, the input held is never above the limit.
    let mut decoder = Decoder::new(64);
    for byte in &header[..64] {
        decoder.push(&[*byte]);
        assert_eq!(decoder.next(), Ok(None));
        assert!(decoder.buffered() <= 64);
    }
}

#[test]
fn sixty_four_headers_are_accepted_and_sixty_five_refused() {
    let frame = |n: usize| {
        let mut bytes = b"SEND\n".to_vec();
        for i in 0..n {
            bytes.extend(format!("h{i}:{i}\n").as_bytes());
        }
        bytes.extend(b"\n\0");
        bytes
    };
    assert_eq!(only_frame(&frame(MAX_HEADERS)).headers.len(), MAX_HEADERS);
    assert_eq!(refusal(&frame(MAX_HEADERS + 1), MAX), FrameError::TooManyHeaders);
    // Refused at the 65th line, not at the end of the frame.
    let mut open = frame(MAX_HEADERS + 1);
    open.truncate(open.len() - 2);
    assert_eq!(refusal(&open, MAX), FrameError::TooManyHeaders);
}

#[test]
fn malformed_header_lines_are_refused() {
    let cases: [(&[u8], FrameError); 7] = [
        (b"SEND\nno colon\n\n\0", FrameError::NoColon),
        (b"SEND\n:value\n\n\0", FrameError::EmptyHeaderName),
        (b"SEND\na:b\rc\n\n\0", FrameError::CarriageReturn),
        (b"CONNECT\na:b\r\r\n\r\n\0", FrameError::CarriageReturn),
        (b"SEND\na:\xFF\xFE\n\n\0", FrameError::InvalidUtf8),
        (b"SEND\n\xC3:b\n\n\0", FrameError::InvalidUtf8),
        (b"SEND\na:b\0\n\n\0", FrameError::NulInHeaders),
    ];
    for (bytes, expected) in cases {
        assert_eq!(refusal(bytes, MAX), expected, "{}", String::from_utf8_lossy(bytes));
    }
    // UTF-8 beyond ASCII is fine.
    assert_eq!(only_frame("SEND\nnåme:välue 😀\n\n\0".as_bytes()).headers.get("nåme"), Some("välue 😀"));
}

#[test]
fn only_client_commands_are_known() {
    for command in Command::ALL {
        let frame = only_frame(format!("{}\n\n\0", command.as_str()).as_bytes());
        assert_eq!(frame.command, command);
    }
    for line in ["MESSAGE", "CONNECTED", "ERROR", "RECEIPT", "send", "SEND ", " SEND", "SENDX", "\rSEND"] {
        let bytes = format!("{line}\n\n\0");
        assert_eq!(refusal(bytes.as_bytes(), MAX), FrameError::UnknownCommand, "{line:?}");
    }
    assert_eq!(refusal(b"\0", MAX), FrameError::NulInHeaders);
    assert_eq!(refusal(b"SEND\0", MAX), FrameError::NulInHeaders);
}

#[test]
fn the_decoder_holds_no_memory_between_frames() {
    assert_eq!(size_of::<Decoder>(), 16, "a pointer while idle, and the limit and the refusal");
    let mut decoder = Decoder::new(MAX);
    assert_eq!(decoder.capacity(), 0);
    decoder.push(b"SEND\nd:1\n\nhi\0");
    assert!(decoder.capacity() > 0);
    assert!(matches!(decoder.next(), Ok(Some(Item::Frame(_)))));
    assert_eq!(decoder.capacity(), 0, "taking the last complete frame frees the buffer");
    assert_eq!(decoder.next(), Ok(None));
    assert!(decoder.input.is_none(), "and the input's state goes once nothing is left");

    // A frame left incomplete behind complete ones moves to a buffer of its own size, instead of
    // keeping theirs alive: its bytes are no longer right after the items in memory.
    decoder.push(&[b"SEND\n\n".to_vec(), vec![b'x'; 500], b"\0\n\nSEND\nd:".to_vec()].concat());
    let Ok(Some(Item::Frame(frame))) = decoder.next() else { panic!("no frame") };
    assert_eq!(decoder.next(), Ok(Some(Item::HeartBeat)));
    assert_eq!(decoder.next(), Ok(Some(Item::HeartBeat)));
    let after_items = frame.body.as_ptr() as usize + frame.body.len() + 3;
    let buf = |decoder: &Decoder| decoder.input.as_ref().expect("input under way").buf.as_ptr() as usize;
    assert_eq!(buf(&decoder), after_items, "not compacted before Ok(None)");
    assert_eq!(decoder.next(), Ok(None));
    assert_ne!(buf(&decoder), after_items, "still in the items' allocation");
    assert_eq!((decoder.buffered(), decoder.capacity()), (7, 7));
    decoder.push(b"1\n\n\0");
    assert!(matches!(decoder.next(), Ok(Some(Item::Frame(_)))));
    assert_eq!((decoder.capacity(), decoder.next()), (0, Ok(None)));
    assert!(decoder.input.is_none());
}

#[test]
fn written_frames_decode_to_what_was_written() {
    const PIECES: [&str; 12] = ["a", "Z", "0", "-", " ", ":", "\\", "\n", "\r", "\\c", "é", "😀"];
    fn text(rng: &mut fastrand::Rng, min: usize) -> String {
        (0..rng.usize(min..8)).map(|_| PIECES[rng.usize(..PIECES.len())]).collect()
    }
    let mut rng = fastrand::Rng::with_seed(6455);
    for case in 0..500 {
        let owned: Vec<(String, String)> =
            (0..rng.usize(..6)).map(|_| (text(&mut rng, 1), text(&mut rng, 0))).collect();
        let mut body: Vec<u8> = (0..rng.usize(..40)).map(|_| rng.u8(..)).collect();
        let length = body.len().to_string();
        let mut sent: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        if rng.bool() {
            sent.push(("content-length", &length));
        } else {
            body.retain(|&b| b != 0);
        }
        let mut bytes = Vec::new();
        write_frame(&mut bytes, "SEND", &sent, &body);
        let frame = only_frame(&bytes);
        assert_eq!(frame.command, Command::Send);
        assert_eq!(headers(&frame), sent, "case {case}: {}", String::from_utf8_lossy(&bytes));
        assert_eq!(frame.body, body, "case {case}");
    }
}

#[test]
fn connect_and_connected_headers_are_written_unescaped() {
    let mut bytes = Vec::new();
    write_frame(&mut bytes, "CONNECTED", &[("version", "1.2"), ("server", "switchyard:1\\x")], b"");
    assert_eq!(bytes, b"CONNECTED\nversion:1.2\nserver:switchyard:1\\x\n\n\0");
    bytes.clear();
    write_frame(&mut bytes, "CONNECT", &[("host", "a:b\\c")], b"");
    assert_eq!(only_frame(&bytes).headers.get("host"), Some("a:b\\c"));
    bytes.clear();
    write_frame(&mut bytes, "MESSAGE", &[("a:b", "c\\d\ne\rf")], b"{}");
    assert_eq!(bytes, b"MESSAGE\na\\cb:c\\\\d\\ne\\rf\n\n{}\0");
}

#[test]
fn frames_built_in_pieces_match_whole_ones() {
    let mut whole = Vec::new();
    write_frame(&mut whole, "MESSAGE", &[("subscription", "sub:1"), ("destination", "/topic/r")], b"hi");
    let mut pieces = b"MESSAGE\n".to_vec();
    write_header(&mut pieces, "subscription", "sub:1");
    write_header(&mut pieces, "destination", "/topic/r");
    pieces.extend(b"\nhi\0");
    assert_eq!(pieces, whole);
}

#[test]
fn refusals_read_as_error_messages() {
    let all = [
        FrameError::TooLarge,
        FrameError::TooManyHeaders,
        FrameError::UnknownCommand,
        FrameError::NoColon,
        FrameError::EmptyHeaderName,
        FrameError::CarriageReturn,
        FrameError::BadEscape,
        FrameError::InvalidUtf8,
        FrameError::BadContentLength,
        FrameError::NoNulAfterBody,
        FrameError::NulInHeaders,
    ];
    for error in all {
        let message = error.to_string();
        assert!(!message.is_empty() && message.len() < 60, "{message:?}");
        assert_eq!(message, message.to_lowercase(), "lower case");
        assert!(!message.contains(['\n', '\r', ':']), "{message:?} fits a header value as it is");
    }
}
