//! A minimal HTTP/1.1 client for the server API: keep-alive connections that pipeline requests
//! (several written before the first answer is read), responses read in order.
//!
//! Responses must carry `Content-Length` (axum's JSON answers do); a chunked answer is refused
//! as an error rather than misread.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// An API base URL (`http://host:port[/prefix]`).
#[derive(Clone, Debug)]
pub struct HttpBase {
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub authority: String,
    /// Path before `/api/v1/...`, without a trailing slash.
    pub prefix: String,
}

impl HttpBase {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let addr = crate::net::resolve(url)?;
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        anyhow::ensure!(uri.scheme_str() == Some("http"), "{url}: the API base must be http://");
        let authority = uri.authority().context("no host")?.as_str().to_string();
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self { addr, authority, prefix })
    }

    /// A complete `POST {prefix}{path}` request with a JSON body.
    pub fn post(&self, path: &str, api_key: Option<&str>, body: &str, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(
            out,
            "POST {}{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.prefix,
            path,
            self.authority,
            body.len()
        );
        if let Some(key) = api_key {
            let _ = write!(out, "Authorization: Bearer {key}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
    }
}

/// One response: status and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: bytes::Bytes,
}

/// Reads responses one after another from a connection.
pub struct ResponseReader<R> {
    reader: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> ResponseReader<R> {
    pub fn new(reader: R) -> Self {
        Self { reader, buf: BytesMut::with_capacity(16 * 1024) }
    }

    pub async fn next(&mut self) -> std::io::Result<Response> {
        loop {
            if let Some((head_len, status, body_len)) = parse_head(&self.buf)?
                && self.buf.len() >= head_len + body_len
            {
                self.buf.advance(head_len);
                let body = self.buf.split_to(body_len).freeze();
                return Ok(Response { status, body });
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// `(head length, status, body length)` once the head is complete.
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(usize, u16, usize)>> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("bad response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut body_len = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
            body_len = Some(v.ok_or_else(|| invalid("bad content-length"))?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked responses are not supported"));
        }
    }
    let body_len = match (status, body_len) {
        (_, Some(n)) => n,
        (100..=199 | 204 | 304, None) => 0,
        _ => return Err(invalid("response without content-length")),
    };
    Ok(Some((head_len, status, body_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_post() {
        let base = HttpBase::parse("http://127.0.0.1:9100").unwrap();
        let mut out = Vec::new();
        base.post("/api/v1/rooms/r1/messages", Some("secret-key"), r#"{"body":1}"#, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "POST /api/v1/rooms/r1/messages HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n\
             Content-Type: application/json\r\nContent-Length: 10\r\n\
             Authorization: Bearer secret-key\r\n\r\n{\"body\":1}"
        );
        let prefixed = HttpBase::parse("http://localhost:1/base/").unwrap();
        assert_eq!(prefixed.prefix, "/base");
        assert!(HttpBase::parse("ws://127.0.0.1:1").is_err());
    }

    #[tokio::test]
    async fn reads_pipelined_responses_in_order() {
        let stream = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"seq\":1}\r\n\
HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}\
HTTP/1.1 204 No Content\r\n\r\n";
        // A reader that hands out 7 bytes at a time, to split heads and bodies anywhere.
        let (mut tx, rx) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(stream).await.unwrap();
        });
        let mut r = ResponseReader::new(rx);
        let a = r.next().await.unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"{\"seq\":1}\r\n"[..]));
        assert_eq!(r.next().await.unwrap().status, 429);
        assert_eq!(r.next().await.unwrap(), Response { status: 204, body: bytes::Bytes::new() });
        writer.await.unwrap();
        assert_eq!(r.next().await.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn refuses_chunked() {
        let data: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let mut r = ResponseReader::new(data);
        assert_eq!(r.next().await.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
