//! The rumqttc client of either protocol version behind one face.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tracing::warn;

/// The two protocol versions' clients behind one face.
#[derive(Clone)]
pub(super) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// What a publish carries besides topic and payload.
pub(super) struct Extras {
    pub(super) qos: u8,
    pub(super) retain: bool,
    /// MQTT v5 correlation data.
    pub(super) correlation: Option<Bytes>,
    /// MQTT v5 message expiry, in seconds.
    pub(super) expiry: Option<u32>,
    /// MQTT v5 response topic.
    pub(super) response_topic: Option<String>,
}

impl Client {
    pub(super) fn try_publish(&self, topic: String, payload: Bytes, extras: Extras) -> bool {
        let Extras { qos, retain, correlation, expiry, response_topic } = extras;
        match self {
            Self::V5(c) if correlation.is_some() || expiry.is_some() || response_topic.is_some() => {
                let properties = PublishProperties {
                    correlation_data: correlation,
                    message_expiry_interval: expiry,
                    response_topic,
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, v5_qos(qos), retain, payload, properties).is_ok()
            }
            Self::V5(c) => c.try_publish(topic, v5_qos(qos), retain, payload).is_ok(),
            Self::V311(c) => c.try_publish(topic, v3_qos(qos), retain, payload.to_vec()).is_ok(),
        }
    }

    /// Subscribes to the request topics (again: every connection starts clean).
    pub(super) fn subscribe(&self, filter: &str) {
        let result = match self {
            Self::V5(c) => c.try_subscribe(filter, v5_qos(1)).map_err(|e| e.to_string()),
            Self::V311(c) => c.try_subscribe(filter, v3_qos(1)).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            warn!(filter, error = %e, "cannot subscribe to the request topics");
        }
    }

    /// Asks for a clean DISCONNECT without waiting (a full request channel means the broker is gone anyway).
    pub(super) fn disconnect(&self) {
        let _ = match self {
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

pub(super) fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    if qos == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

pub(super) fn v3_qos(qos: u8) -> rumqttc::QoS {
    if qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}
