//! Switchyard: a WebSocket messaging server that runs as one node or as a cluster.
//!
//! Data flows one way: socket → [`session`] (parse, authorize) → [`node`] (route) →
//! [`store`], then [`bus`] → the [`hub`] of every node with recipients → session queues → socket.
//!
//! - [`protocol`]: the wire contract (names, commands, frames, error and close codes).
//! - [`config`]: flags, environment and TOML file.
//! - [`auth`]: JWT and dev-mode identities.
//! - [`server`]: HTTP listener, WebSocket upgrade, health, metrics, shutdown.
//! - [`api`]: the server API for backends.
//! - [`node`]: the operations shared by sessions and the API; owns the backends.
//! - [`hub`]: the sessions of this node, by user and by room.
//! - [`session`]: one connection's loop and per-session delivery rules.
//! - [`ws`]: the WebSocket framing under a session, holding no buffers while idle.
//! - [`tls`]: native TLS on the listener (`--tls-cert`), on rustls's unbuffered API, holding no
//!   buffers while idle either; certificate reload.
//! - [`stomp`]: STOMP 1.2 over WebSocket (PROTOCOL.md §7): the frame codec.
//! - [`message`]: the neutral message that stores keep and buses carry.
//! - [`store`], [`bus`], [`presence`], [`registry`]: the backend concepts, each a trait with its
//!   contract and the conformance suite every backend passes.
//! - [`backend`]: the implementations, one folder per backend, chosen by URL at start-up.
//! - [`outbox`]: delivers the rows applications write into an outbox table of the SQL store in
//!   their own transactions.
//! - [`metrics`], [`shutdown`]: operations.

pub mod api;
pub mod auth;
pub(crate) mod backend;
pub(crate) mod bus;
pub mod config;
pub mod drain;
pub(crate) mod hub;
pub mod message;
pub(crate) mod metrics;
pub mod node;
pub(crate) mod outbox;
pub(crate) mod presence;
pub mod protocol;
pub mod proxy;
pub(crate) mod registry;
pub mod server;
pub(crate) mod session;
pub(crate) mod shutdown;
pub mod stomp;
pub(crate) mod store;
pub mod tls;
pub mod ws;

#[cfg(test)]
mod testing;

pub use server::Server;
