//! Command-line options: one subcommand per scenario.

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::wire::Protocol;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard-bench",
    version,
    about = "Load generator for Switchyard and its peers (Socket.IO, ws + Redis relay)",
    long_about = "Drives real WebSocket clients against one node or a cluster and reports \
                  connects/s, server memory per connection, deliveries/s, end-to-end latency \
                  percentiles, lost and duplicated messages, and CPU seconds of every process. \
                  Targets must be loopback addresses (send and receive times come from one clock)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N connections, hold them, report connects/s and server RSS per connection.
    Idle(IdleArgs),
    /// R rooms × M members; publishers publish to their room; deliveries/s, latency, loss.
    Fanout(FanoutArgs),
    /// S senders each sending to their own receiver (on another node when there are several).
    Direct(DirectArgs),
    /// Messages posted through the server API (Switchyard), delivered to room members over WS.
    Api(ApiArgs),
    /// Clients receiving a steady stream through one node; SIGKILL that node; they reconnect
    /// elsewhere and resume (Switchyard).
    Resume(ResumeArgs),
    /// An hour-long mixed load on a cluster (DMs, rooms, joins/leaves, reconnects) while the
    /// nodes' RSS and fds are sampled; every message must arrive exactly once (Switchyard).
    Soak(SoakArgs),
    /// Fuzz running nodes' WebSocket endpoint with random and mutated frames, commands and
    /// upgrade requests; check every answer against RFC 6455 and PROTOCOL.md, and the nodes' health.
    Wsfuzz(WsfuzzArgs),
    /// Internal: one worker process, driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// WebSocket endpoints of the nodes, comma-separated (ws://127.0.0.1:9100[/ws]); clients
    /// are spread over them round-robin. Without a path: /ws (switchyard), /socket.io/
    /// (socketio), / (relay), /stomp (stomp), /ws (stomp-rabbitmq).
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// HTTP bases of the nodes' server API (http://127.0.0.1:9100), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub api: Vec<String>,
    /// Server API key (Authorization: Bearer).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Server process ids, comma-separated, in the order of --target: RSS and CPU seconds are
    /// read from /proc before and after.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Other processes to report RSS and CPU seconds of (e.g. Redis), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub also_pid: Vec<u32>,
    /// How to talk to the servers: Switchyard's JSON protocol, Socket.IO, the relay's JSON,
    /// STOMP 1.2 to Switchyard (`stomp`) or to RabbitMQ's Web-STOMP plugin (`stomp-rabbitmq`).
    #[arg(long, value_enum, default_value_t = Protocol::Switchyard)]
    pub protocol: Protocol,
    /// Print one JSON object with every figure instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Worker processes holding the clients (one process holds at most ~20,000 fds); 0: one
    /// per 18,000 connections. 1 runs everything in this process.
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Bind client sockets to this many source addresses 127.0.0.2, 127.0.0.3, … (each offers
    /// ~28k ephemeral ports); 0: the kernel's choice; default: one per 25,000 connections
    /// above 20,000.
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// New connections per second, over all workers; 0: as fast as --connect-concurrency
    /// allows.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connection attempts in progress at once, over all workers.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seconds allowed for one connect + handshake (and for one join).
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,
    /// Prefix of user ids and room names; default: random, so that runs never see each
    /// other's streams.
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Put before every room name (e.g. the server's --quiet-prefix, to spare large rooms
    /// presence traffic).
    #[arg(long, default_value = "")]
    pub room_prefix: String,
}

/// Options of the scenarios that publish for a while.
#[derive(Args, Debug, Clone)]
pub struct Load {
    /// Seconds of publishing before measuring starts (counted for loss, not for rates or
    /// latency).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// After publishing stops, wait at most this many seconds for deliveries to finish (ends
    /// earlier after 1 s without any).
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Seconds to wait between set-up and publishing.
    #[arg(long, default_value_t = 0.0)]
    pub settle: f64,
    /// Flat out (--rate 0): messages per publisher sent and not yet received by its sentinel
    /// receiver (or answered, over HTTP).
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// Extra bytes in every message body (an "x" field), to set the message size.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open, over all targets.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to hold them before reading the servers' RSS.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// Also join each connection to one of this many rooms (0: no rooms).
    #[arg(long, default_value_t = 0)]
    pub rooms: usize,
    /// Seconds after closing before reading RSS again (0: skip).
    #[arg(long, default_value_t = 2.0)]
    pub after_close: f64,
    /// Switchyard JSON: each connection also sends `sync` (the catch-up of its own stream) and
    /// waits for the reply, as a STOMP client subscribes to /user/queue/messages.
    #[arg(long)]
    pub sync: bool,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: Load,
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Receiving members per room (publishers come in addition).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Publishers, assigned to rooms round-robin; default: one per room.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Total publishes per second over all publishers; 0: flat out (see --window).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct DirectArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: Load,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Total messages per second over all senders; 0: flat out (see --window).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: Load,
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Keep-alive HTTP connections posting, spread over --api bases and rooms round-robin.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per connection: 1 is one request at a time ("single"); more
    /// pipelines them ("batched").
    #[arg(long, default_value_t = 1)]
    pub pipeline: u32,
    /// Total requests per second; 0: as fast as the pipelines allow.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StreamKind {
    Room,
    Direct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KillSignal {
    Kill,
    Term,
}

#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Receiving clients, all connected to the node that gets killed.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// One room all clients joined, or direct messages to each client in turn.
    #[arg(long, value_enum, default_value_t = StreamKind::Room)]
    pub stream: StreamKind,
    /// Messages per second in total.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// The pid to SIGKILL (the node of --kill-target). Without it nothing is killed.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// Index in --target of the node the clients start on (the one killed).
    #[arg(long, default_value_t = 0)]
    pub kill_target: usize,
    /// Seconds after publishing starts to send SIGKILL.
    #[arg(long, default_value_t = 3.0)]
    pub kill_after: f64,
    /// The signal sent to --kill-pid: `kill` (a crash) or `term` (a drain: the node closes its
    /// sessions with 1001 as its --drain-delay / --drain-seconds say).
    #[arg(long, value_enum, default_value_t = KillSignal::Kill)]
    pub kill_signal: KillSignal,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// After publishing stops, wait at most this many seconds for every client to have every
    /// message.
    #[arg(long, default_value_t = 20.0)]
    pub drain: f64,
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
}

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users; each has --devices connections.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    #[arg(long, default_value_t = 2)]
    pub devices: usize,
    /// Home rooms: user u stays in room u % rooms for the whole run.
    #[arg(long, default_value_t = 20)]
    pub rooms: usize,
    /// Lounges, joined and left at random (0: none).
    #[arg(long, default_value_t = 10)]
    pub lounges: usize,
    /// Direct messages plus publishes per second, over all devices.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// The share of --rate that are direct messages (the rest are publishes).
    #[arg(long, default_value_t = 0.5)]
    pub direct_share: f64,
    /// Mean seconds between a device's reconnects (half clean closes, half dropped sockets);
    /// 0: never.
    #[arg(long, default_value_t = 120.0)]
    pub reconnect_every: f64,
    /// Mean seconds between a device's lounge joins or leaves; 0: never.
    #[arg(long, default_value_t = 30.0)]
    pub lounge_every: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 3600.0)]
    pub duration: f64,
    /// After the load, wait at most this many seconds for every message to arrive.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Seconds between samples of the servers.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,
    /// Memory is compared from the first sample after this many seconds (caches filling up).
    #[arg(long, default_value_t = 300.0)]
    pub settle: f64,
    /// Write every sample to this CSV file as it is taken.
    #[arg(long)]
    pub samples: Option<std::path::PathBuf>,
    /// Print a line per sample on stderr.
    #[arg(long)]
    pub progress: bool,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct WsfuzzArgs {
    /// WebSocket endpoints of the nodes (ws://127.0.0.1:PORT; the path used is /ws); repeat or
    /// comma-separate. Fuzzing connections are spread over them; the canary pair uses the first
    /// and the last.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// HTTP bases of the nodes for /healthz, in the order of --target (the API canary posts to
    /// the first); default: taken from --target.
    #[arg(long, value_delimiter = ',')]
    pub api: Vec<String>,
    /// Server API key (Authorization: Bearer) for the API canary.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Server process ids, comma-separated: RSS and open fds are sampled every second, and each
    /// must stay alive.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Seconds of fuzzing.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seed of the run (default: from the clock; printed, and named in every anomaly).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Concurrent fuzzing connections (users fz-0, fz-1, ...).
    #[arg(long, short = 'c', default_value_t = 8)]
    pub connections: usize,
    /// Cases per second per connection (0: flat out, which meets the server's rate limit).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Directory for anomalous cases (the bytes sent, .bin, and a transcript, .txt); default:
    /// wsfuzz-SEED in the temporary directory.
    #[arg(long)]
    pub save: Option<std::path::PathBuf>,
    /// The nodes' --max-message-size.
    #[arg(long, default_value_t = 65_536)]
    pub max_message_size: usize,
    /// The nodes' --handshake-timeout, in seconds.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Share of the connections (0 to 1) that speak STOMP 1.2 (PROTOCOL.md §7) instead of JSON,
    /// spread evenly (0.5: every second one): each upgrades on /stomp or on /ws offering
    /// v12.stomp, sends CONNECT as its user fz-<n>, and runs STOMP cases. 0: JSON only.
    #[arg(long, default_value_t = 0.0)]
    pub stomp_share: f64,
    /// The nodes' --rate-limit: STOMP connections pace their frames under it, so that every
    /// answer is predictable (only their flood cases meet it). 0: the nodes have none.
    #[arg(long, default_value_t = 100)]
    pub rate_limit: u32,
    /// Seconds to wait for an answer owed, a close frame or the end of a connection.
    #[arg(long, default_value_t = 10.0)]
    pub answer_timeout: f64,
    /// Run one case again alone (c<connection>.<number>, as an anomaly names it), with the run's
    /// --seed and --connections, and print what happened.
    #[arg(long)]
    pub replay: Option<String>,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
}
