//! Command line, environment and TOML configuration (PROTOCOL.md §6).
//!
//! Every option is declared once, on [`ServeArgs`], with its default and its environment
//! variable. A `--config` file fills in only what neither a flag nor the environment gave, which
//! gives the precedence flag > environment > file > default. Everything is validated before the
//! node starts, with a message that says what to change.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// When the embedded store's writes reach the disk (`--data-sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataSync {
    /// fsync before a message is acknowledged.
    Always,
    /// fsync at least every 200 ms, after acknowledging.
    Periodic,
}

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Switchyard: a WebSocket messaging server that runs as one node or as a cluster",
    long_about = "Switchyard holds long-lived WebSocket connections and delivers direct, room and \
broadcast messages with presence, numbered streams and catch-up. Run `switchyard serve` for a \
single node in dev mode on 127.0.0.1:8080 with a demo page at /."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Run a node. Every option can also come from SWITCHYARD_<OPTION> or a --config TOML file.
    Serve(Box<ServeArgs>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The options of `switchyard serve`: one field per flag, each readable from the environment
/// variable named beside it and from the `--config` file under the flag's name.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file whose keys are these flags' names (e.g. listen = "0.0.0.0:8080")
    #[arg(long, env = "SWITCHYARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where HTTP and WebSocket listen
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Serve HTTPS and wss:// on --listen with this certificate chain (PEM, the server's
    /// certificate first); needs --tls-key. Read again when the file changes or on SIGHUP
    /// [default: none, plain HTTP]
    #[arg(long, env = "SWITCHYARD_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1)
    #[arg(long, env = "SWITCHYARD_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// This node's id, unique in the cluster [default: generated]
    #[arg(long, env = "SWITCHYARD_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Embedded storage of a single node
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "./switchyard-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// When the embedded store's writes reach the disk. `always`: a message is acknowledged and
    /// delivered only once it is on disk (fsync). `periodic`: once it is written, with an fsync
    /// at least every 200 ms; a crash of the process or of the machine can lose the messages of
    /// those last 200 ms (their seqs are then skipped, never reused)
    #[arg(long, env = "SWITCHYARD_DATA_SYNC", value_enum, default_value_t = DataSync::Always, value_name = "WHEN")]
    pub data_sync: DataSync,

    /// Run as a cluster member over this Redis, e.g. redis://127.0.0.1:6379/0, or Redis Cluster,
    /// e.g. redis+cluster://10.0.0.1:6379,10.0.0.2:6379: short for the same URL as --store, --bus
    /// and --presence, each of which beats it [default: none, single node]
    #[arg(long, env = "SWITCHYARD_REDIS", value_name = "URL", hide_env_values = true)]
    pub redis: Option<String>,

    /// A Redis store acknowledges an append only once N replicas have it (a WAIT after each
    /// append; not confirmed within 1 s: `unavailable`, and a retry with the same key is safe).
    /// 0 acknowledges what the master stored, which a failover may take back
    #[arg(long, env = "SWITCHYARD_REDIS_WAIT_REPLICAS", default_value_t = 0, value_name = "N")]
    pub redis_wait_replicas: usize,

    /// Run as a cluster member over this NATS with JetStream, e.g. nats://127.0.0.1:4222 (several
    /// servers comma-separated): short for the same URL as --store, --bus and --presence, each of
    /// which beats it [default: none]
    #[arg(long, env = "SWITCHYARD_NATS", value_name = "URL", hide_env_values = true)]
    pub nats: Option<String>,

    /// Where streams, read cursors and idempotency keys are kept: embedded (in --data-dir, a
    /// single node only), redis://HOST:PORT/DB, postgres://…, mysql://… or nats://HOST:PORT
    /// (JetStream) [default: embedded]
    #[arg(long, env = "SWITCHYARD_STORE", value_name = "URL", hide_env_values = true)]
    pub store: Option<String>,

    /// How messages and events are routed between nodes: memory (a single node),
    /// redis://HOST:PORT/DB, nats://HOST:PORT[,HOST:PORT…] (tls:// for TLS) or amqp://… (RabbitMQ);
    /// anything but memory
    /// makes the node a cluster member [default: memory]
    #[arg(long, env = "SWITCHYARD_BUS", value_name = "URL", hide_env_values = true)]
    pub bus: Option<String>,

    /// Where sessions, room membership and the node registry are kept: memory (a single node),
    /// redis://HOST:PORT/DB or nats://HOST:PORT (JetStream key-value) [default: memory]
    #[arg(long, env = "SWITCHYARD_PRESENCE", value_name = "URL", hide_env_values = true)]
    pub presence: Option<String>,

    /// Prefix of every key, channel, subject, schema or table this cluster creates, so that several
    /// clusters (and tests) can share one server (alias: --redis-prefix, SWITCHYARD_REDIS_PREFIX)
    #[arg(
        long,
        visible_alias = "redis-prefix",
        env = "SWITCHYARD_PREFIX",
        default_value = "switchyard",
        value_name = "P"
    )]
    pub prefix: String,

    /// Verify client tokens with this HS256 secret [default: none, dev mode]
    #[arg(long, env = "SWITCHYARD_JWT_SECRET", value_name = "S", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Verify client tokens with this RS256 or ES256 public key (PEM) [default: none, dev mode]
    #[arg(long, env = "SWITCHYARD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// A key for the server API; may repeat [default: none]
    #[arg(long, env = "SWITCHYARD_API_KEY", value_name = "KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,

    /// A new session of a user closes the user's older ones (4002)
    #[arg(long, env = "SWITCHYARD_SINGLE_SESSION")]
    pub single_session: bool,

    /// Rooms that need the token's `rooms` claim; may repeat
    #[arg(
        long,
        env = "SWITCHYARD_PRIVATE_PREFIX",
        value_name = "P",
        value_delimiter = ',',
        default_value = "private:"
    )]
    pub private_prefix: Vec<String>,

    /// Rooms without presence events; may repeat [default: none]
    #[arg(long, env = "SWITCHYARD_QUIET_PREFIX", value_name = "P", value_delimiter = ',')]
    pub quiet_prefix: Vec<String>,

    /// Messages kept per stream
    #[arg(long, env = "SWITCHYARD_HISTORY_SIZE", default_value_t = 1000, value_name = "N")]
    pub history_size: u64,

    /// How long a stream's messages are kept, in seconds
    #[arg(long, env = "SWITCHYARD_HISTORY_TTL", default_value_t = 604_800, value_name = "SECS")]
    pub history_ttl: u64,

    /// Largest frame accepted (closed with 1009 above it)
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGE_SIZE", default_value_t = 65_536, value_name = "BYTES")]
    pub max_message_size: usize,

    /// Commands per second per session, with a burst of 2N (0: off)
    #[arg(long, env = "SWITCHYARD_RATE_LIMIT", default_value_t = 100, value_name = "N")]
    pub rate_limit: u32,

    /// Most WebSocket sessions this node holds; more upgrades get HTTP 503 [default: as many as the open-file limit allows]
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Browser origins allowed to open a WebSocket (e.g. https://chat.example.com); others get
    /// HTTP 403. Requests without an Origin header (not from a browser) are not affected; may
    /// repeat [default: any origin]
    #[arg(long, env = "SWITCHYARD_ALLOWED_ORIGIN", value_name = "ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,

    /// Most WebSocket sessions from one IP address; more upgrades get HTTP 429 (0: no limit;
    /// behind a proxy every client shares the proxy's address)
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS_PER_IP", default_value_t = 0, value_name = "N")]
    pub max_connections_per_ip: usize,

    /// A reverse proxy (an address or CIDR network, IPv4 or IPv6) whose X-Forwarded-For or
    /// Forwarded header names the client: the address then used for --max-connections-per-ip and
    /// in logs. Other peers' forwarding headers are ignored; may repeat [default: none]
    #[arg(long, env = "SWITCHYARD_TRUSTED_PROXY", value_name = "CIDR", value_delimiter = ',')]
    pub trusted_proxy: Vec<crate::proxy::Cidr>,

    /// Seconds a node keeps serving after SIGTERM, with /readyz answering 503, so that a gateway
    /// stops sending it new clients before it closes sessions [default: 5 on SIGTERM, 0 on
    /// Ctrl-C]
    #[arg(long, env = "SWITCHYARD_DRAIN_DELAY", value_name = "SECS")]
    pub drain_delay: Option<u64>,

    /// Seconds over which a stopping node closes its sessions (1001) in even batches, so that
    /// their reconnects do not all reach the other nodes at once; 0 closes them together. A second
    /// SIGTERM or Ctrl-C skips what is left of the drain [default: 10 on SIGTERM, 0 on Ctrl-C]
    #[arg(long, env = "SWITCHYARD_DRAIN_SECONDS", value_name = "SECS")]
    pub drain_seconds: Option<u64>,

    /// Most rooms one session may be in; a `join` beyond it is refused with `forbidden`
    #[arg(long, env = "SWITCHYARD_MAX_ROOMS_PER_SESSION", default_value_t = 1000, value_name = "N")]
    pub max_rooms_per_session: usize,

    /// Seconds a client may take for the TLS handshake and its HTTP request headers (slow
    /// handshakes hold sockets)
    #[arg(long, env = "SWITCHYARD_HANDSHAKE_TIMEOUT", default_value_t = 10, value_name = "SECS")]
    pub handshake_timeout: u64,

    /// Seconds between WebSocket pings; a session silent for two intervals is closed
    #[arg(long, env = "SWITCHYARD_PING_INTERVAL", default_value_t = 25, value_name = "SECS")]
    pub ping_interval: u64,

    /// Items queued per session before a reader that does not keep up is closed (4003): a frame,
    /// or up to 64 messages the node received together
    #[arg(long, env = "SWITCHYARD_OUTBOUND_QUEUE", default_value_t = 1024, value_name = "N")]
    pub outbound_queue: usize,

    /// Tests only: drop, duplicate and delay stream messages between the bus and the sessions
    /// (e.g. drop=0.1,dup=0.1,delay=0.3,max-delay=50), to prove that sessions repair
    #[arg(long, env = "SWITCHYARD_TEST_BUS_FAULTS", value_name = "SPEC", hide = true)]
    pub test_bus_faults: Option<String>,

    /// Tests only: messages held per NATS subscription before the client drops new ones (a
    /// small value makes the slow-consumer drop that the NATS bus must repair)
    #[arg(long, env = "SWITCHYARD_TEST_NATS_SUBSCRIPTION_CAPACITY", value_name = "N", hide = true)]
    pub test_nats_subscription_capacity: Option<usize>,

    /// Log format
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve a plain WebSocket echo at /echo, for the Autobahn|Testsuite conformance run
    #[arg(long, env = "SWITCHYARD_AUTOBAHN_ECHO")]
    pub autobahn_echo: bool,

    /// Deliver the rows that applications insert into the outbox table of the PostgreSQL or
    /// MySQL store inside their own transactions (docs/outbox.md)
    #[arg(long, env = "SWITCHYARD_OUTBOX")]
    pub outbox: bool,
}

/// Parses `argv` (including the program name) with the precedence flag > environment > file >
/// default. Errors say which option or file key to change.
pub fn parse<I, T>(argv: I) -> anyhow::Result<Cli>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let matches = Cli::command().try_get_matches_from(&argv).map_err(clap_exit)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let mut extra = legacy_env(serve);
    let file = serve.get_one::<PathBuf>("config");
    if let Some(file) = file {
        let given: Vec<String> = extra.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        extra.extend(file_args(file, serve, &given)?);
    }
    if extra.is_empty() {
        let cli = Cli::from_arg_matches(&matches)?;
        validate(&cli)?;
        return Ok(cli);
    }
    let mut argv = argv;
    argv.extend(extra);
    let origin = file.map_or_else(|| "environment".to_owned(), |f| f.display().to_string());
    let matches = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(|e| anyhow::anyhow!("{origin}: {}", e.render().to_string().trim()))?;
    let cli = Cli::from_arg_matches(&matches)?;
    validate(&cli)?;
    Ok(cli)
}

/// `--help` and `--version` are not errors: print them and exit like clap would.
fn clap_exit(e: clap::Error) -> anyhow::Error {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    anyhow::anyhow!("{}", e.render().to_string().trim())
}

/// Environment variables of renamed options, as arguments, where neither the flag nor the new
/// variable was given: `SWITCHYARD_REDIS_PREFIX` is `--prefix`.
fn legacy_env(serve: &ArgMatches) -> Vec<OsString> {
    let given = matches!(serve.value_source("prefix"), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    match std::env::var_os("SWITCHYARD_REDIS_PREFIX") {
        Some(value) if !given => {
            let mut arg = OsString::from("--prefix=");
            arg.push(value);
            vec![arg]
        }
        _ => Vec::new(),
    }
}

/// Turns the keys of a TOML file into `--key=value` arguments for the options that neither a
/// flag nor the environment set (`given` are the arguments already added from the environment).
fn file_args(file: &PathBuf, serve: &ArgMatches, given: &[String]) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read config file {}", file.display()))?;
    let table: toml::Table =
        text.parse().map_err(|e| anyhow::anyhow!("config file {} is not valid TOML: {e}", file.display()))?;
    let command = Cli::command();
    let serve_cmd = command.find_subcommand("serve").expect("serve exists");
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = serve_cmd
            .get_arguments()
            .find(|a| {
                key != "config"
                    && (a.get_long() == Some(key.as_str())
                        || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&key.as_str())))
            })
            .ok_or_else(|| {
                let known: Vec<_> = serve_cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| *l != "config" && *l != "help")
                    .collect();
                anyhow::anyhow!(
                    "config file {}: unknown key `{key}`; valid keys are: {}",
                    file.display(),
                    known.join(", ")
                )
            })?;
        let long = arg.get_long().unwrap_or_default();
        let given = matches!(
            serve.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) || given.iter().any(|g| g.starts_with(&format!("--{long}=")));
        if given {
            continue;
        }
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => bail!("config file {}: `{key}` must be a string or a number", file.display()),
            }
        };
        match value {
            toml::Value::Boolean(true) => out.push(format!("--{long}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.push(format!("--{long}={}", scalar(item)?).into());
                }
            }
            other => out.push(format!("--{long}={}", scalar(other)?).into()),
        }
    }
    Ok(out)
}

fn validate(cli: &Cli) -> anyhow::Result<()> {
    let CliCommand::Serve(args) = &cli.command;
    args.validate()
}

/// The smallest `--max-message-size`.
pub(crate) const MIN_MESSAGE_SIZE: usize = 256;

/// The longest `--drain-delay` or `--drain-seconds`: an hour is past any orchestrator's grace.
const MAX_DRAIN: u64 = 3600;

/// A byte a prefix may hold: one that every backend takes in a key, subject, schema or table name.
fn prefix_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

impl ServeArgs {
    /// Dev mode: no JWT key configured, whatever API keys are given.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none()
    }

    /// Checks the options together; each error names the option to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            bail!("give either --jwt-secret or --jwt-public-key, not both");
        }
        if self.handshake_timeout == 0 {
            bail!("--handshake-timeout must be at least 1 second");
        }
        if self.jwt_secret.as_deref() == Some("") {
            bail!("--jwt-secret is empty: give a secret, or leave it out for dev mode");
        }
        if self.dev_mode() && !self.listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {} in dev mode (no --jwt-secret or --jwt-public-key): \
                 dev mode lets anyone connect as any user, so it binds to loopback only. \
                 Configure a JWT key or listen on 127.0.0.1",
                self.listen
            );
        }
        if self.prefix.is_empty() || self.prefix.len() > 48 || !self.prefix.bytes().all(prefix_byte) {
            bail!("--prefix must be 1-48 characters of A-Z a-z 0-9 _ -");
        }
        crate::backend::BackendConfig::from_args(self)?;
        if let Some(id) = &self.node_id
            && !crate::protocol::valid_name(id)
        {
            bail!("--node-id must be 1-128 characters of A-Z a-z 0-9 _ . : @ -");
        }
        if self.api_key.iter().any(|k| k.len() < 8) {
            bail!("--api-key: every key must be at least 8 characters");
        }
        if self.private_prefix.iter().chain(&self.quiet_prefix).any(String::is_empty) {
            bail!("--private-prefix / --quiet-prefix must not be empty strings");
        }
        if self.history_size == 0 {
            bail!("--history-size must be at least 1");
        }
        if self.history_ttl == 0 {
            bail!("--history-ttl must be at least 1 second");
        }
        if self.max_message_size < MIN_MESSAGE_SIZE {
            bail!("--max-message-size must be at least {MIN_MESSAGE_SIZE} bytes");
        }
        if self.ping_interval == 0 {
            bail!("--ping-interval must be at least 1 second");
        }
        if !(16..=16_384).contains(&self.outbound_queue) {
            bail!("--outbound-queue must be 16 to 16384");
        }
        if self.max_connections == Some(0) {
            bail!("--max-connections must be at least 1");
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            crate::tls::CertPair::load(cert, key)?;
        }
        if self.drain_delay.is_some_and(|d| d > MAX_DRAIN) || self.drain_seconds.is_some_and(|d| d > MAX_DRAIN) {
            bail!("--drain-delay and --drain-seconds must be at most {MAX_DRAIN} seconds");
        }
        if self.test_nats_subscription_capacity == Some(0) {
            bail!("--test-nats-subscription-capacity must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(cli: Cli) -> ServeArgs {
        let CliCommand::Serve(args) = cli.command;
        *args
    }

    #[test]
    fn defaults_are_a_dev_node_on_loopback() {
        let args = serve(parse(["switchyard", "serve"]).unwrap());
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert!(args.dev_mode());
        assert_eq!(args.private_prefix, vec!["private:"]);
        assert_eq!(args.history_size, 1000);
        assert_eq!(args.history_ttl, 604_800);
        assert_eq!(args.max_message_size, 65_536);
        assert_eq!(args.rate_limit, 100);
    }

    #[test]
    fn file_fills_what_flags_do_not_give() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\napi-key = [\"k1-long-key\", \"k2-long-key\"]\nhistory-size = 50\nsingle-session = true\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let args = serve(parse(["switchyard", "serve", "--config", f, "--history-size", "7"]).unwrap());
        assert_eq!(args.listen.port(), 9000);
        assert_eq!(args.api_key, vec!["k1-long-key", "k2-long-key"]);
        assert_eq!(args.history_size, 7, "a flag beats the file");
        assert!(args.single_session);
    }

    #[test]
    fn bad_input_says_what_to_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let err = parse(["switchyard", "serve", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("unknown key `lisen`"), "{err}");

        std::fs::write(&file, "history-size = \"many\"\n").unwrap();
        let err = parse(["switchyard", "serve", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("history-size"), "{err}");

        let err = parse(["switchyard", "serve", "--listen", "0.0.0.0:8080"]).unwrap_err();
        assert!(err.to_string().contains("dev mode"), "{err}");

        let err = parse(["switchyard", "serve", "--history-size", "0"]).unwrap_err();
        assert!(err.to_string().contains("--history-size"), "{err}");

        let err = parse(["switchyard", "serve", "--prefix", "a b"]).unwrap_err();
        assert!(err.to_string().contains("--prefix"), "{err}");
    }

    #[test]
    fn trusted_proxies_and_drain_flags_parse_and_are_checked() {
        let args =
            serve(parse(["switchyard", "serve", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"]).unwrap());
        assert_eq!(args.trusted_proxy, vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert_eq!((args.drain_delay, args.drain_seconds), (None, None), "the signal picks the default");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "trusted-proxy = [\"192.168.0.0/16\", \"2001:db8::/32\"]\ndrain-delay = 0\ndrain-seconds = 30\n",
        )
        .unwrap();
        let args = serve(parse(["switchyard", "serve", "--config", file.to_str().unwrap()]).unwrap());
        assert_eq!(args.trusted_proxy.len(), 2);
        assert_eq!((args.drain_delay, args.drain_seconds), (Some(0), Some(30)));

        for (bad, says) in [("10.0.0.0/33", "prefix length"), ("proxy.example", "not an IP address"), ("", "not an IP")]
        {
            let err = parse(["switchyard", "serve", "--trusted-proxy", bad]).unwrap_err();
            assert!(err.to_string().contains("--trusted-proxy") && err.to_string().contains(says), "{err}");
        }
        let err = parse(["switchyard", "serve", "--drain-seconds", "86400"]).unwrap_err();
        assert!(err.to_string().contains("--drain-seconds"), "{err}");
        let err = parse(["switchyard", "serve", "--drain-delay=soon"]).unwrap_err();
        assert!(err.to_string().contains("--drain-delay"), "{err}");
    }

    #[test]
    fn redis_prefix_is_an_alias_of_prefix_as_flag_and_file_key() {
        let args = serve(parse(["switchyard", "serve", "--redis-prefix", "old"]).unwrap());
        assert_eq!(args.prefix, "old");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "redis-prefix = \"from-file\"\n").unwrap();
        let args = serve(parse(["switchyard", "serve", "--config", file.to_str().unwrap()]).unwrap());
        assert_eq!(args.prefix, "from-file");
    }
}
