//! STOMP 1.2 frames over a raw WebSocket (PROTOCOL.md §7; RabbitMQ's Web-STOMP plugin speaks the
//! same): the client frames the tool sends, and a server message split into its frames.
//!
//! A frame is `COMMAND\n`, `name:value\n` headers, a blank line, the body and a NUL. Header names
//! and values write a backslash, a line feed, a carriage return and `:` as `\\`, `\n`, `\r` and
//! `\c` in every frame but `CONNECT` and `CONNECTED`. A body is `content-length` bytes when that
//! header is there, else it runs to the first NUL. End-of-line characters between frames are
//! heart-beats. Servers send one frame per WebSocket message, but the spec allows several, so
//! [`next_frame`] walks a message.
//!
//! Reading borrows from the message and allocates only for a header value that holds an escape:
//! the generator reads every delivery, and must not be what limits a run.

use std::borrow::Cow;
use std::fmt::Write;

/// One frame of a server message, borrowed from it: headers still escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub command: &'a str,
    /// The header lines, each ending with `\n` (a `\r` before it is part of no value).
    pub head: &'a str,
    pub body: &'a str,
}

impl<'a> RawFrame<'a> {
    /// The headers in order, as sent (escaped; see [`unescape`]).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.head.split_terminator('\n').filter_map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            line.split_once(':')
        })
    }

    /// The first header `name`, unescaped.
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        let escaped = self.command != "CONNECTED";
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| if escaped { unescape(v) } else { Cow::Borrowed(v) })
    }
}

/// Why a message could not be split into frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The first frame of `text` and what follows it; `None` when `text` holds nothing but
/// heart-beats.
pub fn next_frame(text: &str) -> Result<Option<(RawFrame<'_>, &str)>, Malformed> {
    let text = text.trim_start_matches(['\n', '\r']);
    if text.is_empty() {
        return Ok(None);
    }
    let eol = text.find('\n').ok_or(Malformed("no end of line after the command"))?;
    let command = text[..eol].strip_suffix('\r').unwrap_or(&text[..eol]);
    let after_command = eol + 1;
    // The head ends at the first empty line.
    let mut at = after_command;
    let mut length = None;
    loop {
        let rest = &text[at..];
        let line_end = rest.find('\n').ok_or(Malformed("no blank line after the headers"))?;
        let line = rest[..line_end].strip_suffix('\r').unwrap_or(&rest[..line_end]);
        at += line_end + 1;
        if line.is_empty() {
            break;
        }
        if length.is_none()
            && let Some(value) = line.strip_prefix("content-length:")
        {
            length = Some(value.parse::<usize>().map_err(|_| Malformed("content-length is not a number"))?);
        }
    }
    let head_end = at - if text[..at].ends_with("\r\n") { 2 } else { 1 };
    let head = &text[after_command..head_end];
    let rest = &text[at..];
    let body_len = match length {
        Some(n) => {
            if rest.as_bytes().get(n) != Some(&0) {
                return Err(Malformed("no NUL after content-length bytes"));
            }
            n
        }
        None => rest.find('\0').ok_or(Malformed("no NUL at the end of the frame"))?,
    };
    let body = rest.get(..body_len).ok_or(Malformed("content-length splits a character"))?;
    Ok(Some((RawFrame { command, head, body }, &rest[body_len + 1..])))
}

/// A header value as sent, unescaped (borrowed when it holds no escape).
pub fn unescape(value: &str) -> Cow<'_, str> {
    if !value.contains('\\') {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
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
            // Undefined escapes are an error in STOMP 1.2; keep them visible instead.
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// Appends `text` escaped as STOMP 1.2 asks (`\\`, `\n`, `\r`, `\c`).
pub(crate) fn push_escaped(out: &mut String, text: &str) {
    if !text.contains(['\\', '\n', '\r', ':']) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' => out.push_str("\\c"),
            c => out.push(c),
        }
    }
}

/// A client frame with escaped headers (every command but `CONNECT`) and `body`, with its
/// `content-length` when it has one.
pub fn frame(command: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut out = String::with_capacity(command.len() + 96 + body.len());
    out.push_str(command);
    out.push('\n');
    let escaped = command != "CONNECT" && command != "STOMP";
    for (name, value) in headers {
        if escaped {
            push_escaped(&mut out, name);
            out.push(':');
            push_escaped(&mut out, value);
        } else {
            out.push_str(name);
            out.push(':');
            out.push_str(value);
        }
        out.push('\n');
    }
    if !body.is_empty() {
        let _ = writeln!(out, "content-length:{}", body.len());
    }
    out.push('\n');
    out.push_str(body);
    out.push('\0');
    out
}

/// `CONNECT` for STOMP 1.2 without heart-beats, with `headers` (the identity) added.
pub fn connect(host: &str, identity: &[(&str, &str)]) -> String {
    let mut headers = vec![("accept-version", "1.2"), ("host", host), ("heart-beat", "0,0")];
    headers.extend_from_slice(identity);
    frame("CONNECT", &headers, "")
}

/// `SUBSCRIBE` to `destination` as subscription `id`, answered by `RECEIPT` `receipt`; `since`
/// is Switchyard's catch-up point.
pub fn subscribe(id: &str, destination: &str, receipt: &str, since: Option<u64>) -> String {
    let since = since.map(|s| s.to_string());
    let mut headers = vec![("id", id), ("destination", destination), ("receipt", receipt)];
    if let Some(s) = &since {
        headers.push(("since", s));
    }
    frame("SUBSCRIBE", &headers, "")
}

/// `SEND` of JSON `body` to `destination`, answered by `RECEIPT` `receipt`.
pub fn send(destination: &str, receipt: u64, body: &str) -> String {
    let receipt = receipt.to_string();
    let headers = [("destination", destination), ("content-type", "application/json"), ("receipt", &receipt[..])];
    frame("SEND", &headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames() {
        assert_eq!(
            connect("switchyard", &[("login", "u:1")]),
            "CONNECT\naccept-version:1.2\nhost:switchyard\nheart-beat:0,0\nlogin:u:1\n\n\0"
        );
        assert_eq!(
            subscribe("7", "/topic/q:r1", "7", Some(3)),
            "SUBSCRIBE\nid:7\ndestination:/topic/q\\cr1\nreceipt:7\nsince:3\n\n\0"
        );
        let body = r#"{"t":1,"n":2,"p":3}"#;
        let send = send("/user/bo", 12, body);
        assert_eq!(
            send,
            format!(
                "SEND\ndestination:/user/bo\ncontent-type:application/json\nreceipt:12\ncontent-length:{}\n\n{body}\0",
                body.len()
            )
        );
        // The tool's frames read back as the server would read them.
        let (f, rest) = next_frame(&send).unwrap().unwrap();
        assert_eq!((f.command, f.body, rest), ("SEND", body, ""));
        assert_eq!(f.header("receipt").as_deref(), Some("12"));
    }

    #[test]
    fn escapes_both_ways() {
        let mut out = String::new();
        push_escaped(&mut out, "a:b\\c\nd\re");
        assert_eq!(out, "a\\cb\\\\c\\nd\\re");
        assert_eq!(unescape(&out), "a:b\\c\nd\re");
        assert!(matches!(unescape("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn splits_a_message_into_frames() {
        let two = "\nMESSAGE\nsubscription:1\nstream:room\\cr\ncontent-length:4\n\nab\0c\0\n\
                   RECEIPT\r\nreceipt-id:9\r\n\r\n\0\n";
        let (a, rest) = next_frame(two).unwrap().unwrap();
        assert_eq!((a.command, a.body), ("MESSAGE", "ab\0c"));
        assert_eq!(a.header("stream").as_deref(), Some("room:r"));
        assert_eq!(a.header("nope"), None);
        let (b, rest) = next_frame(rest).unwrap().unwrap();
        assert_eq!((b.command, b.body), ("RECEIPT", ""));
        assert_eq!(b.header("receipt-id").as_deref(), Some("9"));
        assert_eq!(next_frame(rest), Ok(None));
        // Without content-length the body runs to the NUL; the first of a repeated header wins.
        let (c, _) = next_frame("ERROR\nmessage:a\nmessage:b\n\nbad\0").unwrap().unwrap();
        assert_eq!((c.body, c.header("message").as_deref()), ("bad", Some("a")));
        // CONNECTED is not escaped.
        let (d, _) = next_frame("CONNECTED\nserver:x\\c\n\n\0").unwrap().unwrap();
        assert_eq!(d.header("server").as_deref(), Some("x\\c"));
        assert_eq!(next_frame("\n\r\n"), Ok(None));
    }

    #[test]
    fn refuses_broken_frames() {
        assert!(next_frame("MESSAGE").is_err());
        assert!(next_frame("MESSAGE\nx:y\n").is_err());
        assert!(next_frame("MESSAGE\n\nbody").is_err());
        assert!(next_frame("MESSAGE\ncontent-length:9\n\nshort\0").is_err());
        assert!(next_frame("MESSAGE\ncontent-length:x\n\n\0").is_err());
        assert!(next_frame("MESSAGE\ncontent-length:2\n\nabc\0").is_err());
    }
}
