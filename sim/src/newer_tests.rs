//! The behaviours of ComfyUI versions after 0.3.64, over real sockets: the jobs API, lowercase-UUID prompt
//! ids, history that gets its outputs after `execution_success`, and a deaf socket after a reconnect.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::tests::{connect, fixtures, frame_types, http, until_done, Ws};
use super::{ComfyVersion, SimOptions, Simulator};

async fn start(version: &str, speed: f64) -> Simulator {
    let comfyui_version = version.parse::<ComfyVersion>().expect("version");
    let opts = SimOptions { transcripts: vec![fixtures()], speed, comfyui_version, ..SimOptions::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("start")
}

/// A workflow the simulator plays as a synthetic session: `steps` progress steps, then one saved image.
fn workflow(steps: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {}},
        "2": {"class_type": "KSampler", "inputs": {"steps": steps, "image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "newer"}},
    })
}

async fn post(sim: &Simulator, body: Value) -> (u16, Value) {
    http(sim.addr(), "POST", "/api/prompt", Some(&body.to_string())).await
}

/// Text frames until one of `kind` for `id`.
async fn until(ws: &mut Ws, kind: &str, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = match super::tests::recv(ws).await {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).expect("json"),
            _ => continue,
        };
        let done = v["type"] == kind && v["data"]["prompt_id"] == id;
        seen.push(v);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn the_jobs_api_exists_only_on_newer_versions() {
    let old = start("0.3.64", 0.0).await;
    assert_eq!(http(old.addr(), "GET", "/api/jobs", None).await.0, 404);
    assert_eq!(http(old.addr(), "POST", "/api/jobs/x/cancel", None).await.0, 404);

    let sim = start("0.4.0", 0.0).await;
    let (status, page) = http(sim.addr(), "GET", "/api/jobs?limit=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(page, json!({"jobs": [], "pagination": {"offset": 0, "limit": 1, "total": 0, "has_more": false}}));
    assert_eq!(http(sim.addr(), "GET", "/jobs", None).await.0, 404, "only under /api, as ComfyUI registers it");
    assert_eq!(http(sim.addr(), "GET", "/api/jobs?status=done", None).await.0, 400);
    let (status, missing) = http(sim.addr(), "GET", "/api/jobs/2c0f5f3e-8d1a-4b7e-9c3d-0123456789ab", None).await;
    assert_eq!((status, missing), (404, json!({"error": "Job not found"})));
    let (_, stats) = http(sim.addr(), "GET", "/system_stats", None).await;
    assert_eq!(stats["system"]["comfyui_version"], "0.4.0-sim");
}

#[tokio::test]
async fn jobs_list_every_prompt_and_cancel_a_pending_one_without_history_and_a_running_one_as_cancelled() {
    let sim = start("0.4.0", 0.2).await;
    let mut ws = connect(&sim, "me").await;
    let (_, a) = post(&sim, json!({"prompt": workflow(20), "client_id": "me"})).await;
    let (_, b) = post(&sim, json!({"prompt": workflow(20), "client_id": "someone-else"})).await;
    let (a, b) = (a["prompt_id"].as_str().expect("a"), b["prompt_id"].as_str().expect("b"));
    until(&mut ws, "execution_start", a).await;

    let (_, page) = http(sim.addr(), "GET", "/api/jobs?sort_order=asc", None).await;
    let listed: Vec<(&str, &str)> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| (j["id"].as_str().unwrap_or(""), j["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(listed, [(a, "in_progress"), (b, "pending")], "every client's prompts");
    let (_, job) = http(sim.addr(), "GET", &format!("/api/jobs/{b}"), None).await;
    assert_eq!(job["workflow"]["extra_data"]["client_id"], "someone-else");
    assert!(job["create_time"].is_u64(), "{job}");

    let cancel = |id: &str| format!("/api/jobs/{id}/cancel");
    assert_eq!(http(sim.addr(), "POST", &cancel(b), None).await, (200, json!({"cancelled": true})));
    assert_eq!(http(sim.addr(), "GET", &format!("/api/jobs/{b}"), None).await.0, 404, "no history entry");
    assert_eq!(http(sim.addr(), "POST", &cancel(a), None).await, (200, json!({"cancelled": true})));
    until(&mut ws, "execution_interrupted", a).await;
    until_done(&mut ws, a).await;
    tokio::time::sleep(super::queue::HISTORY_LAG * 2).await;
    let (_, job) = http(sim.addr(), "GET", &format!("/api/jobs/{a}"), None).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let messages = job["execution_status"]["messages"].as_array().expect("messages");
    assert!(messages.iter().any(|m| m[0] == "execution_interrupted"), "the reason is in the messages");
    assert_eq!(http(sim.addr(), "POST", &cancel(a), None).await.1, json!({"cancelled": false}), "over already");
    let posts: Vec<String> = sim.requests().into_iter().filter(|r| r.0 == "POST").map(|r| r.1).collect();
    assert!(!posts.iter().any(|p| p == "/interrupt" || p == "/queue"), "{posts:?}");
}

#[tokio::test]
async fn newer_versions_refuse_prompt_ids_that_are_not_lowercase_uuids() {
    let id = "2C0F5F3E-8D1A-4B7E-9C3D-0123456789AB";
    let sim = start("0.4.0", 0.0).await;
    for bad in [json!(id), json!("bridge-1"), json!(7)] {
        let (status, answer) = post(&sim, json!({"prompt": workflow(1), "prompt_id": bad})).await;
        assert_eq!((status, answer["error"]["type"].as_str()), (400, Some("invalid_prompt_id")), "{bad}");
    }
    let lower = id.to_ascii_lowercase();
    let (status, answer) = post(&sim, json!({"prompt": workflow(1), "prompt_id": lower})).await;
    assert_eq!((status, answer["prompt_id"].as_str()), (200, Some(lower.as_str())));

    let old = start("0.3.64", 0.0).await;
    assert_eq!(post(&old, json!({"prompt": workflow(1), "prompt_id": "bridge-1"})).await.0, 200, "any string");
}

#[tokio::test]
async fn history_gets_its_outputs_only_after_execution_success() {
    let sim = start("0.4.0", 0.0).await;
    let mut ws = connect(&sim, "me").await;
    let (_, answer) = post(&sim, json!({"prompt": workflow(2), "client_id": "me"})).await;
    let id = answer["prompt_id"].as_str().expect("id");
    until(&mut ws, "execution_success", id).await;
    let (_, early) = http(sim.addr(), "GET", &format!("/history/{id}"), None).await;
    assert_eq!(early[id]["status"]["status_str"], "success", "{early}");
    assert_eq!(early[id]["outputs"], json!({}), "no outputs yet");
    assert_eq!(early[id]["prompt"][4], json!(["9"]), "the output nodes it will have");
    let (_, queue) = http(sim.addr(), "GET", "/queue", None).await;
    assert_eq!(queue["queue_running"], json!([]), "no longer in the queue");
    tokio::time::sleep(super::queue::HISTORY_LAG * 2).await;
    let (_, later) = http(sim.addr(), "GET", &format!("/history/{id}"), None).await;
    assert!(later[id]["outputs"]["9"]["images"].is_array(), "{later}");
}

#[tokio::test]
async fn a_reconnect_with_the_same_client_id_can_go_deaf_to_its_own_prompts_but_not_to_broadcasts() {
    let sim = start("0.4.0", 0.0).await;
    drop(connect(&sim, "me").await);
    sim.deafen_next_reconnect();
    let mut deaf = connect(&sim, "me").await;
    let (_, answer) = post(&sim, json!({"prompt": workflow(2), "client_id": "me"})).await;
    let id = answer["prompt_id"].as_str().expect("id").to_string();
    sim.send_raw_text(r#"{"type": "assets.seed.started", "data": {}}"#);
    let mut types = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), deaf.next()).await {
        types.extend(frame_types(&[m]));
    }
    assert!(types.contains(&"assets.seed.started".to_string()), "{types:?}");
    assert!(types.iter().all(|t| t == "status" || t == "assets.seed.started"), "nothing addressed: {types:?}");

    drop(deaf);
    let mut heard = connect(&sim, "me").await;
    let (_, answer) = post(&sim, json!({"prompt": workflow(2), "client_id": "me"})).await;
    let id2 = answer["prompt_id"].as_str().expect("id");
    assert_ne!(id, id2);
    let frames = until(&mut heard, "execution_success", id2).await;
    assert!(frames.iter().any(|f| f["type"] == "execution_start"), "the next reconnect hears again");
}
