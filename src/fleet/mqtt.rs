//! The fleet on MQTT: a connection of its own (MQTT v5) that takes submits on `<base>/fleet/<fleet>/queue`
//! through the shared subscription `$share/<fleet>/…` (each submit reaches one bridge, which puts it into the
//! stream and answers with the job id), and carries the job records of the jobs this bridge runs on
//! `<base>/fleet/<fleet>/job/<id>/state` and `/result`.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{Config, FleetError, Names};

/// Connects (in the background, reconnecting) and spawns the loop; the client to publish job records with.
pub(crate) fn start(
    config: &Config,
    js: jetstream::Context,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<AsyncClient, FleetError> {
    let cfg = &config.mqtt;
    let (host, port, tls) =
        crate::config::mqtt_endpoint(&cfg.url).ok_or_else(|| FleetError::MqttUrl(cfg.url.clone()))?;
    let base_id = cfg.client_id.clone().unwrap_or_else(|| format!("comfy-bridge-{}", config.instance));
    let mut opts = MqttOptions::new(format!("{base_id}-fleet"), host, port);
    if tls {
        let config = crate::tls::client_config(
            cfg.ca_file.as_deref(),
            cfg.client_cert_file.as_deref(),
            cfg.client_key_file.as_deref(),
        )?;
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config)));
    }
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
        .set_clean_start(true)
        .set_max_packet_size(Some(u32::try_from(cfg.max_packet_bytes).unwrap_or(u32::MAX)))
        .set_outgoing_inflight_upper_limit(64);
    if let Some(user) = &cfg.username {
        opts.set_credentials(user, cfg.password.as_ref().map_or("", |p| p.expose()));
    }
    let (client, eventloop) = AsyncClient::new(opts, 256);
    let names = Names::new(config);
    let looped = Loop {
        client: client.clone(),
        js,
        names,
        base: cfg.base_topic.clone(),
        share: config.fleet.name.clone(),
        backoff: Duration::from_millis(config.comfyui.reconnect_max_ms.clamp(100, 5_000)),
    };
    tasks.spawn(looped.run(eventloop, tasks.clone(), shutdown));
    Ok(client)
}

struct Loop {
    client: AsyncClient,
    js: jetstream::Context,
    names: Names,
    base: String,
    /// `fleet.name`: the shared subscription's group.
    share: String,
    /// How long to wait after a connection error (`comfyui.reconnect_max_ms`, 100 ms to 5 s).
    backoff: Duration,
}

impl Loop {
    async fn run(self, mut eventloop: rumqttc::v5::EventLoop, tasks: TaskTracker, shutdown: CancellationToken) {
        let queue_topic = format!("{}/queue", self.names.fleet_topic);
        let filter = format!("$share/{}/{queue_topic}", self.share);
        let backoff = self.backoff;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.client.disconnect().await;
                    return;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Err(e) = self.client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        warn!(error = %e, "fleet: cannot subscribe to the MQTT submit topic");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => debug!("fleet: subscribed to the MQTT submit topic"),
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == queue_topic.as_bytes() && !p.retain => {
                    let (client, js, names, base) =
                        (self.client.clone(), self.js.clone(), self.names.clone(), self.base.clone());
                    tasks.spawn(async move { submit(client, js, names, base, p.payload, p.properties).await });
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "fleet: MQTT connection");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

/// Puts one MQTT submit into the stream and answers it.
async fn submit(
    client: AsyncClient,
    js: jetstream::Context,
    names: Names,
    base: String,
    payload: Bytes,
    properties: Option<PublishProperties>,
) {
    let id = serde_json::from_slice::<Value>(&payload).ok().and_then(|v| v.get("id")?.as_str().map(str::to_string));
    let answer = match &id {
        None => error(None, "invalid_request", "a fleet job needs `id` (a string) in a JSON object"),
        Some(id) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            match js.publish_with_headers(names.queue_subject.clone(), headers, payload).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => json!({"id": id, "status": "ok", "data": {
                        "job_id": id, "stream_sequence": ack.sequence, "duplicate": ack.duplicate,
                    }}),
                    Err(e) => error(Some(id), "unavailable", &format!("the fleet's stream did not take it: {e}")),
                },
                Err(e) => error(Some(id), "unavailable", &format!("the fleet's stream did not take it: {e}")),
            }
        }
    };
    let (topic, correlation) = reply_to(&names, &base, properties);
    let props = PublishProperties { correlation_data: correlation, ..Default::default() };
    let body = Bytes::from(answer.to_string());
    if let Err(e) = client.publish_with_properties(topic, QoS::AtLeastOnce, false, body, props).await {
        warn!(error = %e, "fleet: cannot answer an MQTT submit");
    }
}

fn error(id: Option<&str>, code: &str, message: &str) -> Value {
    json!({"id": id, "status": "error", "error": {"code": code, "message": message}})
}

/// The requester's response topic if it is one a bridge may publish to (not inside `<base>/`, not `$…`,
/// no wildcards), else `<base>/fleet/<fleet>/response/queue`; and the correlation data to echo.
fn reply_to(names: &Names, base: &str, properties: Option<PublishProperties>) -> (String, Option<Bytes>) {
    let fallback = format!("{}/response/queue", names.fleet_topic);
    let Some(p) = properties else { return (fallback, None) };
    let usable = |t: &str| {
        !t.is_empty()
            && !t.starts_with('$')
            && !t.starts_with(&format!("{base}/"))
            && t != base
            && !t.contains(['+', '#', '\0'])
            && t.len() <= 1024
    };
    match p.response_topic {
        Some(t) if usable(&t) => (t, p.correlation_data),
        _ => (fallback, p.correlation_data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_to_a_safe_response_topic_or_the_fleets_own() {
        let names = Names::new(&Config::from(&crate::config::Settings::default()));
        let with = |t: &str| Some(PublishProperties { response_topic: Some(t.into()), ..Default::default() });
        assert_eq!(reply_to(&names, "comfyui", with("clients/me")).0, "clients/me");
        for bad in ["comfyui/local/status", "$SYS/x", "a/+/b", ""] {
            assert_eq!(reply_to(&names, "comfyui", with(bad)).0, "comfyui/fleet/default/response/queue", "{bad}");
        }
        assert_eq!(reply_to(&names, "comfyui", None).0, "comfyui/fleet/default/response/queue");
    }
}
