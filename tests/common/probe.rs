//! Probes of a running bridge: its `/metrics` as Prometheus reads it, its tap on `/readyz`, and readiness of
//! its NATS requests.

use std::time::Duration;

/// How long a probe waits for what it is looking for.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// A port nothing listens on right now, for `http.listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `/metrics` on `port`, polled until `pred` holds; panics with the last body after ten seconds.
pub async fn metrics_until(port: u16, pred: impl Fn(&str) -> bool) -> String {
    body_until(&format!("http://127.0.0.1:{port}/metrics"), pred).await
}

/// `/readyz` on `port`, polled until the bridge says the tap extension is active (`"tap":"active"`: its
/// WebSocket got the extension's hello); panics with the last body after ten seconds.
pub async fn tap_active(port: u16) {
    body_until(&format!("http://127.0.0.1:{port}/readyz"), |body| body.contains(r#""tap":"active""#)).await;
}

/// The body of `url`, polled until `pred` holds for it; panics with the last body after ten seconds.
async fn body_until(url: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PROBE_WAIT;
    loop {
        let body = match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if pred(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{url}: last answer\n{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample named exactly `series` (name and labels), 0 when absent.
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the bridge answers a `status` request on `<prefix>.request.status` (its subscription may take a
/// moment after it connects).
pub async fn nats_ready(client: &async_nats::Client, prefix: &str) {
    let subject = format!("{prefix}.request.status");
    let deadline = tokio::time::Instant::now() + PROBE_WAIT;
    while tokio::time::Instant::now() < deadline {
        let reply = tokio::time::timeout(Duration::from_millis(200), client.request(subject.clone(), "{}".into()));
        if let Ok(Ok(_)) = reply.await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the bridge never answered on {subject}");
}
