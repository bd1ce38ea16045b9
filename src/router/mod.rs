//! Turns what ComfyUI sent into messages for the buses. The one owner of the per-connection event state: the
//! sequence counter, the prompt and node currently executing, the preview rate limits, and (through the
//! [`Tracker`] it holds) every prompt's lifecycle.
//!
//! [`Router::route`] and [`Router::control`] are synchronous and do no I/O; [`run`] is the task around them
//! that fans out to the buses and hands queue and history reads to the resync worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::bus::topics::{self, Route};
use crate::bus::{Bus, Class, Outbound};
use crate::comfy::event::{self, BinaryEvent, Kind, TextEvent};
use crate::comfy::tap;
use crate::comfy::Inbound;
use crate::config::PreviewSettings;
use crate::flow::{self, AskChange, Fetch, Flow};
use crate::health::{Health, Part};
use crate::homeassistant::Device;
use crate::json::{json_str, json_u64};
use crate::telemetry;
use crate::tracker::{self, Control, Tracker, Work};

/// Per-connection event state.
pub struct Router {
    instance: String,
    /// `,"instance":<instance as JSON>`, the constant part of every envelope.
    instance_field: Vec<u8>,
    seq: u64,
    /// The prompt executing now and its current (display) node: where type-1 previews and text frames belong.
    current: Option<(String, Option<String>)>,
    previews_enabled: bool,
    preview_interval: Duration,
    last_preview: HashMap<(String, String), Instant>,
    tracker: Tracker,
    /// Reads the resync worker should do.
    work: Work,
    /// With Home Assistant discovery: the device state.
    device: Option<Device>,
    /// ComfyUI's `queue_remaining`, from the latest `status`.
    queue_remaining: u64,
    /// Routes of recent text events, so the many events of one node share one route (and each bus writes
    /// its topic once).
    routes: RouteCache,
    /// `preview`, the latest preview of any node.
    latest_preview: Route,
    /// What `Bus Publish` and `Bus Ask` nodes send.
    flow: Flow,
}

/// A small direct-mapped cache of event routes by (type, prompt id, node id): [`ROUTE_SLOTS`] entries, each
/// holding its full key, so a collision only costs a fresh route. Ids longer than [`ROUTE_KEY_MAX`] are
/// never kept.
struct RouteCache {
    slots: Vec<Option<CachedRoute>>,
}

struct CachedRoute {
    kind: String,
    prompt_id: Option<String>,
    node_id: Option<String>,
    route: Route,
    /// The envelope up to its `data`: `{"type":<kind>,"data":`.
    head: Vec<u8>,
    /// The envelope's fields after `data` that depend on the key: instance, prompt id, node id.
    ids: Vec<u8>,
}

/// Entries of the route cache: enough for many prompts interleaved, each with the few event types of its
/// running node.
const ROUTE_SLOTS: usize = 256;

/// Longest type, prompt id or node id whose route is cached.
const ROUTE_KEY_MAX: usize = 128;

impl RouteCache {
    fn new() -> Self {
        Self { slots: (0..ROUTE_SLOTS).map(|_| None).collect() }
    }

    /// The route of a text event, from the cache when the same type, prompt and node came recently.
    #[cfg(test)]
    fn for_event(&mut self, instance: &str, kind: &str, prompt_id: Option<&str>, node_id: Option<&str>) -> Route {
        match self.get(instance, b"", kind, prompt_id, node_id) {
            Some(cached) => cached.route.clone(),
            None => Route::for_event(instance, kind, prompt_id, node_id),
        }
    }

    /// The cached route and envelope pieces of a text event (made now if the key is new); `None` for a key
    /// too long to keep. `instance_field` is the envelope's constant `,"instance":…`.
    fn get(
        &mut self,
        instance: &str,
        instance_field: &[u8],
        kind: &str,
        prompt_id: Option<&str>,
        node_id: Option<&str>,
    ) -> Option<&CachedRoute> {
        let long = |s: Option<&str>| s.is_some_and(|s| s.len() > ROUTE_KEY_MAX);
        if kind.len() > ROUTE_KEY_MAX || long(prompt_id) || long(node_id) {
            return None;
        }
        let slot = &mut self.slots[route_slot(kind, prompt_id, node_id)];
        let hit = slot
            .as_ref()
            .is_some_and(|c| c.kind == kind && c.prompt_id.as_deref() == prompt_id && c.node_id.as_deref() == node_id);
        if !hit {
            let mut head = Vec::with_capacity(20 + kind.len());
            write_head(&mut head, kind);
            let mut ids = Vec::new();
            write_ids(&mut ids, instance_field, prompt_id, node_id);
            *slot = Some(CachedRoute {
                kind: kind.to_string(),
                prompt_id: prompt_id.map(str::to_string),
                node_id: node_id.map(str::to_string),
                route: Route::for_event(instance, kind, prompt_id, node_id),
                head,
                ids,
            });
        }
        slot.as_ref()
    }
}

/// The cache slot of a key: a cheap mix of the lengths and the last (most varying) bytes of each part. Only
/// speed depends on it; any key may land anywhere.
fn route_slot(kind: &str, prompt_id: Option<&str>, node_id: Option<&str>) -> usize {
    let tail = |s: &str| {
        let b = s.as_bytes();
        let mut word = [0u8; 8];
        let n = b.len().min(8);
        word[..n].copy_from_slice(&b[b.len() - n..]);
        u64::from_le_bytes(word) ^ ((b.len() as u64) << 56)
    };
    let mut h = tail(kind);
    for part in [prompt_id, node_id] {
        h = (h.rotate_left(23) ^ part.map_or(0x9e37, tail)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    (h >> 32) as usize % ROUTE_SLOTS
}

/// Most inbound frames the router task takes from its channel at once.
const BATCH: usize = 64;

/// Most (prompt, node) pairs whose last preview time is kept for the rate limit.
const MAX_PREVIEW_KEYS: usize = 1024;

/// What the router uses of the configuration (`app` builds it from `Settings`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The instance, the base of `/view` links and the buses' answer topics: the router names its messages
    /// with the first, its tracker links results on the second, and the [`Flow`] it holds uses all three.
    pub flow: flow::Config,
    /// `[previews]`.
    pub previews: PreviewSettings,
    /// Home Assistant is on (it needs MQTT): the router keeps the device's state.
    pub home_assistant: bool,
}

impl Router {
    /// A router for `config`.
    pub fn new(config: &Config) -> Self {
        let instance = &config.flow.instance;
        let mut instance_field = b",\"instance\":".to_vec();
        json_str(&mut instance_field, instance);
        Self {
            instance: instance.clone(),
            instance_field,
            seq: 0,
            current: None,
            previews_enabled: config.previews.enabled,
            preview_interval: Duration::from_secs_f64(1.0 / config.previews.max_per_second),
            last_preview: HashMap::new(),
            tracker: Tracker::new(&config.flow.public_base),
            work: Work::default(),
            device: config.home_assistant.then(Device::default),
            queue_remaining: 0,
            routes: RouteCache::new(),
            latest_preview: Route::fixed(instance, &[topics::PREVIEW]),
            flow: Flow::new(&config.flow),
        }
    }

    /// The Home Assistant device state, when it changed.
    fn device_state(&mut self, now: Instant) -> Option<Arc<Outbound>> {
        let running = self.tracker.running();
        self.device.as_mut()?.state(&self.instance, running, self.queue_remaining, now)
    }

    /// Home Assistant's view of a finished prompt.
    fn device_result(&mut self, result: &serde_json::Value) -> Vec<Arc<Outbound>> {
        self.device.as_mut().map_or_else(Vec::new, |device| device.result(&self.instance, result))
    }

    /// Queue and history reads wanted since the last call.
    pub fn take_work(&mut self) -> Work {
        std::mem::take(&mut self.work)
    }

    /// A message from the command plane or the resync worker.
    pub fn control(&mut self, control: Control, now: Instant) -> Vec<Arc<Outbound>> {
        let mut out = self.control_inner(control, now);
        out.extend(self.device_state(now));
        out
    }

    fn control_inner(&mut self, control: Control, now: Instant) -> Vec<Arc<Outbound>> {
        let now_ms = crate::comfy::ws::now_ms();
        let effects = match control {
            Control::Expect { prompt_id, request_id, workflow } => {
                self.tracker.expect(&prompt_id, request_id, &workflow, now);
                return Vec::new();
            }
            Control::Accepted { prompt_id } => self.tracker.accepted(&prompt_id, now_ms, now),
            Control::Rejected { prompt_id } => {
                self.tracker.rejected(&prompt_id);
                return Vec::new();
            }
            Control::Queue { snapshot, recent, requested } => {
                let mut effects = self.tracker.on_queue(&snapshot, requested, now_ms, now);
                effects.extend(self.tracker.on_recent_history(&recent, now_ms, now));
                effects
            }
            Control::History { prompt_id, entry } => self.tracker.on_history(&prompt_id, entry.as_ref(), now_ms),
        };
        self.apply(effects)
    }

    /// A message of the tap extension (`Bus Publish`, `Bus Ask`): its bus messages, and the image to read
    /// for them if there is one.
    pub fn extension(&mut self, message: &tap::Message, now: Instant) -> (Vec<Arc<Outbound>>, Option<Fetch>) {
        self.seq += 1;
        let ts = crate::comfy::ws::now_ms();
        let prompt_id = Flow::about(message).and_then(|(_, p)| p);
        let (request_id, client_id) = prompt_id.map_or((None, None), |p| self.tracker.envelope_ids(p));
        let ids = flow::Ids { seq: self.seq, ts, request_id, client_id };
        let handled = match self.flow.handle(message, ids) {
            Ok(handled) => handled,
            Err(why) => {
                telemetry::frame_skipped("bad_extension_message", &why);
                return (Vec::new(), None);
            }
        };
        let mut out = handled.messages;
        if let Some(change) = handled.ask {
            let effects = match &change {
                AskChange::Waiting(ask) => self.tracker.ask_started(&ask.prompt_id, &ask.ask_id, &ask.subject, now),
                AskChange::Done { prompt_id, ask_id, .. } => self.tracker.ask_ended(prompt_id, ask_id, now),
            };
            self.apply_into(effects, &mut out);
            if let Some(device) = &mut self.device {
                out.extend(device.ask(&self.instance, &change));
            }
        }
        (out, handled.fetch)
    }

    /// Turns tracker effects into messages, and remembers the reads it asked for.
    fn apply(&mut self, effects: tracker::Effects) -> Vec<Arc<Outbound>> {
        let mut out = Vec::new();
        self.apply_into(effects, &mut out);
        out
    }

    /// [`Router::apply`], onto the end of `out`.
    fn apply_into(&mut self, effects: tracker::Effects, out: &mut Vec<Arc<Outbound>>) {
        if effects.updates.is_empty() && effects.lookups.is_empty() {
            // Most events: nothing to publish, nothing to read.
            return;
        }
        self.work.merge(Work { resync: false, lookups: effects.lookups });
        let mut device = Vec::new();
        for result in effects.updates.iter().filter_map(|u| u.result.as_ref()) {
            device.extend(self.device_result(result));
        }
        out.extend(effects.updates.into_iter().map(|update| {
            let last = match update.topic {
                tracker::Topic::State => topics::STATE,
                tracker::Topic::Result => topics::RESULT,
            };
            let class = if update.lifecycle { Class::Lifecycle } else { Class::Droppable };
            Arc::new(Outbound {
                route: Route::for_prompt(&self.instance, &update.prompt_id, last),
                payload: update.payload,
                qos: 1,
                retain: false,
                class,
                headers: Vec::new(),
                reply: None,
                reply_to: None,
            })
        }));
        out.extend(device);
    }

    /// The messages one inbound item becomes (none for a skipped frame).
    pub fn route(&mut self, inbound: Inbound, now: Instant) -> Vec<Arc<Outbound>> {
        let mut out = Vec::new();
        self.route_into(inbound, now, &mut out);
        out
    }

    /// [`Router::route`], onto the end of `out` (no list per frame).
    pub fn route_into(&mut self, inbound: Inbound, now: Instant, out: &mut Vec<Arc<Outbound>>) {
        self.route_inner(inbound, now, out);
        if self.device.is_some() {
            out.extend(self.device_state(now));
        }
    }

    fn route_inner(&mut self, inbound: Inbound, now: Instant, out: &mut Vec<Arc<Outbound>>) {
        match inbound {
            Inbound::Connected => {
                // Whatever ended while the bridge was away is found in the queue and history.
                self.work.resync = true;
                out.push(self.availability(true));
            }
            Inbound::Disconnected => {
                self.current = None;
                out.push(self.availability(false));
            }
            Inbound::Text(text, ts) => {
                self.seq += 1;
                match event::parse_frame(text) {
                    Ok(event) => {
                        telemetry::event_received(event.kind, &event.kind_name);
                        self.route_text(&event, ts, now, out);
                    }
                    Err(e) => telemetry::frame_skipped(e.reason(), &e),
                }
            }
            Inbound::Binary(frame, ts) => {
                self.seq += 1;
                match event::parse_binary(frame) {
                    Ok(event) => out.extend(self.route_binary(event, ts, now)),
                    Err(e) => telemetry::frame_skipped(e.reason(), &e),
                }
            }
        }
    }

    fn availability(&self, online: bool) -> Arc<Outbound> {
        let route = Route::fixed(&self.instance, &[topics::COMFYUI, topics::AVAILABILITY]);
        Outbound::lifecycle(route, if online { "online" } else { "offline" }, true)
    }

    fn route_text(&mut self, event: &TextEvent, ts: u64, now: Instant, out: &mut Vec<Arc<Outbound>>) {
        self.track_current(event);
        if event.kind == Kind::Status {
            // Prompts queued by others show only as queue changes (docs/PROTOCOL.md §3).
            self.work.resync = true;
            if let Some(remaining) = event.queue_remaining() {
                telemetry::comfyui_queue(remaining);
                self.queue_remaining = remaining;
            }
        }
        let effects = self.tracker.on_event(event, ts, now);
        let prompt_id = event.prompt_id();
        let node_id = event.node_id();
        let span = tracing::debug_span!("event", kind = %event.kind_name, prompt_id, node_id, seq = self.seq);
        let _entered = span.enter();
        let (route, payload) = self.event_message(&event.kind_name, event.data(), prompt_id, node_id, ts);
        let (qos, class) = match event.kind {
            Kind::Progress => (0, Class::Droppable),
            Kind::ProgressState => (1, Class::Droppable),
            _ => (1, Class::Lifecycle),
        };
        tracing::debug!("routed");
        let retain = event.kind == Kind::Status;
        out.push(Arc::new(Outbound {
            route,
            payload,
            qos,
            retain,
            class,
            headers: Vec::new(),
            reply: None,
            reply_to: None,
        }));
        self.apply_into(effects, out);
    }

    /// Remembers which prompt and node are executing, for frames that do not say.
    fn track_current(&mut self, event: &TextEvent) {
        let Some(pid) = event.prompt_id() else {
            // The reconnect hint names only the node (docs/PROTOCOL.md §2.2).
            if let (Kind::Executing, Some((_, node))) = (event.kind, &mut self.current) {
                *node = event.node_id().map(str::to_string);
            }
            return;
        };
        let finished = match event.kind {
            Kind::ExecutionStart => {
                self.current = Some((pid.to_string(), None));
                false
            }
            Kind::Executing if event.node_id().is_some() => {
                self.current = Some((pid.to_string(), event.node_id().map(str::to_string)));
                false
            }
            Kind::Executing | Kind::ExecutionSuccess | Kind::ExecutionInterrupted => true,
            Kind::ExecutionError => !event.is_blocked(),
            _ => false,
        };
        if finished && self.current.as_ref().is_some_and(|(p, _)| p == pid) {
            self.current = None;
            self.last_preview.retain(|(p, _), _| p != pid);
        }
    }

    /// The route and envelope of a text event; both from the route cache when the key came recently.
    fn event_message(
        &mut self,
        kind: &str,
        data: &str,
        prompt_id: Option<&str>,
        node_id: Option<&str>,
        ts: u64,
    ) -> (Route, Bytes) {
        let (request_id, client_id) = prompt_id.map_or((None, None), |p| self.tracker.envelope_ids(p));
        match self.routes.get(&self.instance, &self.instance_field, kind, prompt_id, node_id) {
            Some(cached) => {
                let data = data.as_bytes();
                let ids = request_id.map_or(0, str::len) + client_id.map_or(0, str::len);
                let room = cached.head.len() + data.len() + cached.ids.len() + 72 + ids;
                let mut out = Vec::with_capacity(room);
                out.extend_from_slice(&cached.head);
                out.extend_from_slice(data);
                out.extend_from_slice(&cached.ids);
                write_tail(&mut out, self.seq, ts, request_id, client_id);
                (cached.route.clone(), Bytes::from(out))
            }
            None => {
                let route = Route::for_event(&self.instance, kind, prompt_id, node_id);
                (route, self.envelope(kind, data, prompt_id, node_id, ts))
            }
        }
    }

    /// The envelope (docs/INTERFACE.md §2): ComfyUI's own `{type, data}` plus the bridge's fields, written directly
    /// (byte for byte what serde_json makes of the same struct, without its per-field machinery).
    fn envelope(&self, kind: &str, data: &str, prompt_id: Option<&str>, node_id: Option<&str>, ts: u64) -> Bytes {
        let (request_id, client_id) = prompt_id.map_or((None, None), |p| self.tracker.envelope_ids(p));
        let ids = [prompt_id, node_id, request_id, client_id].iter().flatten().map(|s| s.len()).sum::<usize>();
        let mut out = Vec::with_capacity(128 + kind.len() + data.len() + self.instance_field.len() + ids);
        write_head(&mut out, kind);
        out.extend_from_slice(data.as_bytes());
        write_ids(&mut out, &self.instance_field, prompt_id, node_id);
        write_tail(&mut out, self.seq, ts, request_id, client_id);
        Bytes::from(out)
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
        if self.last_preview.len() >= MAX_PREVIEW_KEYS {
            // Previews can name any prompt and node: keep only entries that can still throttle something.
            let interval = self.preview_interval;
            self.last_preview.retain(|_, t| now.duration_since(*t) < interval);
            if self.last_preview.len() >= MAX_PREVIEW_KEYS {
                self.last_preview.clear();
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
                reply: None,
                reply_to: None,
            })
        };
        let mut out = Vec::with_capacity(2);
        if let (Some(pid), Some(nid)) = (&prompt_id, &node_id) {
            out.push(preview(Route::for_node(&self.instance, pid, nid, topics::PREVIEW)));
        }
        out.push(preview(self.latest_preview.clone()));
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
        let payload = self.envelope("progress_text", data.get(), prompt_id.as_deref(), Some(&node_id), ts);
        vec![Arc::new(Outbound {
            route,
            payload,
            qos: 0,
            retain: false,
            class: Class::Droppable,
            headers: Vec::new(),
            reply: None,
            reply_to: None,
        })]
    }
}

/// The envelope up to its data: `{"type":<kind>,"data":`.
fn write_head(out: &mut Vec<u8>, kind: &str) {
    out.extend_from_slice(b"{\"type\":");
    json_str(out, kind);
    out.extend_from_slice(b",\"data\":");
}

/// The envelope's fields after the data that depend only on the event's key: `instance_field`
/// (`,"instance":…`), then the prompt and node ids when there are any.
fn write_ids(out: &mut Vec<u8>, instance_field: &[u8], prompt_id: Option<&str>, node_id: Option<&str>) {
    out.extend_from_slice(instance_field);
    optional_str(out, b",\"prompt_id\":", prompt_id);
    optional_str(out, b",\"node_id\":", node_id);
}

/// The rest of the envelope: sequence number, timestamp, request id, the closing brace.
fn write_tail(out: &mut Vec<u8>, seq: u64, ts: u64, request_id: Option<&str>, client_id: Option<&str>) {
    out.extend_from_slice(b",\"seq\":");
    json_u64(out, seq);
    out.extend_from_slice(b",\"ts\":");
    json_u64(out, ts);
    optional_str(out, b",\"request_id\":", request_id);
    optional_str(out, b",\"client_id\":", client_id);
    out.push(b'}');
}

/// `name` and `value` as a JSON string, when there is a value.
fn optional_str(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(name);
        json_str(out, value);
    }
}

/// The tap extension's messages in, and the images of `Bus Publish` out ([`crate::flow`]).
pub struct Extension {
    /// What the WebSocket task hands over (`comfy_bridge.publish`, `.ask`, `.ask_done`).
    pub messages: mpsc::Receiver<tap::Message>,
    /// To the task that reads images from ComfyUI ([`flow::fetch::run`]).
    pub images: mpsc::Sender<Fetch>,
}

/// The router task: reads [`Inbound`] until the WebSocket task is gone, [`Control`] messages and the
/// extension's messages, and fans each resulting message out to every bus. Control goes first, so a prompt the
/// command plane announced is known before any event about it; events go before the extension's messages, so
/// a node's `executing` comes before the ask it makes. Dropping the bus senders on return is what tells the
/// publishers to drain and stop; dropping `work_tx` stops the resync worker.
pub async fn run(
    config: Config,
    health: Arc<Health>,
    mut inbound_rx: mpsc::Receiver<Inbound>,
    mut control_rx: mpsc::Receiver<Control>,
    work_tx: mpsc::UnboundedSender<Work>,
    buses: Vec<(Bus, mpsc::Sender<Arc<Outbound>>)>,
    extension: Option<Extension>,
) {
    let mut router = Router::new(&config);
    let (mut extension_rx, images) = match extension {
        Some(Extension { messages, images }) => (Some(messages), Some(images)),
        None => (None, None),
    };
    let mut control_open = true;
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            biased;
            control = control_rx.recv(), if control_open => match control {
                Some(control) => out = router.control(control, Instant::now()),
                None => {
                    control_open = false;
                    continue;
                }
            },
            // Whatever is already waiting, at once: one wake-up and one select per batch, not per frame. Frames
            // that arrive meanwhile wait for the next round, behind any control message that came first.
            received = inbound_rx.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
                for inbound in batch.drain(..) {
                    match inbound {
                        Inbound::Connected => health.set(Part::Comfyui, true),
                        Inbound::Disconnected => health.set(Part::Comfyui, false),
                        _ => {}
                    }
                    router.route_into(inbound, Instant::now(), &mut out);
                }
            },
            message = recv(&mut extension_rx) => match message {
                Some(message) => {
                    let (messages, fetch) = router.extension(&message, Instant::now());
                    out = messages;
                    if let (Some(fetch), Some(images)) = (fetch, &images) {
                        flow::fetch::offer(images, fetch);
                    }
                }
                None => extension_rx = None,
            },
        }
        let work = router.take_work();
        if !work.is_empty() {
            let _ = work_tx.send(work);
        }
        for msg in out.drain(..) {
            for (bus, tx) in &buses {
                deliver(*bus, tx, msg.clone()).await;
            }
        }
    }
    tracing::debug!("router stopped");
}

/// The next message of an optional channel; never ready without one.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits while a bus is busy: its publisher stops taking messages only while its broker is connected and
/// slower than ComfyUI (see [`crate::bus::HIGH_WATER`]), and that back-pressure is what keeps every event.
async fn deliver(bus: Bus, tx: &mpsc::Sender<Arc<Outbound>>, msg: Arc<Outbound>) {
    // Room in the channel is the usual case: no future, no waiting.
    let msg = match tx.try_send(msg) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Full(msg)) => msg,
        Err(mpsc::error::TrySendError::Closed(_)) => return tracing::debug!(bus = bus.name(), "bus publisher gone"),
    };
    if tx.send(msg).await.is_err() {
        tracing::debug!(bus = bus.name(), "bus publisher gone");
    }
}

#[cfg(test)]
mod tests;
