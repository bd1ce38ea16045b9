//! Subscribers that collect what real brokers deliver; every wait is bounded and fails with what was seen.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use super::{Mosquitto, NatsServer};

/// One MQTT message as a subscriber saw it.
#[derive(Debug, Clone)]
pub struct MqttMsg {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retain flag as delivered (set only for retained messages sent on subscribe).
    pub retain: bool,
    /// QoS as delivered.
    pub qos: u8,
}

/// One NATS message.
#[derive(Debug, Clone)]
pub struct NatsMsg {
    /// Subject.
    pub subject: String,
    /// Payload.
    pub payload: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The reply subject, when the message asks for one.
    pub reply: Option<String>,
}

/// A stream of messages with bounded waits.
pub struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<T>,
    seen: Vec<String>,
    describe: fn(&T) -> String,
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

/// MQTT subscriber.
pub type MqttSub = Inbox<MqttMsg>;
/// NATS subscriber.
pub type NatsSub = Inbox<NatsMsg>;

impl<T> Inbox<T> {
    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<T> {
        let msg = tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()?;
        self.seen.push((self.describe)(&msg));
        Some(msg)
    }

    /// A message that has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<T> {
        let msg = self.rx.try_recv().ok()?;
        self.seen.push((self.describe)(&msg));
        Some(msg)
    }

    /// The first message matching `pred`; panics with everything seen if none arrives within `timeout`.
    pub async fn expect(&mut self, pred: impl Fn(&T) -> bool, timeout: Duration) -> T {
        self.collect_until(pred, timeout).await.pop().expect("collect_until returns the match last")
    }

    /// Every message up to and including the first one matching `pred`.
    pub async fn collect_until(&mut self, pred: impl Fn(&T) -> bool, timeout: Duration) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(msg) => {
                    let done = pred(&msg);
                    out.push(msg);
                    if done {
                        return out;
                    }
                }
                None => panic!("no matching message within {timeout:?}; seen so far:\n{}", self.seen.join("\n")),
            }
        }
    }
}

/// A fresh v5 client subscribed (QoS 1) to `filter`, with every message it receives converted by `convert` and
/// sent to the returned channel; returns once the broker acknowledged the subscription.
pub async fn subscribe_v5<T: Send + 'static>(
    broker: &Mosquitto,
    id: String,
    filter: &str,
    convert: fn(rumqttc::v5::mqttbytes::v5::Publish) -> T,
) -> (AsyncClient, mpsc::UnboundedReceiver<T>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", broker.port);
    // A large receive maximum: with mosquitto's default of 20 QoS-1 messages in flight, QoS-0 messages overtake
    // the waiting QoS-1 ones and a subscriber sees the two classes interleaved out of order.
    opts.set_max_packet_size(Some(32 * 1024 * 1024)).set_receive_maximum(Some(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("queue subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(convert(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx).await.expect("suback in time").expect("suback");
    (client, rx)
}

/// Subscribes (QoS 1) to `filter` with a fresh v5 client; returns once the broker acknowledged it.
pub async fn mqtt_subscribe(broker: &Mosquitto, filter: &str) -> MqttSub {
    let id = format!("test-sub-{}", fastrand::u64(..));
    let (client, rx) = subscribe_v5(broker, id, filter, |p| MqttMsg {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload,
        retain: p.retain,
        qos: p.qos as u8,
    })
    .await;
    Inbox {
        rx,
        seen: Vec::new(),
        describe: |m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload[..m.payload.len().min(120)])),
        _keep: Some(Box::new(client)),
    }
}

/// Publishes one QoS-1 message and waits for the broker's acknowledgement.
pub async fn mqtt_publish(broker: &Mosquitto, topic: &str, payload: &[u8], retain: bool) {
    let mut opts = MqttOptions::new(format!("test-pub-{}", fastrand::u64(..)), "127.0.0.1", broker.port);
    opts.set_max_packet_size(Some(32 * 1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).await.expect("queue publish");
    let acked = async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked).await.expect("puback in time");
}

/// Subscribes to `subject`; returns once the server has the subscription.
pub async fn nats_subscribe(server: &NatsServer, subject: &str) -> NatsSub {
    let client = async_nats::connect(server.url()).await.expect("nats connect");
    let mut sub = client.subscribe(subject.to_string()).await.expect("subscribe");
    nats_round_trip(&client).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let headers = m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect();
            let reply = m.reply.map(|r| r.to_string());
            if tx.send(NatsMsg { subject: m.subject.to_string(), payload: m.payload, headers, reply }).is_err() {
                return;
            }
        }
    });
    Inbox {
        rx,
        seen: Vec::new(),
        describe: |m| format!("{} {}", m.subject, String::from_utf8_lossy(&m.payload[..m.payload.len().min(120)])),
        _keep: Some(Box::new(client)),
    }
}

/// Waits until the server has processed everything `client` sent before (its subscriptions included), so
/// nothing published after this returns is missed: `flush` only writes the socket, but a message to a
/// private subject the client subscribes to comes back after everything it sent earlier.
pub async fn nats_round_trip(client: &async_nats::Client) {
    let subject = format!("_TEST.sync.{:016x}", fastrand::u64(..));
    let mut echo = client.subscribe(subject.clone()).await.expect("subscribe");
    client.publish(subject, Bytes::new()).await.expect("publish");
    let back = tokio::time::timeout(Duration::from_secs(10), echo.next()).await;
    back.expect("nats round trip in time").expect("subscription open");
}

/// A v3.1.1 subscriber with a persistent session (`clean_session = false`) that reconnects by itself: with a
/// persistent broker it misses no QoS-1 message, even across a broker restart.
pub async fn mqtt_subscribe_persistent(broker: &Mosquitto, filter: &str) -> MqttSub {
    let id = format!("test-persistent-{}", fastrand::u64(..));
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.port);
    opts.set_clean_session(false).set_max_packet_size(32 * 1024 * 1024, 32 * 1024 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.expect("queue subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let msg = MqttMsg {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        retain: p.retain,
                        qos: p.qos as u8,
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx).await.expect("suback in time").expect("suback");
    Inbox {
        rx,
        seen: Vec::new(),
        describe: |m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload[..m.payload.len().min(120)])),
        _keep: Some(Box::new(client)),
    }
}
