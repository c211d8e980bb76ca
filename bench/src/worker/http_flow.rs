//! A flow posted through the server API: one keep-alive HTTP/1.1 connection, up to `pipeline`
//! requests written before their answers are read (1: one request, wait, the next), at the
//! flow's rate or as fast as the pipeline allows.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::client::PubOutcome;
use super::{Phase, Shared};
use crate::clock::{now_us, until_us};
use crate::http::ResponseReader;
use crate::net::io_kind;
use crate::plan::{Audience, Via, bump};
use crate::schedule::Schedule;
use crate::wire::Probe;

pub(crate) async fn run(flow: u32, shared: Arc<Shared>) -> PubOutcome {
    let spec = &shared.spec.flows[flow as usize];
    let mut out = PubOutcome { flow, answers_expected: true, ..PubOutcome::default() };
    let Via::Http { api, pipeline } = spec.via else {
        return out;
    };
    let base = &shared.http[api];
    let path = match &spec.audience {
        Audience::Room(r) => format!("/api/v1/rooms/{}/messages", shared.spec.rooms[*r as usize]),
        Audience::User(u) => format!("/api/v1/users/{u}/messages"),
    };
    let from = format!("api{flow}");
    let rate = spec.rate;
    let depth = pipeline.max(1) as u64;

    let mut phase_rx = shared.phase.clone();
    let window = loop {
        match *phase_rx.borrow_and_update() {
            Phase::Run(w) => break w,
            Phase::Close | Phase::Drain => return out,
            Phase::Setup => {}
        }
        if phase_rx.changed().await.is_err() {
            return out;
        }
    };
    let stream = match crate::net::tcp_connect(base.addr, None).await {
        Ok(s) => s,
        Err(e) => {
            bump(&mut out.errors, format!("api connect: {}", io_kind(&e)));
            return out;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = ResponseReader::new(read);
    // Sent and not yet answered: (number, send time).
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let schedule = Schedule { start_us: window.start_us, offset_us: spec.offset_us, rate, end_us: window.end_us };
    let mut buf = Vec::new();

    loop {
        let now = now_us();
        let more = if rate > 0.0 { out.sent < schedule.total() } else { now < window.end_us };
        let room = (inflight.len() as u64) < depth;
        let wake = match (more, room) {
            (true, true) if rate > 0.0 => Some(schedule.due_at(out.sent)),
            (true, true) => Some(now.max(window.start_us)),
            _ => None,
        };
        if wake.is_none() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            changed = phase_rx.changed() => {
                if changed.is_err() || *phase_rx.borrow_and_update() == Phase::Close {
                    break;
                }
            }
            resp = reader.next(), if !inflight.is_empty() => {
                let at = now_us();
                shared.saw_traffic(at);
                let (n, t) = inflight.pop_front().expect("checked non-empty");
                match resp {
                    Ok(r) => {
                        out.answered.insert(n);
                        shared.api_latency.lock().unwrap().record_between(t, at);
                        if !(200..300).contains(&r.status) {
                            out.rejected.insert(n);
                            bump(&mut out.errors, format!("http {}", r.status));
                        }
                    }
                    Err(e) => {
                        bump(&mut out.errors, format!("api read: {}", io_kind(&e)));
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(until_us(wake.unwrap_or(0))), if wake.is_some() => {
                let now = now_us();
                let count = if rate > 0.0 {
                    schedule.due_by(now).saturating_sub(out.sent)
                } else {
                    u64::MAX
                }
                .min(depth - inflight.len() as u64);
                buf.clear();
                for _ in 0..count {
                    let n = out.sent;
                    let t = now_us();
                    if rate > 0.0 {
                        out.max_lag_us = out.max_lag_us.max(t.saturating_sub(schedule.due_at(n)));
                    }
                    let body = Probe { t, n, p: flow }.encode(&shared.pad);
                    let json = format!(r#"{{"body":{body},"from":"{from}"}}"#);
                    base.post(&path, shared.spec.api_key.as_deref(), &json, &mut buf);
                    inflight.push_back((n, t));
                    out.sent += 1;
                    if window.measures(t) {
                        out.sent_in_window += 1;
                    }
                }
                if let Err(e) = write.write_all(&buf).await {
                    bump(&mut out.errors, format!("api write: {}", io_kind(&e)));
                    break;
                }
            }
        }
    }
    out
}
