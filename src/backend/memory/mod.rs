//! The single-node backends: every topic is local and presence lives in this process. They are
//! the reference implementations the conformance suites are written against.

pub(crate) mod bus;
pub(crate) mod presence;

pub(crate) use bus::MemoryBus;
pub(crate) use presence::MemoryPresence;
