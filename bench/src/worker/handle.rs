//! The coordinator's handle on a worker, in its own process or in a child process.
//!
//! A child is this same binary run as `switchyard-bench worker`: its first stdin line is the
//! [`WorkerSpec`], then one [`ToWorker`] per line; it answers one [`FromWorker`] per stdout line
//! (JSON). Its stderr is the coordinator's.

use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::plan::{FromWorker, ToWorker, WorkerSpec};

pub enum Handle {
    InProcess { tx: mpsc::UnboundedSender<ToWorker>, rx: mpsc::UnboundedReceiver<FromWorker>, task: JoinHandle<()> },
    Child { child: Box<Child>, stdin: ChildStdin, lines: Lines<BufReader<ChildStdout>> },
}

impl Handle {
    pub fn in_process(spec: WorkerSpec) -> Self {
        let (to_tx, to_rx) = mpsc::unbounded_channel();
        let (from_tx, from_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(super::run(spec, to_rx, from_tx));
        Handle::InProcess { tx: to_tx, rx: from_rx, task }
    }

    pub async fn child(spec: &WorkerSpec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut line = serde_json::to_vec(spec)?;
        line.push(b'\n');
        stdin.write_all(&line).await?;
        stdin.flush().await?;
        Ok(Handle::Child { child: Box::new(child), stdin, lines: BufReader::new(stdout).lines() })
    }

    pub async fn send(&mut self, msg: &ToWorker) -> anyhow::Result<()> {
        match self {
            Handle::InProcess { tx, .. } => tx.send(msg.clone()).map_err(|_| anyhow::anyhow!("worker gone")),
            Handle::Child { stdin, .. } => {
                let mut line = serde_json::to_vec(msg)?;
                line.push(b'\n');
                stdin.write_all(&line).await?;
                stdin.flush().await?;
                Ok(())
            }
        }
    }

    pub async fn recv(&mut self) -> anyhow::Result<FromWorker> {
        let msg = match self {
            Handle::InProcess { rx, .. } => rx.recv().await.context("worker ended early")?,
            Handle::Child { lines, .. } => {
                let line = lines.next_line().await?.context("worker process ended early")?;
                serde_json::from_str(&line).with_context(|| format!("bad worker line: {line:.200}"))?
            }
        };
        if let FromWorker::Failed(e) = msg {
            bail!("worker failed: {e}");
        }
        Ok(msg)
    }

    /// Waits for the worker to end (a child is killed if it takes more than 10 s).
    pub async fn finish(self) {
        match self {
            Handle::InProcess { task, .. } => {
                let _ = task.await;
            }
            Handle::Child { mut child, stdin, .. } => {
                drop(stdin);
                if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// The `worker` subcommand: one worker driven over stdin/stdout.
pub async fn child_main() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let spec: WorkerSpec = serde_json::from_str(&lines.next_line().await?.context("no spec on stdin")?)?;
    let (to_tx, to_rx) = mpsc::unbounded_channel();
    let (from_tx, mut from_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(msg) => {
                    if to_tx.send(msg).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker: bad control line: {e}"),
            }
        }
    });
    let worker = tokio::spawn(super::run(spec, to_rx, from_tx));
    let mut stdout = tokio::io::stdout();
    while let Some(msg) = from_rx.recv().await {
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        stdout.write_all(&line).await?;
        stdout.flush().await?;
        if matches!(msg, FromWorker::Result(_) | FromWorker::Failed(_)) {
            break;
        }
    }
    worker.abort();
    Ok(())
}
