//! The MQTT side: a poll-only eventloop task and a publisher task that owns the outbox.
//!
//! rumqttc keeps unacknowledged publishes in its own `pending` list and replays them on reconnect; the
//! bridge clears that list on every connection error and redelivers from its own outbox instead, so one
//! bounded, prioritised queue decides what survives a broker outage. Every handed-over QoS-1 publish produces
//! one `Outgoing::Publish(pkid)` in order, which is how the publisher matches `PubAck`s to messages. QoS-0
//! messages (progress, previews) are fire-and-forget: done once rumqttc has them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet as V5Packet, PublishProperties};
use rumqttc::{Outgoing, Packet as V3Packet};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument as _};

use super::delivery::{Confirmation, Delivery, Limits};
use super::{topics, Bus, Inquiry, InquiryKind, Outbound, Reply, Route};
use crate::backoff;
use crate::commands::inbox::Inbox;
use crate::config::Settings;
use crate::health::{Health, Part};
use crate::telemetry;

/// Most QoS-1 messages handed to rumqttc and not yet acknowledged (rumqttc's own inflight default is 100).
const WINDOW: usize = 100;
/// Capacity of rumqttc's request channel (QoS-0 bursts wait here).
const REQUEST_CAPACITY: usize = 1024;
/// How long to wait before retrying when rumqttc's request channel is full.
const RETRY_FULL: Duration = Duration::from_millis(1);
/// MQTT v5: the retained `bridge/availability` `online` expires after this many keep-alive intervals (at
/// least a minute) and is republished every half of it. A broker that was killed and comes back after the
/// bridge died would otherwise keep saying `online` for a dead bridge forever (no last will fires then).
const ONLINE_EXPIRY_KEEP_ALIVES: u64 = 10;
/// Seconds without a `PubAck` while QoS-1 messages wait for one (or rumqttc's channel stays full) after which
/// the bus reads as not ready: rumqttc's keep-alive notices a broker that stopped answering only after one
/// and a half keep-alive intervals (45 s by default).
const STALL_SECS: u32 = 3;

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
enum LoopEvent {
    Connected,
    Sent(u16),
    Acked(u16),
    Disconnected,
}

/// The two protocol versions' clients behind one face.
#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// What a publish carries besides topic and payload.
struct Extras {
    qos: u8,
    retain: bool,
    /// MQTT v5 correlation data.
    correlation: Option<Bytes>,
    /// MQTT v5 message expiry, in seconds.
    expiry: Option<u32>,
}

impl Client {
    fn try_publish(&self, topic: String, payload: Bytes, extras: Extras) -> bool {
        let Extras { qos, retain, correlation, expiry } = extras;
        match self {
            Self::V5(c) if correlation.is_some() || expiry.is_some() => {
                let properties = PublishProperties {
                    correlation_data: correlation,
                    message_expiry_interval: expiry,
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, v5_qos(qos), retain, payload, properties).is_ok()
            }
            Self::V5(c) => c.try_publish(topic, v5_qos(qos), retain, payload).is_ok(),
            Self::V311(c) => c.try_publish(topic, v3_qos(qos), retain, payload.to_vec()).is_ok(),
        }
    }

    /// Subscribes to the request topics (again: every connection starts clean).
    fn subscribe(&self, filter: &str) {
        let result = match self {
            Self::V5(c) => c.try_subscribe(filter, v5_qos(1)).map_err(|e| e.to_string()),
            Self::V311(c) => c.try_subscribe(filter, v3_qos(1)).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            warn!(filter, error = %e, "cannot subscribe to the request topics");
        }
    }

    /// Asks for a clean DISCONNECT without waiting (a full request channel means the broker is gone anyway).
    fn disconnect(&self) {
        let _ = match self {
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    if qos == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

fn v3_qos(qos: u8) -> rumqttc::QoS {
    if qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

/// Events are small and latency matters: send each publish at once (no Nagle delay waiting for ACKs).
fn network_options() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options
}

/// Host, port and whether the URL asks for TLS (`mqtts://`, `ssl://`; default ports 1883 and 8883).
fn host_port(url: &str) -> Result<(String, u16, bool), MqttError> {
    crate::config::mqtt_endpoint(url).ok_or_else(|| MqttError::InvalidUrl(url.into()))
}

/// Connects (lazily: the first poll connects) and spawns the eventloop and publisher tasks on `tasks`.
/// The publisher reads `outbound_rx` until it closes, drains, publishes `offline` and disconnects.
/// With `requests`, it also subscribes to `<base>/<inst>/request/#` and hands every non-retained message
/// there to that channel.
pub fn spawn(
    settings: &Settings,
    outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    requests: Option<Inbox>,
    health: Arc<Health>,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<(), MqttError> {
    let cfg = &settings.mqtt;
    let (host, port, tls) = host_port(&cfg.url)?;
    let transport = match tls {
        true => {
            let config = crate::tls::client_config(
                cfg.ca_file.as_deref(),
                cfg.client_cert_file.as_deref(),
                cfg.client_key_file.as_deref(),
            )?;
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
        }
        false => rumqttc::Transport::tcp(),
    };
    let client_id = cfg.client_id.clone().unwrap_or_else(|| format!("comfy-bridge-{}", settings.bridge.instance));
    let offline = Route::fixed(&settings.bridge.instance, &[topics::BRIDGE, topics::AVAILABILITY]);
    let will_topic = offline.mqtt_topic(&cfg.base_topic);
    let keep_alive = Duration::from_secs(cfg.keep_alive_secs.max(5));
    // Unbounded so that the polling task never waits on the publisher; it holds at most about two events per
    // in-flight QoS-1 message (the window) plus one per connection attempt.
    let (loop_tx, loop_rx) = mpsc::unbounded_channel();
    let reconnect_max_ms = settings.comfyui.reconnect_max_ms;
    let request_prefix = Route::fixed(&settings.bridge.instance, &[topics::REQUEST]).mqtt_topic(&cfg.base_topic) + "/";
    let home_assistant = crate::homeassistant::enabled(settings).then(|| {
        let entities = crate::homeassistant::route(&settings.bridge.instance, &[]).mqtt_topic(&cfg.base_topic) + "/";
        (entities, format!("{}/status", settings.homeassistant.discovery_prefix))
    });
    let prefix = settings.commands.enabled.then_some(request_prefix);
    let intake = requests.map(|tx| Intake { prefix, home_assistant, tx });
    let subscriptions = intake.as_ref().map(Intake::filters).unwrap_or_default();
    let span = tracing::info_span!("mqtt", url = %cfg.url);
    let client = if cfg.protocol == crate::config::MqttProtocol::V311 {
        let mut opts = rumqttc::MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(keep_alive)
            .set_transport(transport)
            .set_clean_session(true)
            .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
            .set_last_will(rumqttc::LastWill::new(&will_topic, "offline", rumqttc::QoS::AtLeastOnce, true));
        if let Some(user) = &cfg.username {
            opts.set_credentials(user, cfg.password.as_ref().map_or("", |p| p.expose()));
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, REQUEST_CAPACITY);
        eventloop.set_network_options(network_options());
        tasks.spawn(poll(eventloop, loop_tx, intake, reconnect_max_ms).instrument(span.clone()));
        Client::V311(client)
    } else {
        let mut opts = rumqttc::v5::MqttOptions::new(client_id, host, port);
        let will = rumqttc::v5::mqttbytes::v5::LastWill::new(&will_topic, "offline", v5_qos(1), true, None);
        opts.set_keep_alive(keep_alive)
            .set_transport(transport)
            .set_clean_start(true)
            .set_max_packet_size(Some(cfg.max_packet_bytes as u32))
            .set_last_will(will)
            .set_network_options(network_options())
            // rumqttc preallocates one slot per possible in-flight publish: at its default (65535) that is
            // ~13 MB of idle memory for a window the publisher never exceeds.
            .set_outgoing_inflight_upper_limit(WINDOW as u16);
        if let Some(user) = &cfg.username {
            opts.set_credentials(user, cfg.password.as_ref().map_or("", |p| p.expose()));
        }
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, REQUEST_CAPACITY);
        tasks.spawn(poll(eventloop, loop_tx, intake, reconnect_max_ms).instrument(span.clone()));
        Client::V5(client)
    };
    let v5 = cfg.protocol == crate::config::MqttProtocol::V5;
    let expiry = v5.then(|| (keep_alive.as_secs() * ONLINE_EXPIRY_KEEP_ALIVES).clamp(60, u64::from(u32::MAX)) as u32);
    let publisher = Publisher::new(settings, client, subscriptions, health, expiry);
    tasks.spawn(publisher.run(loop_rx, outbound_rx).instrument(span));
    Ok(())
}

impl Publisher {
    fn new(
        settings: &Settings,
        client: Client,
        subscriptions: Vec<String>,
        health: Arc<Health>,
        online_expiry: Option<u32>,
    ) -> Self {
        let limits = Limits {
            count: settings.bridge.outbox_capacity,
            bytes: settings.bridge.outbox_max_bytes,
            window: WINDOW,
            stall_ticks: STALL_SECS,
        };
        Self {
            client,
            topics: topics::Renderer::new(&settings.mqtt.base_topic, settings.mqtt.max_topic_bytes),
            max_packet_bytes: settings.mqtt.max_packet_bytes,
            max_topic_bytes: settings.mqtt.max_topic_bytes,
            delivery: Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits, &settings.bridge.instance),
            subscriptions,
            health,
            grace: Duration::from_millis(settings.bridge.shutdown_grace_ms),
            online_expiry,
            availability: Route::fixed(&settings.bridge.instance, &[topics::BRIDGE, topics::AVAILABILITY]),
        }
    }
}

/// What one poll of either protocol's eventloop meant.
enum Polled {
    /// For the publisher.
    Event(LoopEvent),
    /// A message from the broker.
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
        reply: Option<Reply>,
    },
    Ignored,
    Stopped,
    Failed(String),
}

/// The two protocol versions' eventloops behind one face, so there is one polling loop.
trait EventSource {
    async fn next(&mut self) -> Polled;
    /// After an error: forget rumqttc's own replay queue; the publisher's outbox redelivers.
    fn reset(&mut self);
}

impl EventSource for rumqttc::v5::EventLoop {
    async fn next(&mut self) -> Polled {
        use rumqttc::v5::Event;
        match self.poll().await {
            Ok(Event::Incoming(V5Packet::ConnAck(_))) => Polled::Event(LoopEvent::Connected),
            Ok(Event::Incoming(V5Packet::PubAck(ack))) => Polled::Event(LoopEvent::Acked(ack.pkid)),
            Ok(Event::Incoming(V5Packet::Publish(p))) => {
                let properties = p.properties.unwrap_or_default();
                let reply = properties
                    .response_topic
                    .filter(|t| !t.is_empty())
                    .map(|to| Reply { to, correlation: properties.correlation_data });
                match String::from_utf8(p.topic.to_vec()) {
                    Ok(topic) => Polled::Message { topic, payload: p.payload, retain: p.retain, reply },
                    Err(_) => Polled::Ignored,
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => Polled::Event(LoopEvent::Sent(pkid)),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Polled::Stopped,
            Ok(_) => Polled::Ignored,
            Err(e) => Polled::Failed(e.to_string()),
        }
    }

    fn reset(&mut self) {
        self.clean();
        self.pending.clear();
    }
}

impl EventSource for rumqttc::EventLoop {
    async fn next(&mut self) -> Polled {
        use rumqttc::Event;
        match self.poll().await {
            Ok(Event::Incoming(V3Packet::ConnAck(_))) => Polled::Event(LoopEvent::Connected),
            Ok(Event::Incoming(V3Packet::PubAck(ack))) => Polled::Event(LoopEvent::Acked(ack.pkid)),
            Ok(Event::Incoming(V3Packet::Publish(p))) => {
                Polled::Message { topic: p.topic, payload: p.payload, retain: p.retain, reply: None }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => Polled::Event(LoopEvent::Sent(pkid)),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Polled::Stopped,
            Ok(_) => Polled::Ignored,
            Err(e) => Polled::Failed(e.to_string()),
        }
    }

    fn reset(&mut self) {
        self.clean();
        self.pending.clear();
    }
}

/// Where request messages go.
struct Intake {
    /// `<base>/<inst>/request/`, when commands are on.
    prefix: Option<String>,
    /// With Home Assistant discovery: `<base>/<inst>/ha/` and `<discovery prefix>/status`.
    home_assistant: Option<(String, String)>,
    tx: Inbox,
}

impl Intake {
    /// The topic filters to subscribe to.
    fn filters(&self) -> Vec<String> {
        let mut filters: Vec<String> = self.prefix.iter().map(|p| format!("{p}#")).collect();
        if let Some((entities, status)) = &self.home_assistant {
            filters.push(format!("{entities}+/set"));
            filters.push(status.clone());
        }
        filters
    }

    fn take(&self, topic: String, payload: Bytes, retain: bool, reply: Option<Reply>) {
        let (kind, path) = if let Some(path) = self.prefix.as_deref().and_then(|p| topic.strip_prefix(p)) {
            (InquiryKind::Request, path)
        } else {
            match &self.home_assistant {
                Some((_, status)) if topic == *status => (InquiryKind::HomeAssistantStatus, ""),
                Some((entities, _)) => match topic.strip_prefix(entities.as_str()).and_then(|p| p.strip_suffix("/set"))
                {
                    Some(entity) => (InquiryKind::HomeAssistantSet, entity),
                    None => return,
                },
                None => return,
            }
        };
        if retain && kind != InquiryKind::HomeAssistantStatus {
            // A retained command must never replay on (re)connect.
            telemetry::request_ignored(Bus::Mqtt, "retained", &topic);
            return;
        }
        let inquiry = Inquiry { kind, bus: Bus::Mqtt, path: path.to_string(), payload, reply };
        // Never waits: what does not fit is answered `busy` or counted.
        self.tx.offer(inquiry);
    }
}

/// Polls the eventloop and nothing else, so rumqttc's request channel always drains; reports to the publisher
/// and hands over requests without ever waiting.
async fn poll(
    mut eventloop: impl EventSource,
    tx: mpsc::UnboundedSender<LoopEvent>,
    intake: Option<Intake>,
    max_ms: u64,
) {
    let mut attempt = 0;
    // One wait for the publisher to go, for the task's whole life (not a new one per packet).
    let closed = tx.closed();
    tokio::pin!(closed);
    loop {
        let polled = tokio::select! {
            polled = eventloop.next() => polled,
            // The publisher is gone (shutdown): no reconnecting to a broker nobody publishes to.
            _ = &mut closed => break,
        };
        let event = match polled {
            Polled::Event(event) => event,
            Polled::Message { topic, payload, retain, reply } => {
                if let Some(intake) = &intake {
                    intake.take(topic, payload, retain, reply);
                }
                continue;
            }
            Polled::Ignored => continue,
            Polled::Stopped => break,
            Polled::Failed(e) => {
                telemetry::reconnecting("mqtt", attempt, &e);
                if tx.send(LoopEvent::Disconnected).is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff::delay(attempt, max_ms)) => {}
                    _ = &mut closed => break,
                }
                // Only now: the publisher has seen `Disconnected` and stopped handing over, so whatever it
                // handed over before that (still in rumqttc's channel) is forgotten too and redelivered once,
                // from the outbox.
                eventloop.reset();
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        if matches!(event, LoopEvent::Connected) {
            attempt = 0;
        }
        if tx.send(event).is_err() {
            break;
        }
    }
    debug!("mqtt eventloop stopped");
}

/// Owns the client handle and the delivery state; does what the client reports and what [`Delivery`] says.
struct Publisher {
    client: Client,
    /// Routes under the base topic, checked against `max_topic_bytes`.
    topics: topics::Renderer,
    max_packet_bytes: usize,
    max_topic_bytes: usize,
    delivery: Delivery,
    /// The request (and Home Assistant) filters, when commands are on.
    subscriptions: Vec<String>,
    health: Arc<Health>,
    grace: Duration,
    /// MQTT v5: the message expiry of the retained `online`, in seconds (see [`ONLINE_EXPIRY_KEEP_ALIVES`]).
    online_expiry: Option<u32>,
    availability: Route,
}

impl Publisher {
    async fn run(
        mut self,
        mut loop_rx: mpsc::UnboundedReceiver<LoopEvent>,
        mut outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    ) {
        let period = Duration::from_secs(u64::from(self.online_expiry.unwrap_or(u32::MAX / 2) / 2).max(1));
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut incoming = Vec::with_capacity(super::INTAKE);
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                event = loop_rx.recv() => match event {
                    Some(event) => self.on_loop_event(event),
                    None => return,
                },
                // Everything waiting (up to the room there is) in one call, not one receive per message.
                n = outbound_rx.recv_many(&mut incoming, self.delivery.room().min(super::INTAKE)),
                    if self.delivery.accepting() => match n {
                    0 => break,
                    _ => incoming.drain(..).for_each(|msg| self.delivery.push(msg)),
                },
                _ = tokio::time::sleep(RETRY_FULL), if self.delivery.is_blocked() => {}
                _ = refresh.tick(), if self.online_expiry.is_some() => self.delivery.refresh_online(),
                _ = watchdog.tick() => {
                    self.delivery.tick();
                    self.health.set(Part::Mqtt, self.delivery.is_healthy());
                }
            }
            // Take whatever else is already waiting before handing over.
            while self.delivery.accepting() {
                let Ok(msg) = outbound_rx.try_recv() else { break };
                self.delivery.push(msg);
            }
            self.pump();
        }
        self.shut_down(&mut loop_rx).await;
    }

    fn on_loop_event(&mut self, event: LoopEvent) {
        match event {
            LoopEvent::Connected => {
                info!("connected to mqtt broker");
                self.health.set(Part::Mqtt, true);
                for filter in &self.subscriptions {
                    self.client.subscribe(filter);
                }
                self.delivery.on_connected();
            }
            LoopEvent::Sent(pkid) => self.delivery.numbered(pkid),
            LoopEvent::Acked(pkid) => self.delivery.acked(pkid),
            LoopEvent::Disconnected => {
                let was_connected = self.delivery.is_connected();
                let unconfirmed = self.delivery.on_lost();
                if was_connected {
                    warn!(unconfirmed, "mqtt broker connection lost");
                }
                self.health.set(Part::Mqtt, false);
            }
        }
    }

    /// Hands waiting messages to rumqttc while [`Delivery`] allows. A topic or size the broker can never
    /// take is that message's failure (dropped and counted); only a full request channel is retried.
    fn pump(&mut self) {
        while let Some(msg) = self.delivery.next_to_send() {
            let checked = match &msg.reply {
                Some(reply) => topics::check_mqtt_topic(&reply.to, self.max_topic_bytes)
                    .map(|()| (reply.to.clone(), reply.correlation.clone())),
                // Written and checked once per route, however many messages share it.
                None => self.topics.mqtt(&msg.route).map(|topic| (topic, None)),
            };
            let (topic, correlation) = match checked {
                Ok(checked) => checked,
                Err(refusal) => {
                    self.delivery.refused(msg, refusal.reason());
                    continue;
                }
            };
            let extra = correlation.as_ref().map_or(0, Bytes::len);
            if topic.len() + msg.payload.len() + extra + 16 > self.max_packet_bytes {
                self.delivery.refused(msg, "too_large");
                continue;
            }
            let expiry = self.online_expiry.filter(|_| {
                msg.retain && msg.reply.is_none() && &msg.payload[..] == b"online" && msg.route == self.availability
            });
            let extras = Extras { qos: msg.qos, retain: msg.retain, correlation, expiry };
            // The topic is valid, so rumqttc can refuse only because its request channel is full.
            match self.client.try_publish(topic, msg.payload.clone(), extras) {
                true => self.delivery.sent(msg),
                false => {
                    self.delivery.busy(msg);
                    break;
                }
            }
        }
    }

    /// Input closed: hands over what waits, then `comfyui` and `bridge` `offline`, waiting for acknowledgements
    /// while connected, all within the grace period; then disconnects. A broker that is not connected gets
    /// no wait at all: whatever waits is lost (the broker's last will still says `offline`).
    async fn shut_down(&mut self, loop_rx: &mut mpsc::UnboundedReceiver<LoopEvent>) {
        self.delivery.goodbye();
        let deadline = tokio::time::Instant::now() + self.grace;
        if tokio::time::timeout_at(deadline, self.drain(loop_rx)).await.is_err() {
            warn!(left = self.delivery.waiting() + self.delivery.unconfirmed(), "mqtt drain timed out");
        }
        if self.delivery.is_connected() {
            self.client.disconnect();
            // Let the eventloop send the DISCONNECT before the task ends.
            let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(until, async { while loop_rx.recv().await.is_some() {} }).await;
        } else if !self.delivery.is_idle() {
            warn!(left = self.delivery.waiting(), "mqtt broker not connected at shutdown: not waiting for it");
        }
        info!("mqtt publisher stopped");
    }

    /// Pumps and waits for acknowledgements until everything is confirmed or the connection is gone.
    async fn drain(&mut self, loop_rx: &mut mpsc::UnboundedReceiver<LoopEvent>) {
        loop {
            self.pump();
            if self.delivery.is_idle() || !self.delivery.is_connected() {
                return;
            }
            let event = tokio::select! {
                event = loop_rx.recv() => event,
                _ = tokio::time::sleep(RETRY_FULL), if self.delivery.is_blocked() => continue,
            };
            match event {
                Some(event) => self.on_loop_event(event),
                None => return,
            }
        }
    }
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
