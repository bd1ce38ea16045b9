//! Logging setup, and the counters of everything worth counting. Each counted thing is logged by the same
//! function that counts it, so the log and the numbers never disagree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::{Bus, Route};
use crate::comfy::event::Kind;

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
    /// Prompts the tracker stopped tracking to stay within its bound.
    pub prompts_forgotten: AtomicU64,
    /// Reconnect attempts of any connection.
    pub reconnects: AtomicU64,
    /// Requests answered, by outcome: [ok, error].
    pub requests: [AtomicU64; 2],
    /// Messages on request topics that were not requests (retained, or arriving during shutdown).
    pub requests_ignored: AtomicU64,
    /// ComfyUI's `queue_remaining`, from its latest `status`.
    pub comfyui_queue: AtomicU64,
    /// Text events of each known type ([`Kind::NAMES`]); other types are counted by name under a lock.
    pub known_events: [AtomicU64; Kind::NAMES.len()],
    /// Counters with labels.
    labelled: Mutex<Labelled>,
}

/// Most distinct event types counted by name; the rest count as `other` (custom events are unbounded).
const MAX_EVENT_TYPES: usize = 64;
/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Labelled {
    /// Events of types outside [`Kind::NAMES`], by name.
    events: BTreeMap<String, u64>,
    /// Known types seen at least once: with `events`, they take the [`MAX_EVENT_TYPES`] places.
    known_seen: usize,
    drops: BTreeMap<(&'static str, &'static str), u64>,
    reconnects: BTreeMap<&'static str, u64>,
    /// By command label (bounded: unknown names are `other`) and outcome (`ok` or an error code).
    requests: BTreeMap<(&'static str, &'static str), u64>,
    ignored: BTreeMap<(&'static str, &'static str), u64>,
    /// Per command label: bucket counts, then the sum of seconds.
    latency: BTreeMap<&'static str, ([u64; LATENCY_BUCKETS.len() + 1], f64)>,
}

/// The counters.
pub static COUNTERS: Counters = Counters {
    frames_in: AtomicU64::new(0),
    frames_skipped: AtomicU64::new(0),
    published: [AtomicU64::new(0), AtomicU64::new(0)],
    dropped: [AtomicU64::new(0), AtomicU64::new(0)],
    outbox: [AtomicU64::new(0), AtomicU64::new(0)],
    previews_throttled: AtomicU64::new(0),
    prompts_forgotten: AtomicU64::new(0),
    reconnects: AtomicU64::new(0),
    requests: [AtomicU64::new(0), AtomicU64::new(0)],
    requests_ignored: AtomicU64::new(0),
    comfyui_queue: AtomicU64::new(0),
    known_events: [const { AtomicU64::new(0) }; Kind::NAMES.len()],
    labelled: Mutex::new(Labelled {
        events: BTreeMap::new(),
        known_seen: 0,
        drops: BTreeMap::new(),
        reconnects: BTreeMap::new(),
        requests: BTreeMap::new(),
        ignored: BTreeMap::new(),
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

/// A text event of type `name` (of kind `kind`) arrived. The first [`MAX_EVENT_TYPES`] types seen are counted by
/// name, the rest as `other`; a known type seen before costs one atomic add.
pub fn event_received(kind: Kind, name: &str) {
    let known = kind.index().map(|i| &COUNTERS.known_events[i]);
    if let Some(n) = known.filter(|n| n.load(Relaxed) > 0) {
        n.fetch_add(1, Relaxed);
        return;
    }
    let mut l = labelled();
    let room = l.events.len() + l.known_seen < MAX_EVENT_TYPES;
    if let Some(n) = known {
        if n.load(Relaxed) > 0 || room {
            // Only here, under the lock, does a known count leave 0.
            if n.fetch_add(1, Relaxed) == 0 {
                l.known_seen += 1;
            }
        } else {
            *l.events.entry("other".to_string()).or_default() += 1;
        }
    } else if let Some(n) = l.events.get_mut(name) {
        *n += 1;
    } else if room {
        l.events.insert(name.to_string(), 1);
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

/// A frame from ComfyUI could not be decoded and was skipped (counted always, logged rate-limited).
pub fn frame_skipped(reason: &'static str, detail: &dyn std::fmt::Display) {
    let total = COUNTERS.frames_skipped.fetch_add(1, Relaxed) + 1;
    if warn_allowed("frame_skipped", reason) {
        tracing::warn!(reason, %detail, total, "skipped malformed frame from comfyui");
    }
}

/// A broker confirmed `n` messages.
pub fn published(bus: Bus, n: u64) {
    COUNTERS.published[index(bus)].fetch_add(n, Relaxed);
}

/// A message was dropped before reaching a broker.
pub fn dropped(bus: Bus, reason: &'static str, route: &Route) {
    let total = COUNTERS.dropped[index(bus)].fetch_add(1, Relaxed) + 1;
    *labelled().drops.entry((bus.name(), reason)).or_default() += 1;
    if warn_allowed("dropped", reason) {
        tracing::warn!(bus = bus.name(), reason, route = ?route.levels(), total, "dropped message");
    }
}

/// A preview was skipped by the rate limit.
pub fn preview_throttled() {
    let total = COUNTERS.previews_throttled.fetch_add(1, Relaxed) + 1;
    tracing::trace!(total, "preview throttled");
}

/// The tracker forgot a live prompt to stay within its bound (its `result` will not be published).
pub fn prompt_forgotten() {
    let total = COUNTERS.prompts_forgotten.fetch_add(1, Relaxed) + 1;
    if warn_allowed("tracker", "prompt_forgotten") {
        tracing::warn!(total, "too many live prompts: forgot the oldest");
    }
}

/// A connection is being re-established.
pub fn reconnecting(component: &'static str, attempt: u32, error: &dyn std::fmt::Display) {
    COUNTERS.reconnects.fetch_add(1, Relaxed);
    *labelled().reconnects.entry(component).or_default() += 1;
    if warn_allowed("reconnecting", component) {
        tracing::warn!(component, attempt, %error, "connection lost, reconnecting");
    }
}

/// WebSocket connections to ComfyUI found deaf and replaced (ComfyUI issue 16010).
pub static DEAF_SOCKETS: AtomicU64 = AtomicU64::new(0);

/// The WebSocket to ComfyUI was found deaf: a prompt of the bridge runs and broadcasts come, but nothing
/// addressed to the bridge has for `silent`; it is replaced by a fresh socket.
pub fn deaf_socket(silent: Duration, prompt_id: &str) {
    let total = DEAF_SOCKETS.fetch_add(1, Relaxed) + 1;
    tracing::warn!(
        silent_ms = silent.as_millis() as u64,
        prompt_id,
        total,
        "comfyui websocket is deaf (broadcasts arrive, the running prompt's events do not): reconnecting"
    );
}

/// How long a window of the warning rate limit lasts.
pub const WARN_WINDOW: Duration = Duration::from_secs(10);
/// Warnings of one kind logged per [`WARN_WINDOW`] before the rest are only counted.
pub const WARN_BURST: u32 = 5;

/// The process-wide warning rate limit.
static WARNINGS: Mutex<WarnLimiter> = Mutex::new(WarnLimiter::new(WARN_WINDOW, WARN_BURST));

/// Whether a warning of this kind (`what`, e.g. `"frame_skipped"`, and `detail`, e.g. its reason) may be
/// logged now: the first [`WARN_BURST`] of each kind per [`WARN_WINDOW`] are. The rest are counted and, once
/// their window has ended, summarised in one line ("… and 99,812 more in the last 10 s") by the next call
/// of any kind. Use it for every warning that one message from outside can cause; count before asking.
pub fn warn_allowed(what: &'static str, detail: &'static str) -> bool {
    let mut limiter = WARNINGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    limiter.check((what, detail), Instant::now(), |ended| {
        tracing::warn!(
            kind = ended.kind.0,
            detail = ended.kind.1,
            suppressed = ended.suppressed,
            "{} ({}): … and {} more in the last {} s",
            ended.kind.0,
            ended.kind.1,
            thousands(ended.suppressed),
            ended.window.as_secs()
        );
    })
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A kind of warning: what happened and a detail (both fixed strings, so the kinds are few).
pub type WarnKind = (&'static str, &'static str);

/// Warnings of one kind that were not logged in a window that has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suppressed {
    /// The kind.
    pub kind: WarnKind,
    /// How many were not logged.
    pub suppressed: u64,
    /// The window's length.
    pub window: Duration,
}

/// A sans-IO rate limit for warnings: per kind, fixed windows that start at the kind's first warning; the
/// first `burst` in a window pass, the rest are counted and reported once the window has ended.
#[derive(Debug)]
pub struct WarnLimiter {
    window: Duration,
    burst: u32,
    /// Per kind: when its window started, how many passed and how many did not.
    windows: BTreeMap<WarnKind, (Instant, u32, u64)>,
    /// The earliest end of a window with suppressed warnings: before it, nothing is due.
    next_due: Option<Instant>,
}

impl WarnLimiter {
    /// A limiter passing `burst` warnings per kind per `window`.
    pub const fn new(window: Duration, burst: u32) -> Self {
        Self { window, burst, windows: BTreeMap::new(), next_due: None }
    }

    /// Whether a warning of `kind` at `now` may be logged. First hands `report` every kind whose window
    /// ended before `now` with warnings suppressed.
    pub fn check(&mut self, kind: WarnKind, now: Instant, mut report: impl FnMut(Suppressed)) -> bool {
        if self.next_due.is_some_and(|due| now >= due) {
            self.flush(now, &mut report);
        }
        let window = self.window;
        let entry = self.windows.entry(kind).or_insert((now, 0, 0));
        if now.saturating_duration_since(entry.0) >= window {
            if entry.2 > 0 {
                report(Suppressed { kind, suppressed: entry.2, window });
            }
            *entry = (now, 0, 0);
        }
        if entry.1 < self.burst {
            entry.1 += 1;
            return true;
        }
        entry.2 += 1;
        let due = entry.0 + window;
        self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
        false
    }

    /// Reports and forgets every window that ended before `now`.
    fn flush(&mut self, now: Instant, report: &mut impl FnMut(Suppressed)) {
        let window = self.window;
        let mut next_due = None::<Instant>;
        self.windows.retain(|kind, (start, _, suppressed)| {
            if now.saturating_duration_since(*start) < window {
                if *suppressed > 0 {
                    let due = *start + window;
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
                return true;
            }
            if *suppressed > 0 {
                report(Suppressed { kind: *kind, suppressed: *suppressed, window });
            }
            false
        });
        self.next_due = next_due;
    }
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

/// A message on a request topic was not taken as a request (and not answered). Logged as a warning the
/// first ten times and then at every power of two, so a flood cannot flood the log.
pub fn request_ignored(bus: Bus, reason: &'static str, topic: &str) {
    let total = COUNTERS.requests_ignored.fetch_add(1, Relaxed) + 1;
    *labelled().ignored.entry((bus.name(), reason)).or_default() += 1;
    let topic = crate::commands::inbox::cut(topic, 128);
    if total <= 10 || total.is_power_of_two() {
        tracing::warn!(bus = bus.name(), reason, topic, total, "ignored message on a request topic");
    } else {
        tracing::debug!(bus = bus.name(), reason, topic, total, "ignored message on a request topic");
    }
}

/// A request was answered; `code` is the error code, `None` for success. `command` is counted under its
/// name when it is a known command, else as `other`.
pub fn request_answered(command: &str, code: Option<&'static str>, elapsed: std::time::Duration) {
    let command = crate::commands::policy::metric_label(command);
    let ok = code.is_none();
    COUNTERS.requests[usize::from(!ok)].fetch_add(1, Relaxed);
    let seconds = elapsed.as_secs_f64();
    {
        let mut l = labelled();
        *l.requests.entry((command, code.unwrap_or("ok"))).or_default() += 1;
        let (buckets, sum) = l.latency.entry(command).or_default();
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
    let mut by_type: BTreeMap<&str, u64> = l.events.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let known = Kind::NAMES.iter().zip(&c.known_events).map(|(k, n)| (*k, n.load(Relaxed)));
    by_type.extend(known.filter(|(_, n)| *n > 0));
    let events: Vec<_> = by_type.iter().map(|(k, v)| (format!("{{type=\"{}\"}}", label(k)), *v)).collect();
    metric("frames_received_total", "counter", "Frames received from ComfyUI.", &one(&c.frames_in));
    metric("frames_skipped_total", "counter", "Malformed frames skipped.", &one(&c.frames_skipped));
    metric("events_received_total", "counter", "Text events received from ComfyUI, by type.", &events);
    metric("messages_published_total", "counter", "Messages the broker confirmed, by bus.", &per_bus(&c.published));
    let drops: Vec<_> =
        l.drops.iter().map(|((bus, reason), v)| (format!("{{bus=\"{bus}\",reason=\"{reason}\"}}"), *v)).collect();
    metric("messages_dropped_total", "counter", "Messages dropped before a broker, by bus and reason.", &drops);
    metric("outbox_depth", "gauge", "Messages waiting for a broker, by bus.", &per_bus(&c.outbox));
    metric(
        "headers_refused_total",
        "counter",
        "Headers left off a message because their name or value was unsafe, by bus.",
        &per_bus(&HEADERS_REFUSED),
    );
    metric("previews_throttled_total", "counter", "Previews skipped by the rate limit.", &one(&c.previews_throttled));
    metric(
        "prompts_forgotten_total",
        "counter",
        "Live prompts forgotten to stay within the bound.",
        &one(&c.prompts_forgotten),
    );
    let reconnects: Vec<_> = l.reconnects.iter().map(|(k, v)| (format!("{{component=\"{k}\"}}"), *v)).collect();
    metric("reconnects_total", "counter", "Reconnect attempts, by connection.", &reconnects);
    metric("deaf_sockets_total", "counter", "ComfyUI WebSockets found deaf and replaced.", &one(&DEAF_SOCKETS));
    let requests: Vec<_> = l
        .requests
        .iter()
        .map(|((command, outcome), v)| (format!("{{command=\"{}\",outcome=\"{outcome}\"}}", label(command)), *v))
        .collect();
    metric("requests_total", "counter", "Requests answered, by command and outcome (ok or error code).", &requests);
    let ignored: Vec<_> =
        l.ignored.iter().map(|((bus, reason), v)| (format!("{{bus=\"{bus}\",reason=\"{reason}\"}}"), *v)).collect();
    metric(
        "requests_ignored_total",
        "counter",
        "Messages on request topics that were neither taken nor answered, by bus and reason.",
        &ignored,
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
    if warn_allowed("header_refused", bus.name()) {
        tracing::warn!(bus = bus.name(), header = name, route = ?route.levels(), total, "header refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_a_burst_then_one_line_with_the_exact_count() {
        let mut limiter = WarnLimiter::new(WARN_WINDOW, WARN_BURST);
        let start = Instant::now();
        let mut reports = Vec::new();
        let mut logged = 0;
        for i in 0..100_000u32 {
            let now = start + Duration::from_micros(u64::from(i) * 50);
            logged += u32::from(limiter.check(("frame_skipped", "invalid_json"), now, |s| reports.push(s)));
        }
        assert_eq!((logged, reports.len()), (WARN_BURST, 0), "5 s of flood: a burst, no summary yet");

        // The next one after the window: first the summary, then it is logged as a new window's first.
        let later = start + WARN_WINDOW;
        assert!(limiter.check(("frame_skipped", "invalid_json"), later, |s| reports.push(s)));
        let expected = Suppressed { kind: ("frame_skipped", "invalid_json"), suppressed: 99_995, window: WARN_WINDOW };
        assert_eq!(reports, [expected]);
        assert_eq!(thousands(99_995), "99,995");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }

    #[test]
    fn kinds_are_limited_apart_and_any_call_reports_an_ended_window() {
        let mut limiter = WarnLimiter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let mut reports = Vec::new();
        let dropped = ("dropped", "outbox_full");
        let reconnect = ("reconnecting", "mqtt");
        let passed: Vec<bool> = (0..4).map(|_| limiter.check(dropped, t0, |s| reports.push(s))).collect();
        assert_eq!(passed, [true, true, false, false]);
        assert!(limiter.check(reconnect, t0, |s| reports.push(s)), "another kind has its own burst");

        // No more `dropped`, but a `reconnecting` after the window reports it.
        let t1 = t0 + Duration::from_secs(11);
        assert!(limiter.check(reconnect, t1, |s| reports.push(s)));
        assert_eq!(reports, [Suppressed { kind: dropped, suppressed: 2, window: Duration::from_secs(10) }]);
        assert!(limiter.check(dropped, t1, |s| reports.push(s)), "a new window");
        assert_eq!(reports.len(), 1, "reported once");
    }

    /// Collects what a `fmt` subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn garbage_frames_are_all_counted_but_only_a_burst_is_logged() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let before = COUNTERS.frames_skipped.load(Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..10_000 {
                frame_skipped("test_garbage", &"garbage");
            }
        });
        assert!(COUNTERS.frames_skipped.load(Relaxed) - before >= 10_000, "every frame is counted");
        let log = String::from_utf8(capture.0.lock().expect("log").clone()).expect("utf-8");
        let lines = log.lines().filter(|l| l.contains("reason=\"test_garbage\"")).count();
        assert_eq!(lines, WARN_BURST as usize, "{log}");
    }
}
