//! Where each event goes: one list of levels, rendered as an MQTT topic (`/`) and a NATS subject (`.`).
//!
//! Pure functions only. Levels taken from ComfyUI data are escaped (docs/INTERFACE.md §1): every byte outside
//! `A-Z a-z 0-9 _ - :` becomes `=XX`, and an empty level is `=`. An escaped level longer than
//! [`MAX_ESCAPED_LEVEL`] becomes `~` and 16 hex digits of a 64-bit FNV-1a hash of the raw level: escaping
//! triples a byte, so without this a 22,000-byte prompt id would make a 66,000-byte topic, past what MQTT can
//! carry and far past NATS's control line. `~` is never in an escaped level, so a hashed level cannot collide
//! with a plain one (and hashed levels of different raw values collide with probability 2^-64).
//!
//! [`check_mqtt_topic`] and [`check_nats_subject`] are the last word before a publish: what they refuse is
//! dropped and counted, never handed to a client that would write a malformed packet.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use async_nats::Subject;

/// Level for bridge availability.
pub const BRIDGE: &str = "bridge";
/// Level for ComfyUI availability.
pub const COMFYUI: &str = "comfyui";
/// Last level of availability topics.
pub const AVAILABILITY: &str = "availability";
/// Level for `status` messages.
pub const STATUS: &str = "status";
/// Level before a prompt id.
pub const PROMPT: &str = "prompt";
/// Level before a node id.
pub const NODE: &str = "node";
/// Level for events that name no prompt.
pub const EVENT: &str = "event";
/// Last level of binary previews.
pub const PREVIEW: &str = "preview";
/// Last level of binary progress text.
pub const TEXT: &str = "text";
/// Last level of a prompt's derived state.
pub const STATE: &str = "state";
/// Last level of a prompt's result.
pub const RESULT: &str = "result";
/// Level before a command name, on the way in.
pub const REQUEST: &str = "request";
/// Level before a command name, on the way out.
pub const RESPONSE: &str = "response";
/// Level before the subject of a `Bus Publish` message.
pub const FLOW: &str = "flow";
/// Level before the subject of a `Bus Ask` question.
pub const ASK: &str = "ask";
/// Level before the ask id of an answer, on the way in.
pub const ANSWER: &str = "answer";

/// Longest escaped level kept as it is. 128 bytes hold any real prompt id (a UUID is 36) or node id
/// (`12:5:3.0.0.1` style paths) even fully escaped, and keep the longest route we build (prefix, instance,
/// `prompt/<pid>/node/<nid>/<type>`) around 450 bytes: far below MQTT's limit and NATS's 4,096-byte
/// control line, which also has to hold a reply subject.
pub const MAX_ESCAPED_LEVEL: usize = 128;

/// MQTT's own limit: a topic's length is a 16-bit number.
pub const MQTT_TOPIC_LIMIT: usize = 65_535;

/// nats-server's default `max_control_line`: `PUB <subject> <reply> <hdr> <len>\r\n` must fit in it.
pub const NATS_CONTROL_LINE: usize = 4_096;

/// What `PUB`/`HPUB`, the spaces, the two sizes and `\r\n` take on a NATS control line (generously).
pub const NATS_CONTROL_OVERHEAD: usize = 64;

/// A destination below the base topic / subject prefix: escaped levels starting with the instance, kept
/// joined by `/` (escaped levels never contain `/` or `.`, so either separator can be swapped in cheaply).
///
/// Cloning shares it (a reference count), and it remembers what the first MQTT and the first NATS
/// [`Renderer`] made of it: a route the router reuses for many messages (every progress tick of one node)
/// is written and checked once per bus, not once per message.
#[derive(Clone)]
pub struct Route(Arc<Levels>);

struct Levels {
    path: String,
    mqtt: OnceLock<Rendered<String>>,
    nats: OnceLock<Rendered<Subject>>,
}

/// A route as one renderer wrote it, valid or refused.
struct Rendered<T> {
    by: u64,
    value: Result<T, Refusal>,
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Route").field(&self.as_str()).finish()
    }
}

/// A route being built.
struct Builder(String);

impl Builder {
    /// `instance` alone, with room for `more` bytes of levels.
    fn new(instance: &str, more: usize) -> Self {
        let mut path = String::with_capacity(instance.len() + more);
        path.push_str(instance);
        Self(path)
    }

    fn fixed(mut self, level: &str) -> Self {
        self.0.push('/');
        self.0.push_str(level);
        self
    }

    fn escaped(mut self, level: &str) -> Self {
        self.0.push('/');
        escape_into(level, &mut self.0);
        self
    }

    fn done(self) -> Route {
        Route(Arc::new(Levels { path: self.0, mqtt: OnceLock::new(), nats: OnceLock::new() }))
    }
}

impl Route {
    /// A route under `instance` made of fixed levels (never escaped: they are our own constants).
    pub fn fixed(instance: &str, levels: &[&str]) -> Self {
        let len = levels.iter().map(|l| l.len() + 1).sum::<usize>();
        levels.iter().fold(Builder::new(instance, len), |b, level| b.fixed(level)).done()
    }

    /// The route of a text event: by prompt and node when the data names them (docs/INTERFACE.md §2).
    pub fn for_event(instance: &str, kind: &str, prompt_id: Option<&str>, node_id: Option<&str>) -> Self {
        // Room for the fixed levels and separators, and the ids when they need no escaping (the usual case).
        let ids = prompt_id.map_or(0, str::len) + node_id.map_or(0, str::len);
        let route = Builder::new(instance, 16 + ids + kind.len());
        match (kind, prompt_id) {
            ("status", _) => route.fixed(STATUS),
            (_, Some(pid)) => {
                let route = route.fixed(PROMPT).escaped(pid);
                match node_id {
                    Some(nid) => route.fixed(NODE).escaped(nid),
                    None => route,
                }
                .escaped(kind)
            }
            (_, None) => route.fixed(EVENT).escaped(kind),
        }
        .done()
    }

    /// `prompt/<pid>/node/<nid>/<last>` for binary frames.
    pub fn for_node(instance: &str, prompt_id: &str, node_id: &str, last: &str) -> Self {
        Builder::new(instance, 16 + prompt_id.len() + node_id.len() + last.len())
            .fixed(PROMPT)
            .escaped(prompt_id)
            .fixed(NODE)
            .escaped(node_id)
            .fixed(last)
            .done()
    }

    /// `prompt/<pid>/<last>` for derived messages (`state`, `result`).
    pub fn for_prompt(instance: &str, prompt_id: &str, last: &str) -> Self {
        Builder::new(instance, 8 + prompt_id.len() + last.len()).fixed(PROMPT).escaped(prompt_id).fixed(last).done()
    }

    /// `response/<command>`: where responses go when the request named no reply topic.
    pub fn for_response(instance: &str, command: &str) -> Self {
        Builder::new(instance, 10 + command.len()).fixed(RESPONSE).escaped(command).done()
    }

    /// `<first>/<levels…>`, each of `levels` escaped, then `last` when given: what a workflow names
    /// (`flow/<subject…>/image`, `ask/<subject…>`, `answer/<ask id>`).
    pub fn for_subject(instance: &str, first: &str, levels: &[&str], last: Option<&str>) -> Self {
        let len = first.len() + levels.iter().map(|l| l.len() + 1).sum::<usize>() + last.map_or(0, str::len) + 2;
        let route = levels.iter().fold(Builder::new(instance, len).fixed(first), |b, level| b.escaped(level));
        match last {
            Some(last) => route.fixed(last).done(),
            None => route.done(),
        }
    }

    /// The escaped levels joined by `/`.
    pub fn as_str(&self) -> &str {
        &self.0.path
    }

    /// The levels, escaped.
    pub fn levels(&self) -> Vec<&str> {
        self.as_str().split('/').collect()
    }

    /// The last level.
    pub fn last(&self) -> &str {
        self.as_str().rsplit('/').next().unwrap_or_default()
    }

    /// `<base>/<levels…>`.
    pub fn mqtt_topic(&self, base: &str) -> String {
        let path = self.as_str();
        let mut out = String::with_capacity(base.len() + 1 + path.len());
        out.push_str(base);
        out.push('/');
        out.push_str(path);
        out
    }

    /// `<prefix>.<levels…>`.
    pub fn nats_subject(&self, prefix: &str) -> String {
        let mut out = Vec::with_capacity(prefix.len() + 1 + self.as_str().len());
        out.extend_from_slice(prefix.as_bytes());
        out.push(b'.');
        let start = out.len();
        out.extend_from_slice(self.as_str().as_bytes());
        // Swapping one ASCII byte for another keeps the text UTF-8, so this never takes the lossy path.
        for b in &mut out[start..] {
            if *b == b'/' {
                *b = b'.';
            }
        }
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// How one publisher writes routes: its base topic (or subject prefix) and its configured length limit,
/// with the protocol's checks ([`check_mqtt_topic`], [`check_nats_subject`] without a reply subject). A
/// route keeps what the first renderer of each bus made of it; another renderer (a second bridge in one
/// process, a test) gets its own answer, written afresh each time.
#[derive(Debug)]
pub struct Renderer {
    id: u64,
    base: String,
    max: usize,
}

/// Tells renderers apart: a route's remembered rendering is only ever used by the renderer that made it.
static NEXT_RENDERER: AtomicU64 = AtomicU64::new(1);

impl Renderer {
    /// Routes under `base`, at most `max` bytes long (before the protocol's own bound).
    pub fn new(base: &str, max: usize) -> Self {
        Self { id: NEXT_RENDERER.fetch_add(1, Relaxed), base: base.to_string(), max }
    }

    /// `route` as a checked MQTT topic under the base.
    pub fn mqtt(&self, route: &Route) -> Result<String, Refusal> {
        let render = || {
            let topic = route.mqtt_topic(&self.base);
            check_mqtt_topic(&topic, self.max).map(|()| topic)
        };
        self.remembered(&route.0.mqtt, render)
    }

    /// `route` as a checked NATS subject under the prefix (with no reply subject on the control line).
    pub fn nats(&self, route: &Route) -> Result<Subject, Refusal> {
        let render = || {
            let subject = route.nats_subject(&self.base);
            check_nats_subject(&subject, 0, self.max).map(|()| Subject::from(subject))
        };
        self.remembered(&route.0.nats, render)
    }

    fn remembered<T: Clone>(
        &self,
        cell: &OnceLock<Rendered<T>>,
        render: impl FnOnce() -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        match cell.get() {
            Some(done) if done.by == self.id => done.value.clone(),
            Some(_) => render(),
            None => {
                let value = render();
                // Another task may have been first; either way this renderer's answer is `value`.
                let _ = cell.set(Rendered { by: self.id, value: value.clone() });
                value
            }
        }
    }
}

/// Bytes kept as they are in a level: `A-Z a-z 0-9 _ - :`.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric() || matches!(b as u8, b'_' | b'-' | b':');
        b += 1;
    }
    table
};

fn is_plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// Escapes one level taken from ComfyUI data.
pub fn escape(level: &str) -> String {
    let mut out = String::with_capacity(level.len());
    escape_into(level, &mut out);
    out
}

fn escape_into(level: &str, out: &mut String) {
    // The usual level (a UUID, a node number, an event type) is plain: one pass, then copied whole.
    if level.len() <= MAX_ESCAPED_LEVEL && !level.is_empty() && level.bytes().all(is_plain) {
        out.push_str(level);
        return;
    }
    let escaped_len: usize = level.bytes().map(|b| if is_plain(b) { 1 } else { 3 }).sum();
    if level.is_empty() {
        out.push('=');
    } else if escaped_len > MAX_ESCAPED_LEVEL {
        let _ = write!(out, "~{:016x}", fnv1a(level.as_bytes()));
    } else if escaped_len == level.len() {
        out.push_str(level);
    } else {
        for b in level.bytes() {
            if is_plain(b) {
                out.push(b as char);
            } else {
                let _ = write!(out, "={b:02X}");
            }
        }
    }
}

/// 64-bit FNV-1a: stable across builds and platforms, so a hashed level is the same on every run.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Why a topic or subject cannot be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Longer than the protocol or the configured limit.
    TooLong,
    /// Empty, a wildcard, a NUL, whitespace or a control character, or an empty NATS token.
    Invalid,
}

impl Refusal {
    /// The `reason` label of `messages_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLong => "topic_too_long",
            Self::Invalid => "invalid_topic",
        }
    }
}

/// Whether an MQTT broker takes `topic` for a PUBLISH: not empty, no `+`, `#` or NUL (a `String` is valid
/// UTF-8 already), at most `max` bytes and never more than [`MQTT_TOPIC_LIMIT`].
pub fn check_mqtt_topic(topic: &str, max: usize) -> Result<(), Refusal> {
    if topic.len() > max.min(MQTT_TOPIC_LIMIT) {
        return Err(Refusal::TooLong);
    }
    if topic.is_empty() || topic.bytes().any(|b| matches!(b, b'+' | b'#' | 0)) {
        return Err(Refusal::Invalid);
    }
    Ok(())
}

/// Whether a NATS server takes `subject` for a PUB: tokens not empty, no wildcard, whitespace or control
/// characters, at most `max` bytes and, with room for a reply subject of `reply_len`, within the control line.
pub fn check_nats_subject(subject: &str, reply_len: usize, max: usize) -> Result<(), Refusal> {
    let line = subject.len() + reply_len + NATS_CONTROL_OVERHEAD;
    if subject.len() > max || line > NATS_CONTROL_LINE {
        return Err(Refusal::TooLong);
    }
    let bad_byte = |b: u8| b <= b' ' || b == 0x7f || b == b'*' || b == b'>';
    // One pass: a bad byte, or an empty token (a `.` first, last or after another `.`, or no bytes at all).
    let mut after_dot = true;
    for b in subject.bytes() {
        if bad_byte(b) || (b == b'.' && after_dot) {
            return Err(Refusal::Invalid);
        }
        after_dot = b == b'.';
    }
    if after_dot {
        return Err(Refusal::Invalid);
    }
    Ok(())
}

/// Reverses [`escape`]; `None` when the level is not a valid escape.
pub fn unescape(level: &str) -> Option<String> {
    if level == "=" {
        return Some(String::new());
    }
    let bytes = level.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_follows_the_interface_examples() {
        assert_eq!(escape("bridge_probe.custom"), "bridge_probe=2Ecustom");
        assert_eq!(escape("5.0.0.3"), "5=2E0=2E0=2E3");
        assert_eq!(escape("12:5"), "12:5");
        assert_eq!(escape(""), "=");
        assert_eq!(escape("a/b+#*> é"), "a=2Fb=2B=23=2A=3E=20=C3=A9");
    }

    #[test]
    fn escaping_round_trips_and_never_leaks_separators_or_wildcards() {
        for s in ["", "=", "==41", "12:5", "20.0.0.3.0.0.1", "7:9:3.0.0.1", "a/b", "x y", "ünï", "#+*>", "=2E"] {
            let e = escape(s);
            assert!(!e.contains(['/', '.', '+', '#', '*', '>', ' ']), "{e}");
            assert_eq!(unescape(&e).as_deref(), Some(s), "{s}");
        }
    }

    #[test]
    fn events_route_by_prompt_node_and_type() {
        let cases: [(&str, Option<&str>, Option<&str>, &str); 6] = [
            ("status", None, None, "comfyui/local/status"),
            ("progress", Some("p1"), Some("3"), "comfyui/local/prompt/p1/node/3/progress"),
            ("executing", Some("p1"), Some("5.0.0.3"), "comfyui/local/prompt/p1/node/5=2E0=2E0=2E3/executing"),
            ("execution_start", Some("p1"), None, "comfyui/local/prompt/p1/execution_start"),
            ("bridge_probe.custom", None, None, "comfyui/local/event/bridge_probe=2Ecustom"),
            ("logs", None, None, "comfyui/local/event/logs"),
        ];
        for (kind, pid, nid, topic) in cases {
            let route = Route::for_event("local", kind, pid, nid);
            assert_eq!(route.mqtt_topic("comfyui"), topic);
            assert_eq!(route.nats_subject("comfyui"), topic.replace('/', "."));
        }
    }

    #[test]
    fn long_levels_become_hashed_levels_that_cannot_collide_with_escaped_ones() {
        let dots = ".".repeat(1_400);
        let route = Route::for_prompt("local", &dots, RESULT);
        let topic = route.mqtt_topic("comfyui");
        let hashed = topic.split('/').nth(3).unwrap_or_default();
        assert!(hashed.starts_with('~') && hashed.len() == 17, "{topic}");
        assert_eq!(Route::for_prompt("local", &dots, RESULT), route, "stable");
        assert_ne!(Route::for_prompt("local", &".".repeat(1_401), RESULT), route);
        assert!(!escape(hashed).contains('~'), "a raw `~` is escaped, so never looks like a hash");
        // Right at the bound a level is still escaped; one byte more and it is hashed.
        assert_eq!(escape(&"a".repeat(MAX_ESCAPED_LEVEL)), "a".repeat(MAX_ESCAPED_LEVEL));
        assert!(escape(&"a".repeat(MAX_ESCAPED_LEVEL + 1)).starts_with('~'));
        assert!(escape(&".".repeat(MAX_ESCAPED_LEVEL / 3 + 1)).starts_with('~'));
        let longest = Route::for_event("local", &"x".repeat(10_000), Some(&dots), Some(&dots));
        assert!(longest.nats_subject("comfyui").len() < 200);
    }

    #[test]
    fn topics_and_subjects_are_checked_before_publishing() {
        assert_eq!(check_mqtt_topic("rel/a/x", 100), Ok(()));
        for bad in ["rel/+/x", "rel/#", "", "a\0b"] {
            assert_eq!(check_mqtt_topic(bad, 100), Err(Refusal::Invalid), "{bad:?}");
        }
        assert_eq!(check_mqtt_topic(&"a".repeat(101), 100), Err(Refusal::TooLong));
        assert_eq!(check_mqtt_topic(&"a".repeat(70_000), usize::MAX), Err(Refusal::TooLong));
        assert_eq!(check_nats_subject("_INBOX.abc.1", 0, 100), Ok(()));
        for bad in ["a b", "a\r\nPUB x", "a..b", ".a", "a.", ".", "..", "a.*", "a.>", ""] {
            assert_eq!(check_nats_subject(bad, 0, 100), Err(Refusal::Invalid), "{bad:?}");
        }
        assert_eq!(check_nats_subject(&"a".repeat(101), 0, 100), Err(Refusal::TooLong));
        assert_eq!(check_nats_subject(&"a".repeat(4_000), 100, usize::MAX), Err(Refusal::TooLong));
    }

    #[test]
    fn binary_routes_and_fixed_routes() {
        let route = Route::for_node("gpu1", "p.1", "12:5", PREVIEW);
        assert_eq!(route.mqtt_topic("home/comfy"), "home/comfy/gpu1/prompt/p=2E1/node/12:5/preview");
        assert_eq!(route.nats_subject("comfy"), "comfy.gpu1.prompt.p=2E1.node.12:5.preview");
        let route = Route::fixed("local", &[BRIDGE, AVAILABILITY]);
        assert_eq!(route.mqtt_topic("comfyui"), "comfyui/local/bridge/availability");
    }

    #[test]
    fn renderers_write_and_check_each_route_once_and_only_for_themselves() {
        let mqtt = Renderer::new("comfyui", 100);
        let nats = Renderer::new("cb", 100);
        let route = Route::for_event("local", "progress", Some("p1"), Some("5.0"));
        let shared = route.clone();
        assert_eq!(mqtt.mqtt(&route).as_deref(), Ok("comfyui/local/prompt/p1/node/5=2E0/progress"));
        assert_eq!(mqtt.mqtt(&shared).as_deref(), Ok("comfyui/local/prompt/p1/node/5=2E0/progress"), "remembered");
        assert_eq!(nats.nats(&shared).as_deref(), Ok("cb.local.prompt.p1.node.5=2E0.progress"));
        // Another renderer of the same bus never gets the first one's answer.
        let other = Renderer::new("home/comfy", 20);
        assert_eq!(other.mqtt(&route), Err(Refusal::TooLong));
        assert_eq!(Renderer::new("x", 100).mqtt(&route).as_deref(), Ok("x/local/prompt/p1/node/5=2E0/progress"));
        assert_eq!(Renderer::new("x", 100).nats(&route).as_deref(), Ok("x.local.prompt.p1.node.5=2E0.progress"));
        assert_eq!(mqtt.mqtt(&route).as_deref(), Ok("comfyui/local/prompt/p1/node/5=2E0/progress"));
        // A refusal is remembered as one, and stays the renderer's own.
        let short = Renderer::new("comfyui", 20);
        let fresh = Route::for_prompt("local", "p2", RESULT);
        assert_eq!(short.mqtt(&fresh), Err(Refusal::TooLong));
        assert_eq!(short.mqtt(&fresh), Err(Refusal::TooLong));
        assert_eq!(mqtt.mqtt(&fresh).as_deref(), Ok("comfyui/local/prompt/p2/result"));
        let bad = Renderer::new("a..b", 100);
        assert_eq!(bad.nats(&fresh), Err(Refusal::Invalid));
        assert_eq!(bad.nats(&fresh), Err(Refusal::Invalid));
        assert_eq!(Renderer::new("ok", 100).nats(&fresh).as_deref(), Ok("ok.local.prompt.p2.result"));
        assert_eq!(route, Route::for_event("local", "progress", Some("p1"), Some("5.0")), "equal by levels");
    }
}
