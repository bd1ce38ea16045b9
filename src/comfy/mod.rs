//! Everything that speaks ComfyUI. Knows nothing about MQTT or NATS.

pub mod backoff;
pub mod event;
pub mod http;
pub mod queue;
pub mod ws;

/// What the WebSocket task tells the router.
#[derive(Debug)]
pub enum Inbound {
    /// The socket is open and the feature flags are sent.
    Connected,
    /// The socket closed or failed; a reconnect is under way.
    Disconnected,
    /// A text frame and its receipt time (ms since the epoch).
    Text(String, u64),
    /// A binary frame and its receipt time (ms since the epoch).
    Binary(bytes::Bytes, u64),
}
