//! Logging setup, and the counters of everything worth counting. Each counted thing is logged by the same
//! function that counts it, so the log and the numbers never disagree.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::bus::{Bus, Route};

/// Process-wide counters (read by the status and, later, `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received from ComfyUI.
    pub frames_in: AtomicU64,
    /// Frames skipped because they could not be decoded.
    pub frames_skipped: AtomicU64,
    /// Messages confirmed (MQTT) or flushed (NATS), per bus: [mqtt, nats].
    pub published: [AtomicU64; 2],
    /// Messages dropped, per bus: [mqtt, nats].
    pub dropped: [AtomicU64; 2],
    /// Previews skipped by the per-node rate limit.
    pub previews_throttled: AtomicU64,
    /// Reconnect attempts of any connection.
    pub reconnects: AtomicU64,
    /// Requests answered, by outcome: [ok, error].
    pub requests: [AtomicU64; 2],
    /// Messages on request topics that were not requests (retained, or arriving during shutdown).
    pub requests_ignored: AtomicU64,
}

/// The counters.
pub static COUNTERS: Counters = Counters {
    frames_in: AtomicU64::new(0),
    frames_skipped: AtomicU64::new(0),
    published: [AtomicU64::new(0), AtomicU64::new(0)],
    dropped: [AtomicU64::new(0), AtomicU64::new(0)],
    previews_throttled: AtomicU64::new(0),
    reconnects: AtomicU64::new(0),
    requests: [AtomicU64::new(0), AtomicU64::new(0)],
    requests_ignored: AtomicU64::new(0),
};

fn index(bus: Bus) -> usize {
    match bus {
        Bus::Mqtt => 0,
        Bus::Nats => 1,
    }
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
    let ms = elapsed.as_secs_f64() * 1000.0;
    match code {
        None => tracing::info!(command, ms, "request ok"),
        Some(code) => tracing::info!(command, code, ms, "request failed"),
    }
}
