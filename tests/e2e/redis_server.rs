//! A private `redis-server` per test: started on a free port, killed when dropped; and a private
//! Redis Cluster ([`RedisCluster`]) of several, or the one every `cluster_redis_cluster` variant
//! of a test process shares ([`shared_cluster`]). Tests that need Redis and cannot find the
//! binaries skip with a printed reason, except under `CI=true`, where they fail.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl RedisServer {
    /// Starts a server, or answers `None` (after printing why) when `redis-server` is missing
    /// outside CI.
    pub fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("redis-server is not installed; CI must install it (apt-get install redis-server)");
            }
            eprintln!("SKIP: redis-server is not installed, so this cluster test cannot run");
            return None;
        }
        let mut server = Self { child: None, port: free_port(), dir: tempfile::tempdir().expect("temp dir") };
        server.spawn();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and starts a new, empty one on the same port (no persistence: every key
    /// is gone, as after a crash of a Redis without persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether cluster tests can run: true when `redis-server` is installed; otherwise prints SKIP
/// and answers false, except under `CI=true`, where it panics.
pub fn available() -> bool {
    if Command::new("redis-server").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("redis-server is not installed; CI must install it (apt-get install redis-server)");
    }
    eprintln!("SKIP: redis-server is not installed, so this cluster test cannot run");
    false
}

impl RedisServer {
    /// Like [`RedisServer::start`], and makes sure the server on the port is this one: `start`
    /// picks a free port, then releases it, so under parallel tests another process (a node, or
    /// another test's redis-server) may take the port first; this server then exits and the
    /// readiness check sees the other listener. Such a start is retried on a new port.
    pub fn start_checked() -> Option<Self> {
        for _ in 0..5 {
            let server = Self::start()?;
            if server.owns_port() {
                return Some(server);
            }
            eprintln!("redis-server lost port {} to another process; retrying on another port", server.port);
        }
        panic!("redis-server could not keep a free port in 5 tries");
    }

    /// Whether the process answering on the port is this server's child (`INFO server` names
    /// its `process_id`).
    fn owns_port(&self) -> bool {
        self.child.as_ref().is_some_and(|child| serves(self.port, child.id()))
    }
}

/// Whether the Redis answering on `port` is process `pid` (`INFO server` names its `process_id`).
fn serves(port: u16, pid: u32) -> bool {
    query(port, "INFO server").is_some_and(|info| {
        info.lines().find_map(|l| l.strip_prefix("process_id:")).is_some_and(|p| p.trim() == pid.to_string())
    })
}

/// Sends one inline command to the Redis on `port` and answers its reply as text: a bulk or
/// simple string, or an integer's digits. `None` when nothing answers within 2 s or the reply is
/// an error. Enough for `INFO`, `CLUSTER INFO`, `CLUSTER NODES` and `CLUSTER KEYSLOT`, without a
/// `redis-cli` process per poll.
pub fn query(port: u16, command: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let header = header.trim_end();
    match header.split_at_checked(1)? {
        ("$", len) => {
            let mut body = vec![0u8; len.parse().ok()?];
            reader.read_exact(&mut body).ok()?;
            Some(String::from_utf8_lossy(&body).into_owned())
        }
        ("+" | ":", value) => Some(value.to_owned()),
        _ => None,
    }
}

/// Whether Redis Cluster tests can run: `redis-server` and `redis-cli` (which creates the
/// cluster) are installed. Otherwise prints SKIP and answers false, except under `CI=true`,
/// where it panics.
pub fn cluster_available() -> bool {
    let present = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if present("redis-server") && present("redis-cli") {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("redis-server or redis-cli is not installed; CI must install them (apt-get install redis-server)");
    }
    eprintln!("SKIP: redis-server or redis-cli is not installed, so this Redis Cluster test cannot run");
    false
}

/// A slot range a master serves, as `CLUSTER NODES` lists it: first slot, last slot, the
/// master's port.
type SlotRange = (u16, u16, u16);

/// A private Redis Cluster: `masters` masters with `replicas` replicas each, created by
/// `redis-cli --cluster create`, every server on two free ports of its own (clients, and the
/// cluster bus through `--cluster-port`, so that no port+10000 has to be free), no persistence.
/// Every server is SIGKILLed when this is dropped, and also when the test process dies (see
/// [`spawn_tied`]).
pub struct RedisCluster {
    /// Every server's client port, in start order.
    pub ports: Vec<u16>,
    /// Every server's cluster bus port, in the same order.
    bus_ports: Vec<u16>,
    node_timeout: Duration,
    children: Vec<Option<Child>>,
    /// The slot ranges once the cluster was created, sorted by first slot.
    initial: Vec<SlotRange>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// A cluster with a 2 s `cluster-node-timeout` (a dead master is failed over a few seconds
    /// later), or `None` after printing why when the tools are missing (see
    /// [`cluster_available`]). Returns once every server says `cluster_state:ok`, they agree on
    /// who serves each slot, and every replica is linked to its master.
    pub fn start(masters: usize, replicas: usize) -> Option<Self> {
        Self::start_with(masters, replicas, Duration::from_millis(2000), tempfile::tempdir().expect("temp dir"))
    }

    /// Like [`RedisCluster::start`], with the servers' `cluster-node-timeout` and their
    /// directory (nodes.conf and each server's log).
    pub fn start_with(masters: usize, replicas: usize, node_timeout: Duration, dir: tempfile::TempDir) -> Option<Self> {
        if !cluster_available() {
            return None;
        }
        let count = masters * (1 + replicas);
        let mut cluster = Self {
            ports: Vec::new(),
            bus_ports: Vec::new(),
            node_timeout,
            children: Vec::new(),
            initial: Vec::new(),
            dir,
        };
        // The ports are free when picked and taken when the servers bind, so a parallel test
        // may take one first (see `RedisServer::start_checked`): then start again elsewhere.
        for attempt in 1..=5 {
            match cluster.spawn_all(count).and_then(|()| cluster.create(replicas)) {
                Ok(()) => return Some(cluster),
                Err(why) if attempt < 5 => {
                    eprintln!("Redis Cluster start failed ({why}); retrying on other ports");
                    cluster.kill_all();
                }
                Err(why) => panic!("the Redis Cluster did not start in 5 tries: {why}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts `count` servers on fresh ports and checks that each port is served by its own
    /// child.
    fn spawn_all(&mut self, count: usize) -> Result<(), String> {
        let ports = free_ports(2 * count);
        self.ports = ports[..count].to_vec();
        self.bus_ports = ports[count..].to_vec();
        self.children = (0..count).map(|_| None).collect();
        for i in 0..count {
            self.spawn(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..count {
            self.wait_served(i, deadline)?;
        }
        Ok(())
    }

    /// Starts server `i` on its ports with its `nodes.conf` (a server that was killed comes back
    /// as the cluster member it was).
    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let port = self.ports[i];
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-port", &self.bus_ports[i].to_string()])
            .args(["--cluster-node-timeout", &self.node_timeout.as_millis().to_string()])
            // A replica's first sync starts at once, not after the default 5 s wait for more
            // replicas to share it.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--cluster-config-file")
            .arg(self.dir.path().join(format!("nodes-{port}.conf")))
            .arg("--logfile")
            .arg(self.dir.path().join(format!("redis-{port}.log")))
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.children[i] = Some(spawn_tied(command).map_err(|e| format!("redis-server: {e}"))?);
        Ok(())
    }

    /// Waits until server `i`'s port is served by its own child.
    fn wait_served(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let port = self.ports[i];
        let pid = self.children[i].as_ref().map(Child::id).unwrap_or_default();
        while !serves(port, pid) {
            let exited = self.children[i].as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                return Err(format!("port {port} is not served by its redis-server"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts server `i` again after [`RedisCluster::kill`], on the same ports with its
    /// `nodes.conf` and without data, as a crashed machine comes back: a master that was failed
    /// over rejoins as a replica of the server that took its slots.
    pub fn restart(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "server {i} is running");
        self.spawn(i).unwrap_or_else(|e| panic!("restart of server {i}: {e}"));
        self.wait_served(i, Instant::now() + Duration::from_secs(10)).unwrap_or_else(|e| panic!("restart: {e}"));
    }

    /// Waits (up to 60 s) until the master on `port` has `replicas` replicas in sync (`state=online`
    /// in its `INFO replication`), so that a `WAIT` for them can be answered.
    pub async fn wait_replicated(&self, port: u16, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let online = query(port, "INFO replication")
                .map(|info| info.lines().filter(|l| l.starts_with("slave") && l.contains("state=online")).count());
            if online.is_some_and(|n| n >= replicas) {
                return;
            }
            assert!(Instant::now() < deadline, "master {port} has no {replicas} replicas in sync within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis-cli --cluster create`, then waits until the cluster has settled.
    fn create(&mut self, replicas: usize) -> Result<(), String> {
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.contains("All 16384 slots covered") {
            return Err(format!("redis-cli --cluster create: {stdout}{}", String::from_utf8_lossy(&output.stderr)));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(view) = self.settled()
                && self.replicas_linked(replicas)
            {
                self.initial = view;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the cluster did not settle within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether every master has `replicas` replicas connected and every replica's link to its
    /// master is up (so that a `WAIT 1` can be answered from the start).
    fn replicas_linked(&self, replicas: usize) -> bool {
        self.alive_ports().all(|port| {
            let Some(info) = query(port, "INFO replication") else { return false };
            let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
            match field("role:") {
                Some("master") => field("connected_slaves:") == Some(replicas.to_string().as_str()),
                Some("slave") => field("master_link_status:") == Some("up"),
                _ => false,
            }
        })
    }

    /// The client ports of the servers not killed.
    fn alive_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().zip(&self.children).filter(|(_, c)| c.is_some()).map(|(p, _)| *p)
    }

    /// The slot map every live server agrees on, when each says `cluster_state:ok` and together
    /// they cover every slot; `None` otherwise.
    fn settled(&self) -> Option<Vec<SlotRange>> {
        let mut agreed: Option<Vec<SlotRange>> = None;
        for port in self.alive_ports() {
            if !query(port, "CLUSTER INFO")?.contains("cluster_state:ok") {
                return None;
            }
            let view = slot_map(&query(port, "CLUSTER NODES")?);
            match &agreed {
                Some(other) if *other != view => return None,
                Some(_) => {}
                None => agreed = Some(view),
            }
        }
        let view = agreed?;
        let covered: usize = view.iter().map(|(first, last, _)| usize::from(last - first) + 1).sum();
        (covered == 16384).then_some(view)
    }

    /// The `redis+cluster://` URL of the masters the cluster was created with.
    pub fn url(&self) -> String {
        let mut masters: Vec<u16> = self.initial.iter().map(|r| r.2).collect();
        masters.sort_unstable();
        masters.dedup();
        let hosts: Vec<String> = masters.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The ports of the masters that serve slots now, as the first live server sees it.
    pub fn master_ports(&self) -> Vec<u16> {
        let view = self.alive_ports().find_map(|p| query(p, "CLUSTER NODES")).map(|n| slot_map(&n)).unwrap_or_default();
        let mut masters: Vec<u16> = view.iter().map(|r| r.2).collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// The port of the master that served `key`'s slot when the cluster was created.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.alive_ports().next().expect("a live server");
        let slot: u16 = query(port, &format!("CLUSTER KEYSLOT {key}"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key} answered"));
        self.initial.iter().find(|r| r.0 <= slot && slot <= r.1).map(|r| r.2).expect("every slot has a master")
    }

    /// The index in [`RedisCluster::ports`] of the server on `port`.
    pub fn index_of(&self, port: u16) -> usize {
        self.ports.iter().position(|&p| p == port).unwrap_or_else(|| panic!("no server of this cluster on {port}"))
    }

    /// The port of a replica of the master on `master`, as the first live server sees it.
    pub fn replica_of(&self, master: u16) -> u16 {
        let nodes = self.alive_ports().find_map(|p| query(p, "CLUSTER NODES")).expect("a live server answers");
        let rows: Vec<Vec<&str>> = nodes.lines().map(|l| l.split_whitespace().collect()).collect();
        let port = |row: &Vec<&str>| row[1].split(['@', ',']).next()?.rsplit(':').next()?.parse::<u16>().ok();
        let id = rows.iter().find(|r| r.len() > 3 && port(r) == Some(master)).map(|r| r[0]);
        let id = id.unwrap_or_else(|| panic!("no server on {master} in {nodes}"));
        rows.iter()
            .filter(|r| r.len() > 3 && r[3] == id)
            .find_map(port)
            .unwrap_or_else(|| panic!("master {master} has no replica: {nodes}"))
    }

    /// SIGSTOPs server `i` (`resume` undoes it): it keeps its connections but does nothing, as a
    /// process that is stalled or swapped out.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONTs server `i` after [`RedisCluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let pid = self.children[i].as_ref().map(Child::id).unwrap_or_else(|| panic!("server {i} is not running"));
        // SAFETY: kill(2) on a child this value owns and has not reaped.
        let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} to redis-server {pid}: {}", std::io::Error::last_os_error());
    }

    /// SIGKILLs server `i` (an index in [`RedisCluster::ports`]): it vanishes without a word.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_all(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }

    /// Waits (up to 60 s) until the slots master `old` served when the cluster was created are
    /// served by another server and every live server agrees and says `cluster_state:ok`;
    /// answers the new master's port.
    pub async fn wait_promoted(&self, old: u16) -> u16 {
        let first = self.initial.iter().find(|r| r.2 == old).unwrap_or_else(|| panic!("{old} was no master")).0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(view) = self.settled()
                && !view.iter().any(|r| r.2 == old)
            {
                return view.iter().find(|r| r.0 == first).map(|r| r.2).expect("the old master's first slot is served");
            }
            assert!(Instant::now() < deadline, "no replica took the slots of master {old} within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of each server's log, for a failing test.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for port in &self.ports {
            let log = std::fs::read_to_string(self.dir.path().join(format!("redis-{port}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "--- redis-server {port}:\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        self.kill_all();
    }
}

/// The masters' slot ranges in a `CLUSTER NODES` answer, sorted by first slot (ranges being
/// imported or migrated, `[…]`, are left out).
fn slot_map(nodes: &str) -> Vec<SlotRange> {
    let mut ranges = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].split(',').any(|f| f == "master") {
            continue;
        }
        let address = fields[1].split(['@', ',']).next().unwrap_or_default();
        let Some(port) = address.rsplit(':').next().and_then(|p| p.parse().ok()) else { continue };
        for slots in &fields[8..] {
            let (first, last) = slots.split_once('-').unwrap_or((slots, slots));
            if let (Ok(first), Ok(last)) = (first.parse(), last.parse()) {
                ranges.push((first, last, port));
            }
        }
    }
    ranges.sort_unstable();
    ranges
}

/// `count` distinct ports that were free a moment ago (held together while picked, so that no
/// two are the same).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("bound").port()).collect()
}

/// Spawns `command` with `PR_SET_PDEATHSIG` = SIGKILL, so that the child dies with the test
/// process even when nothing drops its handle: a process killed by a signal, or a value in a
/// `static`, which Rust never drops. The signal fires when the *thread* that forked the child
/// ends, not the process; test threads end with each test, so every child is forked by one
/// thread that lives as long as the process.
pub fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure calls only async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nothing would signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the spawner thread starts");
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner.lock().unwrap_or_else(|e| e.into_inner()).send((command, reply)).expect("the spawner thread runs");
    answer.recv().expect("the spawner thread answers")
}

/// The Redis Cluster of the `cluster_redis_cluster` variants: 3 masters without replicas,
/// started on first use and shared by every test of the process (each has its own `--prefix`).
/// Starting one per test would cost each of the ~70 variants about 2 s and 3 more processes on
/// a machine that runs many tests at once. It is never dropped (it lives in a `static`): its
/// servers die with the process through [`spawn_tied`]. Nothing fails it over, so its node
/// timeout is long: a server slowed by a busy machine is not declared failed. Its directory is
/// under the target's tmp dir, named with the process id; directories of processes that are
/// gone are removed when the next one starts.
pub fn shared_cluster() -> Option<&'static RedisCluster> {
    static SHARED: std::sync::OnceLock<Option<RedisCluster>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name.strip_prefix("shared-redis-cluster-").and_then(|rest| rest.split('-').next());
                if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let dir = tempfile::Builder::new()
                .prefix(&format!("shared-redis-cluster-{}-", std::process::id()))
                .tempdir_in(root)
                .expect("temp dir");
            RedisCluster::start_with(3, 0, Duration::from_secs(15), dir)
        })
        .as_ref()
}
