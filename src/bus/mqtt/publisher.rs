//! The publisher task: owns the client handle and the delivery state, and does what they say.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::super::delivery::{Confirmation, Delivery, Limits};
use super::super::{topics, Bus, Common, Outbound, Route};
use super::wire::{Client, Extras};
use super::*;
use crate::config::MqttSettings;
use crate::health::{Health, Part};

/// Owns the client handle and the delivery state; does what the client reports and what [`Delivery`] says.
pub(super) struct Publisher {
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
    pub(super) async fn run(
        mut self,
        mut loop_rx: mpsc::UnboundedReceiver<LoopEvent>,
        mut outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    ) {
        let period = Duration::from_secs(u64::from(self.online_expiry.unwrap_or(u32::MAX / 2) / 2).max(1));
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut incoming = Vec::with_capacity(crate::bus::INTAKE);
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
                n = outbound_rx.recv_many(&mut incoming, self.delivery.room().min(crate::bus::INTAKE)),
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
            LoopEvent::Refused(pkid, reason) => self.delivery.rejected(pkid, reason),
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

    /// Hands waiting messages to the connection while [`Delivery`] allows. A topic or size the broker can never
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
            // A question names where its answers go (MQTT v5 only; the body says it too).
            let response_topic = msg.reply_to.as_ref().and_then(|route| self.topics.mqtt(route).ok());
            let extra = correlation.as_ref().map_or(0, Bytes::len) + response_topic.as_ref().map_or(0, String::len);
            if topic.len() + msg.payload.len() + extra + 16 > self.max_packet_bytes {
                self.delivery.refused(msg, "too_large");
                continue;
            }
            let expiry = self.online_expiry.filter(|_| {
                msg.retain && msg.reply.is_none() && &msg.payload[..] == b"online" && msg.route == self.availability
            });
            let extras = Extras { qos: msg.qos, retain: msg.retain, correlation, expiry, response_topic };
            // The topic is valid, so the connection can refuse only because its request channel is full.
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

impl Publisher {
    pub(super) fn new(
        cfg: &MqttSettings,
        common: &Common,
        client: Client,
        subscriptions: Vec<String>,
        health: Arc<Health>,
        online_expiry: Option<u32>,
    ) -> Self {
        let limits = Limits {
            count: common.outbox_capacity,
            bytes: common.outbox_max_bytes,
            window: WINDOW,
            stall_ticks: STALL_SECS,
        };
        Self {
            client,
            topics: topics::Renderer::new(&cfg.base_topic, cfg.max_topic_bytes),
            max_packet_bytes: cfg.max_packet_bytes,
            max_topic_bytes: cfg.max_topic_bytes,
            delivery: Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits, &common.instance),
            subscriptions,
            health,
            grace: common.grace,
            online_expiry,
            availability: Route::fixed(&common.instance, &[topics::BRIDGE, topics::AVAILABILITY]),
        }
    }
}
