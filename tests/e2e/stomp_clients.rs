//! Real, widely used STOMP clients against real nodes (PROTOCOL.md §7): `@stomp/stompjs` under
//! Node.js, with a JSON-protocol peer over `ws` (tests/stomp-clients/stompjs.mjs), and `stomp.py`
//! through its WebSocket transport (stomp_py.py). Each test starts two `switchyard serve`
//! processes, a dev-mode one with `--ping-interval 1` and one with `--jwt-secret`, runs its script
//! against them, and asserts the script's exit status and its summary line, which must count
//! every scenario as passed.
//!
//! tests/stomp-clients/setup.sh installs the clients (npm ci; pip install --target), once per
//! process here and idempotent across processes. Without node/npm, python3/pip or a registry to
//! install from, a test prints SKIP and passes, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::procs::NodeProc;

/// The HS256 secret of the JWT-mode node; the scripts sign their tokens with it.
const SECRET: &str = "stomp-clients-secret-0123456789abcdef";

/// The longest a script may run; each stops itself after 60 s and reports why.
const SCRIPT_WAIT: Duration = Duration::from_secs(120);

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stomp-clients")
}

/// The clients of one language, installed by one part of setup.sh.
#[derive(Clone, Copy)]
enum Part {
    Node,
    Python,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Node => "node",
            Part::Python => "python",
        }
    }

    /// Runs `setup.sh <part>` once per process: `Err(why)` when the clients cannot be installed.
    fn setup(self) -> Result<(), String> {
        static NODE: OnceLock<Result<(), String>> = OnceLock::new();
        static PYTHON: OnceLock<Result<(), String>> = OnceLock::new();
        let cell = match self {
            Part::Node => &NODE,
            Part::Python => &PYTHON,
        };
        cell.get_or_init(|| {
            let output = Command::new("bash")
                .arg(clients_dir().join("setup.sh"))
                .arg(self.name())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("bash could not run setup.sh: {e}"))?;
            if output.status.success() {
                return Ok(());
            }
            // Its last lines say why (npm's and pip's own errors come before them).
            let stderr = String::from_utf8_lossy(&output.stderr);
            let mut tail: Vec<&str> = stderr.lines().rev().take(6).collect();
            tail.reverse();
            Err(format!("setup.sh {} failed ({}):\n{}", self.name(), output.status, tail.join("\n")))
        })
        .clone()
    }

    /// Whether the clients can run: installs them, or prints SKIP and answers false, except
    /// under `CI=true`, where it panics.
    fn available(self) -> bool {
        let Err(why) = self.setup() else { return true };
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}; CI must install node, npm, python3 and pip (.ci/run does)");
        }
        eprintln!("SKIP: the {} STOMP clients are not installed: {why}", self.name());
        false
    }
}

/// The two nodes a script talks to, killed when dropped.
struct Nodes {
    dev: NodeProc,
    jwt: NodeProc,
    dir: tempfile::TempDir,
}

impl Nodes {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        let dev = NodeProc::single(&path.join("dev"), path.join("dev.log"), &["--ping-interval", "1"]).await;
        let jwt = NodeProc::single(&path.join("jwt"), path.join("jwt.log"), &["--jwt-secret", SECRET]).await;
        Self { dev, jwt, dir }
    }

    /// Runs `program script DEV_URL JWT_URL` and asserts that it exits 0 with the summary
    /// `label: expected passed, 0 failed` as its last line. Prints what the script printed.
    async fn run(&self, program: &str, script: &str, label: &str, expected: usize) {
        let out = self.dir.path().join(format!("{script}.out"));
        let stdout = std::fs::File::create(&out).expect("script output file");
        let stderr = stdout.try_clone().expect("script output file");
        let mut child = Command::new(program)
            .arg(clients_dir().join(script))
            .arg(format!("http://{}", self.dev.addr))
            .arg(format!("http://{}", self.jwt.addr))
            .env("JWT_SECRET", SECRET)
            .current_dir(clients_dir())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {script} starts: {e}"));
        let deadline = Instant::now() + SCRIPT_WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the script") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let printed = std::fs::read_to_string(&out).unwrap_or_default();
                panic!("{script} did not end within {SCRIPT_WAIT:?}:\n{printed}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let printed = std::fs::read_to_string(&out).expect("script output");
        println!("--- {program} {script}:\n{printed}");
        for known in printed.lines().filter(|l| l.starts_with("KNOWN:")) {
            eprintln!("{script}: {known}");
        }
        let summary = printed.lines().rev().find(|l| l.starts_with(&format!("{label}: ")));
        assert_eq!(
            summary,
            Some(format!("{label}: {expected} passed, 0 failed").as_str()),
            "{script} (exit {status}):\n{printed}"
        );
        assert!(status.success(), "{script} exited with {status}:\n{printed}");
    }
}

/// `@stomp/stompjs` 7 under Node.js: connect on `/stomp` and `/ws`, direct messages with receipts
/// and every MESSAGE header, rooms with presence, `client-individual` ACKs moving the read cursor,
/// DISCONNECT and resume with `since`, a refusal on the error queue, heart-beats at 1 s for 5 s,
/// JWT in CONNECT and at the upgrade, and a JSON-protocol peer.
#[tokio::test]
async fn stompjs_under_node() {
    if !Part::Node.available() {
        return;
    }
    let nodes = Nodes::start().await;
    nodes.run("node", "stompjs.mjs", "stompjs", 10).await;
}

/// `stomp.py` over its WebSocket transport: the same scenarios (a `STOMP` frame to connect, a
/// token in an upgrade header too), with heart-beats for 3.5 s and a JSON-protocol peer over
/// `websocket-client`.
#[tokio::test]
async fn stomp_py_over_websocket() {
    if !Part::Python.available() {
        return;
    }
    let nodes = Nodes::start().await;
    nodes.run("python3", "stomp_py.py", "stomp.py", 9).await;
}
