//! A newcomer's first hour: the README's first command works with the default configuration from a fresh clone,
//! and a template that is not there is answered with where the bridge looked and what it found.

mod common;

use std::path::Path;
use std::time::Duration;

use comfy_bridge::config::Settings;
use common::daemon::{simulator, Daemon, SUCCESS};
use common::requester::MqttRequester;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn the_readme_queue_command_works_with_the_default_templates_dir() {
    let broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let mut responses = mqtt_subscribe(&broker, "comfyui/local/response/#").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let mut states = mqtt_subscribe(&broker, "comfyui/local/prompt/+/state").await;
    // `commands.templates_dir` as it comes (tests run in the repository root, like a fresh clone).
    let as_it_comes = |s: &mut Settings| assert_eq!(s.commands.templates_dir, Path::new("examples/templates"));
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(as_it_comes).start().await;

    // Word for word the README's first command (mosquitto_pub: MQTT v3.1.1, QoS 1).
    let request = r#"{"id": "fox-1", "template": "txt2img", "set": {"Positive.text": "a red fox"}, "randomize": ["KSampler.seed"]}"#;
    common::requester::mqtt311_publish(broker.port, "comfyui/local/request/queue", request.as_bytes(), false).await;
    let response = responses.expect(|m| m.topic == "comfyui/local/response/queue", WAIT).await;
    let body: Value = serde_json::from_slice(&response.payload).unwrap_or(Value::Null);
    assert_eq!(body["status"], "ok", "{body}");
    let result = results.next(WAIT).await.expect("a result");
    let result: Value = serde_json::from_slice(&result.payload).unwrap_or(Value::Null);
    assert_eq!(result["status"], "success", "{result}");
    // The simulator ran a session shaped like txt2img: its seven nodes, its SaveImage output, progress between.
    assert!(result["outputs"]["9"]["images"][0]["url"].is_string(), "{result}");
    let seen = states
        .collect_until(|m| serde_json::from_slice::<Value>(&m.payload).is_ok_and(|s| s["state"] == "success"), WAIT)
        .await;
    let states: Vec<Value> = seen.iter().filter_map(|m| serde_json::from_slice(&m.payload).ok()).collect();
    assert!(states.iter().all(|s| s["nodes_total"] == 7), "{states:?}");
    let fractions: Vec<f64> = states.iter().filter_map(|s| s["fraction"].as_f64()).collect();
    assert!(fractions.iter().any(|f| *f > 0.0 && *f < 1.0), "progress in between: {fractions:?}");
    assert_eq!(fractions.last(), Some(&1.0), "{fractions:?}");

    // A name that is not there: the answer says where the bridge looked and which templates exist.
    let mut requester = MqttRequester::connect(&broker).await;
    let body = requester.request("comfyui/local/request/queue", r#"{"template": "txt2im"}"#, WAIT).await;
    assert_eq!(body["error"]["code"], "unknown_template", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`examples/templates`") && message.contains("templates there: txt2img"), "{message}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_missing_templates_dir_is_named_in_the_unknown_template_answer() {
    let broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let nowhere = tempfile::tempdir().expect("tempdir");
    let missing = |s: &mut Settings| s.commands.templates_dir = nowhere.path().join("no-such-dir");
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(missing).start().await;
    let mut requester = MqttRequester::connect(&broker).await;
    let body = requester.request("comfyui/local/request/queue", r#"{"template": "txt2img"}"#, WAIT).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no-such-dir` (commands.templates_dir) does not exist"), "{body}");
    daemon.stop().await;
}

#[tokio::test]
async fn an_unescaped_dot_in_a_nats_upload_subject_is_answered_with_the_escape() {
    let nats = NatsServer::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let daemon = Daemon::builder(&sim).nats(&nats).start().await;
    let client = common::requester::nats_client(&nats).await;
    // The bridge subscribes a moment after it connects: ready once `status` is answered.
    for _ in 0..50 {
        let status = client.request("comfyui.local.request.status", "{}".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), status).await {
            break;
        }
    }
    let body = common::requester::nats_request(&client, "comfyui.local.request.upload.cat.png", "png").await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("contains `/`") && message.contains("`request.upload.cat=2Epng`"), "{body}");
    daemon.stop().await;
}
