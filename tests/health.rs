//! `/healthz`, `/readyz` and `/metrics`, as a probe or Prometheus sees them.

mod common;

use std::time::Duration;

use common::daemon::{settings, simulator, Daemon, ALL};
use common::requester::nats_client;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until `pred` holds; panics with the last answer after `WAIT`.
async fn until(url: &str, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(url).await;
        if pred(status, &body) {
            return (status, body);
        }
        assert!(tokio::time::Instant::now() < deadline, "{url}: last answer {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A probe sees the bridge alive, ready only while ComfyUI and both buses are connected, and which one is not;
/// Prometheus sees events by type and requests by command and outcome.
#[tokio::test]
async fn readiness_follows_the_connections_and_metrics_count_events_and_requests() {
    let mut broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let (mut s, state) = settings(&sim, Some(&broker), Some(&nats));
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let base = format!("http://127.0.0.1:{port}");
    let daemon = Daemon::start(s, state);

    assert_eq!(until(&format!("{base}/healthz"), |s, _| s == 200).await.1, "ok\n");
    let (_, body) = until(&format!("{base}/readyz"), |s, _| s == 200).await;
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        ready,
        serde_json::json!({
            "ready": true, "comfyui": "connected", "mqtt": "connected", "nats": "connected", "tap": "absent",
        })
    );
    assert_eq!(get(&format!("{base}/nope")).await.0, 404);

    sim.play("a_success").await.expect("plays");
    let client = nats_client(&nats).await;
    // The request subscription follows the connection by a moment: until then NATS has no responder.
    for _ in 0..50 {
        let ask = client.request("comfyui.local.request.status".to_string(), "{}".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), ask).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = until(&format!("{base}/metrics"), |_, m| m.contains(r#"command="status",outcome="ok""#)).await;
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
    };
    assert!(value(r#"comfy_bridge_events_received_total{type="progress"}"#) >= 4.0);
    assert!(value(r#"comfy_bridge_messages_published_total{bus="mqtt"}"#) > 0.0);
    assert!(value(r#"comfy_bridge_request_duration_seconds_count{command="status"}"#) >= 1.0);
    assert!(metrics.contains("# TYPE comfy_bridge_outbox_depth gauge"));

    broker.stop();
    let (status, body) = until(&format!("{base}/readyz"), |s, _| s == 503).await;
    assert_eq!(status, 503);
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((ready["mqtt"].as_str(), ready["nats"].as_str()), (Some("disconnected"), Some("connected")));
    broker.resume();
    until(&format!("{base}/readyz"), |s, _| s == 200).await;
    daemon.stop().await;
}
