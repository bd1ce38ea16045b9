//! The bridge under test: started in-process through `app::run`, or as the built binary.

use std::time::Duration;

use comfy_bridge::config::Settings;
use comfy_sim::{SimOptions, Simulator};
use tokio_util::sync::CancellationToken;

use super::{Mosquitto, NatsServer};

/// Every recorded session.
pub const ALL: &str = "";
/// The recorded success run only (so the simulator replays it for any posted workflow).
pub const SUCCESS: &str = "a_success.jsonl";

/// A simulator on an ephemeral port replaying `transcript` (a file under `tests/fixtures/transcripts`, or [`ALL`])
/// at `speed` (0 = no delays, 1 = recorded timing).
pub async fn simulator(transcript: &str, speed: f64) -> Simulator {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transcripts");
    let path = if transcript.is_empty() { dir.to_string() } else { format!("{dir}/{transcript}") };
    let opts = SimOptions { transcripts: vec![path.into()], speed, autoplay: false };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("simulator starts")
}

/// Settings pointing at the given simulator and brokers, with fast reconnects and a private state dir.
pub fn settings(sim: &Simulator, mqtt: Option<&Mosquitto>, nats: Option<&NatsServer>) -> (Settings, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("state dir");
    let mut s = Settings::default();
    s.comfyui.url = sim.url();
    s.comfyui.reconnect_max_ms = 500;
    s.comfyui.ping_interval_ms = 1_000;
    s.state.dir = state.path().to_path_buf();
    s.previews.max_per_second = 1_000.0;
    s.bridge.shutdown_grace_ms = 3_000;
    s.http.listen = Some("127.0.0.1:0".into());
    s.mqtt.enabled = mqtt.is_some();
    if let Some(m) = mqtt {
        s.mqtt.url = m.url();
    }
    s.nats.enabled = nats.is_some();
    if let Some(n) = nats {
        s.nats.url = n.url();
    }
    (s, state)
}

/// A bridge running in this process.
pub struct Daemon {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), comfy_bridge::app::AppError>>,
    _state: tempfile::TempDir,
}

impl Daemon {
    /// Starts the bridge with `settings`; `state` is kept alive as long as the daemon.
    pub fn start(settings: Settings, state: tempfile::TempDir) -> Self {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(comfy_bridge::app::run(settings, shutdown.clone()));
        Self { shutdown, handle, _state: state }
    }

    /// Cancels the bridge and waits for it to finish draining.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
        let result = result.expect("bridge stops within its grace period").expect("bridge task did not panic");
        result.expect("bridge ran without error");
    }
}
