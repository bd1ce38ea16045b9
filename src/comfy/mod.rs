//! Everything that speaks ComfyUI. Knows nothing about MQTT or NATS.

pub mod deaf;
pub mod event;
pub mod http;
pub mod jobs;
pub mod queue;
pub mod tap;
pub mod urls;
pub mod ws;

/// What the WebSocket task tells the router.
#[derive(Debug)]
pub enum Inbound {
    /// The socket is open and the feature flags are sent.
    Connected,
    /// The socket closed or failed; a reconnect is under way.
    Disconnected,
    /// A text frame (as tungstenite received it, UTF-8 checked, not copied) and its receipt time (ms since
    /// the epoch).
    Text(tokio_tungstenite::tungstenite::Utf8Bytes, u64),
    /// A binary frame and its receipt time (ms since the epoch).
    Binary(bytes::Bytes, u64),
}

/// Percent-encodes everything but unreserved characters, so spaces become `%20` (never `+`) and `&`, `=`,
/// `/` and non-ASCII cannot break a query value.
pub fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
