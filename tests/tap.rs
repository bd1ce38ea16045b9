//! The tap (issue 11 §1): with the extension installed, a prompt queued by someone else (a browser tab, or a
//! script that sends no client id) reaches both buses with every event, previews and a `state` that follows it;
//! without it, only `state` and `result` (rebuilt from the queue and history), as before.

mod common;

use std::time::Duration;

use common::daemon::{simulator, tap_simulator, Daemon};
use common::requester::nats_client;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn txt2img() -> Value {
    serde_json::from_str(include_str!("../examples/templates/txt2img.json")).expect("template")
}

/// `status` over NATS until it answers; its `data`.
async fn status(nats: &NatsServer) -> Value {
    let client = nats_client(nats).await;
    for _ in 0..100 {
        let reply = tokio::time::timeout(
            Duration::from_millis(200),
            client.request("comfyui.local.request.status", "{}".into()),
        )
        .await;
        if let Ok(Ok(msg)) = reply {
            let status = json(&msg.payload);
            if !status["data"]["comfyui"]["tap"].is_null() {
                return status["data"].clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("status never reported the tap");
}

/// The last level of each message's topic below `prompt/<pid>/`, in order (`node/<n>/<type>` keeps its node).
fn levels(topics: &[String], pid: &str, sep: char) -> Vec<String> {
    let marker = format!("prompt{sep}{pid}{sep}");
    topics.iter().filter_map(|t| t.split_once(&marker).map(|(_, rest)| rest.replace(sep, "/"))).collect()
}

fn has(levels: &[String], suffix: &str) -> bool {
    levels.iter().any(|l| l == suffix || l.ends_with(&format!("/{suffix}")))
}

#[tokio::test]
async fn with_the_tap_a_browsers_prompt_arrives_with_every_event_on_both_buses() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    // Recorded timing: the bridge reads the queue entry (and so the submitter) while the prompt runs.
    let sim = tap_simulator("a_success.jsonl", 1.0).await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/prompt/#").await;
    let mut nats_sub = nats_subscribe(&nats, "comfyui.local.prompt.>").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;
    assert_eq!(status(&nats).await["comfyui"]["tap"], comfy_sim::TAP_VERSION);

    let pid = sim.queue_as(&txt2img(), Some("browser-tab")).expect("queued");
    let result = |t: &str| t.contains(&pid) && (t.ends_with("/result") || t.ends_with(".result"));
    let on_mqtt = mqtt.collect_until(|m| result(&m.topic), WAIT).await;
    let on_nats = nats_sub.collect_until(|m| result(&m.subject), WAIT).await;
    for (bus, topics, sep) in [
        ("mqtt", on_mqtt.iter().map(|m| m.topic.clone()).collect::<Vec<_>>(), '/'),
        ("nats", on_nats.iter().map(|m| m.subject.clone()).collect::<Vec<_>>(), '.'),
    ] {
        let seen = levels(&topics, &pid, sep);
        for event in ["execution_start", "executing", "progress", "preview", "executed", "execution_success", "state"] {
            assert!(has(&seen, event), "{bus}: no {event} in {seen:?}");
        }
    }
    // The envelope names the submitter once the queue entry was read; `state` follows the run with its node and
    // progress.
    let done = on_mqtt.iter().find(|m| m.topic.ends_with("/execution_success")).expect("execution_success");
    assert_eq!(json(&done.payload)["client_id"], "browser-tab");
    let running = on_mqtt
        .iter()
        .filter(|m| m.topic.ends_with("/state"))
        .map(|m| json(&m.payload))
        .find(|s| s["state"] == "running" && s["node_id"].is_string() && s["progress"].is_object());
    assert!(running.is_some(), "no running state with node and progress");
    let result = json(&on_mqtt.last().expect("result").payload);
    assert_eq!(result["status"], "success");
    assert!(result["outputs"].as_object().is_some_and(|o| !o.is_empty()), "{result}");
    daemon.stop().await;
}

#[tokio::test]
async fn with_the_tap_a_prompt_queued_without_a_client_id_gets_its_events_too() {
    let broker = Mosquitto::start();
    let sim = tap_simulator("a_success.jsonl", 0.0).await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/prompt/#").await;
    let nats = NatsServer::start();
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;
    status(&nats).await;
    let pid = sim.queue_as(&txt2img(), None).expect("queued");
    let msgs = mqtt.collect_until(|m| m.topic.contains(&pid) && m.topic.ends_with("/result"), WAIT).await;
    let seen = levels(&msgs.iter().map(|m| m.topic.clone()).collect::<Vec<_>>(), &pid, '/');
    for event in ["execution_start", "executing", "progress", "executed", "execution_success"] {
        assert!(has(&seen, event), "no {event} in {seen:?}");
    }
    let start = msgs.iter().find(|m| m.topic.ends_with("/execution_start")).expect("execution_start");
    assert!(json(&start.payload).get("client_id").is_none(), "no submitter to name");
    daemon.stop().await;
}

#[tokio::test]
async fn without_the_tap_a_browsers_prompt_shows_only_as_state_and_result() {
    let broker = Mosquitto::start();
    let sim = simulator("a_success.jsonl", 0.0).await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/prompt/#").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;
    let pid = sim.queue_as(&txt2img(), Some("browser-tab")).expect("queued");
    let msgs = mqtt.collect_until(|m| m.topic.contains(&pid) && m.topic.ends_with("/result"), WAIT).await;
    let seen = levels(&msgs.iter().map(|m| m.topic.clone()).collect::<Vec<_>>(), &pid, '/');
    assert!(seen.iter().all(|l| l == "state" || l == "result"), "{seen:?}");
    assert_eq!(json(&msgs.last().expect("result").payload)["status"], "success");
    daemon.stop().await;
}
