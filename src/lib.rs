//! comfy-bridge: a ComfyUI server as an actor on MQTT and NATS.
//!
//! # Layout
//! ```text
//!  comfy::ws task ──mpsc<Inbound>──▶ router task ──mpsc<Arc<Outbound>>──▶ mqtt publisher ──▶ rumqttc
//!                                                  └─mpsc<Arc<Outbound>>──▶ nats publisher ──▶ async-nats
//! ```
//! * [`comfy`] speaks ComfyUI (WebSocket, frames) and knows nothing about the buses.
//! * [`router`] owns the per-connection event state (sequence numbers, the executing prompt, preview limits)
//!   and turns each frame into [`bus::Outbound`] messages.
//! * [`bus`] owns the brokers: each publisher keeps an outbox so lifecycle events survive a broker restart.
//! * [`app::run`] wires it together; shutdown cancels the WebSocket task only, and everything downstream
//!   drains as its input channel closes.

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
