//! A private `nats-server` per test (JetStream on, in a temp dir): started on a free port,
//! killed when dropped. Tests that need NATS and cannot find the binary skip with a printed
//! reason, except under `CI=true`, where they fail.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// The server's name (`-n`), unique, by which it is told apart from whatever else may have
    /// taken its port.
    name: String,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Whether NATS tests can run: true when `nats-server` is installed; otherwise prints SKIP and
/// answers false, except under `CI=true`, where it panics.
pub fn available() -> bool {
    if Command::new("nats-server").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("nats-server is not installed; CI must install it (apt-get install nats-server)");
    }
    eprintln!("SKIP: nats-server is not installed, so this NATS test cannot run");
    false
}

impl NatsServer {
    /// Starts a server, or answers `None` (after printing why) when `nats-server` is missing
    /// outside CI.
    pub fn start() -> Option<Self> {
        Self::start_with("")
    }

    /// Like [`NatsServer::start`], with `config` as the lines of its configuration file (e.g.
    /// `max_payload: 4096`). `start` picks a free port, then releases it, so another process may
    /// take it first; the server then fails to listen, and is started again on another port.
    pub fn start_with(config: &str) -> Option<Self> {
        if !available() {
            return None;
        }
        for _ in 0..5 {
            let name = format!("sy-test-{:016x}", fastrand::u64(..));
            let mut server = Self { child: None, port: free_port(), name, dir: tempfile::tempdir().expect("temp dir") };
            if server.spawn(config) {
                return Some(server);
            }
            eprintln!("nats-server lost port {} to another process; retrying on another port", server.port);
        }
        panic!("nats-server could not keep a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Starts the process and answers whether the server listening on the port is this one.
    fn spawn(&mut self, config: &str) -> bool {
        let file = self.dir.path().join("nats.conf");
        std::fs::write(&file, config).expect("nats-server config file");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-n", &self.name, "-js", "-sd"])
            .arg(self.dir.path().join("jetstream"))
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(name) = self.listening_name() {
                return name == self.name;
            }
            let exited = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return false;
            }
            assert!(Instant::now() < deadline, "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `server_name` of the `INFO` line that the server on the port greets with.
    fn listening_name(&self) -> Option<String> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
        Some(info["server_name"].as_str()?.to_owned())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
