//! Turns what ComfyUI sent into messages for the buses. The one owner of the per-connection event state: the
//! sequence counter, the prompt and node currently executing, and the preview rate limits.
//!
//! [`Router::route`] is synchronous and does no I/O; [`run`] is the task around it that fans out to the buses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::bus::topics::{self, Route};
use crate::bus::{Bus, Class, Outbound};
use crate::comfy::event::{self, BinaryEvent, Kind, TextEvent};
use crate::comfy::Inbound;
use crate::config::Settings;
use crate::telemetry;

/// The envelope: ComfyUI's own `{type, data}` plus the bridge's fields (INTERFACE.md §2).
#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a RawValue,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<&'a str>,
    seq: u64,
    ts: u64,
}

/// Per-connection event state.
pub struct Router {
    instance: String,
    seq: u64,
    /// The prompt executing now and its current (display) node: where type-1 previews and text frames belong.
    current: Option<(String, Option<String>)>,
    previews_enabled: bool,
    preview_interval: Duration,
    last_preview: HashMap<(String, String), Instant>,
}

impl Router {
    /// A router for `settings`.
    pub fn new(settings: &Settings) -> Self {
        Self {
            instance: settings.bridge.instance.clone(),
            seq: 0,
            current: None,
            previews_enabled: settings.previews.enabled,
            preview_interval: Duration::from_secs_f64(1.0 / settings.previews.max_per_second),
            last_preview: HashMap::new(),
        }
    }

    /// The messages one inbound item becomes (none for a skipped frame).
    pub fn route(&mut self, inbound: Inbound, now: Instant) -> Vec<Arc<Outbound>> {
        match inbound {
            Inbound::Connected => vec![self.availability(true)],
            Inbound::Disconnected => {
                self.current = None;
                vec![self.availability(false)]
            }
            Inbound::Text(text, ts) => {
                self.seq += 1;
                match event::parse_text(&text) {
                    Ok(event) => self.route_text(&event, ts),
                    Err(e) => {
                        telemetry::frame_skipped(e.reason(), &e);
                        Vec::new()
                    }
                }
            }
            Inbound::Binary(frame, ts) => {
                self.seq += 1;
                match event::parse_binary(frame) {
                    Ok(event) => self.route_binary(event, ts, now),
                    Err(e) => {
                        telemetry::frame_skipped(e.reason(), &e);
                        Vec::new()
                    }
                }
            }
        }
    }

    fn availability(&self, online: bool) -> Arc<Outbound> {
        let route = Route::fixed(&self.instance, &[topics::COMFYUI, topics::AVAILABILITY]);
        Outbound::lifecycle(route, if online { "online" } else { "offline" }, true)
    }

    fn route_text(&mut self, event: &TextEvent, ts: u64) -> Vec<Arc<Outbound>> {
        self.track_current(event);
        let prompt_id = event.prompt_id.as_deref();
        let node_id = event.node_id.as_deref();
        let route = Route::for_event(&self.instance, &event.kind_name, prompt_id, node_id);
        let span = tracing::debug_span!("event", kind = %event.kind_name, prompt_id, node_id, seq = self.seq);
        let _entered = span.enter();
        let payload = self.envelope(&event.kind_name, &event.data, prompt_id, node_id, ts);
        let (qos, class) = match event.kind {
            Kind::Progress => (0, Class::Droppable),
            Kind::ProgressState => (1, Class::Droppable),
            _ => (1, Class::Lifecycle),
        };
        tracing::debug!("routed");
        vec![Arc::new(Outbound { route, payload, qos, retain: event.kind == Kind::Status, class, headers: Vec::new() })]
    }

    /// Remembers which prompt and node are executing, for frames that do not say.
    fn track_current(&mut self, event: &TextEvent) {
        let Some(pid) = &event.prompt_id else {
            // The reconnect hint names only the node (PROTOCOL.md §2.2).
            if let (Kind::Executing, Some((_, node))) = (event.kind, &mut self.current) {
                *node = event.node_id.clone();
            }
            return;
        };
        let finished = match event.kind {
            Kind::ExecutionStart => {
                self.current = Some((pid.clone(), None));
                false
            }
            Kind::Executing if event.node_id.is_some() => {
                self.current = Some((pid.clone(), event.node_id.clone()));
                false
            }
            Kind::Executing | Kind::ExecutionSuccess | Kind::ExecutionInterrupted => true,
            Kind::ExecutionError => !is_blocked(event),
            _ => false,
        };
        if finished && self.current.as_ref().is_some_and(|(p, _)| p == pid) {
            self.current = None;
            self.last_preview.retain(|(p, _), _| p != pid);
        }
    }

    fn envelope(&self, kind: &str, data: &RawValue, prompt_id: Option<&str>, node_id: Option<&str>, ts: u64) -> Bytes {
        let envelope = Envelope { kind, data, instance: &self.instance, prompt_id, node_id, seq: self.seq, ts };
        // Serialising borrowed strings and a RawValue cannot fail.
        Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
    }

    fn route_binary(&mut self, event: BinaryEvent, ts: u64, now: Instant) -> Vec<Arc<Outbound>> {
        match event {
            BinaryEvent::Preview { format, ids, image } => {
                let (prompt_id, node_id) = match ids {
                    Some(ids) => ids,
                    None => self.current.clone().map_or((None, None), |(p, n)| (Some(p), n)),
                };
                self.route_preview(format.content_type(), prompt_id, node_id, image, now)
            }
            BinaryEvent::Text { node_id, text } => self.route_progress_text(node_id, text, ts),
        }
    }

    fn route_preview(
        &mut self,
        content_type: &'static str,
        prompt_id: Option<String>,
        node_id: Option<String>,
        image: Bytes,
        now: Instant,
    ) -> Vec<Arc<Outbound>> {
        if !self.previews_enabled {
            return Vec::new();
        }
        let key = (prompt_id.clone().unwrap_or_default(), node_id.clone().unwrap_or_default());
        if let Some(last) = self.last_preview.get(&key) {
            if now.duration_since(*last) < self.preview_interval {
                telemetry::preview_throttled();
                return Vec::new();
            }
        }
        self.last_preview.insert(key, now);
        let mut headers = vec![("Content-Type", content_type.to_string())];
        headers.extend(prompt_id.clone().map(|p| ("Comfy-Prompt-Id", p)));
        headers.extend(node_id.clone().map(|n| ("Comfy-Node-Id", n)));
        let preview = |route| {
            Arc::new(Outbound {
                route,
                payload: image.clone(),
                qos: 0,
                retain: false,
                class: Class::Droppable,
                headers: headers.clone(),
            })
        };
        let mut out = Vec::with_capacity(2);
        if let (Some(pid), Some(nid)) = (&prompt_id, &node_id) {
            out.push(preview(Route::for_node(&self.instance, pid, nid, topics::PREVIEW)));
        }
        out.push(preview(Route::fixed(&self.instance, &[topics::PREVIEW])));
        out
    }

    fn route_progress_text(&mut self, node_id: String, text: String, ts: u64) -> Vec<Arc<Outbound>> {
        let prompt_id = self.current.as_ref().map(|(p, _)| p.clone());
        let data = serde_json::json!({ "node": node_id, "text": text, "prompt_id": prompt_id });
        let data = serde_json::value::to_raw_value(&data).unwrap_or_else(|_| RawValue::NULL.to_owned());
        let route = match &prompt_id {
            Some(pid) => Route::for_node(&self.instance, pid, &node_id, topics::TEXT),
            None => Route::for_event(&self.instance, "progress_text", None, None),
        };
        let payload = self.envelope("progress_text", &data, prompt_id.as_deref(), Some(&node_id), ts);
        vec![Arc::new(Outbound { route, payload, qos: 0, retain: false, class: Class::Droppable, headers: Vec::new() })]
    }
}

/// "Execution Blocked" errors are not terminal (PROTOCOL.md §4.10).
fn is_blocked(event: &TextEvent) -> bool {
    event.data.get().contains("\"ExecutionBlocked\"")
}

/// The router task: reads [`Inbound`] until the WebSocket task is gone, fans each message out to every bus.
/// Dropping the bus senders on return is what tells the publishers to drain and stop.
pub async fn run(
    settings: Settings,
    mut inbound_rx: mpsc::Receiver<Inbound>,
    buses: Vec<(Bus, mpsc::Sender<Arc<Outbound>>)>,
) {
    let mut router = Router::new(&settings);
    while let Some(inbound) = inbound_rx.recv().await {
        for msg in router.route(inbound, Instant::now()) {
            for (bus, tx) in &buses {
                deliver(*bus, tx, msg.clone()).await;
            }
        }
    }
    tracing::debug!("router stopped");
}

/// Waits while a bus is busy: its publisher stops taking messages only while its broker is connected and
/// slower than ComfyUI (see [`crate::bus::HIGH_WATER`]), and that back-pressure is what keeps every event.
async fn deliver(bus: Bus, tx: &mpsc::Sender<Arc<Outbound>>, msg: Arc<Outbound>) {
    if tx.send(msg).await.is_err() {
        tracing::debug!(bus = bus.name(), "bus publisher gone");
    }
}

#[cfg(test)]
mod tests;
