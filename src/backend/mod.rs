//! The backends of a node, chosen by URL (PROTOCOL.md §6 "Backends") and built once into trait
//! objects: nothing outside this module knows which server a store, bus, presence or registry
//! talks to. The node registry lives where presence does (`--presence`): it reaps presence.
//!
//! One folder per backend holds its implementations, one file per concept, beside the plumbing
//! they share (`redis/mod.rs`: connections and the clock; `redis/keys.rs`: every key;
//! `nats/mod.rs`: the client and its supervision; `nats/subjects.rs`: every subject;
//! `amqp/mod.rs`: RabbitMQ's names and limits). A role's
//! URL is checked here at start-up, and a combination that cannot hold the contract is refused
//! with a message naming the role to change. URLs may carry credentials: only [`redact`]ed
//! forms are ever printed.

pub(crate) mod amqp;
pub(crate) mod embedded;
pub(crate) mod memory;
pub(crate) mod mysql;
pub(crate) mod nats;
pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod sql;
#[cfg(test)]
mod sql_tests;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::bus::chaos::{ChaosSink, Faults};
use crate::bus::{Bus, Sink};
use crate::config::ServeArgs;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::presence::Presence;
use crate::registry::Registry;
use crate::store::{Retention, Store};

/// Where a node keeps its streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreConfig {
    /// redb in `--data-dir`: a single node only.
    Embedded {
        dir: PathBuf,
        sync: crate::config::DataSync,
    },
    Redis {
        url: String,
    },
    Postgres {
        url: String,
    },
    Mysql {
        url: String,
    },
    /// JetStream.
    Nats {
        url: String,
    },
}

/// How a node routes messages to the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BusConfig {
    /// Every topic is local: a single node.
    Memory,
    Redis {
        url: String,
    },
    /// Core NATS (`nats://`, `tls://`).
    Nats {
        url: String,
    },
    /// RabbitMQ: a topic exchange, a queue per node.
    Amqp {
        url: String,
    },
}

/// Where a node records sessions and room membership, and the node registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PresenceConfig {
    /// In this process: a single node.
    Memory,
    Redis {
        url: String,
    },
    /// JetStream key-value buckets.
    Nats {
        url: String,
    },
}

/// The backend section of the configuration, validated.
#[derive(Clone, Debug)]
pub(crate) struct BackendConfig {
    pub store: StoreConfig,
    pub bus: BusConfig,
    pub presence: PresenceConfig,
    /// Prefix of every key, channel, schema or table (`--prefix`).
    pub prefix: String,
    pub retention: Retention,
    /// Faults injected between the bus and the hub (tests only, see [`crate::bus::chaos`]).
    pub faults: Option<Faults>,
    /// Consume the outbox table of the store's database (`--outbox`, docs/outbox.md).
    pub outbox: bool,
    /// Largest frame or API message (`--max-message-size`): a bus must carry its message.
    pub max_message_size: usize,
    /// Messages held per NATS subscription before the client drops new ones (tests only, see
    /// `--test-nats-subscription-capacity`).
    pub nats_subscription_capacity: Option<usize>,
    /// Replicas that must confirm each append of a Redis store (`--redis-wait-replicas`).
    pub redis_wait_replicas: usize,
}

/// The role a URL is given for, to name it in messages.
#[derive(Clone, Copy)]
enum Role {
    Store,
    Bus,
    Presence,
}

impl Role {
    fn flag(self) -> &'static str {
        match self {
            Role::Store => "--store",
            Role::Bus => "--bus",
            Role::Presence => "--presence",
        }
    }
}

/// What a URL's scheme names.
enum Scheme {
    Embedded,
    Memory,
    Redis,
    Postgres,
    Mysql,
    Nats,
    Amqp,
}

fn scheme(role: Role, url: &str) -> anyhow::Result<Scheme> {
    let name = match url.split_once("://") {
        Some((scheme, rest)) if !rest.is_empty() => scheme,
        _ if url == "embedded" || url == "memory" => url,
        _ => bail!("{} {}: not a URL (expected scheme://host…)", role.flag(), redact(url)),
    };
    Ok(match name.to_ascii_lowercase().as_str() {
        "embedded" => Scheme::Embedded,
        "memory" => Scheme::Memory,
        "redis" | "rediss" | "unix" | "redis+unix" => Scheme::Redis,
        "redis+cluster" | "rediss+cluster" => Scheme::Redis,
        "nats" | "tls" => Scheme::Nats,
        "amqp" | "amqps" => Scheme::Amqp,
        "postgres" | "postgresql" => Scheme::Postgres,
        "mysql" | "mariadb" => Scheme::Mysql,
        other => bail!("{} {}: unknown scheme `{other}`", role.flag(), redact(url)),
    })
}

/// Refuses a backend the role cannot take.
fn unsupported(role: Role, url: &str) -> anyhow::Error {
    anyhow::anyhow!("{} {}: this backend cannot hold the {} role", role.flag(), redact(url), role.name())
}

impl Role {
    fn name(self) -> &'static str {
        &self.flag()[2..]
    }
}

impl BackendConfig {
    /// Reads the backend flags: each role's own flag, else the `--redis` shorthand, else the
    /// single-node default; then checks that the combination can hold the contract.
    pub(crate) fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        if args.redis.is_some() && args.nats.is_some() {
            bail!(
                "--redis and --nats each name every backend role: give one of them, and --store, --bus or --presence for a role on another server"
            );
        }
        let shorthand = args.redis.as_deref().or(args.nats.as_deref());
        let store_url = args.store.as_deref().or(shorthand).unwrap_or("embedded");
        let bus_url = args.bus.as_deref().or(shorthand).unwrap_or("memory");
        let presence_url = args.presence.as_deref().or(shorthand).unwrap_or("memory");
        let store = match scheme(Role::Store, store_url)? {
            Scheme::Embedded => StoreConfig::Embedded { dir: args.data_dir.clone(), sync: args.data_sync },
            Scheme::Redis => StoreConfig::Redis { url: store_url.to_owned() },
            Scheme::Postgres => StoreConfig::Postgres { url: store_url.to_owned() },
            Scheme::Mysql => StoreConfig::Mysql { url: store_url.replacen("mariadb://", "mysql://", 1) },
            Scheme::Nats => StoreConfig::Nats { url: store_url.to_owned() },
            _ => return Err(unsupported(Role::Store, store_url)),
        };
        let bus = match scheme(Role::Bus, bus_url)? {
            Scheme::Memory => BusConfig::Memory,
            Scheme::Redis => BusConfig::Redis { url: bus_url.to_owned() },
            Scheme::Nats => BusConfig::Nats { url: bus_url.to_owned() },
            Scheme::Amqp => {
                amqp::validate_url(bus_url)?;
                amqp::validate_prefix(&args.prefix)?;
                amqp::validate_message_size(args.max_message_size)?;
                BusConfig::Amqp { url: bus_url.to_owned() }
            }
            _ => return Err(unsupported(Role::Bus, bus_url)),
        };
        let presence = match scheme(Role::Presence, presence_url)? {
            Scheme::Memory => PresenceConfig::Memory,
            Scheme::Redis => PresenceConfig::Redis { url: presence_url.to_owned() },
            Scheme::Nats => PresenceConfig::Nats { url: presence_url.to_owned() },
            _ => return Err(unsupported(Role::Presence, presence_url)),
        };
        if bus != BusConfig::Memory {
            if matches!(store, StoreConfig::Embedded { .. }) {
                bail!(
                    "--store embedded keeps history on this machine only, but --bus {} makes this node a \
                     cluster member: give --store a shared server (redis://…, postgres://…, mysql://…, nats://…)",
                    redact(bus_url)
                );
            }
            if presence == PresenceConfig::Memory {
                bail!(
                    "--presence memory keeps sessions in this process only, but --bus {} makes this node a \
                     cluster member: give --presence a shared server (redis://…, nats://…)",
                    redact(bus_url)
                );
            }
        }
        if args.outbox && !matches!(store, StoreConfig::Postgres { .. } | StoreConfig::Mysql { .. }) {
            bail!(
                "--outbox needs a PostgreSQL or MySQL store, whose database holds the outbox table, but --store is {}: \
                 give --store postgres://… or --store mysql://…, or leave --outbox out",
                redact(store_url)
            );
        }
        let retention = Retention { max_messages: args.history_size, ttl_ms: args.history_ttl.saturating_mul(1000) };
        if matches!(store, StoreConfig::Postgres { .. } | StoreConfig::Mysql { .. }) {
            sql::validate_prefix(&args.prefix)?;
        }
        if matches!(bus, BusConfig::Nats { .. }) {
            nats::validate_prefix(&args.prefix)?;
        }
        if args.redis_wait_replicas > 0 && !matches!(store, StoreConfig::Redis { .. }) {
            bail!(
                "--redis-wait-replicas needs a Redis store, but --store is {}: give --store redis://… or redis+cluster://…",
                redact(store_url)
            );
        }
        let faults = args.test_bus_faults.as_deref().map(Faults::parse).transpose()?;
        Ok(Self {
            store,
            bus,
            presence,
            prefix: args.prefix.clone(),
            retention,
            faults,
            outbox: args.outbox,
            max_message_size: args.max_message_size,
            nats_subscription_capacity: args.test_nats_subscription_capacity,
            redis_wait_replicas: args.redis_wait_replicas,
        })
    }
}

/// A node's backends, built.
pub(crate) struct Backends {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    /// The node registry, on the same backend as `presence`.
    pub registry: Arc<dyn Registry>,
    /// The outbox the node consumes (`--outbox`), in the store's database and on its pool.
    pub outbox: Option<Arc<dyn Outbox>>,
}

/// Connects every backend of `config`. Roles on the same Redis URL share its connection and
/// clock; when the store and the bus are the same Redis, appends publish in their script; the
/// outbox shares the SQL store's pool. Events the bus receives go to `sink`.
pub(crate) async fn build(
    config: &BackendConfig,
    node_id: Arc<str>,
    metrics: Arc<Metrics>,
    sink: Arc<dyn Sink>,
) -> anyhow::Result<Backends> {
    let sink = match &config.faults {
        Some(faults) => Arc::new(ChaosSink::new(sink, faults.clone())) as Arc<dyn Sink>,
        None => sink,
    };
    let mut redis = redis::Shared::default();
    let mut nats = NatsClients::default();
    let bus: Arc<dyn Bus> = match &config.bus {
        BusConfig::Memory => {
            let bus = memory::MemoryBus::new();
            bus.attach(sink);
            Arc::new(bus)
        }
        BusConfig::Redis { url } => {
            let connected = redis.connect(url).await?;
            let keys = redis_keys(url, &config.prefix);
            match connected.server {
                redis::Server::Single(client) => {
                    let bus = redis::RedisBus::connect(client, connected.conn, connected.clock, keys, metrics).await?;
                    bus.attach(sink);
                    Arc::new(bus)
                }
                redis::Server::Cluster(seeds) => {
                    let bus =
                        redis::RedisShardedBus::connect(seeds, connected.conn, connected.clock, keys, metrics).await;
                    let bus = bus.with_context(|| format!("--bus {}", redact(url)))?;
                    bus.attach(sink);
                    Arc::new(bus)
                }
            }
        }
        BusConfig::Nats { url } => {
            let connection = nats.connect(url, config, &node_id, "--bus").await?;
            connection.check_payload(config.max_message_size).with_context(|| format!("--bus {}", redact(url)))?;
            let subjects = nats::Subjects::new(&config.prefix);
            let bus = nats::NatsBus::connect(connection, subjects, metrics).await;
            let bus = bus.with_context(|| format!("--bus {}", redact(url)))?;
            bus.attach(sink);
            Arc::new(bus)
        }
        BusConfig::Amqp { url } => {
            let names = amqp::Names::new(&config.prefix);
            let bus = amqp::AmqpBus::connect(url, names, &node_id, config.max_message_size, metrics).await?;
            bus.attach(sink);
            Arc::new(bus)
        }
    };
    let mut outbox: Option<Arc<dyn Outbox>> = None;
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Embedded { dir, sync } => Arc::new(embedded::EmbeddedStore::open(dir, config.retention, *sync)?),
        StoreConfig::Redis { url } => {
            let publish = match config.bus == (BusConfig::Redis { url: url.clone() }) {
                false => redis::Publish::No,
                true if redis::is_cluster_url(url) => redis::Publish::Sharded,
                true => redis::Publish::Plain,
            };
            let connected = redis.connect(url).await?;
            let keys = redis_keys(url, &config.prefix);
            let (conn, clock, wait) = (connected.conn, connected.clock, config.redis_wait_replicas);
            Arc::new(redis::RedisStore::new(conn, clock, keys, config.retention, publish, wait))
        }
        StoreConfig::Postgres { url } => {
            let store = postgres::PostgresStore::connect(url, &config.prefix, config.retention).await?;
            if config.outbox {
                let source = postgres::PostgresOutbox::start(store.pool().clone(), &config.prefix).await;
                outbox = Some(Arc::new(source.with_context(|| format!("--store {}", redact(url)))?));
            }
            Arc::new(store)
        }
        StoreConfig::Mysql { url } => {
            let store = mysql::MysqlStore::connect(url, &config.prefix, config.retention).await?;
            if config.outbox {
                let source = mysql::MysqlOutbox::start(store.pool().clone(), &config.prefix).await;
                outbox = Some(Arc::new(source.with_context(|| format!("--store {}", redact(url)))?));
            }
            Arc::new(store)
        }
        StoreConfig::Nats { url } => {
            let client = nats.connect(url, config, &node_id, "--store").await?.client().clone();
            let replicas = nats::replicas(&client);
            let store = nats::NatsStore::open(client, &config.prefix, config.retention, replicas).await;
            Arc::new(store.with_context(|| format!("--store {}: opening its JetStream stream", redact(url)))?)
        }
    };
    let (presence, registry): (Arc<dyn Presence>, Arc<dyn Registry>) = match &config.presence {
        PresenceConfig::Memory => {
            let presence = Arc::new(memory::MemoryPresence::new());
            (presence.clone(), Arc::new(memory::MemoryRegistry::new(presence)))
        }
        PresenceConfig::Redis { url } => {
            let redis::Connected { conn, clock, .. } = redis.connect(url).await?;
            let instance = Arc::new(redis::Instance::new(node_id));
            let keys = redis_keys(url, &config.prefix);
            let presence = redis::RedisPresence::new(conn.clone(), clock.clone(), keys.clone(), instance.clone());
            (Arc::new(presence), Arc::new(redis::RedisRegistry::new(conn, clock, keys, instance)))
        }
        PresenceConfig::Nats { url } => {
            let client = nats.connect(url, config, &node_id, "--presence").await?.client().clone();
            let replicas = nats::replicas(&client);
            let buckets = nats::Buckets::open(client, &config.prefix, replicas).await;
            let buckets = buckets.with_context(|| format!("--presence {}: opening its buckets", redact(url)))?;
            let instance = Arc::new(nats::Instance::new(node_id));
            let presence = nats::NatsPresence::new(buckets.clone(), instance.clone(), nats::DEAD_AFTER);
            (Arc::new(presence), Arc::new(nats::NatsRegistry::new(buckets, instance, nats::DEAD_AFTER)))
        }
    };
    Ok(Backends { store, bus, presence, registry, outbox })
}

/// The key layout for a Redis role on `url`: hash-tagged on a Redis Cluster.
fn redis_keys(url: &str, prefix: &str) -> redis::Keys {
    match redis::is_cluster_url(url) {
        true => redis::Keys::cluster(prefix),
        false => redis::Keys::new(prefix),
    }
}

/// The NATS clients of a node being built: one per URL, shared by the roles on it.
#[derive(Default)]
struct NatsClients {
    clients: Vec<(String, nats::Nats)>,
}

impl NatsClients {
    /// The client of `url`, connected on first use; `flag` names the role in errors.
    async fn connect(
        &mut self,
        url: &str,
        config: &BackendConfig,
        node_id: &str,
        flag: &str,
    ) -> anyhow::Result<nats::Nats> {
        if let Some((_, client)) = self.clients.iter().find(|(u, _)| u == url) {
            return Ok(client.clone());
        }
        let options = nats::NatsOptions {
            name: format!("switchyard {node_id}"),
            subscription_capacity: config.nats_subscription_capacity,
        };
        let client = nats::Nats::connect(url, &config.prefix, &options).await;
        let client = client.with_context(|| format!("{flag} {}", redact(url)))?;
        self.clients.push((url.to_owned(), client.clone()));
        Ok(client)
    }
}

/// `url` with any password (and user) replaced, for logs and error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // Several hosts may follow one credential (`nats://u:p@a:1,b:2`); the last `@` ends it.
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{tail}", &authority[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> anyhow::Result<BackendConfig> {
        let mut argv = vec!["switchyard", "serve"];
        argv.extend(args);
        let cli = crate::config::parse(argv)?;
        let crate::config::CliCommand::Serve(args) = cli.command;
        BackendConfig::from_args(&args)
    }

    fn refusal(args: &[&str]) -> String {
        config(args).expect_err("refused").to_string()
    }

    #[test]
    fn defaults_are_a_single_node() {
        let c = config(&[]).unwrap();
        assert!(matches!(c.store, StoreConfig::Embedded { .. }));
        assert_eq!((c.bus, c.presence, c.prefix.as_str()), (BusConfig::Memory, PresenceConfig::Memory, "switchyard"));
    }

    #[test]
    fn the_redis_shorthand_fills_every_role_and_a_role_of_its_own_beats_it() {
        let c = config(&["--redis", "redis://r:6379/0"]).unwrap();
        let url = "redis://r:6379/0".to_owned();
        assert_eq!(c.store, StoreConfig::Redis { url: url.clone() });
        assert_eq!(c.bus, BusConfig::Redis { url: url.clone() });
        assert_eq!(c.presence, PresenceConfig::Redis { url: url.clone() });
        let c = config(&["--redis", "redis://r:6379/0", "--store", "redis://s:6379/1"]).unwrap();
        assert_eq!(c.store, StoreConfig::Redis { url: "redis://s:6379/1".into() });
        assert_eq!(c.bus, BusConfig::Redis { url });
    }

    #[test]
    fn a_single_node_may_keep_its_store_on_a_server() {
        let c = config(&["--store", "redis://r:6379/0"]).unwrap();
        assert_eq!((c.bus, c.presence), (BusConfig::Memory, PresenceConfig::Memory));
        let c = config(&["--store", "postgres://u:p@db/app"]).unwrap();
        assert_eq!(c.store, StoreConfig::Postgres { url: "postgres://u:p@db/app".into() });
        let c = config(&["--redis", "redis://r/0", "--store", "mariadb://root@db/app"]).unwrap();
        assert_eq!(c.store, StoreConfig::Mysql { url: "mysql://root@db/app".into() });
        let c = config(&["--redis", "redis://r/0", "--store", "nats://a:4222,b:4222"]).unwrap();
        assert_eq!(c.store, StoreConfig::Nats { url: "nats://a:4222,b:4222".into() });
    }

    #[test]
    fn the_nats_shorthand_fills_every_role_and_nats_takes_each_role_alone() {
        let c = config(&["--nats", "nats://u:p@a:4222,b:4222"]).unwrap();
        let url = "nats://u:p@a:4222,b:4222".to_owned();
        assert_eq!(c.store, StoreConfig::Nats { url: url.clone() });
        assert_eq!(c.bus, BusConfig::Nats { url: url.clone() });
        assert_eq!(c.presence, PresenceConfig::Nats { url });
        let c = config(&["--nats", "nats://n:4222", "--store", "postgres://u:p@db/app"]).unwrap();
        assert_eq!(c.store, StoreConfig::Postgres { url: "postgres://u:p@db/app".into() });
        let c = config(&["--redis", "redis://r/0", "--presence", "nats://u:p@a:4222,b:4222"]).unwrap();
        assert_eq!(c.presence, PresenceConfig::Nats { url: "nats://u:p@a:4222,b:4222".into() });
        assert_eq!(c.bus, BusConfig::Redis { url: "redis://r/0".into() });
        let e = refusal(&["--nats", "nats://u:secret-pw@n:4222", "--redis", "redis://r/0"]);
        assert!(e.contains("--redis and --nats") && !e.contains("secret-pw"), "{e}");
        let e = refusal(&["--bus", "redis://r/0", "--store", "redis://r/0"]);
        assert!(e.contains("nats://…"), "the refusal names NATS presence: {e}");
    }

    #[test]
    fn a_cluster_bus_needs_shared_store_and_presence() {
        let e = refusal(&["--bus", "redis://r/0", "--presence", "redis://r/0"]);
        assert!(e.starts_with("--store embedded"), "{e}");
        let e = refusal(&["--bus", "redis://r/0", "--store", "redis://r/0"]);
        assert!(e.starts_with("--presence memory"), "{e}");
    }

    #[test]
    fn redis_cluster_takes_every_role_and_unknown_schemes_are_unknown() {
        let url = "redis+cluster://u:pw@a:1,b:2";
        let c = config(&["--redis", url, "--redis-wait-replicas", "1"]).unwrap();
        assert_eq!(c.store, StoreConfig::Redis { url: url.into() });
        assert_eq!(
            (c.bus, c.presence),
            (BusConfig::Redis { url: url.into() }, PresenceConfig::Redis { url: url.into() })
        );
        assert_eq!(c.redis_wait_replicas, 1);
        let e = refusal(&["--nats", "nats://n:4222", "--redis-wait-replicas", "1"]);
        assert!(e.contains("--redis-wait-replicas needs a Redis store"), "{e}");
        let e = refusal(&["--store", "mongodb://u:secret@db"]);
        assert!(e.contains("--store") && e.contains("unknown scheme `mongodb`") && !e.contains("secret"), "{e}");
        let e = refusal(&["--presence", "embedded"]);
        assert!(e.contains("--presence") && e.contains("cannot hold the presence role"), "{e}");
        let e = refusal(&["--bus", "localhost:6379"]);
        assert!(e.contains("--bus") && e.contains("not a URL"), "{e}");
    }

    #[test]
    fn nats_is_a_bus_beside_other_servers() {
        let shared = ["--store", "redis://r/0", "--presence", "redis://r/0"];
        for url in ["nats://u:pw@n:4222", "nats://a:1,b:2", "tls://n:4222", "NATS://n:4222"] {
            let c = config(&[&shared[..], &["--bus", url]].concat()).unwrap();
            assert_eq!(c.bus, BusConfig::Nats { url: url.into() });
        }
        let c = config(&["--redis", "redis://r/0", "--bus", "nats://n:4222"]).unwrap();
        assert_eq!(
            (c.bus, c.store),
            (BusConfig::Nats { url: "nats://n:4222".into() }, StoreConfig::Redis { url: "redis://r/0".into() })
        );
        let e = refusal(&["--bus", "nats://n:4222", "--presence", "redis://r/0"]);
        assert!(e.starts_with("--store embedded"), "a NATS bus makes a cluster member: {e}");
        let e = refusal(&[&shared[..], &["--bus", "nats://n:4222", "--test-nats-subscription-capacity", "0"]].concat());
        assert!(e.contains("--test-nats-subscription-capacity"), "{e}");
        let c = config(&[&shared[..], &["--bus", "nats://n:4222", "--test-nats-subscription-capacity", "8"]].concat());
        assert_eq!(c.unwrap().nats_subscription_capacity, Some(8));
    }

    #[test]
    fn rabbitmq_is_a_bus_only_and_its_limits_are_checked_at_start_up() {
        let url = "amqp://guest:pw@mq:5672/%2f";
        let c = config(&["--bus", url, "--store", "redis://r/0", "--presence", "redis://r/0"]).unwrap();
        assert_eq!(c.bus, BusConfig::Amqp { url: url.into() });
        let c = config(&["--redis", "redis://r/0", "--bus", url, "--store", "postgres://u:p@db/app"]).unwrap();
        assert_eq!(
            (c.bus, c.store),
            (BusConfig::Amqp { url: url.into() }, StoreConfig::Postgres { url: "postgres://u:p@db/app".into() })
        );
        for (flag, role) in [("--store", "store"), ("--presence", "presence")] {
            let e = refusal(&["--redis", "redis://r/0", flag, url]);
            assert!(e.starts_with(flag) && e.contains(&format!("cannot hold the {role} role")), "{e}");
            assert!(!e.contains(":pw@"), "credentials printed: {e}");
        }
        let e = refusal(&["--bus", url, "--presence", "redis://r/0"]);
        assert!(e.starts_with("--store embedded") && !e.contains(":pw@"), "{e}");
        let shared = ["--redis", "redis://r/0", "--bus"];
        assert!(config(&[&shared[..], &["amqps://guest:pw@mq:5671/%2f"]].concat()).is_ok());
        let e = refusal(&[&shared[..], &["amqps://guest:pw@mq:5671/%2f?cacertfile=/none.pem"]].concat());
        assert!(e.contains("cannot read cacertfile /none.pem") && !e.contains(":pw@"), "{e}");
        let e = refusal(&[&shared[..], &[url, "--prefix", "amq"]].concat());
        assert!(e.contains("--prefix amq"), "{e}");
        let e = refusal(&[&shared[..], &[url, "--max-message-size", "134217728"]].concat());
        assert!(e.contains("lower --max-message-size to at most 134209536"), "{e}");
        assert!(config(&[&shared[..], &[url, "--max-message-size", "134209536"]].concat()).is_ok());
    }

    #[test]
    fn the_outbox_needs_a_sql_store() {
        for args in [&["--outbox"][..], &["--redis", "redis://:secret-pw@r/0", "--outbox"]] {
            let e = refusal(args);
            assert!(e.contains("--outbox needs") && e.contains("--store"), "{e}");
            assert!(!e.contains("secret-pw"), "credentials printed: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "outbox = true\n").unwrap();
        let e = refusal(&["--config", file.to_str().unwrap()]);
        assert!(e.contains("--outbox needs"), "the file's key is read: {e}");
        assert!(!config(&[]).unwrap().outbox, "off by default");
        assert!(config(&["--store", "postgres://u:p@db/app", "--outbox"]).unwrap().outbox);
        let c = config(&["--redis", "redis://r/0", "--store", "mariadb://u:p@db/app", "--outbox"]).unwrap();
        assert!(c.outbox && matches!(c.store, StoreConfig::Mysql { .. }));
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact("redis://:pw@r:6379/0"), "redis://***@r:6379/0");
        assert_eq!(redact("postgres://u:p@db:5432/app?sslmode=x"), "postgres://***@db:5432/app?sslmode=x");
        assert_eq!(redact("nats://u:p@a:1,b:2"), "nats://***@a:1,b:2");
        assert_eq!(redact("redis://r:6379/0"), "redis://r:6379/0");
        assert_eq!(redact("memory"), "memory");
    }
}
