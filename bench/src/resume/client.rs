//! One receiving client of the resume scenario: it counts what arrives, and when its
//! connection ends it reconnects to the other nodes in turn and resumes from the last seq it saw.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use super::{CATCH_UP_ID, Ctx, Phase};
use crate::cli::StreamKind;
use crate::clock::now_us;
use crate::latency::Latency;
use crate::ledger::FlowTally;
use crate::net::{Conn, ws_error_kind};
use crate::plan::bump;
use crate::wire::Frame;

#[derive(Default)]
pub(super) struct ClientLog {
    pub(super) established: bool,
    pub(super) failure: Option<String>,
    pub(super) tally: FlowTally,
    /// First receipt time by message number (0: not received).
    pub(super) first_receipt: Vec<u64>,
    pub(super) last_seq: u64,
    /// When each connection ended, and why.
    pub(super) ends: Vec<(u64, String)>,
    /// When each catch-up request was answered after a reconnect.
    pub(super) resumed_at: Vec<u64>,
    pub(super) reconnect_failures: BTreeMap<String, u64>,
    pub(super) foreign: u64,
    pub(super) stray: u64,
}

impl ClientLog {
    pub(super) fn on_frame(
        &mut self,
        frame: &Frame<'_>,
        at: u64,
        my_flow: u32,
        my_stream: &str,
        latency: &std::sync::Mutex<Latency>,
    ) {
        let Frame::Message { probe, stream, seq } = frame else {
            return;
        };
        if let (Some(s), Some(q)) = (stream, seq)
            && s.as_ref() == my_stream
        {
            self.last_seq = self.last_seq.max(*q);
        }
        let Some(p) = probe else {
            self.foreign += 1;
            return;
        };
        if p.p != my_flow {
            self.stray += 1;
            return;
        }
        if self.tally.record(p.n) == crate::ledger::Arrival::New {
            let i = p.n as usize;
            if self.first_receipt.len() <= i {
                self.first_receipt.resize(i + 1, 0);
            }
            self.first_receipt[i] = at;
            latency.lock().unwrap().record_between(p.t, at);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn client(
    ctx: Arc<Ctx>,
    user: String,
    flow: u32,
    start_target: usize,
    index: usize,
    mut phase: watch::Receiver<Phase>,
    received: Arc<AtomicU64>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
) -> ClientLog {
    let mut log = ClientLog::default();
    let my_stream = match ctx.stream {
        StreamKind::Room => format!("room:{}", ctx.room),
        StreamKind::Direct => format!("user:{user}"),
    };
    let mut target = start_target;
    let first = {
        let _permit = ctx.gate.acquire().await.expect("open");
        open_and_resume(&ctx, &user, target, None, &mut log, flow, &my_stream).await
    };
    let mut conn = match first {
        Ok(c) => c,
        Err(e) => {
            log.failure = Some(e.clone());
            let _ = ready.send(Err(e));
            return log;
        }
    };
    log.established = true;
    let _ = ready.send(Ok(()));
    drop(ready);
    let others = ctx.targets.len() - 1;

    'outer: loop {
        // Receive until the connection ends or the run does.
        let ended = loop {
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow_and_update() == Phase::Close {
                        conn.close().await;
                        break 'outer;
                    }
                }
                msg = conn.ws.next() => match msg {
                    None => break "eof".to_string(),
                    Some(Err(e)) => break ws_error_kind(&e),
                    Some(Ok(m)) => {
                        if let Some(text) = m.as_text() {
                            let at = now_us();
                            log.on_frame(&ctx.proto.parse(text), at, flow, &my_stream, &ctx.latency);
                            received.store(log.tally.unique(), Ordering::Relaxed);
                        } else if let Some((code, _)) = m.as_close() {
                            break format!("close {}", u16::from(code));
                        }
                    }
                }
            }
        };
        log.ends.push((now_us(), ended));
        // The dead connection's socket goes before a new one opens: held through the reconnect,
        // every client of a storm would need two descriptors at once, and 15,000 of them ran
        // the generator out (EMFILE), which counted as reconnect failures and backed off.
        drop(conn);
        // Reconnect to the other nodes in turn, starting at a different one per client.
        let mut attempt = 0usize;
        loop {
            if *phase.borrow() == Phase::Close {
                break 'outer;
            }
            let next = (target + 1 + (index + attempt) % others) % ctx.targets.len();
            let since = Some(log.last_seq);
            match open_and_resume(&ctx, &user, next, since, &mut log, flow, &my_stream).await {
                Ok(c) => {
                    conn = c;
                    target = next;
                    log.resumed_at.push(now_us());
                    received.store(log.tally.unique(), Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    bump(&mut log.reconnect_failures, e);
                    attempt += 1;
                    let backoff = Duration::from_millis((25u64 << attempt.min(6)).min(1000));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
    received.store(log.tally.unique(), Ordering::Relaxed);
    log
}

/// Opens a connection to `target` and joins the room (`since` given: resume from there) or
/// syncs the user's stream.
async fn open_and_resume(
    ctx: &Ctx,
    user: &str,
    target: usize,
    since: Option<u64>,
    log: &mut ClientLog,
    flow: u32,
    my_stream: &str,
) -> Result<Conn, String> {
    let mut conn = Conn::open(ctx.proto, &ctx.targets[target], ctx.addrs[target], user, None, ctx.timeout).await?;
    let record = |f: &Frame<'_>, at: u64| log.on_frame(f, at, flow, my_stream, &ctx.latency);
    let answer = match ctx.stream {
        StreamKind::Room => tokio::time::timeout(ctx.timeout, conn.join(&ctx.room, since, CATCH_UP_ID, record)).await,
        StreamKind::Direct => tokio::time::timeout(ctx.timeout, conn.sync(since, CATCH_UP_ID, record)).await,
    };
    match answer {
        Err(_) => Err("catch-up timeout".into()),
        Ok(Err(e)) => Err(format!("catch-up: {e}")),
        Ok(Ok(seq)) => {
            if since.is_none() {
                log.last_seq = log.last_seq.max(seq.unwrap_or(0));
            }
            Ok(conn)
        }
    }
}
