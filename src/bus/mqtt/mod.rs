//! The MQTT side: a polling task over the bridge's own connection loop ([`wire`]: rumqttc's packet codec,
//! batched writes) and a publisher task that owns the outbox.
//!
//! The connection keeps nothing across a reconnect: the publisher redelivers from its own outbox, so one
//! bounded, prioritised queue decides what survives a broker outage. Every handed-over QoS-1 publish produces
//! one `Sent(pkid)` in order, which is how the publisher matches `PubAck`s to messages. QoS-0 messages
//! (progress, previews) are fire-and-forget: done once the connection has them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{topics, Common, Outbound, Route};
use crate::commands::inbox::Inbox;
use crate::config::MqttSettings;
use crate::health::Health;

mod intake;
mod publisher;
mod wire;

use intake::{poll, Intake};
use publisher::Publisher;

/// Most QoS-1 messages handed to the connection and not yet acknowledged.
pub(super) const WINDOW: usize = 100;
/// Capacity of the connection's request channel (QoS-0 bursts wait here).
pub(super) const REQUEST_CAPACITY: usize = 1024;
/// How long to wait before retrying when the connection's request channel is full.
pub(super) const RETRY_FULL: Duration = Duration::from_millis(1);
/// MQTT v5: the retained `bridge/availability` `online` expires after this many keep-alive intervals (at
/// least a minute) and is republished every half of it. A broker that was killed and comes back after the
/// bridge died would otherwise keep saying `online` for a dead bridge forever (no last will fires then).
pub(super) const ONLINE_EXPIRY_KEEP_ALIVES: u64 = 10;
/// Seconds without a `PubAck` while QoS-1 messages wait for one (or the connection's channel stays full) after
/// which the bus reads as not ready: the keep-alive notices a broker that stopped answering only after up to
/// two keep-alive intervals (60 s by default).
pub(super) const STALL_SECS: u32 = 3;

/// Why the MQTT side could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `mqtt.url` is not `mqtt://host[:port]`.
    #[error("invalid mqtt.url `{0}`: expected mqtt://host:port")]
    InvalidUrl(String),
    /// The TLS files could not be used.
    #[error("mqtt tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What the eventloop task reports to the publisher.
#[derive(Debug)]
pub(super) enum LoopEvent {
    Connected,
    Sent(u16),
    Acked(u16),
    /// The broker acknowledged the packet id with a refusal (MQTT v5 reason code), named as a metric label.
    Refused(u16, &'static str),
    Disconnected,
}

/// Host, port and whether the URL asks for TLS (`mqtts://`, `ssl://`; default ports 1883 and 8883).
pub(super) fn host_port(url: &str) -> Result<(String, u16, bool), MqttError> {
    crate::config::mqtt_endpoint(url).ok_or_else(|| MqttError::InvalidUrl(url.into()))
}

/// Which request topics the MQTT intake subscribes to, when it has a request channel.
#[derive(Debug, Clone, Default)]
pub struct Listen {
    /// `commands.enabled`: `<base>/<inst>/request/#` and `<base>/<inst>/answer/+`.
    pub commands: bool,
    /// Home Assistant is on: its `homeassistant.discovery_prefix` (for `<prefix>/status`); the intake also
    /// takes `<base>/<inst>/ha/…/set`.
    pub home_assistant: Option<String>,
}

/// Connects (lazily: the first poll connects) and spawns the eventloop and publisher tasks on `tasks`.
/// The publisher reads `outbound_rx` until it closes, drains, publishes `offline` and disconnects.
/// With `requests`, it also subscribes to `<base>/<inst>/request/#` and hands every non-retained message
/// there to that channel.
pub fn spawn(
    cfg: &MqttSettings,
    common: &Common,
    listen: Listen,
    outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    requests: Option<Inbox>,
    health: Arc<Health>,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<(), MqttError> {
    let (host, port, tls) = host_port(&cfg.url)?;
    let tls = match tls {
        true => Some(crate::tls::client_config(
            cfg.ca_file.as_deref(),
            cfg.client_cert_file.as_deref(),
            cfg.client_key_file.as_deref(),
        )?),
        false => None,
    };
    let client_id = cfg.client_id.clone().unwrap_or_else(|| format!("comfy-bridge-{}", common.instance));
    let offline = Route::fixed(&common.instance, &[topics::BRIDGE, topics::AVAILABILITY]);
    let will_topic = offline.mqtt_topic(&cfg.base_topic);
    let keep_alive = Duration::from_secs(cfg.keep_alive_secs.max(5));
    // Unbounded so that the polling task never waits on the publisher; it holds at most about two events per
    // in-flight QoS-1 message (the window) plus one per connection attempt.
    let (loop_tx, loop_rx) = mpsc::unbounded_channel();
    let reconnect_max_ms = common.reconnect_max_ms;
    let request_prefix = Route::fixed(&common.instance, &[topics::REQUEST]).mqtt_topic(&cfg.base_topic) + "/";
    let home_assistant = listen.home_assistant.map(|discovery_prefix| {
        let entities = crate::homeassistant::route(&common.instance, &[]).mqtt_topic(&cfg.base_topic) + "/";
        (entities, format!("{discovery_prefix}/status"))
    });
    let answers = Route::fixed(&common.instance, &[topics::ANSWER]).mqtt_topic(&cfg.base_topic) + "/";
    let (prefix, answers) = match listen.commands {
        true => (Some(request_prefix), Some(answers)),
        false => (None, None),
    };
    let intake = requests.map(|tx| Intake { prefix, answers, home_assistant, tx });
    let subscriptions = intake.as_ref().map(Intake::filters).unwrap_or_default();
    let span = tracing::info_span!("mqtt", url = %cfg.url);
    let v5 = cfg.protocol == crate::config::MqttProtocol::V5;
    let options = wire::Options {
        host,
        port,
        tls,
        v5,
        client_id,
        keep_alive,
        login: cfg.username.clone().map(|user| (user, cfg.password.as_ref().map_or("", |p| p.expose()).to_string())),
        will_topic,
        max_packet_bytes: cfg.max_packet_bytes,
    };
    let (client, connection) = wire::new(options, REQUEST_CAPACITY);
    tasks.spawn(poll(connection, loop_tx, intake, reconnect_max_ms).instrument(span.clone()));
    let expiry = v5.then(|| (keep_alive.as_secs() * ONLINE_EXPIRY_KEEP_ALIVES).clamp(60, u64::from(u32::MAX)) as u32);
    let publisher = Publisher::new(cfg, common, client, subscriptions, health, expiry);
    tasks.spawn(publisher.run(loop_rx, outbound_rx).instrument(span));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(host_port("mqtt://127.0.0.1:1884").ok(), Some(("127.0.0.1".into(), 1884, false)));
        assert_eq!(host_port("mqtt://broker").ok(), Some(("broker".into(), 1883, false)));
        assert_eq!(host_port("mqtts://broker").ok(), Some(("broker".into(), 8883, true)));
        assert_eq!(host_port("mqtts://broker:9999/").ok(), Some(("broker".into(), 9999, true)));
        assert!(matches!(host_port("http://x"), Err(MqttError::InvalidUrl(_))));
        assert!(matches!(host_port("mqtt://x:notaport"), Err(MqttError::InvalidUrl(_))));
    }
}
