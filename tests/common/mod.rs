//! Test harness: real brokers on ephemeral loopback ports, subscribers that time out with a useful message,
//! and the bridge under test.
#![allow(dead_code, unused_imports)]

pub mod brokers;
pub mod daemon;
pub mod fixtures;
pub mod fleet;
pub mod hostile;
pub mod probe;
pub mod requester;
pub mod subscribers;

pub use brokers::{Mosquitto, NatsCluster, NatsServer, Outage, PlainNatsServer};
pub use fixtures::{json, workflow};
pub use subscribers::{
    mqtt_publish, mqtt_subscribe, mqtt_subscribe_persistent, nats_subscribe, MqttMsg, MqttSub, NatsMsg, NatsSub,
};
