//! The single-node backends: every topic is local, and presence and the node registry live in
//! this process. They are the reference implementations the conformance suites are written
//! against.

pub(crate) mod bus;
pub(crate) mod presence;
pub(crate) mod registry;

pub(crate) use bus::MemoryBus;
pub(crate) use presence::MemoryPresence;
pub(crate) use registry::MemoryRegistry;
