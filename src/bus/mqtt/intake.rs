//! The polling task: drives the connection loop ([`super::wire`]), reports to the publisher and hands requests
//! to the inbox.

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::super::{Bus, Inquiry, InquiryKind, Reply};
use super::wire::{Polled, Wire};
use super::*;
use crate::backoff;
use crate::commands::inbox::Inbox;
use crate::telemetry;

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

/// Polls the connection and nothing else, so its request channel always drains; reports to the publisher and
/// hands over requests without ever waiting.
pub(super) async fn poll(
    mut connection: Wire,
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
            polled = connection.next() => polled,
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
                // handed over before that (still in the connection's channel) is forgotten too and redelivered
                // once, from the outbox.
                connection.reset();
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
    debug!("mqtt connection stopped");
}
