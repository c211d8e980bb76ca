//! A private `redis-server` per test: started on a free port, killed when dropped. Tests that
//! need Redis and cannot find the binary skip with a printed reason, except under `CI=true`,
//! where they fail.

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
        use std::io::{BufRead, BufReader, Read, Write};
        let Some(pid) = self.child.as_ref().map(Child::id) else { return false };
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"INFO server\r\n").is_err() {
            return false;
        }
        let mut reader = BufReader::new(stream);
        let mut header = String::new();
        let Some(len) = reader.read_line(&mut header).ok().and_then(|_| header.trim().strip_prefix('$')?.parse().ok())
        else {
            return false;
        };
        let mut info = vec![0u8; len];
        if reader.read_exact(&mut info).is_err() {
            return false;
        }
        String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .is_some_and(|p| p.trim() == pid.to_string())
    }
}
