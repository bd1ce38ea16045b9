//! The fleet: many bridges, each beside its own ComfyUI, as one on NATS JetStream (README "Fleet").
//!
//! Submitters put `queue` requests into one work-queue stream; every bridge of the fleet pulls from one
//! shared durable consumer, but only while its ComfyUI is reachable and has room (`fleet.capacity`). A job is
//! claimed in a KV bucket (create-if-absent, or a revision-checked update), then sent as a `queue` request
//! to the bridge's own request subject, like any client would, and followed on the instance's `state` and
//! `result` subjects (matched by `request_id` = the job id, or by prompt id). The message stays alive with
//! in-progress acks while ComfyUI works on it and is acked when the prompt ends; a bridge that dies stops
//! acking and the job is redelivered to another. The worker has its own NATS connection and touches nothing
//! on the event path.
//!
//! * [`job`]: the job record and its states (pure).
//! * [`dispatch`]: room and the claim decision for a delivered job (pure).
//! * [`task`]: the worker loop, the job tasks, the heartbeat and resume on restart.
//! * [`commands`]: the fleet's own requests, `status` and `cancel`.
//! * `mqtt`: submits over MQTT (a shared subscription) and the job records on MQTT.

pub mod commands;
pub mod dispatch;
pub mod job;
mod mqtt;
pub mod task;

use std::time::Duration;

use crate::bus::topics;
use crate::config::{ComfySettings, FleetSettings, MqttSettings, NatsSettings};

/// Why the fleet worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Its NATS connection could not be set up.
    #[error("fleet: {0}")]
    Nats(#[from] crate::bus::nats::NatsError),
    /// Its ComfyUI client could not be built.
    #[error("fleet: {0}")]
    Http(#[from] crate::comfy::http::HttpError),
    /// `mqtt.url` is not an MQTT URL.
    #[error("fleet: mqtt.url `{0}` is not mqtt://host[:port]")]
    MqttUrl(String),
    /// The TLS files for MQTT could not be used.
    #[error("fleet: mqtt tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What the fleet worker uses of the configuration (`app` builds it from `Settings`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `[fleet]`.
    pub fleet: FleetSettings,
    /// `bridge.instance`: this worker's name, and the bridge it sends jobs to.
    pub instance: String,
    /// `[nats]`: the worker's own connection, and the subject prefix.
    pub nats: NatsSettings,
    /// `[mqtt]`: the worker's own MQTT connection when `mqtt.enabled`, and the topic base.
    pub mqtt: MqttSettings,
    /// `[comfyui]`: the worker's own HTTP client, and the request timeout.
    pub comfyui: ComfySettings,
    /// `commands.max_payload_bytes`: the largest job the stream takes.
    pub max_payload_bytes: usize,
}

/// Every name the fleet uses, derived from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `COMFY_FLEET_<FLEET>`: the work-queue stream.
    pub stream: String,
    /// The one durable pull consumer all bridges share.
    pub consumer: String,
    /// `COMFY_FLEET_<FLEET>_JOBS`: job records by job id.
    pub jobs_bucket: String,
    /// `COMFY_FLEET_<FLEET>_BRIDGES`: one heartbeat per live bridge.
    pub bridges_bucket: String,
    /// `<prefix>.fleet.<fleet>.queue`: where jobs are submitted.
    pub queue_subject: String,
    /// `<prefix>.fleet.<fleet>`: the fleet's subjects.
    pub fleet_subject: String,
    /// `<base>/fleet/<fleet>`: the fleet's MQTT topics.
    pub fleet_topic: String,
    /// `<prefix>.<inst>`: this bridge's own subjects.
    pub instance_subject: String,
}

impl Names {
    /// The names for `config`.
    pub fn new(config: &Config) -> Self {
        let fleet = &config.fleet.name;
        let upper = fleet.to_uppercase();
        let prefix = &config.nats.subject_prefix;
        let fleet_subject = format!("{prefix}.fleet.{fleet}");
        Self {
            stream: format!("COMFY_FLEET_{upper}"),
            consumer: "workers".into(),
            jobs_bucket: format!("COMFY_FLEET_{upper}_JOBS"),
            bridges_bucket: format!("COMFY_FLEET_{upper}_BRIDGES"),
            queue_subject: format!("{fleet_subject}.queue"),
            fleet_topic: format!("{}/fleet/{fleet}", config.mqtt.base_topic),
            fleet_subject,
            instance_subject: format!("{prefix}.{}", config.instance),
        }
    }

    /// `<prefix>.fleet.<fleet>.job.<id>.<last>` (`state` or `result`), the id escaped like any level.
    pub fn job_subject(&self, id: &str, last: &str) -> String {
        format!("{}.job.{}.{last}", self.fleet_subject, topics::escape(id))
    }

    /// `<base>/fleet/<fleet>/job/<id>/<last>` on MQTT.
    pub fn job_topic(&self, id: &str, last: &str) -> String {
        format!("{}/job/{}/{last}", self.fleet_topic, topics::escape(id))
    }

    /// `<prefix>.<inst>.request.<command>` of bridge `instance`.
    pub fn request_subject(prefix: &str, instance: &str, command: &str) -> String {
        format!("{prefix}.{instance}.request.{command}")
    }
}

/// Timing derived from `fleet.ack_wait_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `fleet.ack_wait_ms`.
    pub ack_wait: Duration,
    /// How often a job's message gets an in-progress ack (a third of `ack_wait`).
    pub progress: Duration,
    /// How often the bridge heartbeats (a quarter of `ack_wait`, 200 ms to 5 s); it counts as gone after
    /// three missed beats.
    pub heartbeat: Duration,
}

impl Timing {
    /// The timing for `fleet.ack_wait_ms`.
    pub fn new(fleet: &FleetSettings) -> Self {
        let ack_wait = Duration::from_millis(fleet.ack_wait_ms);
        let heartbeat = (ack_wait / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        Self { ack_wait, progress: ack_wait / 3, heartbeat }
    }
}

pub use task::spawn;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn names_follow_the_contract() {
        let mut s = Settings::default();
        s.fleet.name = "gpus".into();
        s.bridge.instance = "box1".into();
        let n = Names::new(&Config::from(&s));
        assert_eq!(n.stream, "COMFY_FLEET_GPUS");
        assert_eq!(n.jobs_bucket, "COMFY_FLEET_GPUS_JOBS");
        assert_eq!(n.queue_subject, "comfyui.fleet.gpus.queue");
        assert_eq!(n.job_subject("a.b", "state"), "comfyui.fleet.gpus.job.a=2Eb.state");
        assert_eq!(n.job_topic("a/b", "result"), "comfyui/fleet/gpus/job/a=2Fb/result");
        assert_eq!(Names::request_subject("comfyui", "box1", "queue"), "comfyui.box1.request.queue");
        let t = Timing::new(&Config::from(&s).fleet);
        assert_eq!((t.progress, t.heartbeat), (Duration::from_secs(20), Duration::from_secs(5)));
    }
}
