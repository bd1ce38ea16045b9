//! Wiring: splits the configuration ([`split`]), builds the channels, spawns every task, and sequences
//! shutdown.

pub mod split;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::{self, Bus};
use crate::comfy::{self, http::ComfyHttp, ws::WsClient};
use crate::commands::inbox::inbox;
use crate::commands::task::CommandTask;
use crate::config::Settings;
use crate::flow;
use crate::health::Health;
use crate::router;
use crate::tracker::resync;

/// What shutdown may take beyond `bridge.shutdown_grace_ms`: closing channels and sockets. Publishers bound
/// their own drain and goodbyes by the grace and do not wait for a broker that is not connected.
const SHUTDOWN_MARGIN: Duration = Duration::from_millis(500);

/// Capacity of each channel on the event path.
const CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the channel of the tap extension's messages (`Bus Publish`, `Bus Ask`) to the router.
const EXTENSION_CAPACITY: usize = 64;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The state directory or the client id file could not be used.
    #[error("state directory: {0}")]
    State(#[from] std::io::Error),
    /// MQTT could not be set up.
    #[error(transparent)]
    Mqtt(#[from] bus::mqtt::MqttError),
    /// NATS could not be set up.
    #[error(transparent)]
    Nats(#[from] bus::nats::NatsError),
    /// The TLS files for ComfyUI could not be used.
    #[error("comfyui tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `http.listen` could not be bound.
    #[error("cannot listen on http.listen: {0}")]
    Listen(std::io::Error),
    /// The HTTP client for ComfyUI could not be built.
    #[error(transparent)]
    Http(#[from] comfy::http::HttpError),
    /// The fleet worker could not be set up.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// Runs the bridge until `shutdown` is cancelled, then drains and returns.
///
/// The WebSocket task, the command plane and the NATS request intake watch `shutdown`. When the WebSocket
/// task ends it drops its sender, the router's input closes, the router drops its bus senders and the resync
/// worker's; the command plane answers what it already received and drops its own. Each publisher then
/// drains its outbox, publishes `offline` and disconnects. The whole drain is bounded by
/// `bridge.shutdown_grace_ms` (plus `SHUTDOWN_MARGIN`).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AppError> {
    let tasks = TaskTracker::new();
    let client_id = comfy::ws::client_id(settings.comfyui.client_id.as_deref(), &settings.state.dir)?;
    info!(instance = %settings.bridge.instance, %client_id, "starting comfy-bridge");

    let (inbound_tx, inbound_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (extension_tx, extension_rx) = mpsc::channel(EXTENSION_CAPACITY);
    let ws = WsClient::new(&settings.comfyui, &client_id, inbound_tx)?.with_extension(extension_tx);
    let http = ComfyHttp::new(&settings.comfyui)?.with_tap(ws.tap());
    // One HTTP client for the process: the WebSocket task's deaf check shares it.
    let ws = ws.with_http(http.clone());
    let health = Health::new(settings.mqtt.enabled, settings.nats.enabled, ws.tap());
    if let Some(listener) = crate::health::bind(&settings.http).await.map_err(AppError::Listen)? {
        tasks.spawn(crate::health::serve(listener, health.clone(), shutdown.clone()));
    }
    let c = &settings.commands;
    let (request_tx, request_rx) = inbox(c.max_waiting_requests, c.max_waiting_bytes, c.max_payload_bytes);
    let home_assistant = split::home_assistant(&settings).is_some();
    let requests = (settings.commands.enabled || home_assistant).then_some(request_tx);
    let common = bus::Common::from(&settings);
    let mut buses = Vec::new();
    if settings.mqtt.enabled {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let listen = split::mqtt_listen(&settings);
        bus::mqtt::spawn(&settings.mqtt, &common, listen, rx, requests.clone(), health.clone(), &tasks)?;
        buses.push((Bus::Mqtt, tx));
    }
    if settings.nats.enabled {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let requests = requests.clone().filter(|_| settings.commands.enabled);
        bus::nats::spawn(&settings.nats, &common, rx, requests, health.clone(), &tasks, shutdown.clone()).await?;
        buses.push((Bus::Nats, tx));
    }
    if buses.is_empty() {
        warn!("both mqtt and nats are disabled: events go nowhere");
    }
    let grace = common.grace;

    let (control_tx, control_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    tasks.spawn(resync::run(http.clone(), work_rx, control_tx.clone()));
    let (images, images_rx) = mpsc::channel(flow::fetch::WAITING);
    tasks.spawn(flow::fetch::run(http.clone(), images_rx, buses.clone()));
    if requests.is_some() {
        let senders = buses.iter().cloned().collect();
        let config = crate::commands::task::Config::from(&settings);
        let commands = CommandTask::new(config, &client_id, http, control_tx, senders);
        tasks.spawn(commands.run(request_rx, shutdown.clone(), grace));
    }
    drop(requests);

    let extension = router::Extension { messages: extension_rx, images };
    let config = router::Config::from(&settings);
    tasks.spawn(router::run(config, health, inbound_rx, control_rx, work_tx, buses, Some(extension)));
    tasks.spawn(ws.run(shutdown.clone()));
    if settings.fleet.enabled {
        crate::fleet::spawn(crate::fleet::Config::from(&settings), &tasks, shutdown.clone()).await?;
    }
    tasks.close();

    shutdown.cancelled().await;
    info!("shutting down");
    let grace = grace + SHUTDOWN_MARGIN;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(?grace, "some tasks did not stop in time");
    }
    info!("stopped");
    Ok(())
}
