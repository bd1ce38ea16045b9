//! The fleet on MQTT: submits through the shared subscription (each answered once, by one bridge, with the
//! job id), and the job's state and result on `<base>/fleet/<fleet>/job/<id>/…`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::daemon::{simulator, SUCCESS};
use common::fleet::{fleet_settings, job, wait_for_bridges, FleetBridge};
use common::requester::MqttRequester;
use common::{mqtt_subscribe, Mosquitto, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_submits_are_answered_once_and_jobs_report_on_mqtt() {
    let (nats, mqtt) = (NatsServer::start(), Mosquitto::start());
    let (sim1, sim2) = (simulator(SUCCESS, 4.0).await, simulator(SUCCESS, 4.0).await);
    let settings = |sim, inst| {
        let mut s = fleet_settings(sim, &nats.url(), inst, "fq");
        s.mqtt.enabled = true;
        s.mqtt.url = mqtt.url();
        s
    };
    let bridges = [FleetBridge::start(settings(&sim1, "gpu1")), FleetBridge::start(settings(&sim2, "gpu2"))];
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "fq", 2, || bridges.iter().map(FleetBridge::log).collect()).await;
    let mut results = mqtt_subscribe(&mqtt, "comfyui/fleet/fq/job/+/result").await;
    let mut requester = MqttRequester::connect(&mqtt).await;
    // Submits reach a bridge only once its shared subscription is in place: each logs its SUBACK.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bridges.iter().all(|b| b.log().contains("fleet: subscribed to the MQTT submit topic")) {
        let logs: Vec<String> = bridges.iter().map(FleetBridge::log).collect();
        assert!(tokio::time::Instant::now() < deadline, "a shared subscription never came; logs:\n{logs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut answered = HashMap::new();
    for n in 0..6 {
        let id = format!("m-{n}");
        let answer = requester.request("comfyui/fleet/fq/queue", job(&id).to_string(), Duration::from_secs(10)).await;
        assert_eq!(answer["status"], "ok", "{answer:#}");
        assert_eq!(answer["data"]["job_id"], id.as_str(), "{answer:#}");
        assert_eq!(answer["data"]["duplicate"], false, "{answer:#}");
        answered.insert(id, answer);
    }
    let again = requester.request("comfyui/fleet/fq/queue", job("m-0").to_string(), Duration::from_secs(10)).await;
    assert_eq!(again["data"]["duplicate"], true, "the same id again is JetStream's duplicate: {again:#}");
    let bad = requester.request("comfyui/fleet/fq/queue", "{\"workflow\": {}}", Duration::from_secs(10)).await;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad:#}");
    requester.expect_silence(Duration::from_millis(500)).await;

    let mut seen = HashMap::new();
    for _ in 0..6 {
        let m = results.expect(|_| true, Duration::from_secs(20)).await;
        let v = common::json(&m.payload);
        assert_eq!(v["state"], "success", "{v:#}");
        *seen.entry(v["id"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
    }
    assert!(seen.keys().all(|k| answered.contains_key(k)) && seen.len() == 6, "{seen:?}");
    assert!(results.next(Duration::from_secs(1)).await.is_none(), "one result per job, the duplicate ran not");
}
