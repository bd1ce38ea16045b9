//! Soak: the `comfy-bridge` binary under mixed load with reconnects, for `SOAK_SECS` (default 1800), reporting
//! its RSS over time.
//!
//! `SOAK_SECS=600 cargo bench --bench soak` starts mosquitto, nats-server and the simulator (replaying recorded
//! sessions four times faster than recorded: progress, previews, lifecycle events), then the bridge binary.
//! Load: a `queue` request over NATS every second and a `status` request over MQTT every second, so events,
//! state, results and responses all flow. Every minute mosquitto, nats-server and the WebSocket to ComfyUI each
//! go away for two seconds. Every 30 s it prints the bridge's RSS and the running totals; at the end, the
//! first and last RSS samples and whether every answered prompt got its result.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(soak(Duration::from_secs(secs)));
}

async fn soak(length: Duration) {
    let mut broker = common::Mosquitto::start();
    let mut nats = common::NatsServer::start();
    let sim = common::daemon::simulator(common::daemon::SUCCESS, 4.0).await;
    let mut results = common::mqtt_subscribe_persistent(&broker, "comfyui/soak/prompt/+/result").await;
    let state = tempfile::tempdir().expect("state");
    let templates = tempfile::tempdir().expect("templates");
    let workflow = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/workflows/a_success__prompt.json");
    std::fs::copy(workflow, templates.path().join("probe.json")).expect("template");
    let mut bridge = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"))
        .env("COMFY_BRIDGE__BRIDGE__INSTANCE", "soak")
        .env("COMFY_BRIDGE__BRIDGE__LOG", "error")
        .env("COMFY_BRIDGE__COMFYUI__URL", sim.url())
        .env("COMFY_BRIDGE__COMFYUI__RECONNECT_MAX_MS", "1000")
        .env("COMFY_BRIDGE__MQTT__URL", broker.url())
        .env("COMFY_BRIDGE__NATS__URL", nats.url())
        .env("COMFY_BRIDGE__STATE__DIR", state.path())
        .env("COMFY_BRIDGE__COMMANDS__TEMPLATES_DIR", templates.path())
        .env("COMFY_BRIDGE__HTTP__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge");
    let pid = bridge.id();
    sim.wait_for_client(Duration::from_secs(10)).await.expect("bridge connects");

    let nats_url = nats.url();
    let queued = tokio::spawn(async move {
        let mut answered = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut client = None;
        let started = Instant::now();
        while started.elapsed() < length {
            tick.tick().await;
            if client.is_none() {
                client = async_nats::connect(nats_url.as_str()).await.ok();
            }
            let Some(c) = &client else { continue };
            let ask = c.request("comfyui.soak.request.queue".to_string(), r#"{"template":"probe"}"#.into());
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
                let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                if let Some(id) = v["data"]["prompt_id"].as_str() {
                    answered.insert(id.to_string());
                }
            }
        }
        answered
    });
    let broker_port = broker.port;
    let status = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < length {
            let mqtt = common::requester::mqtt311_publish(broker_port, "comfyui/soak/request/status", b"{}", false);
            let _ = tokio::time::timeout(Duration::from_secs(2), mqtt).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    let mut next_fault = Duration::from_secs(60);
    let mut next_sample = Duration::ZERO;
    println!("| minute | RSS | results so far |");
    println!("|---|---|---|");
    while started.elapsed() < length {
        while let Some(m) = results.next(Duration::from_millis(100)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            seen.insert(v["prompt_id"].as_str().unwrap_or_default().to_string());
        }
        if started.elapsed() >= next_sample {
            let rss = rss_kib(pid);
            samples.push(rss);
            println!(
                "| {:.1} | {:.1} MB | {} |",
                started.elapsed().as_secs_f64() / 60.0,
                rss as f64 / 1024.0,
                seen.len()
            );
            next_sample += Duration::from_secs(30);
        }
        if started.elapsed() >= next_fault {
            broker.stop();
            tokio::time::sleep(Duration::from_secs(2)).await;
            broker.resume();
            nats.stop();
            tokio::time::sleep(Duration::from_secs(2)).await;
            nats.resume();
            sim.refuse_websockets(true);
            sim.disconnect_all();
            tokio::time::sleep(Duration::from_secs(2)).await;
            sim.refuse_websockets(false);
            next_fault += Duration::from_secs(60);
        }
    }
    let answered = queued.await.expect("queue task");
    let _ = status.await;
    // Let the last prompts finish and their results arrive.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(60) && !answered.iter().all(|p| seen.contains(p)) {
        if let Some(m) = results.next(Duration::from_millis(500)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            seen.insert(v["prompt_id"].as_str().unwrap_or_default().to_string());
        }
    }
    let missing = answered.iter().filter(|p| !seen.contains(*p)).count();
    let alive = bridge.try_wait().map(|s| s.is_none()).unwrap_or(false);
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = bridge.wait();
    let first = samples.get(1).or(samples.first()).copied().unwrap_or(0);
    let peak = samples.iter().copied().max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    println!(
        "\nsoak {:.0} min: prompts answered {}, results missing {missing}, bridge alive until the end: {alive}; \
         RSS at 30 s {:.1} MB, peak {:.1} MB, last {:.1} MB",
        length.as_secs_f64() / 60.0,
        answered.len(),
        first as f64 / 1024.0,
        peak as f64 / 1024.0,
        last as f64 / 1024.0
    );
}
