//! The tap: the companion ComfyUI extension (`extension/comfy_bridge_tap`), as this connection knows it.
//!
//! The WebSocket task is the one owner of what the extension said on the current connection: whether the
//! server's `feature_flags` reply announced `"comfy_bridge_tap": "<version>"`, and the per-start secret of its
//! `comfy_bridge.hello`. It publishes both on a [`tokio::sync::watch`] ([`TapWatch`]); the HTTP client reads the
//! secret when it posts an answer, `status` and `/readyz` read the version. Both are forgotten when the socket
//! closes. The secret is never logged and never published: its `Debug` is `***`.
//!
//! Frames of type `comfy_bridge.*` are the extension's messages, not ComfyUI events: [`classify`] finds them
//! (and the `feature_flags` reply) by looking only at the start of a frame, so every other frame costs a short
//! scan and nothing more.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

/// The client feature flag (JSON `true`) that makes the bridge's socket a tap, and the server feature flag that
/// carries the extension's version.
pub const FLAG: &str = "comfy_bridge_tap";
/// Prefix of every message type the extension sends.
pub const PREFIX: &str = "comfy_bridge.";
/// Longest version string taken from the server (anything longer is not the extension's).
const MAX_VERSION: usize = 64;
/// Longest secret taken (the extension's are 43 characters).
const MAX_SECRET: usize = 1024;
/// How far into a frame its type is looked for: ComfyUI writes `{"type": "<type>", "data": …}`, type first.
const HEAD: usize = 64;

/// The per-start secret of the extension's answer route: a [`crate::config::Secret`], never shown.
pub use crate::config::Secret;

/// What the extension said on the current connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tap {
    /// The version the server's feature flags announced; `None`: no tap (or not connected).
    pub version: Option<String>,
    /// The secret of the extension's `comfy_bridge.hello`.
    pub secret: Option<Secret>,
}

/// Reads the current [`Tap`], and which WebSocket connection it belongs to; cheap to clone.
#[derive(Debug, Clone)]
pub struct TapWatch(watch::Receiver<Tap>, Arc<AtomicU64>);

impl TapWatch {
    /// A watch that always says "no tap" (nothing will ever set it).
    pub fn absent() -> Self {
        Self(watch::channel(Tap::default()).1, Arc::default())
    }

    /// How many times the WebSocket has connected: what the HTTP client learns once per connection (the
    /// jobs API) is learnt again when this changes.
    pub fn connection(&self) -> u64 {
        self.1.load(Relaxed)
    }

    /// The tap's version, when it is active.
    pub fn version(&self) -> Option<String> {
        self.0.borrow().version.clone()
    }

    /// The secret for the answer route, when the extension has sent its hello on this connection.
    pub fn secret(&self) -> Option<Secret> {
        self.0.borrow().secret.clone()
    }
}

/// Where the WebSocket task records what the extension said, and each new connection.
#[derive(Debug)]
pub struct TapSender(watch::Sender<Tap>, Arc<AtomicU64>);

/// A sender and its watch.
pub fn channel() -> (TapSender, TapWatch) {
    let (tx, rx) = watch::channel(Tap::default());
    let connections = Arc::new(AtomicU64::new(0));
    (TapSender(tx, connections.clone()), TapWatch(rx, connections))
}

impl TapSender {
    /// A new WebSocket connection is up.
    pub fn connected(&self) {
        self.1.fetch_add(1, Relaxed);
    }

    /// The server's `feature_flags` reply arrived: the tap is active when it carries a version.
    pub fn feature_flags(&self, version: Option<String>) {
        self.0.send_if_modified(|tap| {
            let changed = tap.version != version;
            tap.version = version;
            changed
        });
        set_active(self.0.borrow().version.is_some());
    }

    /// The extension's hello: its secret (and its version, should the flags not have carried it).
    pub fn hello(&self, version: Option<String>, secret: Secret) {
        self.0.send_modify(|tap| {
            if tap.version.is_none() {
                tap.version = version;
            }
            tap.secret = Some(secret);
        });
        set_active(self.0.borrow().version.is_some());
    }

    /// The socket closed: whatever the extension said belongs to that connection.
    pub fn disconnected(&self) {
        self.0.send_if_modified(|tap| std::mem::take(tap) != Tap::default());
        set_active(false);
    }

    /// A watch on what this sender records.
    pub fn subscribe(&self) -> TapWatch {
        TapWatch(self.0.subscribe(), self.1.clone())
    }

    /// What is recorded now.
    pub fn current(&self) -> Tap {
        self.0.borrow().clone()
    }
}

/// What a text frame is, for the WebSocket task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// ComfyUI's `feature_flags` reply: read it, and pass it on like any event.
    FeatureFlags,
    /// A `comfy_bridge.*` message of the extension: never an event.
    Extension,
    /// Anything else.
    Other,
}

/// Tells the frames the tap cares about from the rest by their type, read from the first [`HEAD`] bytes
/// (ComfyUI writes `type` first), else the last (a writer that sorts keys puts `type` after `data`). Only
/// the type is read; a frame's full parse is the router's.
pub fn classify(text: &str) -> Frame {
    let bytes = text.as_bytes();
    let head = &bytes[..bytes.len().min(HEAD)];
    let tail = &bytes[bytes.len().saturating_sub(HEAD)..];
    match type_in(head).or_else(|| type_in(tail)) {
        Some(value) if value.starts_with(b"\"comfy_bridge.") => Frame::Extension,
        Some(value) if value.starts_with(b"\"feature_flags\"") => Frame::FeatureFlags,
        _ => Frame::Other,
    }
}

/// What follows the first `"type":` in `bytes` (whitespace skipped), if it is there.
fn type_in(bytes: &[u8]) -> Option<&[u8]> {
    let at = bytes.windows(6).position(|w| w == b"\"type\"")?;
    let skip = |b: &[u8]| b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let rest = &bytes[at + 6..];
    let rest = rest[skip(rest)..].strip_prefix(b":")?;
    Some(&rest[skip(rest)..])
}

/// The tap's version in the server's feature flags (`data.comfy_bridge_tap`, a short string), if any.
pub fn version_in_flags(frame: &str) -> Option<String> {
    let frame: Value = serde_json::from_str(frame).ok()?;
    if frame.get("type")?.as_str()? != "feature_flags" {
        return None;
    }
    version(frame.get("data")?.get(FLAG)?)
}

fn version(value: &Value) -> Option<String> {
    let v = value.as_str()?;
    (!v.is_empty() && v.len() <= MAX_VERSION && v.chars().all(|c| c.is_ascii_graphic())).then(|| v.to_string())
}

/// A message of the extension (`comfy_bridge.<kind>`) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// What follows `comfy_bridge.`: `hello`, `publish`, `ask`, `ask_done` (or something newer).
    pub kind: String,
    /// Its `data`.
    pub data: Value,
}

/// Parses an extension message; `None` when it is not one (not JSON, no such type, data not an object).
pub fn parse(frame: &str) -> Option<Message> {
    let mut frame: Value = serde_json::from_str(frame).ok()?;
    let kind = frame.get("type")?.as_str()?.strip_prefix(PREFIX)?.to_string();
    let data = frame.get_mut("data").map(Value::take).filter(Value::is_object)?;
    Some(Message { kind, data })
}

/// The hello's secret and version.
pub fn hello(data: &Value) -> Option<(Secret, Option<String>)> {
    let secret = data.get("secret")?.as_str().filter(|s| !s.is_empty() && s.len() <= MAX_SECRET)?;
    Some((Secret::new(secret), data.get("version").and_then(version)))
}

/// Whether a tap is active now (process-wide, for `/metrics`).
static ACTIVE: AtomicU64 = AtomicU64::new(0);

fn set_active(active: bool) {
    ACTIVE.store(u64::from(active), Relaxed);
}

/// The tap's lines for `/metrics` (Prometheus text format).
pub fn render_metrics() -> String {
    format!(
        "# HELP comfy_bridge_tap_active Whether ComfyUI's tap extension is active on the connection (1) or not (0).\n\
         # TYPE comfy_bridge_tap_active gauge\ncomfy_bridge_tap_active {}\n",
        ACTIVE.load(Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_told_apart_by_their_start() {
        assert_eq!(classify(r#"{"type": "comfy_bridge.hello", "data": {}}"#), Frame::Extension);
        assert_eq!(classify(r#"{"type":"feature_flags","data":{"comfy_bridge_tap":"0.1.0"}}"#), Frame::FeatureFlags);
        assert_eq!(classify(r#"{"type": "progress", "data": {"value": 1, "max": 2}}"#), Frame::Other);
        assert_eq!(classify(r#"{"type": "executed", "data": {"output": {"comfy_bridge.x": 1}}}"#), Frame::Other);
        assert_eq!(classify(""), Frame::Other);
        let sorted =
            format!(r#"{{"data":{{"ask_id":"a","payload":"{}"}},"type":"comfy_bridge.ask"}}"#, "x".repeat(100));
        assert_eq!(classify(&sorted), Frame::Extension, "keys sorted: type last");
        let long =
            format!(r#"{{"type": "executed", "data": {{"x": "{}", "type": "comfy_bridge.x"}}}}"#, "x".repeat(100));
        assert_eq!(classify(&long), Frame::Other, "the type at the start decides");
        assert_eq!(classify("é".repeat(40).as_str()), Frame::Other, "no char boundary is needed");
    }

    #[test]
    fn the_version_comes_from_the_servers_feature_flags_only() {
        let flags = |v: &str| format!(r#"{{"type": "feature_flags", "data": {{"comfy_bridge_tap": {v}}}}}"#);
        assert_eq!(version_in_flags(&flags("\"0.1.0\"")).as_deref(), Some("0.1.0"));
        for absent in ["true", "1", "\"\"", "\"a b\"", &format!("\"{}\"", "9".repeat(65))] {
            assert_eq!(version_in_flags(&flags(absent)), None, "{absent}");
        }
        assert_eq!(version_in_flags(r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true}}"#), None);
        assert_eq!(version_in_flags(r#"{"type": "status", "data": {"comfy_bridge_tap": "0.1.0"}}"#), None);
    }

    #[test]
    fn the_watch_forgets_everything_on_disconnect_and_never_shows_the_secret() {
        let (tx, watch) = channel();
        assert_eq!(watch.version(), None);
        tx.feature_flags(Some("0.1.0".into()));
        let msg = parse(r#"{"type": "comfy_bridge.hello", "data": {"version": "0.1.0", "secret": "s3cret"}}"#);
        let msg = msg.expect("a message");
        assert_eq!(msg.kind, "hello");
        let (secret, version) = hello(&msg.data).expect("hello");
        tx.hello(version, secret);
        assert_eq!(format!("{:?}", tx.current()), "Tap { version: Some(\"0.1.0\"), secret: Some(***) }");
        assert_eq!(
            (watch.version().as_deref(), watch.secret().map(|s| s.expose().to_string())),
            (Some("0.1.0"), Some("s3cret".into()))
        );
        assert!(render_metrics().contains("comfy_bridge_tap_active 1"));
        tx.disconnected();
        assert_eq!((watch.version(), watch.secret()), (None, None));
        assert!(render_metrics().contains("comfy_bridge_tap_active 0"));
        assert_eq!(parse(r#"{"type": "comfy_bridge.ask", "data": 1}"#), None, "data must be an object");
        assert_eq!(parse(r#"{"type": "executing", "data": {}}"#), None);
        assert_eq!(TapWatch::absent().version(), None);
    }
}
