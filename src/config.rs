//! Settings: compiled defaults, then a TOML file, then `COMFY_BRIDGE__SECTION__KEY` environment variables.
//!
//! Every field is documented because `config/default.toml` and the README reference mirror it; a test parses
//! `config/default.toml` and checks it equals the compiled defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "COMFY_BRIDGE";

/// Room an MQTT request packet needs besides its payload: fixed header, topic, packet id and properties
/// (response topic, correlation data). `commands.max_payload_bytes` plus this must fit `mqtt.max_packet_bytes`,
/// so that a request over the command limit still reaches the bridge and is answered `payload_too_large`.
pub const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, an environment variable or a value could not be read or has the wrong type or name.
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    /// A value parsed but breaks a rule.
    #[error("{}invalid value for `{key}`: {reason}", var.as_ref().map(|v| format!("{v}: ")).unwrap_or_default())]
    Invalid {
        /// The dotted key, e.g. `mqtt.protocol`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
        /// The environment variable that set it, if one did.
        var: Option<String>,
    },
    /// An environment variable names no setting, or its value has the wrong type.
    #[error("{var}: {reason}")]
    Env {
        /// The variable, e.g. `COMFY_BRIDGE__MQTT__URL`.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A string that never shows up in logs or printed configuration.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// `value`, kept out of logs.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `mqtt.protocol`: the MQTT version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum MqttProtocol {
    /// MQTT 5 (`v5`): response topics, correlation data, message expiry.
    #[default]
    #[serde(rename = "v5")]
    V5,
    /// MQTT 3.1.1 (`v311`), for older brokers and clients.
    #[serde(rename = "v311")]
    V311,
}

/// `bridge.log_format`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (`text`).
    #[default]
    Text,
    /// One JSON object per line (`json`).
    Json,
}

/// The keys whose values form a closed set, and what the error for any other value says.
const CHOICES: &[(&str, &str)] =
    &[("mqtt.protocol", "must be `v5` or `v311`"), ("bridge.log_format", "must be `text` or `json`")];

/// `""` means unset, in the file and in the environment, as it always has: an `Option` field with
/// `#[serde(with = "empty_is_none")]` reads `""` as `None`, and prints `None` as `""` so `check` shows every key.
mod empty_is_none {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
    }

    pub fn serialize<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.as_deref().unwrap_or_default())
    }
}

/// The whole configuration tree.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The bridge process itself.
    pub bridge: BridgeSettings,
    /// The ComfyUI server.
    pub comfyui: ComfySettings,
    /// The MQTT broker.
    pub mqtt: MqttSettings,
    /// The NATS server.
    pub nats: NatsSettings,
    /// Binary preview frames.
    pub previews: PreviewSettings,
    /// The command plane (requests from the buses).
    pub commands: CommandSettings,
    /// Persistent state.
    pub state: StateSettings,
    /// Health and metrics endpoint.
    pub http: HttpSettings,
    /// Home Assistant MQTT discovery.
    pub homeassistant: HomeAssistantSettings,
    /// Many bridges as one fleet on NATS JetStream.
    pub fleet: FleetSettings,
}

/// `[bridge]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeSettings {
    /// Instance name: the level after the base topic, so several ComfyUI servers can share one broker.
    pub instance: String,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// How long shutdown may take to drain in-flight publishes, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Messages each bus keeps while its broker is away; progress and previews are dropped first.
    pub outbox_capacity: usize,
    /// Bytes each bus keeps while its broker is away (payloads, topics and a small overhead per message);
    /// progress and previews are dropped first, then the oldest lifecycle events.
    pub outbox_max_bytes: usize,
    /// Threads the daemon's tasks run on; 0 is one per core (the default), 1 keeps everything on one thread.
    pub threads: usize,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            instance: "local".into(),
            log: "info".into(),
            log_format: LogFormat::Text,
            shutdown_grace_ms: 5_000,
            outbox_capacity: 10_000,
            outbox_max_bytes: 64 * 1024 * 1024,
            threads: 0,
        }
    }
}

/// `[comfyui]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ComfySettings {
    /// Base URL of ComfyUI's HTTP API; the WebSocket URL is derived from it (`http` -> `ws`, `https` -> `wss`).
    pub url: String,
    /// Base URL that subscribers can reach, used in `/view` links; unset (or empty) means `url`.
    #[serde(with = "empty_is_none")]
    pub public_url: Option<String>,
    /// WebSocket client id; unset (or empty) means a random id generated once and kept in `state.dir`.
    #[serde(with = "empty_is_none")]
    pub client_id: Option<String>,
    /// Extra HTTP headers for every request and the WebSocket handshake (e.g. `Authorization`).
    pub headers: BTreeMap<String, Secret>,
    /// Upper bound of the reconnect backoff, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Interval of WebSocket pings; a connection that does not answer within two intervals is dropped.
    pub ping_interval_ms: u64,
    /// A socket counts as deaf when one of the bridge's prompts runs and broadcasts keep coming, but nothing
    /// addressed to the bridge has for this long (ComfyUI issue 16010); it is replaced by a fresh one. 0: off.
    pub deaf_after_ms: u64,
    /// Longest an HTTP request to ComfyUI may take, in milliseconds (uploads get four times as long).
    pub request_timeout_ms: u64,
    /// PEM file of the CA that signed an `https` ComfyUI's (or its proxy's) certificate; unset: public roots.
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<String>,
    /// Longest body read from any HTTP answer of ComfyUI, in bytes; a longer one fails that call. The default,
    /// 32 MiB, holds `GET /history?max_items=32` of large workflows and a queue of about a hundred of them,
    /// while the parsed JSON of a capped body (several times its size) stays in the low hundreds of megabytes.
    pub max_body_bytes: u64,
}

impl ComfySettings {
    /// ComfyUI's base URL without a trailing slash.
    pub fn base(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The URL `/view` links are built on.
    pub fn public_base(&self) -> &str {
        match self.public_url.as_deref().map(|url| url.trim_end_matches('/')) {
            None | Some("") => self.base(),
            Some(url) => url,
        }
    }
}

impl Default for ComfySettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8188".into(),
            public_url: None,
            client_id: None,
            headers: BTreeMap::new(),
            reconnect_max_ms: 30_000,
            ping_interval_ms: 10_000,
            deaf_after_ms: 30_000,
            request_timeout_ms: 30_000,
            ca_file: None,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Publish to and take commands from MQTT.
    pub enabled: bool,
    /// Broker URL: `mqtt://host:port` (`mqtts://` for TLS).
    pub url: String,
    /// User name; unset (or empty) for none.
    #[serde(with = "empty_is_none")]
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// First topic level(s), e.g. `comfyui` or `home/comfyui`.
    pub base_topic: String,
    /// `v5` or `v311`.
    pub protocol: MqttProtocol,
    /// MQTT client id; unset (or empty) means `comfy-bridge-<instance>`.
    #[serde(with = "empty_is_none")]
    pub client_id: Option<String>,
    /// Keep-alive interval, in seconds.
    pub keep_alive_secs: u64,
    /// Largest packet the bridge sends or accepts, in bytes (previews can be large).
    pub max_packet_bytes: usize,
    /// Longest topic the bridge publishes to (at most 65,535, MQTT's limit); a message for a longer topic
    /// (e.g. a requester's response topic) is dropped and counted.
    pub max_topic_bytes: usize,
    /// For `mqtts://`: PEM file of the broker's CA; unset: public roots.
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<String>,
    /// For `mqtts://`: PEM client certificate (chain), with `client_key_file`.
    #[serde(with = "empty_is_none")]
    pub client_cert_file: Option<String>,
    /// For `mqtts://`: PEM private key of the client certificate.
    #[serde(with = "empty_is_none")]
    pub client_key_file: Option<String>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            base_topic: "comfyui".into(),
            protocol: MqttProtocol::V5,
            client_id: None,
            keep_alive_secs: 30,
            max_packet_bytes: 16 * 1024 * 1024,
            max_topic_bytes: 4_096,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Publish to and take commands from NATS.
    pub enabled: bool,
    /// Server URL(s), comma separated.
    pub url: String,
    /// First subject token(s), e.g. `comfyui`.
    pub subject_prefix: String,
    /// Path of a `.creds` file; unset (or empty) for none.
    #[serde(with = "empty_is_none")]
    pub credentials_file: Option<String>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// User name; unset (or empty) for none.
    #[serde(with = "empty_is_none")]
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<Secret>,
    /// Longest a publish may take before the message goes back to the outbox, in milliseconds.
    pub publish_timeout_ms: u64,
    /// Longest subject (and reply subject) the bridge publishes to; longer ones are dropped and counted. At
    /// most 2,016, so subject and reply fit the server's default 4,096-byte control line.
    pub max_subject_bytes: usize,
    /// NKey seed (`SU…`) for nkey authentication.
    pub nkey_seed: Option<Secret>,
    /// PEM file of the server's CA (TLS: `tls://` URLs, or whenever the server asks for it).
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate, with `client_key_file`, for servers that verify clients.
    #[serde(with = "empty_is_none")]
    pub client_cert_file: Option<String>,
    /// PEM private key of the client certificate.
    #[serde(with = "empty_is_none")]
    pub client_key_file: Option<String>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "comfyui".into(),
            credentials_file: None,
            token: None,
            user: None,
            password: None,
            publish_timeout_ms: 2_000,
            max_subject_bytes: 1_024,
            nkey_seed: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// `[previews]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewSettings {
    /// Publish binary preview frames.
    pub enabled: bool,
    /// Most previews per node per second; extra frames are skipped.
    pub max_per_second: f64,
}

impl Default for PreviewSettings {
    fn default() -> Self {
        Self { enabled: true, max_per_second: 5.0 }
    }
}

/// `[commands]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CommandSettings {
    /// Listen on the request topics.
    pub enabled: bool,
    /// Commands allowed; empty allows all.
    pub allow: Vec<String>,
    /// Directory of API-format workflow templates (`*.json`), relative to the working directory. The default is
    /// the repository's examples, so a first run from a fresh clone can queue `txt2img`.
    pub templates_dir: PathBuf,
    /// Largest request payload, in bytes. With MQTT, at most `mqtt.max_packet_bytes` minus
    /// [`REQUEST_OVERHEAD_BYTES`], so that a larger request still arrives and is answered `payload_too_large`.
    pub max_payload_bytes: usize,
    /// Node classes a queued workflow may not contain (e.g. nodes that run code or touch files).
    pub deny_node_classes: Vec<String>,
    /// Most requests waiting for ComfyUI at once (beyond the ones running); more are answered `busy`.
    pub max_waiting_requests: usize,
    /// Most payload bytes held by requests received and not yet answered; more are answered `busy`. At least
    /// `max_payload_bytes`.
    pub max_waiting_bytes: usize,
}

impl Default for CommandSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            allow: Vec::new(),
            templates_dir: PathBuf::from("examples/templates"),
            max_payload_bytes: 8 * 1024 * 1024,
            deny_node_classes: Vec::new(),
            max_waiting_requests: 256,
            max_waiting_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// Directory for the persisted client id and patched templates.
    pub dir: PathBuf,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self { dir: PathBuf::from("state") }
    }
}

/// `[homeassistant]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HomeAssistantSettings {
    /// Publish MQTT discovery configs so Home Assistant shows the bridge as a device.
    pub enabled: bool,
    /// Home Assistant's discovery prefix; its birth message is `<prefix>/status`.
    pub discovery_prefix: String,
    /// The `"<node>.<input>"` the prompt text entity sets in the selected template.
    pub prompt_input: String,
}

impl Default for HomeAssistantSettings {
    fn default() -> Self {
        Self { enabled: false, discovery_prefix: "homeassistant".into(), prompt_input: "Positive.text".into() }
    }
}

/// `[fleet]`: this bridge as one worker of a fleet that shares one JetStream work queue.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSettings {
    /// Take jobs from the fleet's stream (needs NATS with JetStream).
    pub enabled: bool,
    /// The fleet's name: one level of every fleet subject, and (upper-cased) of its stream and buckets.
    pub name: String,
    /// Fleet jobs this bridge keeps in its ComfyUI (queued or running) at once.
    pub capacity: usize,
    /// Replicas of the fleet's stream and buckets when this bridge creates them (3 on a 3-node cluster).
    pub replicas: usize,
    /// How long a job stays with a bridge that stops acknowledging progress before it is redelivered, in ms.
    pub ack_wait_ms: u64,
    /// Most runs of one job; the job then ends with `state: "error"`.
    pub max_deliver: u64,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self { enabled: false, name: "default".into(), capacity: 1, replicas: 1, ack_wait_ms: 60_000, max_deliver: 3 }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz` and `/metrics`; unset (or empty) disables it.
    #[serde(with = "empty_is_none")]
    pub listen: Option<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { listen: Some("127.0.0.1:9464".into()) }
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then the process environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`Settings::load`], with the environment given as a map (tests never touch the real one).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let vars = env_vars(env.as_ref());
        check_env_names(&vars)?;
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("commands.allow")
            .with_list_parse_key("commands.deny_node_classes")
            .source(env);
        let load = || -> Result<Settings, ConfigError> {
            let settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
            settings.validate()?;
            Ok(settings)
        };
        load().map_err(|e| name_variable(name_choice(e), &vars))
    }

    /// Cross-field and value checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_string(), var: None });
        if !(self.comfyui.url.starts_with("http://") || self.comfyui.url.starts_with("https://")) {
            return invalid("comfyui.url", "must start with http:// or https://");
        }
        if !is_plain_level(&self.bridge.instance) {
            return invalid("bridge.instance", "use only A-Z a-z 0-9 _ - and no empty value");
        }
        if self.mqtt.base_topic.split('/').any(|l| !is_plain_level(l)) {
            return invalid("mqtt.base_topic", "levels may use only A-Z a-z 0-9 _ - separated by /");
        }
        if self.homeassistant.discovery_prefix.split('/').any(|l| !is_plain_level(l)) {
            return invalid("homeassistant.discovery_prefix", "levels may use only A-Z a-z 0-9 _ - separated by /");
        }
        if self.nats.subject_prefix.split('.').any(|l| !is_plain_level(l)) {
            return invalid("nats.subject_prefix", "tokens may use only A-Z a-z 0-9 _ - separated by .");
        }
        if self.previews.max_per_second <= 0.0 || self.previews.max_per_second.is_nan() {
            return invalid("previews.max_per_second", "must be greater than 0");
        }
        if self.comfyui.max_body_bytes == 0 {
            return invalid("comfyui.max_body_bytes", "must be at least 1");
        }
        if self.bridge.outbox_capacity == 0 {
            return invalid("bridge.outbox_capacity", "must be at least 1");
        }
        if self.bridge.outbox_max_bytes < 64 * 1024 {
            return invalid("bridge.outbox_max_bytes", "must be at least 65536");
        }
        if !(256..=65_535).contains(&self.mqtt.max_topic_bytes) {
            return invalid("mqtt.max_topic_bytes", "must be between 256 and 65535");
        }
        if !(256..=MAX_SUBJECT_BYTES).contains(&self.nats.max_subject_bytes) {
            return invalid("nats.max_subject_bytes", "must be between 256 and 2016");
        }
        if self.mqtt.enabled && mqtt_endpoint(&self.mqtt.url).is_none() {
            return invalid("mqtt.url", "must be mqtt://host[:port] or mqtts://host[:port] (also tcp://, ssl://)");
        }
        if let Some(Err(e)) = self.nats.enabled.then(|| nats_servers(&self.nats.url)) {
            return Err(ConfigError::Invalid { key: "nats.url", reason: e, var: None });
        }
        self.validate_commands()?;
        self.validate_fleet()
    }

    /// `[fleet]`: names JetStream accepts, values it can work with, and NATS to run on.
    fn validate_fleet(&self) -> Result<(), ConfigError> {
        let f = &self.fleet;
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_string(), var: None });
        if !is_plain_level(&f.name) {
            return invalid("fleet.name", "use only A-Z a-z 0-9 _ - and no empty value");
        }
        if !f.enabled {
            return Ok(());
        }
        if !self.nats.enabled {
            return invalid("fleet.enabled", "the fleet runs on NATS JetStream: set `nats.enabled = true`");
        }
        if self.bridge.instance == "fleet" {
            return invalid("bridge.instance", "`fleet` is the fleet's own level under the base topic");
        }
        if f.capacity == 0 {
            return invalid("fleet.capacity", "must be at least 1");
        }
        if !(1..=5).contains(&f.replicas) {
            return invalid("fleet.replicas", "must be between 1 and 5 (JetStream's limit)");
        }
        if f.ack_wait_ms < 500 {
            return invalid("fleet.ack_wait_ms", "must be at least 500");
        }
        if f.max_deliver == 0 {
            return invalid("fleet.max_deliver", "must be at least 1");
        }
        Ok(())
    }

    /// The request limits: what the MQTT path can carry, and room for at least one largest request.
    fn validate_commands(&self) -> Result<(), ConfigError> {
        let c = &self.commands;
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason, var: None });
        if c.enabled && self.mqtt.enabled && c.max_payload_bytes + REQUEST_OVERHEAD_BYTES > self.mqtt.max_packet_bytes {
            let most = self.mqtt.max_packet_bytes.saturating_sub(REQUEST_OVERHEAD_BYTES);
            let reason = format!(
                "must leave {REQUEST_OVERHEAD_BYTES} bytes of `mqtt.max_packet_bytes` ({}) for topic and properties: \
                 at most {most}, or a request over the limit could not even be answered",
                self.mqtt.max_packet_bytes
            );
            return invalid("commands.max_payload_bytes", reason);
        }
        let known = crate::commands::COMMANDS;
        if let Some(name) = c.allow.iter().find(|a| !known.contains(&a.as_str())) {
            let reason = format!("no command named `{name}`; the commands are {}", known.join(", "));
            return invalid("commands.allow", reason);
        }
        if c.max_waiting_requests == 0 {
            return invalid("commands.max_waiting_requests", "must be at least 1".into());
        }
        if c.max_waiting_bytes < c.max_payload_bytes {
            return invalid("commands.max_waiting_bytes", "must be at least `commands.max_payload_bytes`".into());
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets shown as `***`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Host, port and whether an MQTT broker URL asks for TLS (`mqtts://`, `ssl://`; default ports 1883 and 8883);
/// `None` when the bridge cannot use it.
pub fn mqtt_endpoint(url: &str) -> Option<(String, u16, bool)> {
    let (rest, tls) = match url.split_once("://")? {
        ("mqtt" | "tcp", rest) => (rest, false),
        ("mqtts" | "ssl", rest) => (rest, true),
        _ => return None,
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Some((host.into(), port.parse().ok()?, tls)),
        None if !rest.is_empty() => Some((rest.into(), if tls { 8883 } else { 1883 }, tls)),
        None => None,
    }
}

/// `nats.url` read the way the NATS client reads it when it connects: a comma-separated list of servers.
fn nats_servers(url: &str) -> Result<(), String> {
    for server in url.split(',') {
        server.trim().parse::<async_nats::ServerAddr>().map_err(|e| format!("`{}`: {e}", server.trim()))?;
    }
    Ok(())
}

/// The `COMFY_BRIDGE__…` variables (from `env`, else the process environment) with the dotted key each sets.
fn env_vars(env: Option<&std::collections::HashMap<String, String>>) -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}__");
    let names: Vec<String> = match env {
        Some(map) => map.keys().cloned().collect(),
        None => std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect(),
    };
    let mut vars: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|var| {
            let key = var.strip_prefix(&prefix)?.to_lowercase().replace("__", ".");
            Some((var, key))
        })
        .collect();
    vars.sort();
    vars
}

/// A variable that names no setting is refused with its own name (a typo would otherwise be reported
/// against the section, or not at all).
fn check_env_names(vars: &[(String, String)]) -> Result<(), ConfigError> {
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    for (var, key) in vars {
        let (section, field) = key.split_once('.').unwrap_or((key, ""));
        let Some(table) = defaults.get(section).and_then(serde_json::Value::as_object) else {
            let sections: Vec<&String> = defaults.as_object().into_iter().flat_map(|o| o.keys()).collect();
            let reason = format!("no section `{section}`; the sections are {}", join(sections));
            return Err(ConfigError::Env { var: var.clone(), reason });
        };
        if !table.contains_key(field) {
            let reason = format!("no setting `{key}`; `[{section}]` has {}", join(table.keys().collect()));
            return Err(ConfigError::Env { var: var.clone(), reason });
        }
    }
    Ok(())
}

fn join(names: Vec<&String>) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// A value outside a closed set ([`CHOICES`]) is an invalid value for its key, naming the accepted values,
/// whether it came from the file or the environment (serde alone would say "unknown variant").
fn name_choice(error: ConfigError) -> ConfigError {
    let key = match &error {
        ConfigError::Load(config::ConfigError::At { key: Some(key), .. })
        | ConfigError::Load(config::ConfigError::Type { key: Some(key), .. }) => key,
        _ => return error,
    };
    match CHOICES.iter().find(|(k, _)| k == key) {
        Some((key, reason)) => ConfigError::Invalid { key, reason: reason.to_string(), var: None },
        None => error,
    }
}

/// An error about a key that an environment variable set names that variable.
fn name_variable(error: ConfigError, vars: &[(String, String)]) -> ConfigError {
    let var_of = |key: &str| vars.iter().find(|(_, k)| k == key).map(|(var, _)| var.clone());
    match error {
        ConfigError::Invalid { key, reason, var: None } => ConfigError::Invalid { key, reason, var: var_of(key) },
        ConfigError::Load(e) => {
            let text = e.to_string();
            let key = text.split("for key `").nth(1).and_then(|rest| rest.split('`').next());
            match key.and_then(var_of) {
                Some(var) => ConfigError::Env { var, reason: text.replace(" in the environment", "") },
                None => ConfigError::Load(e),
            }
        }
        other => other,
    }
}

/// The largest `nats.max_subject_bytes`: a subject and a reply subject this long, with the rest of the
/// `HPUB` line, fit nats-server's default 4,096-byte `max_control_line`.
const MAX_SUBJECT_BYTES: usize =
    (crate::bus::topics::NATS_CONTROL_LINE - crate::bus::topics::NATS_CONTROL_OVERHEAD) / 2;

/// Base topic levels and the instance are used verbatim in topics, so they must need no escaping.
fn is_plain_level(level: &str) -> bool {
    !level.is_empty() && level.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn shipped_default_toml_equals_compiled_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let loaded = Settings::load_with_env(Some(&path), env(&[])).expect("default.toml loads");
        assert_eq!(loaded, Settings::default());
    }

    #[test]
    fn environment_overrides_file_values() {
        let loaded = Settings::load_with_env(
            None,
            env(&[
                ("COMFY_BRIDGE__MQTT__URL", "mqtt://broker:1884"),
                ("COMFY_BRIDGE__BRIDGE__INSTANCE", "gpu1"),
                ("COMFY_BRIDGE__NATS__ENABLED", "false"),
                ("COMFY_BRIDGE__COMMANDS__ALLOW", "queue,status"),
            ]),
        )
        .expect("loads");
        assert_eq!(loaded.mqtt.url, "mqtt://broker:1884");
        assert_eq!(loaded.bridge.instance, "gpu1");
        assert!(!loaded.nats.enabled);
        assert_eq!(loaded.commands.allow, vec!["queue", "status"]);
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[mqtt]\nurll = \"mqtt://x\"\n").expect("write");
        let err = Settings::load_with_env(Some(&path), env(&[])).expect_err("must fail");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected_with_their_key() {
        for (key, value, name) in [
            ("COMFY_BRIDGE__MQTT__PROTOCOL", "v4", "mqtt.protocol"),
            ("COMFY_BRIDGE__BRIDGE__INSTANCE", "a/b", "bridge.instance"),
            ("COMFY_BRIDGE__COMFYUI__URL", "ftp://x", "comfyui.url"),
            ("COMFY_BRIDGE__MQTT__MAX_TOPIC_BYTES", "70000", "mqtt.max_topic_bytes"),
            ("COMFY_BRIDGE__NATS__MAX_SUBJECT_BYTES", "4096", "nats.max_subject_bytes"),
            ("COMFY_BRIDGE__BRIDGE__OUTBOX_MAX_BYTES", "100", "bridge.outbox_max_bytes"),
            ("COMFY_BRIDGE__HOMEASSISTANT__DISCOVERY_PREFIX", "homeassistant/", "homeassistant.discovery_prefix"),
            ("COMFY_BRIDGE__BRIDGE__LOG_FORMAT", "xml", "bridge.log_format"),
            ("COMFY_BRIDGE__MQTT__PROTOCOL", "5", "mqtt.protocol"),
        ] {
            let err = Settings::load_with_env(None, env(&[(key, value)])).expect_err(key);
            assert!(matches!(err, ConfigError::Invalid { key, .. } if key == name), "{err}");
        }
    }

    #[test]
    fn the_request_limit_must_fit_what_mqtt_can_carry() {
        let too_big = (16 * 1024 * 1024).to_string();
        let err = Settings::load_with_env(None, env(&[("COMFY_BRIDGE__COMMANDS__MAX_PAYLOAD_BYTES", &too_big)]))
            .expect_err("16 MiB of payload cannot fit a 16 MiB packet with its topic");
        assert!(matches!(&err, ConfigError::Invalid { key: "commands.max_payload_bytes", .. }), "{err}");
        assert!(err.to_string().contains("at most 16711680"), "{err}");
        let fits =
            env(&[("COMFY_BRIDGE__COMMANDS__MAX_PAYLOAD_BYTES", &too_big), ("COMFY_BRIDGE__MQTT__ENABLED", "false")]);
        assert!(Settings::load_with_env(None, fits).is_ok(), "without MQTT only NATS's own limit applies");
        let small = env(&[("COMFY_BRIDGE__COMMANDS__MAX_WAITING_BYTES", "1000")]);
        let err = Settings::load_with_env(None, small).expect_err("one largest request must fit");
        assert!(matches!(&err, ConfigError::Invalid { key: "commands.max_waiting_bytes", .. }), "{err}");
    }

    #[test]
    fn errors_from_the_environment_name_the_variable() {
        for (var, value, says) in [
            ("COMFY_BRIDGE__MQTT__URLL", "mqtt://x", "COMFY_BRIDGE__MQTT__URLL: no setting `mqtt.urll`; `[mqtt]` has"),
            ("COMFY_BRIDGE__MQTTT__URL", "mqtt://x", "COMFY_BRIDGE__MQTTT__URL: no section `mqttt`"),
            ("COMFY_BRIDGE__MQTT__KEEP_ALIVE_SECS", "abc", "COMFY_BRIDGE__MQTT__KEEP_ALIVE_SECS: invalid type"),
            ("COMFY_BRIDGE__MQTT__PROTOCOL", "v4", "COMFY_BRIDGE__MQTT__PROTOCOL: invalid value for `mqtt.protocol`"),
        ] {
            let err = Settings::load_with_env(None, env(&[(var, value)])).expect_err(var);
            assert!(err.to_string().starts_with(says), "{err}");
        }
    }

    #[test]
    fn bus_urls_and_command_names_that_run_would_refuse_are_refused_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (toml, key, says) in [
            ("[mqtt]\nurl = \"http://broker:1883\"", "mqtt.url", "must be mqtt://host[:port]"),
            ("[mqtt]\nurl = \"mqtt://broker:18x3\"", "mqtt.url", "must be mqtt://host[:port]"),
            ("[nats]\nurl = \"127.0.0.1:4222x\"", "nats.url", "`127.0.0.1:4222x`: NATS server URL is invalid"),
            ("[commands]\nallow = [\"status\", \"sttus\"]", "commands.allow", "no command named `sttus`"),
        ] {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, toml).expect("write");
            let err = Settings::load_with_env(Some(&path), env(&[])).expect_err(toml);
            assert!(matches!(&err, ConfigError::Invalid { key: k, var: None, .. } if *k == key), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        let off = env(&[("COMFY_BRIDGE__MQTT__ENABLED", "false"), ("COMFY_BRIDGE__MQTT__URL", "http://x")]);
        assert!(Settings::load_with_env(None, off).is_ok(), "a disabled bus is not checked");
        let many = env(&[("COMFY_BRIDGE__NATS__URL", "nats://a:4222, tls://b:4223,c")]);
        assert!(Settings::load_with_env(None, many).is_ok(), "a list of servers, as the NATS client takes it");
        assert_eq!(mqtt_endpoint("mqtts://broker"), Some(("broker".into(), 8883, true)));
    }

    #[test]
    fn closed_sets_take_their_names_and_refuse_others_naming_key_and_values() {
        let named = env(&[("COMFY_BRIDGE__MQTT__PROTOCOL", "v311"), ("COMFY_BRIDGE__BRIDGE__LOG_FORMAT", "json")]);
        let loaded = Settings::load_with_env(None, named).expect("loads");
        assert_eq!((loaded.mqtt.protocol, loaded.bridge.log_format), (MqttProtocol::V311, LogFormat::Json));
        let dir = tempfile::tempdir().expect("tempdir");
        for (toml, key, says) in [
            ("[mqtt]\nprotocol = \"v4\"", "mqtt.protocol", "invalid value for `mqtt.protocol`: must be `v5` or `v311`"),
            ("[mqtt]\nprotocol = 5", "mqtt.protocol", "invalid value for `mqtt.protocol`: must be `v5` or `v311`"),
            (
                "[bridge]\nlog_format = \"JSON\"",
                "bridge.log_format",
                "invalid value for `bridge.log_format`: must be `text` or `json`",
            ),
        ] {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, toml).expect("write");
            let err = Settings::load_with_env(Some(&path), env(&[])).expect_err(toml);
            assert!(matches!(&err, ConfigError::Invalid { key: k, var: None, .. } if *k == key), "{err}");
            assert_eq!(err.to_string(), says);
        }
        let printed = Settings::default().to_redacted_toml();
        assert!(printed.contains("protocol = \"v5\"") && printed.contains("log_format = \"text\""), "{printed}");
    }

    #[test]
    fn an_empty_value_means_unset_in_the_file_and_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[comfyui]\npublic_url = \"\"\nclient_id = \"\"\n[mqtt]\nusername = \"\"\n")
            .expect("write");
        let loaded = Settings::load_with_env(Some(&path), env(&[("COMFY_BRIDGE__HTTP__LISTEN", "")])).expect("loads");
        assert_eq!((loaded.comfyui.public_url, loaded.comfyui.client_id), (None, None));
        assert_eq!((loaded.mqtt.username, loaded.http.listen), (None, None), "an empty http.listen disables it");
        let set =
            env(&[("COMFY_BRIDGE__COMFYUI__PUBLIC_URL", "http://gpu:8188/"), ("COMFY_BRIDGE__MQTT__USERNAME", "u")]);
        let loaded = Settings::load_with_env(None, set).expect("loads");
        assert_eq!(loaded.comfyui.public_base(), "http://gpu:8188");
        assert_eq!(loaded.mqtt.username.as_deref(), Some("u"));
        assert_eq!(Settings::default().comfyui.public_base(), "http://127.0.0.1:8188", "unset: the ComfyUI URL");
        // `check` still shows every key, unset ones as "".
        let printed = Settings::default().to_redacted_toml();
        assert!(printed.contains("public_url = \"\"") && printed.contains("credentials_file = \"\""), "{printed}");
    }

    #[test]
    fn the_fleet_needs_nats_and_sane_values() {
        let on = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("COMFY_BRIDGE__FLEET__ENABLED", "true")];
            pairs.extend_from_slice(extra);
            Settings::load_with_env(None, env(&pairs))
        };
        let loaded = on(&[("COMFY_BRIDGE__FLEET__CAPACITY", "2")]).expect("loads");
        assert!(loaded.fleet.enabled);
        assert_eq!((loaded.fleet.capacity, loaded.fleet.name.as_str()), (2, "default"));
        let err = on(&[("COMFY_BRIDGE__NATS__ENABLED", "false")]).expect_err("no NATS, no fleet");
        assert!(matches!(&err, ConfigError::Invalid { key: "fleet.enabled", .. }), "{err}");
        assert!(err.to_string().contains("runs on NATS JetStream"), "{err}");
        for (var, value, key) in [
            ("COMFY_BRIDGE__FLEET__NAME", "a.b", "fleet.name"),
            ("COMFY_BRIDGE__FLEET__CAPACITY", "0", "fleet.capacity"),
            ("COMFY_BRIDGE__FLEET__REPLICAS", "7", "fleet.replicas"),
            ("COMFY_BRIDGE__FLEET__ACK_WAIT_MS", "10", "fleet.ack_wait_ms"),
            ("COMFY_BRIDGE__FLEET__MAX_DELIVER", "0", "fleet.max_deliver"),
            ("COMFY_BRIDGE__BRIDGE__INSTANCE", "fleet", "bridge.instance"),
        ] {
            let err = on(&[(var, value)]).expect_err(var);
            assert!(matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key), "{err}");
        }
        let off = env(&[("COMFY_BRIDGE__NATS__ENABLED", "false"), ("COMFY_BRIDGE__FLEET__CAPACITY", "0")]);
        assert!(Settings::load_with_env(None, off).is_ok(), "a disabled fleet is not checked");
    }

    #[test]
    fn secrets_are_redacted_when_printed() {
        let loaded = Settings::load_with_env(
            None,
            env(&[("COMFY_BRIDGE__MQTT__PASSWORD", "hunter2"), ("COMFY_BRIDGE__NATS__TOKEN", "s3cret")]),
        )
        .expect("loads");
        assert_eq!(loaded.mqtt.password.as_ref().map(Secret::expose), Some("hunter2"));
        let shown = format!("{}\n{:?}", loaded.to_redacted_toml(), loaded);
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
    }
}
