//! STOMP 1.2 over WebSocket, PROTOCOL.md §7: frame codec; the session lives elsewhere.
//!
//! - [`frame`]: client frames decoded from the bytes of WebSocket messages (any split, any
//!   number of frames per message, heart-beats between them) and server frames encoded, with no
//!   I/O. Holds no memory between frames.

pub mod frame;
