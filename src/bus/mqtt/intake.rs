//! The polling task: drives rumqttc's event loop, reports to the publisher and hands requests to the inbox.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet as V5Packet;
use rumqttc::{Outgoing, Packet as V3Packet};
use tokio::sync::mpsc;
use tracing::debug;

use super::super::{Bus, Inquiry, InquiryKind, Reply};
use super::*;
use crate::backoff;
use crate::commands::inbox::Inbox;
use crate::telemetry;

/// What one poll of either protocol's eventloop meant.
pub(super) enum Polled {
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
pub(super) trait EventSource {
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
pub(super) struct Intake {
    /// `<base>/<inst>/request/`, when commands are on.
    pub(super) prefix: Option<String>,
    /// `<base>/<inst>/answer/`, when commands are on: answers to `Bus Ask` questions.
    pub(super) answers: Option<String>,
    /// With Home Assistant discovery: `<base>/<inst>/ha/` and `<discovery prefix>/status`.
    pub(super) home_assistant: Option<(String, String)>,
    pub(super) tx: Inbox,
}

impl Intake {
    /// The topic filters to subscribe to.
    pub(super) fn filters(&self) -> Vec<String> {
        let mut filters: Vec<String> = self.prefix.iter().map(|p| format!("{p}#")).collect();
        filters.extend(self.answers.iter().map(|a| format!("{a}+")));
        if let Some((entities, status)) = &self.home_assistant {
            filters.push(format!("{entities}+/set"));
            filters.push(status.clone());
        }
        filters
    }

    fn take(&self, topic: String, payload: Bytes, retain: bool, reply: Option<Reply>) {
        let (kind, path) = if let Some(path) = self.prefix.as_deref().and_then(|p| topic.strip_prefix(p)) {
            (InquiryKind::Request, path)
        } else if let Some(ask_id) = self.answers.as_deref().and_then(|a| topic.strip_prefix(a)) {
            (InquiryKind::Answer, ask_id)
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
pub(super) async fn poll(
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
