//! `switchyard-bench`: a load generator for Switchyard and the peers it is compared with.
//!
//! Layout: `cli` (options), `scenarios` (options → worker specs), `run` (the coordinator),
//! `worker` (client connections and publishers, in this process or in child processes),
//! `resume` (the node-kill scenario), `soak` (the long mixed run), `report` (figures). Pure pieces with unit tests:
//! `ledger` (loss/duplicate accounting), `latency` (percentiles), `socketio`, `stomp` and `wire`
//! (protocols), `http` (pipelined HTTP/1.1), `procfs` (RSS and CPU of processes).

mod cli;
mod clock;
mod http;
mod latency;
mod ledger;
mod net;
mod plan;
mod procfs;
mod report;
mod resume;
mod run;
mod scenarios;
mod schedule;
mod soak;
mod socketio;
mod stomp;
mod wire;
mod worker;
mod wsfuzz;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    procfs::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Command::Worker = cli.command {
        let result = runtime.block_on(worker::child_main());
        if let Err(e) = &result {
            eprintln!("worker: {e:#}");
        }
        // Leave at once: the stdin reader is a blocking thread the runtime would wait for.
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    let (plan, common) = match &command {
        Command::Idle(a) => (scenarios::idle(a)?, &a.common),
        Command::Fanout(a) => (scenarios::fanout(a)?, &a.common),
        Command::Direct(a) => (scenarios::direct(a)?, &a.common),
        Command::Api(a) => (scenarios::api(a)?, &a.common),
        Command::Resume(a) => {
            let report = resume::run(a).await?;
            if a.common.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", resume::human(&report));
            }
            return Ok(());
        }
        Command::Soak(a) => {
            let report = soak::run(a).await?;
            if a.common.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", soak::human(&report));
            }
            let failures = soak::failures(&report);
            anyhow::ensure!(failures.is_empty(), "soak failed: {}", failures.join("; "));
            return Ok(());
        }
        Command::Wsfuzz(a) => return wsfuzz::run(a).await,
        Command::Worker => unreachable!("handled in main"),
    };
    let pids: Vec<u32> = common.pid.iter().chain(&common.also_pid).copied().collect();
    let outcome = run::execute(&plan, &pids).await?;
    let report = report::build(&plan, &outcome, common.pid.len());
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report::human(&report));
    }
    anyhow::ensure!(outcome.established > 0, "no connection was established: nothing was measured");
    Ok(())
}
