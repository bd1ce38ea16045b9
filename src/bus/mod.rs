//! The buses: what a message for them looks like, and the outbox each publisher keeps.
//!
//! Knows nothing about ComfyUI: the router hands over [`Outbound`] messages, each publisher renders the
//! route with its own base and delivers it.

pub mod delivery;
pub mod mqtt;
pub mod nats;
pub mod outbox;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use outbox::Outbox;

/// What both publishers use of the configuration besides their own section (`[mqtt]`, `[nats]`).
#[derive(Debug, Clone)]
pub struct Common {
    /// `bridge.instance`: the instance level of every topic, and the client names.
    pub instance: String,
    /// `bridge.outbox_capacity`: messages kept while the broker is away.
    pub outbox_capacity: usize,
    /// `bridge.outbox_max_bytes`: bytes kept while the broker is away.
    pub outbox_max_bytes: usize,
    /// `bridge.shutdown_grace_ms`: the longest drain and goodbye on shutdown.
    pub grace: Duration,
    /// `comfyui.reconnect_max_ms`: the reconnect backoff's cap (MQTT, the NATS request intake).
    pub reconnect_max_ms: u64,
}

/// While its broker is connected, a publisher stops taking new messages once this many wait in its outbox,
/// so a slow broker slows the reading of ComfyUI's WebSocket instead of losing events. While the broker is
/// away the outbox takes everything and its drop rule applies.
pub const HIGH_WATER: usize = 1024;
/// Most messages a publisher takes from its channel at once.
pub const INTAKE: usize = 256;
pub use topics::Route;

/// How a message may be treated under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Lifecycle events and retained state: QoS 1, kept while the broker is away, dropped only when the
    /// outbox is full of them.
    Lifecycle,
    /// Progress ticks, previews, progress text: dropped first when the outbox fills.
    Droppable,
}

/// One message for the buses; shared between them behind an `Arc`.
#[derive(Debug)]
pub struct Outbound {
    /// Where it goes, below the base topic.
    pub route: Route,
    /// The body: an envelope, a state object, `online`/`offline` or raw image bytes.
    pub payload: Bytes,
    /// MQTT QoS (0 or 1).
    pub qos: u8,
    /// MQTT retain flag.
    pub retain: bool,
    /// Drop policy.
    pub class: Class,
    /// Headers for NATS (previews): `Content-Type`, `Comfy-Prompt-Id`, `Comfy-Node-Id`.
    pub headers: Vec<(&'static str, String)>,
    /// A topic or subject used verbatim instead of `route`: a requester's reply topic, or (MQTT only) a Home
    /// Assistant discovery topic outside the base topic.
    pub reply: Option<Reply>,
    /// Where answers to this message go (a `Bus Ask` question): its NATS reply subject and MQTT v5 response
    /// topic, rendered like `route`.
    pub reply_to: Option<Route>,
}

/// Where a requester asked for its response: a NATS reply subject, or an MQTT v5 response topic with its
/// correlation data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The whole topic or subject, used verbatim.
    pub to: String,
    /// MQTT v5 correlation data, echoed back.
    pub correlation: Option<Bytes>,
}

/// What an [`Inquiry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InquiryKind {
    /// A request on `request/<command>`: `path` is what follows `request/`.
    Request,
    /// A Home Assistant entity command on `ha/<entity>/set`: `path` is `<entity>`.
    HomeAssistantSet,
    /// Home Assistant's birth or last-will message (`online` / `offline`).
    HomeAssistantStatus,
    /// An answer to a `Bus Ask` question on `answer/<ask id>`: `path` is the ask id level, the body the answer.
    Answer,
}

/// A message that arrived on a request topic or subject (or a Home Assistant one).
#[derive(Debug)]
pub struct Inquiry {
    /// What it is.
    pub kind: InquiryKind,
    /// The bus it came from, which the response goes back on.
    pub bus: Bus,
    /// The levels after `<base>/<inst>/request/`, still escaped, joined by `/` (e.g. `queue`,
    /// `upload/cat=2Epng`).
    pub path: String,
    /// The body, untouched.
    pub payload: Bytes,
    /// Where the requester wants the response; `None` means `<base>/<inst>/response/<command>`.
    pub reply: Option<Reply>,
}

impl Outbound {
    /// A QoS-1, kept message.
    pub fn lifecycle(route: Route, payload: impl Into<Bytes>, retain: bool) -> Arc<Self> {
        let payload = payload.into();
        Arc::new(Self {
            route,
            payload,
            qos: 1,
            retain,
            class: Class::Lifecycle,
            headers: Vec::new(),
            reply: None,
            reply_to: None,
        })
    }
}

/// The bus name, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bus {
    /// MQTT.
    Mqtt,
    /// NATS.
    Nats,
}

impl Bus {
    /// `mqtt` or `nats`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Nats => "nats",
        }
    }
}
