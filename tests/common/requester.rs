//! Clients that send requests to the bridge the way users do: MQTT v5 with a response topic and correlation
//! data, MQTT v3.1.1 (responses on the fallback topic), and NATS request-reply.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Mosquitto, NatsServer};

/// A response as an MQTT v5 requester receives it.
#[derive(Debug, Clone)]
pub struct MqttResponse {
    /// Topic it arrived on.
    pub topic: String,
    /// Correlation data echoed back.
    pub correlation: Option<Bytes>,
    /// The response object.
    pub body: Value,
}

/// An MQTT v5 client that sends requests with a response topic of its own.
pub struct MqttRequester {
    client: AsyncClient,
    responses: mpsc::UnboundedReceiver<MqttResponse>,
    /// Where this requester asks for responses.
    pub response_topic: String,
}

impl MqttRequester {
    /// Connects and subscribes to a private response topic.
    pub async fn connect(broker: &Mosquitto) -> Self {
        let id = format!("test-req-{}", fastrand::u64(..));
        let response_topic = format!("clients/{id}/responses");
        let (client, rx) = super::subscribers::subscribe_v5(broker, id, &response_topic, |p| MqttResponse {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            correlation: p.properties.and_then(|pr| pr.correlation_data),
            body: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
        })
        .await;
        Self { client, responses: rx, response_topic }
    }

    /// Publishes `payload` on `topic` with this requester's response topic and `correlation`.
    pub async fn send(&self, topic: &str, payload: impl Into<Bytes>, correlation: &[u8]) {
        let properties = PublishProperties {
            response_topic: Some(self.response_topic.clone()),
            correlation_data: Some(Bytes::copy_from_slice(correlation)),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), properties)
            .await
            .expect("queue publish");
    }

    /// The next response, or a panic after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> MqttResponse {
        tokio::time::timeout(timeout, self.responses.recv()).await.expect("a response in time").expect("open")
    }

    /// Sends and waits for the response carrying the same correlation data.
    pub async fn request(&mut self, topic: &str, payload: impl Into<Bytes>, timeout: Duration) -> Value {
        let correlation = format!("corr-{}", fastrand::u64(..));
        self.send(topic, payload, correlation.as_bytes()).await;
        loop {
            let response = self.next(timeout).await;
            if response.correlation.as_deref() == Some(correlation.as_bytes()) {
                return response.body;
            }
        }
    }

    /// No response within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(wait, self.responses.recv()).await {
            panic!("unexpected response: {r:?}");
        }
    }
}

/// A NATS request-reply round trip; the response object.
pub async fn nats_request(client: &async_nats::Client, subject: &str, payload: impl Into<Bytes>) -> Value {
    let reply = tokio::time::timeout(Duration::from_secs(10), client.request(subject.to_string(), payload.into()))
        .await
        .expect("a reply in time")
        .expect("request");
    serde_json::from_slice(&reply.payload).unwrap_or(Value::Null)
}

/// A NATS request, sent again every 100 ms while the bridge has not subscribed yet ("no responders"), for up
/// to ten seconds; the response object.
pub async fn nats_request_until_subscribed(client: &async_nats::Client, subject: &str, payload: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let request = client.request(subject.to_string(), payload.to_string().into());
        if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(1), request).await {
            return serde_json::from_slice(&answer.payload).unwrap_or(Value::Null);
        }
        assert!(tokio::time::Instant::now() < deadline, "no answer on {subject}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A NATS client for requests.
pub async fn nats_client(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url()).await.expect("nats connect")
}

/// Publishes one QoS-1 message with a v3.1.1 client and waits for the broker's acknowledgement.
pub async fn mqtt311_publish(port: u16, topic: &str, payload: &[u8], retain: bool) {
    let mut opts = rumqttc::MqttOptions::new(format!("test-311-{}", fastrand::u64(..)), "127.0.0.1", port);
    opts.set_max_packet_size(32 * 1024 * 1024, 32 * 1024 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    client.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.to_vec()).await.expect("queue publish");
    let acked = async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked).await.expect("puback in time");
}
