//! Broker restarts in the middle of a prompt lose no lifecycle event.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_sim::Simulator;
use common::daemon::{simulator, Daemon, SUCCESS};
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Plays a_success and takes the broker away from 0.4 s to 2.2 s into it (the run takes about 1.9 s).
async fn play_across_outage(sim: Simulator, broker: &mut impl Outage) -> (Simulator, String) {
    let play = tokio::spawn(async move {
        let pid = sim.play("a_success").await.expect("plays");
        (sim, pid)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    broker.resume();
    play.await.expect("play task")
}

/// The lifecycle event types of the recorded run, in order (progress ticks and status excluded).
fn recorded_lifecycle() -> Vec<String> {
    fixtures::recorded_frames("a_success")
        .into_iter()
        .filter_map(|frame| frame["type"].as_str().map(str::to_string))
        .filter(|t| !matches!(t.as_str(), "progress" | "progress_state" | "status" | "feature_flags"))
        .collect()
}

/// Lifecycle envelopes by `seq` (a redelivered duplicate has the same `seq`), in `seq` order.
fn lifecycle_by_seq<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut by_seq = BTreeMap::new();
    for p in payloads {
        let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
        if let (Some(seq), Some(t)) = (v["seq"].as_u64(), v["type"].as_str()) {
            if !matches!(t, "progress" | "progress_state" | "status") {
                by_seq.insert(seq, t.to_string());
            }
        }
    }
    by_seq.into_values().collect()
}

fn is_final(payload: &[u8]) -> bool {
    let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    v["type"] == "executing" && v["data"]["node"].is_null()
}

/// mosquitto stops (and saves its state) in the middle of a prompt and comes back: every lifecycle event
/// reaches a persistent subscriber, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restart_mid_prompt_loses_no_lifecycle_event() {
    let mut broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 1.0).await;
    let mut sub = mqtt_subscribe_persistent(&broker, "comfyui/local/prompt/#").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;

    let (_sim, pid) = play_across_outage(sim, &mut broker).await;

    let msgs = sub.collect_until(|m| m.topic.contains(&pid) && is_final(&m.payload), WAIT).await;
    let got = lifecycle_by_seq(msgs.iter().filter(|m| m.topic.contains(&pid)).map(|m| &m.payload[..]));
    assert_eq!(got, recorded_lifecycle(), "every lifecycle event, once per seq, in order");
    daemon.stop().await;
}

/// nats-server stops in the middle of a prompt and comes back: a JetStream stream capturing the prompt's
/// subjects holds every lifecycle event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_prompt_loses_no_lifecycle_event() {
    let mut nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "CAPTURE".into(),
        subjects: vec!["comfyui.local.prompt.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create capture stream");
    let sim = simulator(SUCCESS, 1.0).await;
    let daemon = Daemon::builder(&sim).nats(&nats).start().await;

    let (_sim, pid) = play_across_outage(sim, &mut nats).await;

    let client = async_nats::connect(nats.url()).await.expect("reconnect");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + WAIT;
    let payloads = loop {
        let mut stream = js.get_stream("CAPTURE").await.expect("stream survives restart");
        let last = stream.info().await.expect("info").state.last_sequence;
        let mut payloads = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                if m.subject.contains(pid.as_str()) {
                    payloads.push(m.payload.to_vec());
                }
            }
        }
        if payloads.iter().any(|p| is_final(p)) || tokio::time::Instant::now() > deadline {
            break payloads;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let got = lifecycle_by_seq(payloads.iter().map(Vec::as_slice));
    assert_eq!(got, recorded_lifecycle(), "every lifecycle event, once per seq, in order");
    daemon.stop().await;
}
