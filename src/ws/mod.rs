//! The server side of RFC 6455, written for a server holding many idle connections: between
//! messages a connection owns no read or write buffer at all.
//!
//! - [`frame`]: the framing, with no I/O. Decodes client frames from bytes it is lent (masking,
//!   control frames, fragments, incremental UTF-8 checks, the size limit, close codes) and
//!   encodes server frame headers. Owns memory only for a fragmented message under way.
//! - [`socket`]: [`WebSocket`], one connection over any [`Transport`]. Owns the input and output
//!   buffers and keeps them empty while idle: it waits for input without a buffer and frees the
//!   input once all of it is parsed and the output once it is written; frames go out in batched
//!   vectored writes. Cancel-safe: all progress lives in the `WebSocket`.
//! - [`handshake`]: the opening handshake on hyper's upgrade: the RFC 6455 §4.2.1 checks,
//!   `Sec-WebSocket-Accept`, and the stream taken back from hyper as the `Transport` it was
//!   served on.
//! - [`transport`]: what the socket needs of a stream ([`Transport`]: readiness, then reads and
//!   writes that do not wait), implemented for `TcpStream` and for `tls::TlsStream`.
//!
//! Generic over the stream, not `dyn`: each stream type gets its own monomorphized socket, so no
//! frame pays for a virtual call. `WebSocket` alone means `WebSocket<TcpStream>`; sessions are
//! generic over the stream too. Only what the fuzz targets use is `pub`, and `Transport`, which bounds it.

pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod socket;
pub(crate) mod transport;

pub use frame::{Error, Incoming};
pub use socket::WebSocket;
pub use transport::Transport;
