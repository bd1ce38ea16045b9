//! Recorded ComfyUI sessions, replayed by the simulator, arrive on real MQTT and NATS brokers.

mod common;

use std::time::Duration;

use comfy_bridge::config::{MqttProtocol, Settings};
use common::daemon::{simulator, Daemon, ALL};
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The recorded `data` of every text frame ComfyUI sent in a scenario, in order, with the recorded prompt id.
fn recorded_text_data(scenario: &str) -> Vec<(String, Value)> {
    fixtures::recorded_frames(scenario)
        .into_iter()
        .filter(|f| f["type"] != "feature_flags" && f["data"].get("sid").is_none())
        .map(|f| (f["type"].as_str().unwrap_or_default().to_string(), f["data"].clone()))
        .collect()
}

fn is_final(topic_or_subject: &str, payload: &[u8]) -> bool {
    let v = json(payload);
    (topic_or_subject.ends_with("/executing") || topic_or_subject.ends_with(".executing"))
        && v["data"]["node"].is_null()
}

/// A user watching `comfyui/#` sees every event of a successful run, in ComfyUI's order, with `data` untouched,
/// the prompt and node in the topic, and `seq` increasing without unexplained gaps.
#[tokio::test]
async fn success_run_arrives_on_mqtt_in_order_with_untouched_data() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/#").await;
    // Every preview frame published, so every seq is accounted for.
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(|s| s.previews.max_per_second = 1e9).start().await;
    sub.expect(|m| m.topic == "comfyui/local/comfyui/availability" && &m.payload[..] == b"online", WAIT).await;

    let pid = sim.play("a_success").await.expect("scenario plays");
    let msgs = sub.collect_until(|m| is_final(&m.topic, &m.payload), WAIT).await;
    let derived = |t: &str| t.ends_with("/state") || t.ends_with("/result");
    let envelopes: Vec<_> =
        msgs.iter().filter(|m| m.topic.contains(&pid) && m.payload.starts_with(b"{") && !derived(&m.topic)).collect();

    let recorded: Vec<_> = recorded_text_data("a_success").into_iter().filter(|(t, _)| t != "status").collect();
    assert_eq!(envelopes.len(), recorded.len(), "one message per prompt event");
    for (msg, (kind, data)) in envelopes.iter().zip(&recorded) {
        let env = json(&msg.payload);
        assert_eq!(env["type"], kind.as_str(), "{}", msg.topic);
        assert_eq!(env["prompt_id"], pid.as_str());
        // The simulator swapped the prompt id; everything else ComfyUI sent is untouched.
        let mut expected = data.clone();
        // The simulator gives each replay a new prompt id and fresh timestamps; nothing else may differ.
        for key in ["prompt_id", "timestamp"] {
            if expected.get(key).is_some() {
                expected[key] = env["data"][key].clone();
            }
        }
        assert_eq!(env["data"]["prompt_id"], pid.as_str());
        if let Some(nodes) = expected.get_mut("nodes").and_then(Value::as_object_mut) {
            for node in nodes.values_mut() {
                node["prompt_id"] = Value::from(pid.as_str());
            }
        }
        assert_eq!(env["data"], expected, "{}", msg.topic);
        let qos = if kind == "progress" { 0 } else { 1 };
        assert_eq!(msg.qos, qos, "{}", msg.topic);
    }
    // `seq` counts every frame: envelopes carry theirs, and each preview frame (raw bytes, no envelope) takes one.
    let seqs: Vec<u64> = msgs.iter().filter_map(|m| json(&m.payload)["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "seq increases: {seqs:?}");
    let first = msgs.iter().position(|m| json(&m.payload)["seq"].is_u64()).expect("an envelope");
    let node_previews =
        msgs[first..].iter().filter(|m| m.topic.contains("/node/") && m.topic.ends_with("/preview")).count();
    let span = (seqs[seqs.len() - 1] - seqs[0] + 1) as usize;
    assert_eq!(span, seqs.len() + node_previews, "no seq gap that a frame does not explain");

    let topics: Vec<&str> = msgs.iter().map(|m| m.topic.as_str()).collect();
    for t in ["execution_start", "node/2/progress", "node/2/preview", "node/4/executed", "execution_success"] {
        let want = format!("comfyui/local/prompt/{pid}/{t}");
        assert!(topics.contains(&want.as_str()), "missing {want} in {topics:#?}");
    }
    let preview = msgs.iter().find(|m| m.topic.ends_with("/node/2/preview")).expect("preview");
    assert_eq!(&preview.payload[..2], &[0xFF, 0xD8], "raw JPEG bytes");
    assert_eq!(preview.qos, 0);
    daemon.stop().await;
}

/// The same run on NATS: subjects mirror the topics, previews carry their headers.
#[tokio::test]
async fn success_run_arrives_on_nats_with_preview_headers() {
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = nats_subscribe(&nats, "comfyui.>").await;
    let daemon = Daemon::builder(&sim).nats(&nats).start().await;
    sub.expect(|m| m.subject == "comfyui.local.bridge.availability" && &m.payload[..] == b"online", WAIT).await;

    let pid = sim.play("a_success").await.expect("scenario plays");
    let msgs = sub.collect_until(|m| is_final(&m.subject, &m.payload), WAIT).await;
    let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
    for t in ["execution_start", "node.2.progress", "node.4.executed", "execution_success"] {
        let want = format!("comfyui.local.prompt.{pid}.{t}");
        assert!(subjects.contains(&want.as_str()), "missing {want} in {subjects:#?}");
    }
    let preview = msgs.iter().find(|m| m.subject.ends_with(".node.2.preview")).expect("preview on nats");
    let header = |name: &str| preview.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(header("Content-Type"), Some("image/jpeg"));
    assert_eq!(header("Comfy-Prompt-Id"), Some(pid.as_str()));
    assert_eq!(header("Comfy-Node-Id"), Some("2"));
    assert_eq!(&preview.payload[..2], &[0xFF, 0xD8]);
    daemon.stop().await;
}

/// Subgraph (`7:9:3`) and expansion (`20.0.0.1`) node ids become escaped levels on both buses, and the
/// original id is in the payload.
#[tokio::test]
async fn node_ids_are_escaped_identically_on_both_buses() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/prompt/#").await;
    let mut nsub = nats_subscribe(&nats, "comfyui.local.prompt.>").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;

    let pid = sim.play("j_node_ids").await.expect("plays");
    let via_mqtt = mqtt.collect_until(|m| is_final(&m.topic, &m.payload), WAIT).await;
    let via_nats = nsub.collect_until(|m| is_final(&m.subject, &m.payload), WAIT).await;
    let expanded = format!("comfyui/local/prompt/{pid}/node/20=2E0=2E0=2E1/progress");
    let msg = via_mqtt.iter().find(|m| m.topic == expanded).expect("expanded node id escaped");
    assert_eq!(json(&msg.payload)["node_id"], "20.0.0.1");
    assert!(via_mqtt.iter().any(|m| m.topic == format!("comfyui/local/prompt/{pid}/node/7:9:3/executing")));
    // Same names on both buses. (Not the same order: mosquitto holds QoS-1 messages while the subscriber's
    // in-flight window is full and lets QoS-0 ones pass, and nothing in MQTT orders across QoS levels.)
    let mut mqtt_topics: Vec<String> = via_mqtt.iter().map(|m| m.topic.replace('/', ".")).collect();
    let mut nats_subjects: Vec<String> = via_nats.iter().map(|m| m.subject.clone()).collect();
    mqtt_topics.sort();
    nats_subjects.sort();
    assert_eq!(mqtt_topics, nats_subjects, "one scheme, two buses");
    daemon.stop().await;
}

/// Custom events and unknown types are never dropped; binary progress text is an envelope with `data.text`.
#[tokio::test]
async fn custom_events_and_progress_text_are_published() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/#").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;
    sub.expect(|m| m.topic.ends_with("bridge/availability"), WAIT).await;
    sim.play("g_custom_events").await.expect("plays");
    let custom = sub.expect(|m| m.topic == "comfyui/local/event/bridge_probe=2Ecustom", WAIT).await;
    assert_eq!(json(&custom.payload)["type"], "bridge_probe.custom");
    let text = sub.expect(|m| m.topic.ends_with("/text"), WAIT).await;
    assert!(json(&text.payload)["data"]["text"].is_string(), "{:?}", text.payload);
    daemon.stop().await;
}

/// Garbage from ComfyUI is skipped: the connection stays up and later events still flow.
#[tokio::test]
async fn malformed_frames_are_skipped_and_the_bridge_keeps_going() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/#").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;
    let client = sim.wait_for_client(WAIT).await.expect("bridge connects");
    sub.expect(|m| m.topic.ends_with("comfyui/availability") && &m.payload[..] == b"online", WAIT).await;

    sim.send_raw_text("{this is not json");
    sim.send_raw_text(r#"{"type": 42}"#);
    sim.send_raw_binary(vec![0, 0, 0, 4, 0, 0, 1, 0, b'{']);
    sim.send_raw_binary(vec![0, 0, 0, 99]);
    sim.send_raw_binary(vec![]);
    let pid = sim.play("b_cached").await.expect("plays");
    let msgs = sub.collect_until(|m| is_final(&m.topic, &m.payload), WAIT).await;
    assert!(msgs.iter().any(|m| m.topic == format!("comfyui/local/prompt/{pid}/execution_success")));
    assert!(
        !msgs.iter().any(|m| m.topic.ends_with("comfyui/availability") && &m.payload[..] == b"offline"),
        "the websocket stayed up"
    );
    assert_eq!(sim.connected_clients(), vec![client], "same connection");
    daemon.stop().await;
}

/// When ComfyUI drops the connection the bridge says so, reconnects with the same client id, and says so again.
#[tokio::test]
async fn comfyui_availability_follows_the_websocket() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/local/comfyui/availability").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;
    let first = sim.wait_for_client(WAIT).await.expect("connects");
    let online = sub.expect(|m| &m.payload[..] == b"online", WAIT).await;
    assert!(online.retain || online.qos == 1);
    sim.disconnect_all();
    sub.expect(|m| &m.payload[..] == b"offline", WAIT).await;
    sub.expect(|m| &m.payload[..] == b"online", WAIT).await;
    assert_eq!(sim.wait_for_client(WAIT).await.as_deref(), Some(first.as_str()), "stable client id");
    daemon.stop().await;
}

/// A graceful stop publishes the retained `offline`, so late subscribers see the bridge is down.
#[tokio::test]
async fn graceful_stop_leaves_retained_offline() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;
    sub.expect(|m| &m.payload[..] == b"online", WAIT).await;
    daemon.stop().await;
    sub.expect(|m| &m.payload[..] == b"offline", WAIT).await;
    let mut late = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let retained = late.next(WAIT).await.expect("retained availability");
    assert_eq!((&retained.payload[..], retained.retain), (&b"offline"[..], true));
}

/// `mqtt.protocol = "v311"` for older brokers and clients: the same topics, QoS and retained availability.
#[tokio::test]
async fn mqtt_v311_carries_the_same_events() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/#").await;
    let v311 = |s: &mut Settings| s.mqtt.protocol = MqttProtocol::V311;
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(v311).start().await;
    sub.expect(|m| m.topic == "comfyui/local/bridge/availability" && &m.payload[..] == b"online", WAIT).await;
    let pid = sim.play("a_success").await.expect("plays");
    let msgs = sub.collect_until(|m| is_final(&m.topic, &m.payload), WAIT).await;
    let success = format!("comfyui/local/prompt/{pid}/execution_success");
    assert!(msgs.iter().any(|m| m.topic == success && m.qos == 1), "{success}");
    let preview = msgs.iter().find(|m| m.topic.ends_with("/node/2/preview")).expect("preview over v3.1.1");
    assert_eq!(&preview.payload[..2], &[0xFF, 0xD8]);
    daemon.stop().await;
    sub.expect(|m| m.topic.ends_with("bridge/availability") && &m.payload[..] == b"offline", WAIT).await;
}

/// A bus that is enabled but unreachable does not hold back the other one.
#[tokio::test]
async fn an_unreachable_nats_does_not_affect_mqtt() {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, 0.0).await;
    let mut sub = mqtt_subscribe(&broker, "comfyui/#").await;
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let unreachable_nats = |s: &mut Settings| {
        s.nats.enabled = true;
        s.nats.url = format!("nats://127.0.0.1:{nowhere}");
    };
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(unreachable_nats).start().await;
    sub.expect(|m| m.topic.ends_with("bridge/availability") && &m.payload[..] == b"online", WAIT).await;
    let pid = sim.play("a_success").await.expect("plays");
    let msgs = sub.collect_until(|m| is_final(&m.topic, &m.payload), WAIT).await;
    assert!(msgs.iter().any(|m| m.topic == format!("comfyui/local/prompt/{pid}/execution_success")));
    daemon.stop().await;
}

/// A preview larger than the NATS server's `max_payload` is dropped (and counted) on NATS, still delivered on
/// MQTT, and does not block the events after it.
#[tokio::test]
async fn oversized_preview_does_not_block_nats() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/preview").await;
    let mut sub = nats_subscribe(&nats, "comfyui.>").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;
    sub.expect(|m| m.subject.ends_with("bridge.availability"), WAIT).await;
    // A type-1 JPEG preview of 2 MiB: over nats-server's default 1 MiB max_payload.
    let mut frame = vec![0, 0, 0, 1, 0, 0, 0, 1, 0xFF, 0xD8];
    frame.resize(2 * 1024 * 1024, 7);
    sim.send_raw_binary(frame);
    // The bridge publishes the image without the 8-byte frame header.
    let big = mqtt.expect(|m| m.payload.len() == 2 * 1024 * 1024 - 8, WAIT).await;
    assert_eq!(&big.payload[..2], &[0xFF, 0xD8]);
    let pid = sim.play("b_cached").await.expect("plays");
    let msgs = sub.collect_until(|m| is_final(&m.subject, &m.payload), WAIT).await;
    assert!(msgs.iter().any(|m| m.subject == format!("comfyui.local.prompt.{pid}.execution_success")));
    assert!(!msgs.iter().any(|m| m.payload.len() > 1024 * 1024), "nothing over max_payload on nats");
    // nats-server closes a connection that sends more than max_payload; the bridge would reconnect and
    // announce `online` again.
    assert!(!msgs.iter().any(|m| m.subject.ends_with("bridge.availability")), "the nats connection stayed up");
    daemon.stop().await;
}
