//! Where a requester may ask for its response: never into the bridge's own tree or Home Assistant's (the bridge
//! would publish there as itself: fake results, availability, discovery configs, commands to itself), never a
//! reserved `$…` topic or subject (NATS `$JS.API.…` would be a JetStream command), and only what can be
//! published at all.
//!
//! Pure: a function of the configuration, the bus and the requested topic or subject.

use crate::bus::Bus;
use crate::config::{MqttSettings, NatsSettings};

/// Longest response topic or reply subject taken, in bytes.
pub const MAX_REPLY_BYTES: usize = 1024;

/// The roots replies may not go under, and the longest reply, per bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRules {
    /// MQTT: `<base>` (this bridge's tree and its siblings'), the discovery prefix, and the NATS prefix as an
    /// MQTT-enabled NATS server maps it.
    mqtt: Vec<String>,
    /// NATS: `<prefix>`, and the MQTT roots as a NATS server with MQTT enabled maps them.
    nats: Vec<String>,
    /// The longest response topic and reply subject: [`MAX_REPLY_BYTES`], or less where the bus's own limit
    /// (`mqtt.max_topic_bytes`, `nats.max_subject_bytes`) is lower, so an accepted reply is never dropped.
    max_bytes: (usize, usize),
}

impl ReplyRules {
    /// The rules for this bridge's topic and subject trees: `mqtt.base_topic`, `nats.subject_prefix`, their
    /// length limits, and Home Assistant's `discovery_prefix` (refused whether Home Assistant is on or not).
    pub fn new(mqtt: &MqttSettings, nats: &NatsSettings, discovery_prefix: &str) -> Self {
        let max_bytes = (MAX_REPLY_BYTES.min(mqtt.max_topic_bytes), MAX_REPLY_BYTES.min(nats.max_subject_bytes));
        let mqtt_base = mqtt.base_topic.clone();
        let discovery = discovery_prefix.trim_end_matches('/').to_string();
        let nats_base = nats.subject_prefix.clone();
        let nats = vec![nats_base.clone(), mqtt_base.replace('/', "."), discovery.replace('/', ".")];
        let mqtt = vec![mqtt_base, discovery, nats_base.replace('.', "/")];
        Self { mqtt, nats, max_bytes }
    }

    /// Whether `to` may receive a response on `bus`; the error says what is wrong with it, for an
    /// `invalid_request` answer.
    pub fn check(&self, bus: Bus, to: &str) -> Result<(), String> {
        let what = match bus {
            Bus::Mqtt => "the response topic",
            Bus::Nats => "the reply subject",
        };
        if to.is_empty() {
            return Err(format!("{what} is empty"));
        }
        let max = match bus {
            Bus::Mqtt => self.max_bytes.0,
            Bus::Nats => self.max_bytes.1,
        };
        if to.len() > max {
            return Err(format!("{what} is {} bytes, more than the {max} allowed", to.len()));
        }
        if to.starts_with('$') {
            return Err(format!("{what} starts with `$`, which is reserved for the server"));
        }
        let (sep, roots) = match bus {
            Bus::Mqtt => ('/', &self.mqtt),
            Bus::Nats => ('.', &self.nats),
        };
        let problem = match bus {
            Bus::Mqtt => mqtt_problem(to),
            Bus::Nats => nats_problem(to),
        };
        if let Some(problem) = problem {
            return Err(format!("{what} {problem}"));
        }
        if let Some(root) = roots.iter().find(|root| under(to, root, sep)) {
            return Err(format!("{what} is inside `{root}{sep}`, where only the bridge publishes"));
        }
        Ok(())
    }
}

/// `to` is `root` or below it (`root` followed by the separator): `a/b2/x` is not under `a/b`.
fn under(to: &str, root: &str, sep: char) -> bool {
    !root.is_empty() && to.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with(sep))
}

/// Why an MQTT topic cannot be published to.
fn mqtt_problem(topic: &str) -> Option<&'static str> {
    if topic.contains(['+', '#']) {
        return Some("contains a wildcard (`+` or `#`)");
    }
    if topic.contains('\0') {
        return Some("contains NUL");
    }
    None
}

/// Why a NATS subject cannot be published to.
fn nats_problem(subject: &str) -> Option<&'static str> {
    if subject.contains(['*', '>']) {
        return Some("contains a wildcard (`*` or `>`)");
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains whitespace or control characters");
    }
    if subject.split('.').any(str::is_empty) {
        return Some("has an empty token");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// The rules of `settings`, split as `app` splits them.
    fn rules_of(settings: &Settings) -> ReplyRules {
        crate::commands::task::Config::from(settings).replies
    }

    fn rules() -> ReplyRules {
        rules_of(&Settings::default())
    }

    #[test]
    fn replies_outside_every_tree_are_taken() {
        let r = rules();
        for to in ["clients/1/responses", "comfyuiX/local/x", "replies/comfyui/local", "a"] {
            assert_eq!(r.check(Bus::Mqtt, to), Ok(()), "{to}");
        }
        for to in ["_INBOX.abc.1", "comfyuiX.local.x", "replies.comfyui", "homeassistants.x"] {
            assert_eq!(r.check(Bus::Nats, to), Ok(()), "{to}");
        }
    }

    #[test]
    fn replies_into_the_bridges_tree_or_home_assistants_are_refused() {
        let r = rules();
        for to in [
            "comfyui/local",
            "comfyui/local/prompt/victim/result",
            "comfyui/local/bridge/availability",
            "comfyui/local/request/queue",
            "comfyui/local/ha/prompt/set",
            "homeassistant/sensor/x/config",
            "homeassistant",
            "comfyui/other/prompt/p/result",
            "comfyui",
        ] {
            let error = r.check(Bus::Mqtt, to).expect_err(to);
            assert!(error.contains("where only the bridge publishes"), "{to}: {error}");
        }
        for to in ["comfyui.local.prompt.victim.result", "comfyui.local", "homeassistant.status", "comfyui.other.x"] {
            let error = r.check(Bus::Nats, to).expect_err(to);
            assert!(error.starts_with("the reply subject is inside"), "{to}: {error}");
        }
    }

    #[test]
    fn other_trees_follow_the_configuration() {
        let mut settings = Settings::default();
        settings.mqtt.base_topic = "site/gpu".into();
        settings.nats.subject_prefix = "farm".into();
        settings.bridge.instance = "a1".into();
        settings.homeassistant.discovery_prefix = "ha".into();
        let r = rules_of(&settings);
        assert!(r.check(Bus::Mqtt, "site/gpu/a1/prompt/x/result").is_err());
        assert!(r.check(Bus::Mqtt, "comfyui/local/prompt/x/result").is_ok());
        assert!(r.check(Bus::Mqtt, "ha/select/x/config").is_err());
        assert!(r.check(Bus::Nats, "farm.a1.response.status").is_err());
        assert!(r.check(Bus::Nats, "site.gpu.a1.x").is_err(), "the MQTT tree as NATS maps it");
        assert!(r.check(Bus::Nats, "farm.a10.x").is_err(), "a sibling instance's tree");
        assert!(r.check(Bus::Mqtt, "farm/a1/prompt/x/result").is_err(), "the NATS tree as MQTT maps it");
        settings.mqtt.max_topic_bytes = 300;
        let r = rules_of(&settings);
        assert!(r.check(Bus::Mqtt, &format!("r/{}", "x".repeat(300))).is_err(), "over mqtt.max_topic_bytes");
        assert!(r.check(Bus::Nats, &format!("r.{}", "x".repeat(300))).is_ok());
    }

    #[test]
    fn replies_that_cannot_be_published_are_refused_naming_why() {
        let r = rules();
        let long = "x".repeat(MAX_REPLY_BYTES + 1);
        let cases = [
            (Bus::Mqtt, "", "the response topic is empty"),
            (Bus::Mqtt, "rel/+/x", "wildcard"),
            (Bus::Mqtt, "rel/#", "wildcard"),
            (Bus::Mqtt, "a\0b", "NUL"),
            (Bus::Mqtt, "$SYS/broker", "reserved"),
            (Bus::Mqtt, long.as_str(), "more than the 1024 allowed"),
            (Bus::Nats, "", "the reply subject is empty"),
            (Bus::Nats, "a.*", "wildcard"),
            (Bus::Nats, "a.>", "wildcard"),
            (Bus::Nats, "a b", "whitespace"),
            (Bus::Nats, "a\r\nPUB x", "whitespace"),
            (Bus::Nats, "a..b", "empty token"),
            (Bus::Nats, ".a", "empty token"),
            (Bus::Nats, "$JS.API.STREAM.DELETE.x", "reserved"),
            (Bus::Nats, long.as_str(), "more than the 1024 allowed"),
        ];
        for (bus, to, why) in cases {
            let error = r.check(bus, to).expect_err(to);
            assert!(error.contains(why), "{to:?}: {error}");
        }
        assert!(r.check(Bus::Mqtt, &"x".repeat(MAX_REPLY_BYTES)).is_ok());
    }
}
