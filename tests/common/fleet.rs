//! The fleet's harness: bridges as child processes of the built binary (so a test can SIGKILL one), job
//! watchers, submitting, and fleet requests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::HeaderMap;
use comfy_bridge::config::Settings;
use comfy_sim::Simulator;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A bridge of the fleet, run as `comfy-bridge -c <file>` in a private directory.
pub struct FleetBridge {
    /// Its `bridge.instance`.
    pub instance: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Settings for a fleet bridge `instance` against `sim` and the NATS servers at `nats_url`: MQTT off, a fast
/// `ack_wait_ms` (2 s), the given fleet name.
pub fn fleet_settings(sim: &Simulator, nats_url: &str, instance: &str, fleet: &str) -> Settings {
    let mut s = Settings::default();
    s.bridge.instance = instance.into();
    s.bridge.log = "info,comfy_bridge::fleet=debug".into();
    s.bridge.shutdown_grace_ms = 1_000;
    s.comfyui.url = sim.url();
    s.comfyui.reconnect_max_ms = 500;
    s.comfyui.ping_interval_ms = 1_000;
    s.comfyui.client_id = Some(format!("client-{instance}"));
    s.mqtt.enabled = false;
    s.nats.url = nats_url.into();
    s.http.listen = None;
    s.commands.templates_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates"));
    s.fleet.enabled = true;
    s.fleet.name = fleet.into();
    s.fleet.ack_wait_ms = 2_000;
    s
}

impl FleetBridge {
    /// Starts the binary with `settings` (its state dir is made private to this bridge).
    pub fn start(mut settings: Settings) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        settings.state.dir = dir.path().join("state");
        let file = dir.path().join("bridge.toml");
        std::fs::write(&file, settings.to_redacted_toml()).expect("write config");
        let mut bridge = Self { instance: settings.bridge.instance.clone(), dir, child: None };
        bridge.spawn();
        bridge
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bridge.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"))
            .arg("-c")
            .arg(self.dir.path().join("bridge.toml"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn comfy-bridge");
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye, no drain.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same configuration and state.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }
}

impl Drop for FleetBridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every job record published on the fleet's `job.*.state` and `job.*.result` subjects, in arrival order.
pub struct JobWatch {
    rx: mpsc::UnboundedReceiver<(bool, Value)>,
    /// Everything received so far: (is a result, the record).
    pub seen: Vec<(bool, Value)>,
    _client: async_nats::Client,
}

impl JobWatch {
    /// Subscribes (and waits for the server to have it, so nothing published after this returns is missed).
    pub async fn start(nats_url: &str, fleet: &str) -> Self {
        let client = async_nats::connect(nats_url).await.expect("nats connect");
        let mut sub = client.subscribe(format!("comfyui.fleet.{fleet}.job.*.*")).await.expect("subscribe");
        super::subscribers::nats_round_trip(&client).await;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let result = m.subject.ends_with(".result");
                let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                if tx.send((result, body)).is_err() {
                    return;
                }
            }
        });
        Self { rx, seen: Vec::new(), _client: client }
    }

    /// Waits for a record matching `pred` (looking at what was seen first), or panics after `timeout`.
    pub async fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(bool, &Value) -> bool) -> Value {
        if let Some((_, v)) = self.seen.iter().find(|(r, v)| pred(*r, v)) {
            return v.clone();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((r, v))) => {
                    self.seen.push((r, v.clone()));
                    if pred(r, &v) {
                        return v;
                    }
                }
                _ => panic!("no {what} within {timeout:?}; seen: {:#?}", self.seen),
            }
        }
    }

    /// Collects for `wait` more.
    pub async fn settle(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(item);
        }
    }

    /// The results seen for `id`.
    pub fn results(&self, id: &str) -> Vec<&Value> {
        self.seen.iter().filter(|(r, v)| *r && v["id"] == id).map(|(_, v)| v).collect()
    }
}

/// Submits a job as a JetStream publish with `Nats-Msg-Id: <id>`; whether JetStream saw it as a duplicate.
pub async fn submit(js: &async_nats::jetstream::Context, fleet: &str, job: &Value) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", job["id"].as_str().expect("job id"));
    let ack = js
        .publish_with_headers(format!("comfyui.fleet.{fleet}.queue"), headers, job.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("the stream takes it");
    ack.duplicate
}

/// A fleet request-reply; the answer.
pub async fn fleet_request(client: &async_nats::Client, fleet: &str, command: &str, body: Value) -> Value {
    super::requester::nats_request(client, &format!("comfyui.fleet.{fleet}.request.{command}"), body.to_string()).await
}

/// Waits until the fleet's `status` lists `n` live, reachable bridges.
pub async fn wait_for_bridges(client: &async_nats::Client, fleet: &str, n: usize, logs: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("comfyui.fleet.{fleet}.request.status"), "{}".into()),
        )
        .await;
        if let Ok(Ok(reply)) = asked {
            let answer: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
            let bridges = answer["data"]["bridges"].as_array().cloned().unwrap_or_default();
            if bridges.iter().filter(|b| b["reachable"] == true).count() >= n {
                return;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the fleet never had {n} bridges; logs:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job that queues the example workflow (the simulator replays its success run for it).
pub fn job(id: &str) -> Value {
    json!({"id": id, "workflow": super::workflow("a_success__prompt")})
}

/// Prints the bridges' logs when the test fails (dropped while panicking).
pub struct LogsOnPanic<'a>(pub &'a [FleetBridge]);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for b in self.0 {
                eprintln!("----- {} -----\n{}", b.instance, b.log());
            }
        }
    }
}
