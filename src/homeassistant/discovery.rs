//! The discovery configs.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{route, Config, FINISHED_TYPES, LAST_ERROR_ATTRIBUTES};
use crate::bus::topics::{self, Route};

/// Every discovery config: `(topic, retained payload)`. Command entities only when `commands` is on, and the
/// template select only when there are templates; the configs of entities not offered are cleared (an empty
/// retained payload), so Home Assistant removes what an earlier configuration had announced.
pub fn discovery(config: &Config, templates: &[String], commands: bool) -> Vec<(String, Bytes)> {
    let inst = &config.instance;
    let base = &config.base_topic;
    let topic = |route: Route| route.mqtt_topic(base);
    let node_id = format!("comfy_bridge_{inst}");
    let mut origin = json!({"name": "comfy-bridge", "sw_version": env!("CARGO_PKG_VERSION")});
    if let Some(url) = [env!("CARGO_PKG_REPOSITORY"), env!("CARGO_PKG_HOMEPAGE")].into_iter().find(|u| !u.is_empty()) {
        origin["support_url"] = json!(url);
    }
    let device = json!({
        "identifiers": [node_id],
        "name": format!("ComfyUI {inst}"),
        "manufacturer": "comfy-bridge",
        "model": "ComfyUI bridge",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let bridge_up = topic(Route::fixed(inst, &[topics::BRIDGE, topics::AVAILABILITY]));
    let comfy_up = topic(Route::fixed(inst, &[topics::COMFYUI, topics::AVAILABILITY]));
    let availability = json!({
        "availability": [{"topic": bridge_up}, {"topic": comfy_up}],
        "availability_mode": "all",
    });
    let state = topic(route(inst, &["state"]));
    let request = |command: &str| topic(Route::fixed(inst, &[topics::REQUEST, command]));
    let prefix = &config.discovery_prefix;

    let mut entities: Vec<(&str, &str, Value)> = vec![
        (
            "binary_sensor",
            "connected",
            json!({"name": "Connected", "state_topic": comfy_up, "payload_on": "online", "payload_off": "offline",
                   "device_class": "connectivity", "availability": [{"topic": bridge_up}]}),
        ),
        (
            "binary_sensor",
            "busy",
            json!({"name": "Busy", "state_topic": state, "value_template": "{{ value_json.busy }}",
                   "device_class": "running"}),
        ),
        (
            "sensor",
            "queue",
            json!({"name": "Queue", "state_topic": state, "value_template": "{{ value_json.queue }}",
                   "state_class": "measurement", "unit_of_measurement": "prompts"}),
        ),
        (
            "sensor",
            "progress",
            json!({"name": "Progress", "state_topic": state, "value_template": "{{ value_json.progress }}",
                   "unit_of_measurement": "%", "state_class": "measurement"}),
        ),
        (
            "sensor",
            "node",
            json!({"name": "Current node", "state_topic": state, "value_template": "{{ value_json.node }}"}),
        ),
        (
            "sensor",
            "last_state",
            json!({"name": "Last prompt", "state_topic": state, "value_template": "{{ value_json.last_state }}",
                   "json_attributes_topic": topic(route(inst, &["last"]))}),
        ),
        (
            "sensor",
            "last_duration",
            json!({"name": "Last duration", "state_topic": state,
                   "value_template": "{{ value_json.last_duration }}", "unit_of_measurement": "s",
                   "device_class": "duration"}),
        ),
        (
            "sensor",
            "last_error",
            json!({"name": "Last error", "state_topic": state, "value_template": "{{ value_json.last_error }}",
                   "json_attributes_topic": topic(route(inst, &["last"])),
                   "json_attributes_template": LAST_ERROR_ATTRIBUTES}),
        ),
        ("image", "last_image", json!({"name": "Last image", "url_topic": topic(route(inst, &["image_url"]))})),
        (
            "event",
            "finished",
            json!({"name": "Prompt finished", "state_topic": topic(route(inst, &["finished"])),
                   "event_types": FINISHED_TYPES}),
        ),
        (
            "sensor",
            "question",
            json!({"name": "Question", "state_topic": topic(route(inst, &["ask"])),
                   "value_template": "{{ value_json.question }}",
                   "json_attributes_topic": topic(route(inst, &["ask"]))}),
        ),
        (
            "event",
            "asked",
            json!({"name": "Workflow asked", "state_topic": topic(route(inst, &["asked"])),
                   "event_types": ["asked"]}),
        ),
    ];
    let command_entities = [
        (
            "button",
            "interrupt",
            json!({"name": "Interrupt", "command_topic": request("interrupt"), "payload_press": "{}"}),
        ),
        (
            "button",
            "clear_queue",
            json!({"name": "Clear queue", "command_topic": request("clear"), "payload_press": "{}"}),
        ),
        (
            "button",
            "free_memory",
            json!({"name": "Free memory", "command_topic": request("free"),
                       "payload_press": r#"{"unload_models": true, "free_memory": true}"#}),
        ),
        (
            "select",
            "template",
            json!({"name": "Template", "options": templates,
                       "command_topic": topic(route(inst, &["template", "set"])),
                       "state_topic": topic(route(inst, &["template"]))}),
        ),
        (
            "text",
            "prompt",
            json!({"name": "Prompt", "max": 255, "mode": "text",
                       "command_topic": topic(route(inst, &["prompt", "set"])),
                       "state_topic": topic(route(inst, &["prompt"]))}),
        ),
    ];
    entities.extend(command_entities);
    entities
        .into_iter()
        .map(|(component, object_id, mut config)| {
            let topic = format!("{prefix}/{component}/{node_id}/{object_id}/config");
            // A select needs options: with no template there is nothing to pick.
            let offered = config.get("command_topic").is_none() || commands;
            if !offered || (component == "select" && templates.is_empty()) {
                return (topic, Bytes::new());
            }
            config["unique_id"] = json!(format!("{node_id}_{object_id}"));
            config["default_entity_id"] = json!(format!("{component}.{node_id}_{object_id}"));
            config["device"] = device.clone();
            config["origin"] = origin.clone();
            if config.get("availability").is_none() {
                config["availability"] = availability["availability"].clone();
                config["availability_mode"] = availability["availability_mode"].clone();
            }
            if config.get("command_topic").is_some() {
                config["qos"] = json!(1);
            }
            (topic, Bytes::from(config.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn configs(commands: bool) -> Vec<(String, Value)> {
        let mut settings = Settings::default();
        settings.homeassistant.enabled = true;
        let templates = vec!["probe".to_string(), "txt2img".to_string()];
        discovery(&Config::from(&settings), &templates, commands)
            .into_iter()
            .map(|(t, p)| (t, serde_json::from_slice(&p).unwrap_or(Value::Null)))
            .collect()
    }

    #[test]
    fn every_entity_belongs_to_one_device_with_both_availabilities() {
        let all = configs(true);
        assert_eq!(all.len(), 17);
        let mut ids: Vec<&str> = all.iter().map(|(_, c)| c["unique_id"].as_str().expect("id")).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), all.len(), "unique ids are unique");
        for (topic, config) in &all {
            assert!(topic.starts_with("homeassistant/") && topic.ends_with("/config"), "{topic}");
            assert_eq!(config["device"]["identifiers"][0], "comfy_bridge_local");
            let availability: Vec<&str> =
                config["availability"].as_array().expect("list").iter().filter_map(|a| a["topic"].as_str()).collect();
            assert!(availability.contains(&"comfyui/local/bridge/availability"), "{topic}");
            if !topic.contains("/connected/") {
                assert!(availability.contains(&"comfyui/local/comfyui/availability"), "{topic}");
            }
        }
        let select = all.iter().find(|(t, _)| t.contains("/select/")).expect("select");
        assert_eq!(select.1["options"], json!(["probe", "txt2img"]));
        let button = all.iter().find(|(t, _)| t.ends_with("/interrupt/config")).expect("button");
        assert_eq!(button.1["command_topic"], "comfyui/local/request/interrupt");
    }

    #[test]
    fn a_read_only_bridge_offers_no_buttons_and_clears_them() {
        let read_only = configs(false);
        for (topic, config) in &read_only {
            let command = topic.contains("/button/") || topic.contains("/select/") || topic.contains("/text/");
            assert_eq!(config.is_null(), command, "{topic}: cleared exactly when it is a command entity");
        }
        assert_eq!(read_only.iter().filter(|(_, c)| !c.is_null()).count(), 12);
    }
}
