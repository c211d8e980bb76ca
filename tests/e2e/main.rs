//! End-to-end tests: real nodes on port 0, real WebSocket clients, as PROTOCOL.md describes.

mod redis_server;
mod support;

mod messaging;
mod rooms;
mod api;
mod operations;
mod openapi;
mod cli;
mod timers;
mod limits;
mod auth;
mod cluster;
