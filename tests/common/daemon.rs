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
    let dir = super::fixtures::transcripts();
    let path = if transcript.is_empty() { dir } else { dir.join(transcript) };
    let opts = SimOptions { transcripts: vec![path], speed, ..SimOptions::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("simulator starts")
}

/// A simulator like [`simulator`] with the tap extension installed (`SimOptions::tap`).
pub async fn tap_simulator(transcript: &str, speed: f64) -> Simulator {
    let dir = super::fixtures::transcripts();
    let path = if transcript.is_empty() { dir } else { dir.join(transcript) };
    let opts = SimOptions { transcripts: vec![path], speed, tap: true, ..SimOptions::default() };
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

/// How long [`DaemonBuilder::start`] waits for each sign of readiness.
const READY_WAIT: Duration = Duration::from_secs(10);

/// The one way tests set a bridge up: [`settings`] for `sim`, the brokers it should use, any changes, then
/// [`start`](DaemonBuilder::start), which returns once the bridge is ready.
pub struct DaemonBuilder<'a> {
    sim: &'a Simulator,
    mqtt: Option<&'a Mosquitto>,
    nats: Option<&'a NatsServer>,
    settings: Settings,
    state: tempfile::TempDir,
}

impl<'a> DaemonBuilder<'a> {
    /// Publish to and take requests from `broker`.
    pub fn mqtt(mut self, broker: &'a Mosquitto) -> Self {
        self.mqtt = Some(broker);
        self.settings.mqtt.enabled = true;
        self.settings.mqtt.url = broker.url();
        self
    }

    /// Publish to and take requests from `server`.
    pub fn nats(mut self, server: &'a NatsServer) -> Self {
        self.nats = Some(server);
        self.settings.nats.enabled = true;
        self.settings.nats.url = server.url();
        self
    }

    /// Changes the settings.
    pub fn with(mut self, configure: impl FnOnce(&mut Settings)) -> Self {
        configure(&mut self.settings);
        self
    }

    /// Starts the bridge and waits until it is ready: connected to the simulator, and `online` on the
    /// `bridge/availability` of each broker given (subscribed before the start, so nothing is missed).
    pub async fn start(self) -> Daemon {
        let (s, inst) = (&self.settings, &self.settings.bridge.instance);
        let mut mqtt_online = match self.mqtt.filter(|_| s.mqtt.enabled) {
            Some(broker) => {
                Some(super::mqtt_subscribe(broker, &format!("{}/{inst}/bridge/availability", s.mqtt.base_topic)).await)
            }
            None => None,
        };
        let mut nats_online = match self.nats.filter(|_| s.nats.enabled) {
            Some(server) => Some(
                super::nats_subscribe(server, &format!("{}.{inst}.bridge.availability", s.nats.subject_prefix)).await,
            ),
            None => None,
        };
        let daemon = Daemon::start(self.settings, self.state);
        self.sim.wait_for_client(READY_WAIT).await.expect("the bridge connects to the simulator");
        if let Some(sub) = &mut mqtt_online {
            sub.expect(|m| &m.payload[..] == b"online", READY_WAIT).await;
        }
        if let Some(sub) = &mut nats_online {
            sub.expect(|m| &m.payload[..] == b"online", READY_WAIT).await;
        }
        daemon
    }
}

/// A bridge running in this process.
pub struct Daemon {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), comfy_bridge::app::AppError>>,
    _state: tempfile::TempDir,
}

impl Daemon {
    /// A bridge against `sim` ([`settings`] with no broker yet), to be given brokers and started.
    pub fn builder(sim: &Simulator) -> DaemonBuilder<'_> {
        let (settings, state) = settings(sim, None, None);
        DaemonBuilder { sim, mqtt: None, nats: None, settings, state }
    }

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
