//! The MQTT keep-alive (in a process of its own: it reads the process-wide reconnect counter). A broker that
//! keeps the connection open but answers nothing is given up after two keep-alive intervals without a
//! `PINGRESP`, and connected to anew once it moves again.

mod common;

use std::time::Duration;

use common::daemon::{settings, simulator, Daemon, SUCCESS};
use common::hostile::{free_port, get, metric};
use common::*;

#[tokio::test]
async fn a_broker_that_stops_answering_is_given_up_and_reconnected_to() {
    let broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let (mut s, state) = settings(&sim, Some(&broker), None);
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    s.mqtt.keep_alive_secs = 5;
    let daemon = Daemon::start(s, state);
    until(|| async { get(port, "/readyz").await.0 == 200 }, 10).await;

    broker.freeze(true);
    // Pings at 5 s and 10 s; the second finds the first unanswered.
    let reconnects =
        || async { metric(&get(port, "/metrics").await.1, "comfy_bridge_reconnects_total{component=\"mqtt\"}") };
    until(|| async { reconnects().await >= 1.0 }, 16).await;
    broker.freeze(false);

    until(|| async { get(port, "/readyz").await.0 == 200 }, 15).await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let pid = sim.play("a_success").await.expect("plays");
    results.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), Duration::from_secs(10)).await;
    daemon.stop().await;
}

/// Polls `check` every 100 ms until it holds, for at most `secs` seconds.
async fn until<F: std::future::Future<Output = bool>>(check: impl Fn() -> F, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
