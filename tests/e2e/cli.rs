//! The `switchyard` binary itself: option precedence (flag > environment > file), refusal of bad
//! options, help text, start-up banner.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::raw_http;

/// The `switchyard` binary, with none of the test's `SWITCHYARD_` environment.
pub(crate) fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHYARD_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Starts the binary and reads its first stdout line, which names the address.
fn spawn(mut cmd: Command) -> (Child, std::net::SocketAddr, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut banner = String::new();
    lines.read_line(&mut banner).expect("banner");
    let mut second = String::new();
    lines.read_line(&mut second).expect("dev mode line");
    let addr = banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("banner names the address: {banner}"));
    (child, addr, format!("{banner}{second}"))
}

async fn node_id(addr: std::net::SocketAddr) -> String {
    let (status, body) = raw_http(addr, "GET", "/api/v1/nodes", "", "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["nodes"][0]["id"].as_str().unwrap().to_owned()
}

fn stop(mut child: Child) {
    // SIGTERM: the node shuts down gracefully and exits 0.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().expect("exits");
    assert!(status.success(), "graceful exit: {status}");
}

#[tokio::test]
async fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchyard.toml");
    std::fs::write(&file, "node-id = \"from-file\"\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let data = dir.path().join("data");
    let base = |cmd: &mut Command| {
        cmd.args(["serve", "--config"]).arg(&file).arg("--data-dir").arg(&data);
    };

    let mut cmd = binary();
    base(&mut cmd);
    let (child, addr, banner) = spawn(cmd);
    assert!(banner.contains("dev mode"), "{banner}");
    assert_eq!(node_id(addr).await, "from-file");
    stop(child);

    let mut cmd = binary();
    base(&mut cmd);
    cmd.env("SWITCHYARD_NODE_ID", "from-env");
    let (child, addr, _) = spawn(cmd);
    assert_eq!(node_id(addr).await, "from-env");
    stop(child);

    let mut cmd = binary();
    base(&mut cmd);
    cmd.env("SWITCHYARD_NODE_ID", "from-env").args(["--node-id", "from-flag"]);
    let (child, addr, _) = spawn(cmd);
    assert_eq!(node_id(addr).await, "from-flag");
    stop(child);
}

#[test]
fn bad_options_are_refused_with_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["serve", "--listen", "0.0.0.0:0"], "dev mode"),
        (&["serve", "--history-size", "0"], "--history-size"),
        (&["serve", "--rate-limit", "lots"], "--rate-limit"),
        (&["serve", "--jwt-public-key", "/nonexistent.pem", "--listen", "127.0.0.1:0"], "--jwt-public-key"),
    ];
    for (args, expected) in cases {
        let out = binary().args(args).arg("--data-dir").arg(dir.path()).output().expect("runs");
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, "listen = [\n").unwrap();
    let out = binary().args(["serve", "--config"]).arg(&bad_file).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));
}

#[test]
fn help_describes_every_option() {
    let out = binary().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--node-id",
        "--data-dir",
        "--redis",
        "--jwt-secret",
        "--jwt-public-key",
        "--api-key",
        "--single-session",
        "--private-prefix",
        "--quiet-prefix",
        "--history-size",
        "--history-ttl",
        "--max-message-size",
        "--rate-limit",
        "--max-connections",
        "--config",
        "SWITCHYARD_LISTEN",
    ] {
        assert!(help.contains(flag), "serve --help mentions {flag}");
    }
    let out = binary().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = binary()
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(log["level"], "INFO");
    assert_eq!(log["message"], "listening");
    assert!(log["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{log}");
}
