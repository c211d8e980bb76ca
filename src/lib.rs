//! Switchyard: a WebSocket messaging server that runs as one node or as a cluster.
//!
//! Data flows one way: socket → [`session`] (parse, authorize) → [`node`] (route) →
//! [`store`] / [`broker`] → the [`hub`] of every node with recipients → session queues → socket.
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
//! - [`store`], [`broker`], [`presence`]: the backends, each a trait with its implementations.
//! - [`metrics`], [`shutdown`]: operations.

pub mod api;
pub mod auth;
pub mod bus;
pub(crate) mod backend;
pub mod config;
pub mod hub;
pub mod message;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod ws;

pub use server::Server;
