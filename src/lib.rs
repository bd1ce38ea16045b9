//! comfy-bridge: a ComfyUI server as an actor on MQTT and NATS.
//!
//! # Layout
//! ```text
//!  comfy::ws task ──Inbound──▶ router task (Router + Tracker) ──Arc<Outbound>──▶ mqtt publisher ──▶ rumqttc
//!                                 ▲      │                     └────────────────▶ nats publisher ──▶ async-nats
//!                          Control│      │Work                                         ▲
//!  resync worker ─────────────────┤      ▼                                              │ responses
//!  (GET /queue, /history) ◀───────┼──────┘                                              │
//!  command plane ─────────────────┘ (Expect/Accepted before and after POST /prompt) ────┘
//!    ▲ Inquiry through commands::inbox::Inbox (bounded in count and bytes; the mqtt poll task and the nats
//!    │ intake, on a connection of its own, never wait on it)
//! ```
//! * [`comfy`] speaks ComfyUI (WebSocket, frames, HTTP) and knows nothing about the buses.
//! * [`router`] owns the per-connection event state (sequence numbers, the executing prompt, preview limits)
//!   and, through [`tracker::Tracker`], every prompt's lifecycle; it turns frames and control messages into
//!   [`bus::Outbound`] messages. [`tracker::resync`] reads the queue and history when the tracker asks.
//! * [`commands`] parses and answers requests; [`workflow`] holds templates and the edits requests make.
//! * [`bus`] owns the brokers: each publisher is a thin loop over [`bus::delivery::Delivery`], the sans-IO core
//!   that keeps the outbox (bounded in count and bytes) so lifecycle events survive a broker restart, and
//!   decides what is retried, replayed, dropped and counted.
//! * [`health`] serves `/healthz`, `/readyz`, `/metrics`; [`homeassistant`] builds Home Assistant discovery; [`tls`] the
//!   rustls client configuration.
//! * [`flow`] carries what the tap extension's `Bus Publish` and `Bus Ask` nodes send (the router holds its
//!   pure core; its own task reads published images), and the `answer` command hands answers back.
//! * [`fleet`] makes the bridge one worker of a fleet on NATS JetStream (its own connection, off the event
//!   path).
//! * [`app::run`] wires it together, giving each component only its part of the configuration
//!   ([`app::split`]); shutdown cancels the WebSocket task, the command plane and the intakes,
//!   and everything downstream drains as its input channels close.

pub mod app;
pub mod backoff;
pub mod bus;
pub mod check;
pub mod comfy;
pub mod commands;
pub mod config;
pub mod fleet;
pub mod flow;
pub mod health;
pub mod homeassistant;
pub mod json;
pub mod router;
pub mod telemetry;
pub mod tls;
pub mod tracker;
pub mod workflow;
