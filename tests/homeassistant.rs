//! Home Assistant MQTT discovery, as Home Assistant sees it: the configs, the device state, and the entities'
//! commands (select a template, type a prompt, press a button) doing what they say.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::daemon::{simulator, Daemon, ALL};
use common::requester::mqtt311_publish;
use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn discovery_configs_state_and_entity_commands_work_like_home_assistant_expects() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let templates = tempfile::tempdir().expect("templates");
    for (name, fixture) in [("probe", "a_success__prompt"), ("long", "e_interrupt__p1_long")] {
        std::fs::copy(fixtures::workflow_path(fixture), templates.path().join(format!("{name}.json")))
            .expect("template");
    }
    let mut discovery = mqtt_subscribe(&broker, "homeassistant/#").await;
    let mut device = mqtt_subscribe(&broker, "comfyui/local/ha/#").await;
    let configure = |s: &mut comfy_bridge::config::Settings| {
        s.homeassistant.enabled = true;
        s.homeassistant.prompt_input = "4.filename_prefix".into();
        s.commands.templates_dir = templates.path().to_path_buf();
    };
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(configure).start().await;

    // Seventeen entities of one device, each valid for its component.
    let mut configs = BTreeMap::new();
    while configs.len() < 17 {
        let msg = discovery.next(WAIT).await.unwrap_or_else(|| panic!("configs so far: {:?}", configs.keys()));
        configs.insert(msg.topic.clone(), json(&msg.payload));
    }
    for (topic, config) in &configs {
        let parts: Vec<&str> = topic.split('/').collect();
        assert_eq!((parts.len(), parts[0], parts[2], parts[4]), (5, "homeassistant", "comfy_bridge_local", "config"));
        assert_eq!(config["device"]["identifiers"], json!(["comfy_bridge_local"]), "{topic}");
        assert!(config["unique_id"].as_str().is_some_and(|u| u.starts_with("comfy_bridge_local_")), "{topic}");
        let needs = match parts[1] {
            "sensor" | "binary_sensor" | "event" => "state_topic",
            "button" | "select" | "text" => "command_topic",
            "image" => "url_topic",
            other => panic!("unexpected component {other}"),
        };
        assert!(config[needs].as_str().is_some(), "{topic} needs {needs}: {config}");
        let availability = config["availability"].to_string();
        assert!(availability.contains("comfyui/local/bridge/availability"), "{topic}");
    }
    let select = &configs["homeassistant/select/comfy_bridge_local/template/config"];
    assert_eq!(select["options"], json!(["long", "probe"]));
    let button = &configs["homeassistant/button/comfy_bridge_local/interrupt/config"];

    // The select starts on the first template; choosing another one is reflected back.
    device.expect(|m| m.topic == "comfyui/local/ha/template" && &m.payload[..] == b"long", WAIT).await;
    mqtt311_publish(broker.port, "comfyui/local/ha/template/set", b"probe", false).await;
    device.expect(|m| m.topic == "comfyui/local/ha/template" && &m.payload[..] == b"probe", WAIT).await;

    // Typing a prompt queues the selected template with that text; the device reports the run.
    mqtt311_publish(broker.port, "comfyui/local/ha/prompt/set", b"a red fox", false).await;
    let msgs = device
        .collect_until(|m| m.topic == "comfyui/local/ha/state" && json(&m.payload)["last_state"] == "success", WAIT)
        .await;
    let find = |topic: &str| msgs.iter().find(|m| m.topic == topic).unwrap_or_else(|| panic!("no {topic}"));
    let finished = find("comfyui/local/ha/finished");
    assert_eq!(json(&finished.payload)["event_type"], "success");
    assert!(!finished.retain, "the event topic is not retained");
    let image = find("comfyui/local/ha/image_url");
    assert!(String::from_utf8_lossy(&image.payload).starts_with(&format!("{}/view?filename=", sim.url())));
    assert!(msgs.iter().any(|m| m.topic == "comfyui/local/ha/state" && json(&m.payload)["busy"] == "ON"));
    let posted: Vec<Value> =
        sim.requests().into_iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").map(|(_, _, b)| b).collect();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["prompt"]["4"]["inputs"]["filename_prefix"], "a red fox");

    // A button press is a request like any other.
    let mut responses = mqtt_subscribe(&broker, "comfyui/local/response/#").await;
    let press = button["payload_press"].as_str().expect("payload").as_bytes().to_vec();
    mqtt311_publish(broker.port, button["command_topic"].as_str().expect("topic"), &press, false).await;
    let answer = responses.expect(|m| m.topic == "comfyui/local/response/interrupt", WAIT).await;
    assert_eq!(json(&answer.payload)["status"], "ok");

    // Home Assistant restarted: its birth message brings every config again.
    mqtt311_publish(broker.port, "homeassistant/status", b"online", false).await;
    let again = discovery.collect_until(|m| m.topic.ends_with("/prompt/config"), WAIT).await;
    assert!(again.len() >= 15, "configs republished: {}", again.len());
    daemon.stop().await;
}
