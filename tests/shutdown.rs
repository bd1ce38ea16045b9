//! The built binary: SIGTERM drains and leaves `offline`; a crash leaves `offline` through the last will.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use comfy_sim::Simulator;
use common::daemon::{simulator, SUCCESS};
use common::*;

const WAIT: Duration = Duration::from_secs(10);

fn spawn_bridge(sim: &Simulator, broker: &Mosquitto, state: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_comfy-bridge"))
        .arg("run")
        .env("COMFY_BRIDGE__COMFYUI__URL", sim.url())
        .env("COMFY_BRIDGE__MQTT__URL", broker.url())
        .env("COMFY_BRIDGE__MQTT__KEEP_ALIVE_SECS", "5")
        .env("COMFY_BRIDGE__NATS__ENABLED", "false")
        .env("COMFY_BRIDGE__STATE__DIR", state)
        .env("COMFY_BRIDGE__HTTP__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge binary starts")
}

/// Brokers, simulator and the bridge binary, with a subscriber that has seen the bridge come online.
async fn start_online() -> (Mosquitto, Simulator, tempfile::TempDir, MqttSub, Child) {
    let broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let state = tempfile::tempdir().expect("state");
    let mut sub = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let child = spawn_bridge(&sim, &broker, state.path());
    sub.expect(|m| &m.payload[..] == b"online", WAIT).await;
    (broker, sim, state, sub, child)
}

/// `kill -TERM`: the bridge publishes the retained `offline` itself and exits 0.
#[tokio::test]
async fn sigterm_publishes_offline_and_exits_cleanly() {
    let (_broker, _sim, _state, mut sub, mut child) = start_online().await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    sub.expect(|m| &m.payload[..] == b"offline", WAIT).await;
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "{exit:?}");
}

/// `kill -9`: the broker publishes the last will, so subscribers still learn the bridge is gone.
#[tokio::test]
async fn crash_publishes_offline_through_the_last_will() {
    let (broker, _sim, _state, mut sub, mut child) = start_online().await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let will = sub.expect(|m| &m.payload[..] == b"offline", Duration::from_secs(15)).await;
    assert!(will.qos == 1);
    let mut late = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let retained = late.next(WAIT).await.expect("retained availability");
    assert_eq!((&retained.payload[..], retained.retain), (&b"offline"[..], true));
}
