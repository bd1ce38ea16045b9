//! Logging setup, and the counters of everything worth counting. Each counted thing is logged by the same
//! function that counts it, so the log and the numbers never disagree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::bus::{Bus, Route};

/// Process-wide counters, read by `/metrics`. One daemon per process; tests that run several share them.
#[derive(Debug)]
pub struct Counters {
    /// Frames received from ComfyUI.
    pub frames_in: AtomicU64,
    /// Frames skipped because they could not be decoded.
    pub frames_skipped: AtomicU64,
    /// Messages confirmed (MQTT) or flushed (NATS), per bus: [mqtt, nats].
    pub published: [AtomicU64; 2],
    /// Messages dropped, per bus: [mqtt, nats].
    pub dropped: [AtomicU64; 2],
    /// Messages waiting in each bus's outbox: [mqtt, nats].
    pub outbox: [AtomicU64; 2],
    /// Previews skipped by the per-node rate limit.
    pub previews_throttled: AtomicU64,
    /// Reconnect attempts of any connection.
    pub reconnects: AtomicU64,
    /// Requests answered, by outcome: [ok, error].
    pub requests: [AtomicU64; 2],
    /// Messages on request topics that were not requests (retained, or arriving during shutdown).
    pub requests_ignored: AtomicU64,
    /// ComfyUI's `queue_remaining`, from its latest `status`.
    pub comfyui_queue: AtomicU64,
    /// Counters with labels.
    labelled: Mutex<Labelled>,
}

/// Most distinct event types counted by name; the rest count as `other` (custom events are unbounded).
const MAX_EVENT_TYPES: usize = 64;
/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Labelled {
    events: BTreeMap<String, u64>,
    drops: BTreeMap<(&'static str, &'static str), u64>,
    reconnects: BTreeMap<&'static str, u64>,
    requests: BTreeMap<(String, String), u64>,
    /// Per command: bucket counts, then the sum of seconds.
    latency: BTreeMap<String, ([u64; LATENCY_BUCKETS.len() + 1], f64)>,
}

/// The counters.
pub static COUNTERS: Counters = Counters {
    frames_in: AtomicU64::new(0),
    frames_skipped: AtomicU64::new(0),
    published: [AtomicU64::new(0), AtomicU64::new(0)],
    dropped: [AtomicU64::new(0), AtomicU64::new(0)],
    outbox: [AtomicU64::new(0), AtomicU64::new(0)],
    previews_throttled: AtomicU64::new(0),
    reconnects: AtomicU64::new(0),
    requests: [AtomicU64::new(0), AtomicU64::new(0)],
    requests_ignored: AtomicU64::new(0),
    comfyui_queue: AtomicU64::new(0),
    labelled: Mutex::new(Labelled {
        events: BTreeMap::new(),
        drops: BTreeMap::new(),
        reconnects: BTreeMap::new(),
        requests: BTreeMap::new(),
        latency: BTreeMap::new(),
    }),
};

fn labelled() -> std::sync::MutexGuard<'static, Labelled> {
    COUNTERS.labelled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn index(bus: Bus) -> usize {
    match bus {
        Bus::Mqtt => 0,
        Bus::Nats => 1,
    }
}

/// A text event of type `kind` arrived.
pub fn event_received(kind: &str) {
    let mut l = labelled();
    if let Some(n) = l.events.get_mut(kind) {
        *n += 1;
    } else if l.events.len() < MAX_EVENT_TYPES {
        l.events.insert(kind.to_string(), 1);
    } else {
        *l.events.entry("other".to_string()).or_default() += 1;
    }
}

/// The depth of a bus's outbox changed.
pub fn outbox_depth(bus: Bus, depth: usize) {
    COUNTERS.outbox[index(bus)].store(depth as u64, Relaxed);
}

/// ComfyUI reported its queue size.
pub fn comfyui_queue(remaining: u64) {
    COUNTERS.comfyui_queue.store(remaining, Relaxed);
}

/// A frame arrived from ComfyUI.
pub fn frame_received() {
    COUNTERS.frames_in.fetch_add(1, Relaxed);
}

/// A frame from ComfyUI could not be decoded and was skipped.
pub fn frame_skipped(reason: &str, detail: &dyn std::fmt::Display) {
    let total = COUNTERS.frames_skipped.fetch_add(1, Relaxed) + 1;
    tracing::warn!(reason, %detail, total, "skipped malformed frame from comfyui");
}

/// A broker confirmed `n` messages.
pub fn published(bus: Bus, n: u64) {
    COUNTERS.published[index(bus)].fetch_add(n, Relaxed);
}

/// A message was dropped before reaching a broker.
pub fn dropped(bus: Bus, reason: &'static str, route: &Route) {
    let total = COUNTERS.dropped[index(bus)].fetch_add(1, Relaxed) + 1;
    *labelled().drops.entry((bus.name(), reason)).or_default() += 1;
    tracing::warn!(bus = bus.name(), reason, route = ?route.levels(), total, "dropped message");
}

/// A preview was skipped by the rate limit.
pub fn preview_throttled() {
    let total = COUNTERS.previews_throttled.fetch_add(1, Relaxed) + 1;
    tracing::trace!(total, "preview throttled");
}

/// A connection is being re-established.
pub fn reconnecting(component: &'static str, attempt: u32, error: &dyn std::fmt::Display) {
    COUNTERS.reconnects.fetch_add(1, Relaxed);
    *labelled().reconnects.entry(component).or_default() += 1;
    tracing::warn!(component, attempt, %error, "connection lost, reconnecting");
}

/// Installs the global subscriber: `RUST_LOG` if set, else `filter`; JSON or text; ANSI only on a terminal.
pub fn init(filter: &str, json: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// A message on a request topic was not taken as a request.
pub fn request_ignored(bus: Bus, reason: &'static str, topic: &str) {
    let total = COUNTERS.requests_ignored.fetch_add(1, Relaxed) + 1;
    tracing::warn!(bus = bus.name(), reason, topic, total, "ignored message on a request topic");
}

/// A request was answered; `code` is the error code, `None` for success.
pub fn request_answered(command: &str, code: Option<&str>, elapsed: std::time::Duration) {
    let ok = code.is_none();
    COUNTERS.requests[usize::from(!ok)].fetch_add(1, Relaxed);
    let seconds = elapsed.as_secs_f64();
    {
        let mut l = labelled();
        *l.requests.entry((command.to_string(), code.unwrap_or("ok").to_string())).or_default() += 1;
        let (buckets, sum) = l.latency.entry(command.to_string()).or_default();
        let bucket = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        buckets[bucket] += 1;
        *sum += seconds;
    }
    let ms = seconds * 1000.0;
    match code {
        None => tracing::info!(command, ms, "request ok"),
        Some(code) => tracing::info!(command, code, ms, "request failed"),
    }
}

/// Every counter in Prometheus' text format.
pub fn render_metrics() -> String {
    let mut out = String::with_capacity(4096);
    let c = &COUNTERS;
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP comfy_bridge_{name} {help}\n# TYPE comfy_bridge_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "comfy_bridge_{name}{labels} {value}");
        }
    };
    let per_bus = |a: &[AtomicU64; 2]| {
        vec![(r#"{bus="mqtt"}"#.to_string(), a[0].load(Relaxed)), (r#"{bus="nats"}"#.to_string(), a[1].load(Relaxed))]
    };
    let one = |a: &AtomicU64| vec![(String::new(), a.load(Relaxed))];
    let l = labelled();
    let events: Vec<_> = l.events.iter().map(|(k, v)| (format!("{{type=\"{}\"}}", label(k)), *v)).collect();
    metric("frames_received_total", "counter", "Frames received from ComfyUI.", &one(&c.frames_in));
    metric("frames_skipped_total", "counter", "Malformed frames skipped.", &one(&c.frames_skipped));
    metric("events_received_total", "counter", "Text events received from ComfyUI, by type.", &events);
    metric("messages_published_total", "counter", "Messages the broker confirmed, by bus.", &per_bus(&c.published));
    let drops: Vec<_> =
        l.drops.iter().map(|((bus, reason), v)| (format!("{{bus=\"{bus}\",reason=\"{reason}\"}}"), *v)).collect();
    metric("messages_dropped_total", "counter", "Messages dropped before a broker, by bus and reason.", &drops);
    metric("outbox_depth", "gauge", "Messages waiting for a broker, by bus.", &per_bus(&c.outbox));
    metric("previews_throttled_total", "counter", "Previews skipped by the rate limit.", &one(&c.previews_throttled));
    let reconnects: Vec<_> = l.reconnects.iter().map(|(k, v)| (format!("{{component=\"{k}\"}}"), *v)).collect();
    metric("reconnects_total", "counter", "Reconnect attempts, by connection.", &reconnects);
    let requests: Vec<_> = l
        .requests
        .iter()
        .map(|((command, outcome), v)| (format!("{{command=\"{}\",outcome=\"{outcome}\"}}", label(command)), *v))
        .collect();
    metric("requests_total", "counter", "Requests answered, by command and outcome (ok or error code).", &requests);
    metric(
        "requests_ignored_total",
        "counter",
        "Messages on request topics that were not requests.",
        &one(&c.requests_ignored),
    );
    metric("comfyui_queue_remaining", "gauge", "ComfyUI's pending plus running prompts.", &one(&c.comfyui_queue));
    let _ = writeln!(
        out,
        "# HELP comfy_bridge_request_duration_seconds Time to answer a request, by command.\n\
         # TYPE comfy_bridge_request_duration_seconds histogram"
    );
    for (command, (buckets, sum)) in &l.latency {
        let command = label(command);
        let mut cumulative = 0;
        for (i, count) in buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "comfy_bridge_request_duration_seconds_bucket{{command=\"{command}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "comfy_bridge_request_duration_seconds_sum{{command=\"{command}\"}} {sum}");
        let _ = writeln!(out, "comfy_bridge_request_duration_seconds_count{{command=\"{command}\"}} {cumulative}");
    }
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// NATS headers left off a message because their name or value was not safe to send, per bus.
pub static HEADERS_REFUSED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// A header was left off a message because its value held control characters (or its name was no token).
pub fn header_refused(bus: Bus, name: &str, route: &Route) {
    let total = HEADERS_REFUSED[index(bus)].fetch_add(1, Relaxed) + 1;
    tracing::warn!(bus = bus.name(), header = name, route = ?route.levels(), total, "header refused");
}
