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
        /// Play the tap extension too: every prompt's events reach the bridge, and Bus Publish / Bus Ask
        /// nodes in a queued workflow send their messages and wait for answers.
        #[arg(long)]
        tap: bool,
        /// The ComfyUI version to play: 0.3.64 (the recordings); a newer one (e.g. 0.4.0) also serves the jobs
        /// API, refuses prompt ids that are not lowercase UUIDs, and adds outputs to history only after
        /// `execution_success`.
        #[arg(long, default_value = "0.3.64")]
        comfyui_version: comfy_sim::ComfyVersion,
    },
    /// The tap: the ComfyUI extension that lets the bridge see every prompt (and runs Bus Publish / Bus Ask).
    Tap {
        #[command(subcommand)]
        command: TapCommand,
    },
}

#[derive(Subcommand)]
enum TapCommand {
    /// Write the extension into `<COMFYUI_DIR>/custom_nodes/comfy_bridge_tap/` (then restart ComfyUI).
    Install {
        /// ComfyUI's directory: the one holding `custom_nodes/`.
        comfyui_dir: PathBuf,
    },
}

/// The extension's files, carried by the binary: `extension/comfy_bridge_tap/<name>`.
const TAP_FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../extension/comfy_bridge_tap/__init__.py")),
    ("asks.py", include_str!("../extension/comfy_bridge_tap/asks.py")),
    ("bus_nodes.py", include_str!("../extension/comfy_bridge_tap/bus_nodes.py")),
    ("tap.py", include_str!("../extension/comfy_bridge_tap/tap.py")),
    ("version.py", include_str!("../extension/comfy_bridge_tap/version.py")),
];

/// Writes the extension into `comfyui_dir/custom_nodes/comfy_bridge_tap/`, each file through a temporary
/// name and a rename; refuses a directory without `custom_nodes/` (most likely not ComfyUI's).
fn tap_install(comfyui_dir: &std::path::Path) -> anyhow::Result<()> {
    let custom_nodes = comfyui_dir.join("custom_nodes");
    anyhow::ensure!(
        custom_nodes.is_dir(),
        "{} has no custom_nodes/ directory: give ComfyUI's own directory (the one with main.py and custom_nodes/)",
        comfyui_dir.display()
    );
    let target = custom_nodes.join("comfy_bridge_tap");
    std::fs::create_dir_all(&target).with_context(|| format!("cannot create {}", target.display()))?;
    for (name, text) in TAP_FILES {
        let path = target.join(name);
        let tmp = target.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), text.len());
    }
    println!(
        "installed the comfy_bridge_tap extension into {}; restart ComfyUI to load it (its log then says \
         \"comfy_bridge_tap ...: installed\", and the bridge logs \"comfyui tap active\")",
        target.display()
    );
    Ok(())
}

/// The daemon's runtime: a pool of `bridge.threads` threads (0: one per core), or for 1 everything on the one
/// thread.
fn daemon_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let settings = load(cli.config.as_deref())?;
            let runtime = daemon_runtime(settings.bridge.threads)?;
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
        Command::Simulate { listen, transcript, speed, autoplay, tap, comfyui_version } => {
            comfy_bridge::telemetry::init("info", false);
            let opts = comfy_sim::SimOptions { transcripts: transcript, speed, autoplay, tap, comfyui_version };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let shutdown = CancellationToken::new();
                    tokio::spawn(cancel_on_signal(shutdown.clone()));
                    comfy_sim::run_cli(listen, opts, shutdown.cancelled_owned()).await
                })
                .with_context(|| format!("cannot listen on {listen} (choose another address with --listen)"))?;
        }
        Command::Tap { command: TapCommand::Install { comfyui_dir } } => tap_install(&comfyui_dir)?,
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
