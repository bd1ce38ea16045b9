//! `/healthz`, `/readyz` and `/metrics` on `http.listen`.
//!
//! A deliberately small HTTP/1.1 server: three `GET` routes, one request per connection, bounded reads. The
//! readiness flags are per daemon ([`Health`], set by the tasks that own each connection); the counters are
//! the process-wide ones of [`crate::telemetry`].

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::comfy::tap::TapWatch;
use crate::config::HttpSettings;
use crate::telemetry;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Longest a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection whose state `/readyz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The WebSocket to ComfyUI.
    Comfyui,
    /// The MQTT broker.
    Mqtt,
    /// The NATS server.
    Nats,
}

/// Whether each connection is up. `None` for a bus that is disabled: it does not count against readiness.
#[derive(Debug)]
pub struct Health {
    comfyui: AtomicBool,
    mqtt: Option<AtomicBool>,
    nats: Option<AtomicBool>,
    /// Whether ComfyUI's tap extension is active (reported, never required).
    tap: TapWatch,
}

impl Health {
    /// Everything down, counting MQTT and NATS only where enabled (`mqtt.enabled`, `nats.enabled`); the tap
    /// as `tap` says.
    pub fn new(mqtt_enabled: bool, nats_enabled: bool, tap: TapWatch) -> Arc<Self> {
        Arc::new(Self {
            comfyui: AtomicBool::new(false),
            mqtt: mqtt_enabled.then(|| AtomicBool::new(false)),
            nats: nats_enabled.then(|| AtomicBool::new(false)),
            tap,
        })
    }

    /// Records that `part` went up or down.
    pub fn set(&self, part: Part, up: bool) {
        let flag = match part {
            Part::Comfyui => Some(&self.comfyui),
            Part::Mqtt => self.mqtt.as_ref(),
            Part::Nats => self.nats.as_ref(),
        };
        if let Some(flag) = flag {
            flag.store(up, Relaxed);
        }
    }

    /// Ready when ComfyUI and every enabled bus are connected; the body says which are not, and whether the tap
    /// is `active` or `absent` (it does not count towards readiness).
    pub fn readiness(&self) -> (bool, Value) {
        let state = |flag: Option<&AtomicBool>| match flag {
            Some(f) if f.load(Relaxed) => "connected",
            Some(_) => "disconnected",
            None => "disabled",
        };
        let parts = [
            ("comfyui", state(Some(&self.comfyui))),
            ("mqtt", state(self.mqtt.as_ref())),
            ("nats", state(self.nats.as_ref())),
        ];
        let ready = parts.iter().all(|(_, s)| *s != "disconnected");
        let mut body = json!({ "ready": ready });
        for (name, s) in parts {
            body[name] = json!(s);
        }
        body["tap"] = json!(if self.tap.version().is_some() { "active" } else { "absent" });
        (ready, body)
    }
}

/// Binds `http.listen`; `None` when it is unset (disabled).
pub async fn bind(http: &HttpSettings) -> std::io::Result<Option<TcpListener>> {
    match http.listen.as_deref() {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr).await.map(Some),
    }
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "health and metrics listening");
    }
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(READ_TIMEOUT, answer(stream, &health)).await {
                debug!(error = %e, "health request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, health: &Health) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            let (ready, body) = health.readiness();
            let status = if ready { "200 OK" } else { "503 Service Unavailable" };
            (status, "application/json", body.to_string())
        }
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            telemetry::render_metrics() + &crate::comfy::tap::render_metrics() + &crate::flow::render_metrics(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn ready_only_when_comfyui_and_every_enabled_bus_are_connected() {
        let mut settings = Settings::default();
        settings.nats.enabled = false;
        let (tap_tx, tap) = crate::comfy::tap::channel();
        let health = Health::new(settings.mqtt.enabled, settings.nats.enabled, tap);
        assert_eq!(
            health.readiness().1,
            json!({"ready": false, "comfyui": "disconnected", "mqtt": "disconnected", "nats": "disabled", "tap": "absent"})
        );
        tap_tx.feature_flags(Some("0.1.0".into()));
        assert_eq!(health.readiness().1["tap"], "active");
        tap_tx.disconnected();
        assert_eq!(health.readiness().1["tap"], "absent");
        health.set(Part::Comfyui, true);
        health.set(Part::Nats, true);
        assert!(!health.readiness().0, "mqtt still down");
        health.set(Part::Mqtt, true);
        assert!(health.readiness().0);
        health.set(Part::Comfyui, false);
        assert_eq!(health.readiness().1["comfyui"], "disconnected");
    }
}
