//! The `switchyard` binary: parse the configuration, set up logging, run a node until SIGTERM or
//! Ctrl-C, then shut it down gracefully.

use anyhow::Context;
use switchyard::config::{self, CliCommand, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = match config::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            std::process::exit(2);
        }
    };
    let CliCommand::Serve(args) = cli.command;
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve(*args)) {
        eprintln!("switchyard: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: config::ServeArgs) -> anyhow::Result<()> {
    // Installed before anything is announced, so a SIGTERM right after the banner is graceful.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let dev = args.dev_mode();
    let data_dir = args.data_dir.clone();
    let (drain_delay, drain_seconds) = (args.drain_delay, args.drain_seconds);
    let server = switchyard::Server::start(args).await?;
    let addr = server.addr;
    let (http, ws) = if server.tls() { ("https", "wss") } else { ("http", "ws") };
    tracing::info!(node = %server.node.id, %addr, url = %format!("{http}://{addr}"), data_dir = %data_dir.display(), "listening");
    println!(
        "switchyard {} listening on {http}://{addr} (WebSocket {ws}://{addr}/ws, node {})",
        env!("CARGO_PKG_VERSION"),
        server.node.id
    );
    if dev {
        println!(
            "dev mode: no JWT key configured, clients connect with {ws}://{addr}/ws?user=<id>; demo page at {http}://{addr}/"
        );
        tracing::warn!(
            "dev mode: clients are trusted to name their user; configure --jwt-secret or --jwt-public-key for production"
        );
    }
    // An orchestrator's SIGTERM drains by default (a gateway needs time to stop sending clients,
    // and the other nodes to take the reconnects); a person's Ctrl-C stops at once unless the
    // flags say otherwise. SIGHUP reads --tls-cert and --tls-key again meanwhile (and is ignored
    // once the drain has begun, rather than ending the process).
    let default = loop {
        tokio::select! {
            _ = term.recv() => break switchyard::drain::SIGTERM_DEFAULT,
            _ = interrupt.recv() => break switchyard::drain::Plan::NOW,
            _ = hangup.recv() => server.reload_tls(),
        }
    };
    let plan = switchyard::drain::Plan::from_flags(drain_delay, drain_seconds, default);
    tracing::info!(
        drain_delay_secs = plan.delay.as_secs(),
        drain_seconds = plan.window.as_secs(),
        "shutting down: closing sessions with 1001"
    );
    let again = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    server.drain(plan, again).await;
    tracing::info!("stopped");
    Ok(())
}
