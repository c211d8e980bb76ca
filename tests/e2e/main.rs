//! End-to-end tests: real nodes on port 0, real WebSocket clients, as PROTOCOL.md describes.

mod amqp_server;
mod failover_load;
mod fault_proxy;
mod nats_server;
mod nginx_server;
mod procs;
mod redis_server;
mod stomp_client;
mod support;
mod tls;

mod amqp;
mod api;
mod auth;
mod authz;
mod cli;
mod cluster;
mod drain;
mod limits;
mod messaging;
mod nats;
mod nats_cluster;
mod nginx;
mod openapi;
mod operations;
mod outbox;
mod proxy;
mod redis_cluster;
mod repair;
mod rolling;
mod rooms;
mod sql_server;
mod stomp;
mod stomp_clients;
mod timers;
mod tls_native;
