//! `comfy-bridge simulate --loop`, the README's demo, with the bridge: every looped prompt that ran to the end
//! is reported `success`, as its events say, never `cancelled`.

mod common;

use std::time::Duration;

use comfy_sim::{SimOptions, Simulator};
use common::daemon::Daemon;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn looped_prompts_end_success_not_cancelled() {
    let broker = Mosquitto::start();
    let transcripts = ["a_success", "b_cached", "f_three_prompts"].map(fixtures::transcript);
    // Fast, but slow enough that the bridge reads the queue while prompts run (the 16 ms of the report).
    let opts = SimOptions {
        transcripts: transcripts.to_vec(),
        speed: 8.0,
        autoplay: true,
        tap: false,
        ..SimOptions::default()
    };
    let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("simulator starts");
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).start().await;

    // Two rounds of the three sessions: 1 + 1 + 3 prompts each.
    let mut statuses = Vec::new();
    while statuses.len() < 10 {
        let msg = results.next(WAIT).await.unwrap_or_else(|| panic!("results so far: {statuses:?}"));
        let result: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        statuses.push(result["status"].as_str().unwrap_or("?").to_string());
    }
    assert!(statuses.iter().all(|s| s == "success"), "{statuses:?}");
    daemon.stop().await;
}
