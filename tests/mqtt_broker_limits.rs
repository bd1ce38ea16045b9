//! What a v5 broker tells the bridge's MQTT connection in its `CONNACK` and `PUBACK`s: its receive maximum
//! holds back QoS-1 publishes beyond it, and every one goes out as acknowledgements come (mosquitto 2.0
//! announces the maximum but does not enforce it; brokers that do refuse the excess); a publish it refuses
//! (its ACL) is that message's failure, dropped and counted, while everything else keeps flowing on the same
//! connection.

mod common;

use std::time::Duration;

use comfy_sim::Simulator;
use common::daemon::{settings, simulator, Daemon, SUCCESS};
use common::hostile::{free_port, get, metric};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// The simulator and a bridge on `broker` (MQTT only), ready; the bridge's HTTP port.
async fn start(broker: &Mosquitto) -> (Simulator, Daemon, u16) {
    let sim = simulator(SUCCESS, 0.0).await;
    let (mut s, state) = settings(&sim, Some(broker), None);
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);
    let deadline = tokio::time::Instant::now() + WAIT;
    while get(port, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (sim, daemon, port)
}

/// How many `online`s the availability subscriber has seen (one per connection).
async fn onlines(availability: &mut MqttSub) -> usize {
    let mut onlines = 0;
    while let Some(m) = availability.next(Duration::from_millis(300)).await {
        onlines += usize::from(&m.payload[..] == b"online");
    }
    onlines
}

#[tokio::test]
async fn a_small_receive_maximum_holds_qos1_back_and_loses_nothing() {
    let broker = Mosquitto::start_with("max_inflight_messages 2");
    let mut availability = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon, port) = start(&broker).await;
    // Ten prompts at once: dozens of QoS-1 lifecycle messages in one burst.
    let mut pids = Vec::new();
    for _ in 0..10 {
        pids.push(sim.play("a_success").await.expect("plays"));
    }
    for pid in &pids {
        results.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), WAIT).await;
    }
    let metrics = get(port, "/metrics").await.1;
    let quota = r#"comfy_bridge_messages_dropped_total{bus="mqtt",reason="quota_exceeded"}"#;
    assert_eq!(metric(&metrics, quota), 0.0, "{metrics}");
    assert_eq!(onlines(&mut availability).await, 1, "the connection was never dropped");
    daemon.stop().await;
}

#[tokio::test]
async fn a_publish_the_broker_refuses_is_dropped_and_counted_and_the_rest_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    // Anonymous clients may read everything and write all but results.
    let grants = "topic read #\ntopic write comfyui/local/bridge/#\ntopic write comfyui/local/comfyui/#\n\
                  topic write comfyui/local/prompt/+/state\ntopic write comfyui/local/prompt/+/execution_start\n";
    std::fs::write(&acl, grants).expect("write acl");
    let broker = Mosquitto::start_with(&format!("acl_file {}", acl.display()));
    let mut availability = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let mut events = mqtt_subscribe(&broker, "comfyui/local/prompt/#").await;
    let (sim, daemon, port) = start(&broker).await;
    for _ in 0..2 {
        let pid = sim.play("a_success").await.expect("plays");
        events.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/execution_start"), WAIT).await;
    }
    let refused = r#"comfy_bridge_messages_dropped_total{bus="mqtt",reason="not_authorized"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&get(port, "/metrics").await.1, refused) < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "the refused results were not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(port, "/readyz").await.0, 200, "a refused message is not the bus's failure");
    assert_eq!(onlines(&mut availability).await, 1, "the connection was never dropped");
    daemon.stop().await;
}
