//! ComfyUI versions after 0.3.64, played by the simulator (`SimOptions::comfyui_version`), next to 0.3.64:
//! cancel and interrupt through the jobs API's atomic cancel, results with outputs although `execution_success`
//! comes before history has them, lowercase-UUID prompt ids, a deaf WebSocket found and replaced, and event
//! types with dots.

mod common;

use std::time::Duration;

use comfy_bridge::config::Settings;
use comfy_sim::{ComfyVersion, SimOptions, Simulator};
use common::daemon::Daemon;
use common::hostile::{free_port, metric, metrics_until};
use common::requester::MqttRequester;
use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const NEWER: &str = "0.4.0";
const RECORDED: &str = "0.3.64";

/// A simulator playing `version` with every recorded session, at `speed`.
async fn simulator(version: &str, speed: f64) -> Simulator {
    let comfyui_version: ComfyVersion = version.parse().expect("version");
    let opts =
        SimOptions { transcripts: vec![fixtures::transcripts()], speed, comfyui_version, ..SimOptions::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("simulator starts")
}

/// Templates: `probe` (the recorded success run), `long` (the recorded long run an interrupt stopped).
fn templates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("templates dir");
    let write = |name: &str, v: &Value| std::fs::write(dir.path().join(name), v.to_string()).expect("write");
    write("probe.json", &workflow("a_success__prompt"));
    write("long.json", &workflow("e_interrupt__p1_long"));
    dir
}

struct Setup {
    sim: Simulator,
    broker: Mosquitto,
    daemon: Daemon,
    requester: MqttRequester,
    _templates: tempfile::TempDir,
}

async fn start(version: &str, speed: f64, configure: impl FnOnce(&mut Settings)) -> Setup {
    let broker = Mosquitto::start();
    let sim = simulator(version, speed).await;
    let templates = templates();
    let dir = templates.path().to_path_buf();
    let daemon =
        Daemon::builder(&sim).mqtt(&broker).with(|s| s.commands.templates_dir = dir).with(configure).start().await;
    let requester = MqttRequester::connect(&broker).await;
    Setup { sim, broker, daemon, requester, _templates: templates }
}

impl Setup {
    async fn request(&mut self, command: &str, body: Value) -> Value {
        self.requester.request(&format!("comfyui/local/request/{command}"), body.to_string(), WAIT).await
    }

    /// Queues a template; its prompt id.
    async fn queue(&mut self, template: &str) -> String {
        let answer = self.request("queue", json!({ "template": template })).await;
        answer["data"]["prompt_id"].as_str().unwrap_or_else(|| panic!("queued: {answer}")).to_string()
    }

    /// The paths of the HTTP requests the simulator got with `method`.
    fn paths(&self, method: &str) -> Vec<String> {
        self.sim.requests().into_iter().filter(|r| r.0 == method).map(|r| r.1).collect()
    }
}

/// Whether `id` is a UUID in canonical lowercase hyphenated form.
fn canonical_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => matches!(c, '0'..='9' | 'a'..='f'),
        })
}

/// Collects every `result` until one has come for each of `pids`, then for another second: `(prompt, status)`.
async fn results_for(results: &mut MqttSub, pids: &[&str]) -> Vec<(String, Value)> {
    let mut seen: Vec<(String, Value)> = Vec::new();
    let pid_of = |topic: &str| topic.split('/').nth(3).unwrap_or_default().to_string();
    while !pids.iter().all(|p| seen.iter().any(|(s, _)| s == p)) {
        let msg = results.expect(|_| true, WAIT).await;
        seen.push((pid_of(&msg.topic), json(&msg.payload)));
    }
    while let Some(msg) = results.next(Duration::from_secs(1)).await {
        seen.push((pid_of(&msg.topic), json(&msg.payload)));
    }
    seen
}

/// Cancels a pending and then a running prompt; returns (what cancel answered, the results seen).
async fn cancel_pending_then_running(setup: &mut Setup) -> (Vec<Value>, Vec<(String, Value)>, [String; 2]) {
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let mut states = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/state").await;
    let a = setup.queue("long").await;
    let b = setup.queue("long").await;
    let running = |m: &MqttMsg| m.topic.contains(&a) && json(&m.payload)["state"] == "running";
    states.expect(running, WAIT).await;
    let pending = setup.request("cancel", json!({ "prompt_id": b })).await;
    let running = setup.request("cancel", json!({ "prompt_id": a })).await;
    let seen = results_for(&mut results, &[&a, &b]).await;
    (vec![pending, running], seen, [a, b])
}

/// On a newer ComfyUI, `cancel` goes through `POST /api/jobs/{id}/cancel`: a pending prompt is removed (it
/// leaves no history; the bridge itself ends it `cancelled`), a running one interrupted (`interrupted`, not
/// `failed`), each with exactly one result, and never through the global `/interrupt` or `/queue`.
#[tokio::test]
async fn cancel_on_newer_comfyui_is_the_atomic_jobs_cancel_with_one_result_each() {
    let mut setup = start(NEWER, 0.1, |_| {}).await;
    let (answers, seen, [a, b]) = cancel_pending_then_running(&mut setup).await;
    assert_eq!(answers[0]["data"], json!({"cancelled": true, "was": "pending", "prompt_id": b}), "{}", answers[0]);
    assert_eq!(answers[1]["data"], json!({"cancelled": true, "was": "running", "prompt_id": a}), "{}", answers[1]);
    let of = |pid: &str| seen.iter().filter(|(p, _)| p == pid).map(|(_, r)| r["status"].clone()).collect::<Vec<_>>();
    assert_eq!(of(&b), [json!("cancelled")], "{seen:?}");
    assert_eq!(of(&a), [json!("interrupted")], "{seen:?}");
    let posts = setup.paths("POST");
    assert!(posts.contains(&format!("/jobs/{b}/cancel")) && posts.contains(&format!("/jobs/{a}/cancel")), "{posts:?}");
    assert!(!posts.iter().any(|p| p == "/interrupt" || p == "/queue"), "{posts:?}");
    assert!(canonical_uuid(&a) && canonical_uuid(&b), "newer servers take only lowercase UUIDs: {a} {b}");
    let probes = setup.paths("GET").iter().filter(|p| *p == "/jobs").count();
    assert_eq!(probes, 1, "the jobs API is probed once per connection");
    setup.daemon.stop().await;
}

/// On 0.3.64 nothing changes: `cancel` deletes a pending prompt with `POST /queue` and interrupts a running one
/// with the targeted `POST /interrupt`, after a `GET /api/jobs` that says 404.
#[tokio::test]
async fn cancel_on_0_3_64_keeps_queue_delete_and_interrupt() {
    let mut setup = start(RECORDED, 0.1, |_| {}).await;
    let (answers, seen, [a, b]) = cancel_pending_then_running(&mut setup).await;
    assert_eq!(answers[0]["data"]["was"], "pending", "{}", answers[0]);
    assert_eq!(answers[1]["data"]["was"], "running", "{}", answers[1]);
    let of = |pid: &str| seen.iter().filter(|(p, _)| p == pid).map(|(_, r)| r["status"].clone()).collect::<Vec<_>>();
    assert_eq!((of(&b), of(&a)), (vec![json!("cancelled")], vec![json!("interrupted")]), "{seen:?}");
    let posts = setup.paths("POST");
    assert!(posts.iter().any(|p| p == "/queue") && posts.iter().any(|p| p == "/interrupt"), "{posts:?}");
    assert!(!posts.iter().any(|p| p.starts_with("/jobs")), "{posts:?}");
    setup.daemon.stop().await;
}

/// On a newer ComfyUI, `interrupt` stops the running prompt by id through the jobs API and says whether it
/// did; a prompt id that is not the running one interrupts nothing.
#[tokio::test]
async fn interrupt_on_newer_comfyui_cancels_the_running_prompt_by_id() {
    let mut setup = start(NEWER, 0.1, |_| {}).await;
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let mut states = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/state").await;
    let a = setup.queue("long").await;
    states.expect(|m| m.topic.contains(&a) && json(&m.payload)["state"] == "running", WAIT).await;
    let other = "00000000-0000-4000-8000-000000000000";
    let wrong = setup.request("interrupt", json!({ "prompt_id": other })).await;
    assert_eq!(wrong["data"], json!({"interrupted": false, "prompt_id": other}), "{wrong}");
    let answer = setup.request("interrupt", json!({})).await;
    assert_eq!(answer["data"], json!({"interrupted": true, "prompt_id": a}), "{answer}");
    let seen = results_for(&mut results, &[&a]).await;
    assert_eq!(seen.iter().map(|(_, r)| r["status"].clone()).collect::<Vec<_>>(), [json!("interrupted")]);
    let posts = setup.paths("POST");
    assert!(posts.contains(&format!("/jobs/{a}/cancel")), "{posts:?}");
    assert!(!posts.iter().any(|p| p == "/interrupt"), "{posts:?}");
    setup.daemon.stop().await;
}

/// A newer ComfyUI sends `execution_success` before its history entry has the outputs. The bridge's own
/// prompt takes them from the `executed` events; a prompt queued by someone else (seen only through `/queue`
/// and `/history`) gets them from history read again a moment later.
#[tokio::test]
async fn results_carry_outputs_although_execution_success_comes_before_history_has_them() {
    let mut setup = start(NEWER, 0.0, |_| {}).await;
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let own = setup.queue("probe").await;
    let seen = results_for(&mut results, &[&own]).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1["status"], "success");
    assert!(seen[0].1["outputs"]["4"]["images"][0]["url"].is_string(), "{}", seen[0].1);

    let foreign = setup.sim.queue_as(&workflow("a_success__prompt"), Some("web-ui-tab")).expect("queued");
    let seen = results_for(&mut results, &[&foreign]).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1["status"], "success");
    assert!(seen[0].1["outputs"]["4"]["images"][0]["url"].is_string(), "outputs from history: {}", seen[0].1);
    setup.daemon.stop().await;
}

/// A reconnect with the same client id leaves the new socket deaf (ComfyUI issue 16010): broadcasts come, the
/// bridge's running prompt sends nothing. After `comfyui.deaf_after_ms` the bridge counts it on `/metrics`,
/// replaces the socket, and the prompt still gets its result.
#[tokio::test]
async fn a_deaf_socket_is_counted_replaced_and_the_prompt_still_gets_its_result() {
    let port = free_port();
    let mut setup = start(NEWER, 0.3, |s| {
        s.comfyui.deaf_after_ms = 400;
        s.http.listen = Some(format!("127.0.0.1:{port}"));
    })
    .await;
    let deaf = r#"comfy_bridge_deaf_sockets_total "#;
    let before = metric(&metrics_until(port, |m| m.contains(deaf)).await, deaf);
    setup.sim.deafen_next_reconnect();
    setup.sim.disconnect_all();
    setup.sim.wait_for_client(WAIT).await.expect("the bridge reconnects");
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let pid = setup.queue("probe").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let result = loop {
        // Broadcasts keep coming (a new-style asset event), as on a busy server.
        setup.sim.send_raw_text(r#"{"type": "assets.seed.started", "data": {}}"#);
        if let Some(msg) = results.next(Duration::from_millis(100)).await {
            break json(&msg.payload);
        }
        assert!(tokio::time::Instant::now() < deadline, "no result for {pid}");
    };
    assert_eq!((result["prompt_id"].as_str(), result["status"].as_str()), (Some(pid.as_str()), Some("success")));
    let metrics = metrics_until(port, |m| metric(m, deaf) > before).await;
    assert!(metric(&metrics, deaf) >= before + 1.0, "{metrics}");
    setup.daemon.stop().await;
}

/// Newer broadcast event types carry dots (`assets.seed.started`): they reach `event/<type>` with the dots
/// escaped, on MQTT and NATS alike, and keep their type in the payload.
#[tokio::test]
async fn dotted_event_types_route_escaped_to_event_on_both_buses() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(NEWER, 0.0).await;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;
    let mut mqtt = mqtt_subscribe(&broker, "comfyui/local/event/#").await;
    let mut on_nats = nats_subscribe(&nats, "comfyui.local.event.>").await;
    sim.send_raw_text(r#"{"type": "assets.seed.started", "data": {"assets": 3}}"#);
    let msg = mqtt.expect(|m| m.topic.contains("assets"), WAIT).await;
    assert_eq!(msg.topic, "comfyui/local/event/assets=2Eseed=2Estarted");
    let envelope = json(&msg.payload);
    assert_eq!(
        (envelope["type"].as_str(), envelope["data"]["assets"].as_u64()),
        (Some("assets.seed.started"), Some(3))
    );
    let msg = on_nats.expect(|m| m.subject.contains("assets"), WAIT).await;
    assert_eq!(msg.subject, "comfyui.local.event.assets=2Eseed=2Estarted");
    assert_eq!(json(&msg.payload)["type"], "assets.seed.started");
    daemon.stop().await;
}
