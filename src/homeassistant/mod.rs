//! Home Assistant, all of it, in this folder: one device per bridge instance.
//!
//! * `discovery.rs`: the discovery configs (pure builders).
//! * `device.rs`: [`Device`], the device's state sensors, the last result, its image and the `finished` event;
//!   held by the router, which sees every event and result.
//! * `entities.rs`: [`Entities`], the template select and the prompt text, which queue prompts; held by the
//!   command task, which owns the template list and does what a set asks ([`Set`]).
//!
//! Everything here is pure; the tasks that hold these do the I/O. [`Config`] is what it uses of the
//! configuration; `app` builds one only when Home Assistant is on (`homeassistant.enabled`, and MQTT too).
//! Entities:
//!
//! | entity | source |
//! |---|---|
//! | binary sensors `connected`, `busy` | `comfyui/availability`, `ha/state` |
//! | sensors queue, progress %, current node, last state, last duration, last error | `ha/state` (last result as attributes: `ha/last`) |
//! | buttons interrupt, clear queue, free memory | publish to `request/interrupt`, `request/clear`, `request/free` |
//! | select `template`, text `prompt` | `ha/template/set`, `ha/prompt/set`; state on `ha/template`, `ha/prompt` |
//! | image `last image` | `ha/image_url` |
//! | event `finished` | `ha/finished` (not retained) |
//! | sensor question (the waiting `Bus Ask`, with `ask_id` and `answer_topic` as attributes), event `asked` | `ha/ask` (retained), `ha/asked` (not retained) |
//!
//! Each config names its entity id (`default_entity_id`, Home Assistant 2025.10 and later; `object_id`, which
//! older releases read, was removed in 2026.4 and is not sent) and the software that published it (`origin`).
//! The templates render for every `ha/state` and every result on `ha/last`: what is not there is `null`, which
//! renders `None`, which Home Assistant shows as unknown.

use crate::bus::topics::Route;

mod device;
mod discovery;
mod entities;

pub use device::{Device, DeviceState};
pub use discovery::discovery;
pub use entities::{Entities, Set};

/// The level under the instance for everything Home Assistant reads or writes.
pub const HA: &str = "ha";
/// Event types of the `finished` event entity: the result statuses.
pub const FINISHED_TYPES: [&str; 4] = ["success", "error", "interrupted", "cancelled"];
/// Home Assistant truncates nothing for us: states longer than this are refused, so they are cut here.
pub const MAX_STATE_CHARS: usize = 250;

/// Attributes of the Last error sensor from a result: its `error` object, `{}` for a result without one (the
/// test `is mapping` does not touch an undefined value, so Home Assistant logs nothing).
pub const LAST_ERROR_ATTRIBUTES: &str = "{{ (value_json.error if value_json.error is mapping else {}) | tojson }}";

/// `<base>/<inst>/ha/<leaf…>` as a route.
pub fn route(instance: &str, leaf: &[&str]) -> Route {
    let mut levels = vec![HA];
    levels.extend_from_slice(leaf);
    Route::fixed(instance, &levels)
}

/// Cuts `text` to at most [`MAX_STATE_CHARS`] characters.
pub fn state_text(text: &str) -> String {
    match text.char_indices().nth(MAX_STATE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// What Home Assistant's side uses of the configuration (`app` builds it from `Settings`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `bridge.instance`: one device per instance.
    pub instance: String,
    /// `mqtt.base_topic`: where the device's topics are.
    pub base_topic: String,
    /// `homeassistant.discovery_prefix`.
    pub discovery_prefix: String,
    /// `homeassistant.prompt_input`: the template input the prompt text goes to.
    pub prompt_input: String,
}
