//! What a worker is asked to do and what it reports, as serializable data: the same values go
//! through an in-process channel or, as JSON lines, through a worker process's stdin/stdout.
//!
//! A *flow* is one publisher and its audience (a room, or one user); its messages are numbered
//! 0, 1, 2, … and carry the flow's index as `p`. A worker holds some of the client connections
//! (its `clients`) and runs the flows whose publisher it holds; every worker knows the whole
//! flow table, to tell which messages each of its clients should get.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::latency::Buckets;
use crate::ledger::{Check, Ranges};
use crate::wire::Protocol;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: usize,
    pub protocol: Protocol,
    /// WebSocket bases of the nodes; a client's `target` indexes this.
    pub targets: Vec<String>,
    /// HTTP bases of the nodes' server API; an HTTP flow's `api` indexes this.
    pub api: Vec<String>,
    pub api_key: Option<String>,
    pub connect: ConnectOpts,
    /// Room names; `ClientSpec::room` and `Audience::Room` index this.
    pub rooms: Vec<String>,
    pub clients: Vec<ClientSpec>,
    /// Every flow of the run, indexed by flow id.
    pub flows: Vec<FlowSpec>,
    pub timing: Timing,
    /// Bytes of padding in every body (the `x` field).
    pub pad: usize,
    /// Switchyard JSON: every client sends `sync` once set up (idle `--sync`).
    #[serde(default)]
    pub sync: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectOpts {
    /// Connection attempts (TCP, upgrade, handshake, join) in progress at once.
    pub concurrency: usize,
    /// New connections per second started by this worker; 0: no pacing.
    pub rate: f64,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    pub user: String,
    pub target: usize,
    /// Source address to bind (127.0.0.2, …); `None`: the kernel's choice.
    pub source: Option<Ipv4Addr>,
    /// The room it joins before the run.
    pub room: Option<u32>,
    /// The flow it publishes (a WebSocket publisher).
    pub publishes: Option<u32>,
    /// Flows whose flat-out window it paces: each new message of these it receives frees a slot
    /// of the flow's publisher (which is in the same worker).
    pub sentinel_for: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Audience {
    Room(u32),
    User(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Via {
    /// Published by the WebSocket client whose `publishes` names this flow.
    Ws,
    /// Posted to the server API `api[api]`, `pipeline` requests in flight on one keep-alive
    /// connection.
    Http { api: usize, pipeline: u32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowSpec {
    pub audience: Audience,
    pub via: Via,
    /// Messages per second; 0: as fast as the window allows.
    pub rate: f64,
    /// Rate mode: the first message is due this long after the start (see `schedule`).
    pub offset_us: u64,
    /// Flat out: messages sent and not yet seen by the sentinel (WebSocket) or answered (HTTP).
    pub window: u32,
    /// The worker that runs it.
    pub runner: usize,
}

/// The phases of a run, relative to the start time the coordinator sends with `Go`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Timing {
    /// Publishing runs `warmup + duration`; only the last `duration` is measured.
    pub warmup_us: u64,
    pub duration_us: u64,
    /// After publishing ends, wait at most this long for deliveries to finish…
    pub drain_max_us: u64,
    /// …and stop waiting earlier once nothing arrived for this long.
    pub quiet_us: u64,
}

/// Coordinator → worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Start publishing at `start_us` (µs since the epoch).
    Go { start_us: u64 },
    /// What every flow sent; lets the worker count its clients' losses.
    Tally { flows: Vec<FlowSent> },
}

/// Worker → coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromWorker {
    Ready(SetupReport),
    Published(PublishReport),
    Result(WorkerResult),
    Failed(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SetupReport {
    pub attempted: u64,
    /// Connections that completed the handshake (and their join, if any).
    pub established: u64,
    pub established_per_target: Vec<u64>,
    /// Failed attempts by reason.
    pub failures: BTreeMap<String, u64>,
    /// Time from starting the TCP connect to the end of the handshake and join.
    pub handshake: Buckets,
    /// From the worker's start to its last client set up.
    pub setup_us: u64,
    /// The worker process's CPU ticks so far.
    pub cpu_ticks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlowSent {
    pub flow: u32,
    /// Messages sent: numbers `0..sent`.
    pub sent: u64,
    /// Numbers the server refused (an `error` answer, a non-2xx HTTP status).
    pub rejected: Ranges,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PublishReport {
    pub flows: Vec<FlowSent>,
    /// Messages sent during the measured window.
    pub sent_in_window: u64,
    /// Sends that got no answer by the end (protocols that answer).
    pub unanswered: u64,
    pub errors: BTreeMap<String, u64>,
    /// Times a flat-out publisher saw no progress for 1 s and reset its window.
    pub window_stalls: u64,
    /// The largest delay of a send behind its schedule (rate mode), µs.
    pub max_lag_us: u64,
    /// Request → response of HTTP publishes.
    pub api_latency: Buckets,
    pub cpu_ticks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub check: Check,
    /// New deliveries received during the measured window.
    pub delivered_in_window: u64,
    /// Send → first receipt of messages sent during the measured window.
    pub latency: Buckets,
    /// Connections that ended before the run did, by how.
    pub closes: BTreeMap<String, u64>,
    /// Error frames without an id (not answers to a publish), by code.
    pub server_errors: BTreeMap<String, u64>,
    /// Message events whose body was not a probe.
    pub foreign: u64,
    /// A publisher's own messages echoed back to it.
    pub self_echo: u64,
    pub cpu_ticks: u64,
}

pub fn bump(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

pub fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}
