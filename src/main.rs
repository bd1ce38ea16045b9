//! The `comfy-bridge` binary: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use comfy_bridge::config::Settings;
use tokio_util::sync::CancellationToken;

/// Bridge a ComfyUI server onto MQTT and NATS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, global = true, env = "COMFY_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Validate the configuration, print it (secrets redacted) and the topic map.
    Check,
    /// Serve a stand-in ComfyUI that replays recorded sessions.
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8188")]
        listen: SocketAddr,
        /// Transcript file or directory of `.jsonl` transcripts (repeatable); without it, the recorded
        /// sessions built into the binary.
        #[arg(long)]
        transcript: Vec<PathBuf>,
        /// Replay speed factor (2 = twice as fast, 0 = no delays).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Replay every scenario to every connected client, forever.
        #[arg(long = "loop")]
        autoplay: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let settings = load(cli.config.as_deref())?;
            comfy_bridge::telemetry::init(
                &settings.bridge.log,
                settings.bridge.log_format == comfy_bridge::config::LogFormat::Json,
            );
            if settings.commands.enabled && !settings.commands.templates_dir.is_dir() {
                tracing::warn!("{}", comfy_bridge::check::missing_templates_dir(&settings));
            }
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                comfy_bridge::app::run(settings, shutdown).await
            })?;
        }
        Command::Check => {
            let settings = load(cli.config.as_deref())?;
            let checked = comfy_bridge::check::check(&settings);
            print!("{}", checked.report);
            anyhow::ensure!(checked.problems == 0, "{} problem(s) found", checked.problems);
        }
        Command::Simulate { listen, transcript, speed, autoplay } => {
            comfy_bridge::telemetry::init("info", false);
            let opts = comfy_sim::SimOptions { transcripts: transcript, speed, autoplay };
            runtime
                .block_on(async {
                    let shutdown = CancellationToken::new();
                    tokio::spawn(cancel_on_signal(shutdown.clone()));
                    comfy_sim::run_cli(listen, opts, shutdown.cancelled_owned()).await
                })
                .with_context(|| format!("cannot listen on {listen} (choose another address with --listen)"))?;
        }
    }
    Ok(())
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Settings::load(path).with_context(|| match path {
        Some(p) => format!("configuration from {}", p.display()),
        None => "configuration".to_string(),
    })
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}
