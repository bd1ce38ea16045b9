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
//!    ▲ Inquiry (mqtt poll task, nats intake)
//! ```
//! * [`comfy`] speaks ComfyUI (WebSocket, frames, HTTP) and knows nothing about the buses.
//! * [`router`] owns the per-connection event state (sequence numbers, the executing prompt, preview limits)
//!   and, through [`tracker::Tracker`], every prompt's lifecycle; it turns frames and control messages into
//!   [`bus::Outbound`] messages. [`tracker::resync`] reads the queue and history when the tracker asks.
//! * [`commands`] parses and answers requests; [`workflow`] holds templates and the edits requests make.
//! * [`bus`] owns the brokers: each publisher keeps an outbox so lifecycle events survive a broker restart.
//! * [`health`] serves `/healthz`, `/readyz`, `/metrics`; [`ha`] builds Home Assistant discovery; [`tls`] the
//!   rustls client configuration.
//! * [`app::run`] wires it together; shutdown cancels the WebSocket task, the command plane and the intakes,
//!   and everything downstream drains as its input channels close.

pub mod app;
pub mod bus;
pub mod check;
pub mod comfy;
pub mod commands;
pub mod config;
pub mod ha;
pub mod health;
pub mod router;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod tracker;
pub mod workflow;
