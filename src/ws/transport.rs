//! What a [`WebSocket`](super::WebSocket) needs of the stream under it: waiting for input
//! without a buffer, and reading and writing without waiting.
//!
//! `AsyncRead` cannot wait without a buffer (`poll_read` takes one and keeps it across
//! `Pending`), which an idle session must not hold, so the socket reads through [`Transport`]
//! instead: wait for readiness first, then read into a buffer that exists only for that read.
//!
//! `TcpStream` implements it with tokio's readiness API. [`TlsStream`](crate::tls::TlsStream)
//! (`--tls-cert`, on the same listener) implements it on top of its `TcpStream` with rustls's
//! unbuffered API (`UnbufferedServerConnection`), which leaves every buffer to the caller:
//!
//! - `poll_read_ready`: ready at once while it holds decrypted bytes not yet handed out (or a
//!   whole record not yet decrypted), else the `TcpStream`'s readiness; it also writes out a
//!   ciphertext remainder (below) while the session waits.
//! - `try_read_buf` (and `try_read`, into a slice): reads TLS records from the `TcpStream` into
//!   a ciphertext buffer held only while a record is incomplete (freed once it is empty, as the
//!   socket frees its input), decrypts them with `process_tls_records` and appends the
//!   plaintext to `buf`; `WouldBlock` when no whole record has arrived yet.
//! - `try_write_vectored`: encrypts what fits into records with `encrypt` and writes them; the
//!   ciphertext the `TcpStream` did not take is kept, and written before anything else, until
//!   it drains, and counted as written so that the socket does not send it twice;
//!   `poll_write_ready` waits for that remainder to drain.
//! - the TLS handshake happens before HTTP, and its records (and alerts, key updates) go out
//!   through the same remainder, so the socket needs no other change.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream under a WebSocket that can wait for input without a buffer.
///
/// Readiness may be spurious: after a `Ready`, a `try_` call may still answer
/// [`io::ErrorKind::WouldBlock`], and the socket then waits again. The `AsyncWrite` side is used
/// only to shut the stream down.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Ready when a read may make progress (input, the end of the stream or an error); on
    /// `Pending`, wakes the task of the latest `cx` once that changes. Holds no buffer.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Appends what can be read now to `buf`, within its spare capacity (which the caller has
    /// reserved), and answers how many bytes (0: the stream ended), or `WouldBlock`.
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// Reads what can be read now into `buf`, as far as it holds, and answers how many bytes
    /// (0: the stream ended), or `WouldBlock`.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Ready when a write may make progress; on `Pending`, wakes the task of the latest `cx`
    /// once that changes.
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Writes the start of `bufs`, in order, as far as the stream takes it now and answers how
    /// many bytes, or `WouldBlock`. Bytes it answers as written are never asked for again.
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// [`try_write_vectored`](Self::try_write_vectored) with one buffer.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }
}

impl Transport for TcpStream {
    #[inline]
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    #[inline]
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }

    #[inline]
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    #[inline]
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    #[inline]
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    #[inline]
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}
