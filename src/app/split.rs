//! The one place that splits [`Settings`]: each component gets its own section, or a small config struct of
//! exactly what it uses, so its signature says what it depends on. Tests build a `Settings` and go through
//! these same conversions.
//!
//! Components that need one section take it directly (`ComfyHttp::new(&settings.comfyui)`,
//! `health::bind(&settings.http)`); those that need more take a struct built here.

use std::time::Duration;

use crate::bus::{self, mqtt::Listen};
use crate::commands::reply::ReplyRules;
use crate::commands::task;
use crate::config::Settings;
use crate::{fleet, flow, homeassistant, router};

/// Home Assistant is on: it needs MQTT.
fn home_assistant_on(settings: &Settings) -> bool {
    settings.homeassistant.enabled && settings.mqtt.enabled
}

/// Home Assistant's part of the configuration when it is on (`homeassistant.enabled` and `mqtt.enabled`).
pub fn home_assistant(settings: &Settings) -> Option<homeassistant::Config> {
    home_assistant_on(settings).then(|| homeassistant::Config::from(settings))
}

/// Which request topics the MQTT intake subscribes to.
pub fn mqtt_listen(settings: &Settings) -> Listen {
    Listen {
        commands: settings.commands.enabled,
        home_assistant: home_assistant_on(settings).then(|| settings.homeassistant.discovery_prefix.clone()),
    }
}

impl From<&Settings> for homeassistant::Config {
    /// Whether or not Home Assistant is on; see [`home_assistant`].
    fn from(s: &Settings) -> Self {
        Self {
            instance: s.bridge.instance.clone(),
            base_topic: s.mqtt.base_topic.clone(),
            discovery_prefix: s.homeassistant.discovery_prefix.clone(),
            prompt_input: s.homeassistant.prompt_input.clone(),
        }
    }
}

impl From<&Settings> for bus::Common {
    fn from(s: &Settings) -> Self {
        Self {
            instance: s.bridge.instance.clone(),
            outbox_capacity: s.bridge.outbox_capacity,
            outbox_max_bytes: s.bridge.outbox_max_bytes,
            grace: Duration::from_millis(s.bridge.shutdown_grace_ms),
            reconnect_max_ms: s.comfyui.reconnect_max_ms,
        }
    }
}

impl From<&Settings> for flow::Config {
    fn from(s: &Settings) -> Self {
        Self {
            instance: s.bridge.instance.clone(),
            public_base: s.comfyui.public_base().to_string(),
            mqtt_base_topic: s.mqtt.enabled.then(|| s.mqtt.base_topic.clone()),
            nats_subject_prefix: s.nats.enabled.then(|| s.nats.subject_prefix.clone()),
        }
    }
}

impl From<&Settings> for router::Config {
    fn from(s: &Settings) -> Self {
        Self { flow: flow::Config::from(s), previews: s.previews.clone(), home_assistant: home_assistant_on(s) }
    }
}

impl From<&Settings> for task::Config {
    fn from(s: &Settings) -> Self {
        Self {
            instance: s.bridge.instance.clone(),
            commands: s.commands.clone(),
            state_dir: s.state.dir.clone(),
            request_timeout: Duration::from_millis(s.comfyui.request_timeout_ms),
            replies: ReplyRules::new(&s.mqtt, &s.nats, &s.homeassistant.discovery_prefix),
            home_assistant: home_assistant(s),
        }
    }
}

impl From<&Settings> for fleet::Config {
    fn from(s: &Settings) -> Self {
        Self {
            fleet: s.fleet.clone(),
            instance: s.bridge.instance.clone(),
            nats: s.nats.clone(),
            mqtt: s.mqtt.clone(),
            comfyui: s.comfyui.clone(),
            max_payload_bytes: s.commands.max_payload_bytes,
        }
    }
}
