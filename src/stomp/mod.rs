//! STOMP 1.2 over WebSocket, PROTOCOL.md §7: the frames; the session is [`crate::session`]'s.
//!
//! - [`frame`]: client frames decoded from the bytes of WebSocket messages (any split, any
//!   number of frames per message, heart-beats between them) and server frames encoded, with no
//!   I/O. Holds no memory between frames.
//! - `encode`: the server's frames from the neutral message, a `MESSAGE`'s shared part encoded
//!   once per node.

pub(crate) mod encode;
pub mod frame;
