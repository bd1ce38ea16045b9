//! Requests over real brokers, answered by the bridge against the simulated ComfyUI: every command on MQTT v5
//! (response topic + correlation data), MQTT v3.1.1 (fallback response topic) and NATS request-reply, with the
//! events, `state` and `result` a queued prompt produces.

mod common;

use std::time::Duration;

use comfy_bridge::config::Settings;
use comfy_sim::Simulator;
use common::daemon::{simulator, Daemon, ALL};
use common::requester::{mqtt311_publish, nats_client, nats_request, MqttRequester};
use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A templates directory holding `probe` (the recorded success workflow), `long` and a broken file.
fn templates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("templates dir");
    let write = |name: &str, v: &Value| std::fs::write(dir.path().join(name), v.to_string()).expect("write");
    write("probe.json", &workflow("a_success__prompt"));
    write("long.json", &workflow("e_interrupt__p1_long"));
    std::fs::write(dir.path().join("broken.json"), "{ not json").expect("write");
    dir
}

/// Settings that take their templates from `dir`.
fn from(dir: &tempfile::TempDir) -> impl FnOnce(&mut Settings) + '_ {
    |s| s.commands.templates_dir = dir.path().to_path_buf()
}

struct Setup {
    sim: Simulator,
    broker: Mosquitto,
    daemon: Daemon,
    _templates: tempfile::TempDir,
}

async fn start(speed: f64, configure: impl FnOnce(&mut Settings)) -> Setup {
    let broker = Mosquitto::start();
    let sim = simulator(ALL, speed).await;
    let templates = templates();
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(from(&templates)).with(configure).start().await;
    Setup { sim, broker, daemon, _templates: templates }
}

fn posted_prompts(sim: &Simulator) -> Vec<Value> {
    sim.requests().into_iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").map(|(_, _, body)| body).collect()
}

/// The newcomer's path: queue a template with a `set` over MQTT v5, get the prompt id back on the response
/// topic with the correlation data, then watch its events, state and result, all carrying the request id.
#[tokio::test]
async fn queue_a_template_over_mqtt_v5_and_follow_its_events_state_and_result() {
    let setup = start(0.0, |_| {}).await;
    let mut events = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/#").await;
    let mut requester = MqttRequester::connect(&setup.broker).await;

    let correlation = b"\x00\x01corr";
    let request = json!({"id": "req-1", "template": "probe", "set": {"Sleep with Progress.steps": 4, "4.filename_prefix": "bus/test"}});
    requester.send("comfyui/local/request/queue", request.to_string(), correlation).await;
    let response = requester.next(WAIT).await;
    assert_eq!(response.topic, requester.response_topic);
    assert_eq!(response.correlation.as_deref(), Some(&correlation[..]));
    assert_eq!(response.body["status"], "ok", "{}", response.body);
    assert_eq!(response.body["id"], "req-1");
    let pid = response.body["data"]["prompt_id"].as_str().expect("prompt id").to_string();
    assert!(response.body["data"]["number"].is_number());

    // ComfyUI got the edited workflow, for the bridge's own WebSocket client id.
    let posted = posted_prompts(&setup.sim);
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["prompt_id"], pid.as_str());
    assert_eq!(posted[0]["prompt"]["4"]["inputs"]["filename_prefix"], "bus/test");
    assert_eq!(
        Some(posted[0]["client_id"].as_str().expect("client id")),
        setup.sim.connected_clients().first().map(String::as_str)
    );

    let result_topic = format!("comfyui/local/prompt/{pid}/result");
    let msgs = events.collect_until(|m| m.topic == result_topic, WAIT).await;
    let of = |suffix: &str| -> Vec<Value> {
        msgs.iter()
            .filter(|m| m.topic.starts_with(&format!("comfyui/local/prompt/{pid}/")) && m.topic.ends_with(suffix))
            .map(|m| json(&m.payload))
            .collect()
    };
    let progress = of("/progress");
    assert!(!progress.is_empty(), "step progress arrives");
    assert!(progress.iter().all(|e| e["request_id"] == "req-1"), "events carry the request id");
    let states: Vec<Value> = of("/state");
    let phases: Vec<&str> = states.iter().filter_map(|s| s["state"].as_str()).collect();
    assert_eq!(phases.first(), Some(&"queued"), "{phases:?}");
    assert!(phases.contains(&"running"), "{phases:?}");
    assert_eq!(phases.last(), Some(&"success"), "{phases:?}");
    assert_eq!(states.last().expect("state")["fraction"], 1.0);
    let result = of("/result").pop().expect("result");
    assert_eq!(result["status"], "success");
    assert_eq!(result["request_id"], "req-1");
    let url = result["outputs"]["4"]["images"][0]["url"].as_str().expect("an image url");
    assert!(url.starts_with(&format!("{}/view?filename=", setup.sim.url())), "{url}");
    setup.daemon.stop().await;
}

/// Every command answers over NATS request-reply, with the right data or error code, and the daemon stays up.
#[tokio::test]
async fn every_command_answers_over_nats_request_reply() {
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let templates = templates();
    let daemon = Daemon::builder(&sim).nats(&nats).with(from(&templates)).start().await;
    let client = nats_client(&nats).await;
    let subject = |c: &str| format!("comfyui.local.request.{c}");
    // The subscription may take a moment after connecting.
    let mut status = Value::Null;
    for _ in 0..50 {
        let reply =
            tokio::time::timeout(Duration::from_millis(200), client.request(subject("status"), "{}".into())).await;
        if let Ok(Ok(msg)) = reply {
            status = json(&msg.payload);
            break;
        }
    }
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["data"]["comfyui"]["reachable"], true);
    assert!(status["data"]["comfyui"]["version"].as_str().is_some_and(|v| v.starts_with("0.3.64")), "{status}");
    assert!(status["data"]["bridge"]["version"].is_string());

    let templates = nats_request(&client, &subject("templates"), r#"{"id":"t"}"#).await;
    assert_eq!(templates["id"], "t");
    let names: Vec<&str> =
        templates["data"]["templates"].as_array().expect("list").iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["long", "probe"]);
    assert!(templates["data"]["errors"].to_string().contains("broken.json"), "{templates}");

    let patched = nats_request(&client, &subject("patch"), r#"{"template":"probe","set":{"2.steps":9}}"#).await;
    assert_eq!(patched["data"]["changed"], json!(["2.steps"]), "{patched}");
    let templates = nats_request(&client, &subject("templates"), "").await;
    assert!(templates["data"].to_string().contains(r#""steps":9"#), "the patch shows in templates");

    let upload = json!({"filename": "cat.png", "data_base64": "iVBORw0KGgo=", "subfolder": "bus"});
    let uploaded = nats_request(&client, &subject("upload"), upload.to_string()).await;
    assert_eq!(uploaded["status"], "ok", "{uploaded}");
    assert_eq!(uploaded["data"]["name"], "cat.png");
    let raw = nats_request(&client, &subject("upload.dog=2Epng"), vec![0x89, b'P', b'N', b'G']).await;
    assert_eq!(raw["data"]["name"], "dog.png", "{raw}");

    let freed = nats_request(&client, &subject("free"), r#"{"unload_models":true}"#).await;
    assert_eq!(freed, json!({"status": "ok", "data": {}}));
    let cleared = nats_request(&client, &subject("clear"), "").await;
    assert_eq!(cleared["data"]["cleared"], 0);
    let interrupted = nats_request(&client, &subject("interrupt"), "").await;
    assert_eq!(interrupted["data"]["interrupted"], false);
    let cancel = nats_request(&client, &subject("cancel"), r#"{"id":"c","prompt_id":"nope"}"#).await;
    assert_eq!((cancel["id"].clone(), cancel["error"]["code"].clone()), (json!("c"), json!("not_found")));

    for (command, payload, code) in [
        ("reboot", r#"{"id":"x"}"#, "unknown_command"),
        ("queue", "{ nope", "invalid_json"),
        ("queue", r#"{"templte":"probe"}"#, "invalid_request"),
        ("queue", r#"{"template":"nope"}"#, "unknown_template"),
        ("queue", r#"{"template":"probe","set":{"9.steps":1}}"#, "patch_failed"),
        ("queue", r#"{"workflow":{"1":{"inputs":{}}}}"#, "invalid_request"),
        ("upload", r#"{"filename":"../../etc/passwd","data_base64":"AA=="}"#, "invalid_request"),
        ("upload.=2E=2E", "x", "invalid_request"),
    ] {
        let answer = nats_request(&client, &subject(command), payload.to_string()).await;
        assert_eq!(answer["status"], "error", "{command} {payload}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{command} {payload}: {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let huge = format!(r#"{{"workflow":{}}}"#, "[".repeat(100_000));
    let answer = nats_request(&client, &subject("queue"), huge).await;
    assert_eq!(answer["error"]["code"], "invalid_json");
    let uploads = sim.requests().into_iter().filter(|(_, p, _)| p.starts_with("/upload")).count();
    assert_eq!(uploads, 2, "rejected uploads never reach ComfyUI");
    assert!(posted_prompts(&sim).is_empty(), "no rejected queue request reached ComfyUI");
    daemon.stop().await;
}

/// A v3.1.1 client has no response topic: the response comes on `response/<command>`, echoing the id.
#[tokio::test]
async fn mqtt_v311_requests_are_answered_on_the_response_topic() {
    let setup = start(0.0, |_| {}).await;
    let mut responses = mqtt_subscribe(&setup.broker, "comfyui/local/response/#").await;
    mqtt311_publish(setup.broker.port, "comfyui/local/request/status", br#"{"id":"v311"}"#, false).await;
    let msg = responses.expect(|m| m.topic == "comfyui/local/response/status", WAIT).await;
    let body = json(&msg.payload);
    assert_eq!((body["id"].clone(), body["status"].clone()), (json!("v311"), json!("ok")));
    setup.daemon.stop().await;
}

/// A repeated request id (MQTT QoS 1 redelivers) gets the first response again and queues nothing twice; a
/// retained request never runs.
#[tokio::test]
async fn a_repeated_request_id_acts_once_and_retained_requests_are_ignored() {
    let broker = Mosquitto::start();
    // Retained before the bridge even starts: it must not replay when the bridge subscribes.
    mqtt311_publish(broker.port, "comfyui/local/request/queue", br#"{"id":"old","template":"probe"}"#, true).await;
    let sim = simulator(ALL, 0.0).await;
    let templates = templates();
    let daemon = Daemon::builder(&sim).mqtt(&broker).with(from(&templates)).start().await;
    let mut requester = MqttRequester::connect(&broker).await;
    let first = requester.request("comfyui/local/request/queue", r#"{"id":"once","template":"probe"}"#, WAIT).await;
    let again = requester.request("comfyui/local/request/queue", r#"{"id":"once","template":"probe"}"#, WAIT).await;
    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(first, again, "the first response again");
    let other = requester.request("comfyui/local/request/queue", r#"{"id":"twice","template":"probe"}"#, WAIT).await;
    assert_ne!(other["data"]["prompt_id"], first["data"]["prompt_id"]);
    assert_eq!(posted_prompts(&sim).len(), 2, "one POST per distinct id, none for the retained request");
    daemon.stop().await;
}

/// ComfyUI gone: requests that need it fail fast with `comfyui_unavailable`; `status` says so and still answers.
#[tokio::test]
async fn comfyui_stopped_gives_comfyui_unavailable_not_a_hang() {
    let Setup { sim, broker, daemon, _templates } = start(0.0, |s| s.comfyui.request_timeout_ms = 2_000).await;
    drop(sim);
    let mut requester = MqttRequester::connect(&broker).await;
    let started = std::time::Instant::now();
    let answer = requester.request("comfyui/local/request/queue", r#"{"id":"q","template":"probe"}"#, WAIT).await;
    assert_eq!(answer["error"]["code"], "comfyui_unavailable", "{answer}");
    let status = requester.request("comfyui/local/request/status", "", WAIT).await;
    assert_eq!(status["data"]["comfyui"]["reachable"], false, "{status}");
    assert!(started.elapsed() < Duration::from_secs(8), "answered in {:?}", started.elapsed());
    daemon.stop().await;
}

/// Cancel a pending prompt (deleted, result `cancelled`) and a running one (interrupted, result `interrupted`).
#[tokio::test]
async fn cancel_pending_and_running_prompts_and_interrupt() {
    let setup = start(0.1, |_| {}).await;
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let mut requester = MqttRequester::connect(&setup.broker).await;
    let queue = |id: &str| json!({"id": id, "template": "long"}).to_string();
    let first = requester.request("comfyui/local/request/queue", queue("a"), WAIT).await;
    let second = requester.request("comfyui/local/request/queue", queue("b"), WAIT).await;
    let (a, b) = (first["data"]["prompt_id"].as_str().expect("a"), second["data"]["prompt_id"].as_str().expect("b"));

    let cancel = |pid: &str| json!({"prompt_id": pid}).to_string();
    let pending = requester.request("comfyui/local/request/cancel", cancel(b), WAIT).await;
    assert_eq!(pending["data"], json!({"cancelled": true, "was": "pending", "prompt_id": b}), "{pending}");
    let msg = results.expect(|m| m.topic.contains(b), WAIT).await;
    assert_eq!(json(&msg.payload)["status"], "cancelled");

    let wrong = requester.request("comfyui/local/request/interrupt", r#"{"prompt_id":"other"}"#, WAIT).await;
    assert_eq!(wrong["data"]["interrupted"], false, "only the named prompt is interrupted");
    let running = requester.request("comfyui/local/request/cancel", cancel(a), WAIT).await;
    assert_eq!(running["data"]["was"], "running", "{running}");
    let msg = results.expect(|m| m.topic.contains(a), WAIT).await;
    assert_eq!(json(&msg.payload)["status"], "interrupted");
    setup.daemon.stop().await;
}

/// A prompt queued by someone else (the web UI) is invisible on the WebSocket but still gets state and result.
#[tokio::test]
async fn a_foreign_prompt_gets_state_and_result() {
    let setup = start(0.0, |_| {}).await;
    let mut prompts = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/#").await;
    let body = json!({"prompt": workflow("a_success__prompt"), "client_id": "web-ui-user"});
    let answer = post_json(&format!("{}/prompt", setup.sim.url()), &body).await;
    let pid = answer["prompt_id"].as_str().expect("prompt id").to_string();
    let msg = prompts.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), WAIT).await;
    let result = json(&msg.payload);
    assert_eq!(result["status"], "success", "{result}");
    assert!(result["outputs"].as_object().is_some_and(|o| !o.is_empty()), "{result}");
    assert!(result.get("request_id").is_none());
    setup.daemon.stop().await;
}

/// The WebSocket is cut while the bridge's prompt runs and it ends during the gap: after reconnecting, the
/// bridge still publishes its result, from history.
#[tokio::test]
async fn a_prompt_that_ends_while_the_websocket_is_down_still_gets_its_result() {
    let setup = start(0.5, |s| s.comfyui.reconnect_max_ms = 200).await;
    let mut results = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/+/result").await;
    let mut requester = MqttRequester::connect(&setup.broker).await;
    let answer = requester.request("comfyui/local/request/queue", r#"{"id":"gap","template":"probe"}"#, WAIT).await;
    let pid = answer["data"]["prompt_id"].as_str().expect("pid").to_string();
    setup.sim.refuse_websockets(true);
    setup.sim.disconnect_all();
    // The prompt (about 1.5 s at this speed) ends while nobody listens.
    let deadline = tokio::time::Instant::now() + WAIT;
    while setup.sim.queue_remaining() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the prompt never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup.sim.refuse_websockets(false);
    let msg = results.expect(|m| m.topic.contains(&pid), WAIT).await;
    let result = json(&msg.payload);
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["request_id"], "gap");
    assert!(result["outputs"]["4"]["images"][0]["url"].is_string(), "{result}");
    setup.daemon.stop().await;
}

/// `commands.allow` limits what runs and `commands.deny_node_classes` what may be queued; the rest is
/// `not_allowed`.
#[tokio::test]
async fn commands_outside_the_allow_list_and_denied_node_classes_are_not_allowed() {
    let setup = start(0.0, |s| {
        s.commands.allow = vec!["status".into(), "queue".into()];
        s.commands.deny_node_classes = vec!["SaveImage".into()];
    })
    .await;
    let mut requester = MqttRequester::connect(&setup.broker).await;
    let denied = requester.request("comfyui/local/request/clear", r#"{"id":"no"}"#, WAIT).await;
    assert_eq!((denied["id"].clone(), denied["error"]["code"].clone()), (json!("no"), json!("not_allowed")));
    let denied = requester.request("comfyui/local/request/queue", r#"{"template":"probe"}"#, WAIT).await;
    assert_eq!(denied["error"]["code"], "not_allowed", "{denied}");
    assert_eq!(denied["error"]["details"]["nodes"], json!(["4 (SaveImage)"]));
    let merged = json!({"template": "probe", "merge": {"4": null, "5": null}});
    let queued = requester.request("comfyui/local/request/queue", merged.to_string(), WAIT).await;
    assert_eq!(queued["status"], "ok", "without the denied node it runs: {queued}");
    let allowed = requester.request("comfyui/local/request/status", "", WAIT).await;
    assert_eq!(allowed["status"], "ok");
    assert!(!setup.sim.requests().iter().any(|(m, p, _)| m == "POST" && p == "/queue"));
    assert_eq!(posted_prompts(&setup.sim).len(), 1, "only the allowed workflow reached ComfyUI");
    setup.daemon.stop().await;
}

async fn post_json(url: &str, body: &Value) -> Value {
    let client = reqwest::Client::new();
    let response = client.post(url).body(body.to_string()).send().await.expect("post");
    json(&response.bytes().await.expect("answer"))
}

/// One way of asking the bridge.
enum Via {
    V5(MqttRequester),
    V311(u16, MqttSub),
    Nats(async_nats::Client),
}

impl Via {
    fn name(&self) -> &'static str {
        match self {
            Self::V5(_) => "mqtt v5",
            Self::V311(..) => "mqtt v3.1.1",
            Self::Nats(_) => "nats",
        }
    }

    /// Sends `body` (which carries an `id`) as `command` and returns the response with that id.
    async fn ask(&mut self, command: &str, body: &Value) -> Value {
        let payload = body.to_string();
        match self {
            Self::V5(requester) => requester.request(&format!("comfyui/local/request/{command}"), payload, WAIT).await,
            Self::V311(port, responses) => {
                mqtt311_publish(*port, &format!("comfyui/local/request/{command}"), payload.as_bytes(), false).await;
                let topic = format!("comfyui/local/response/{command}");
                // A request too large to read has no id to echo.
                let ours = |m: &MqttMsg| {
                    let id = &json(&m.payload)["id"];
                    id.is_null() || *id == body["id"]
                };
                let msg = responses.expect(|m| m.topic == topic && ours(m), WAIT).await;
                json(&msg.payload)
            }
            Self::Nats(client) => nats_request(client, &format!("comfyui.local.request.{command}"), payload).await,
        }
    }
}

/// Each command, on each of the three ways in, gets its one response with the same outcome.
#[tokio::test]
async fn every_command_works_the_same_over_mqtt_v5_mqtt_v311_and_nats() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let templates = templates();
    let small = |s: &mut Settings| s.commands.max_payload_bytes = 64 * 1024;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).with(from(&templates)).with(small).start().await;
    let client = nats_client(&nats).await;
    // The NATS subscription is made right after connecting; wait until it answers.
    for _ in 0..50 {
        let probe = client.request("comfyui.local.request.status".to_string(), "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
            break;
        }
    }
    let ways = [
        Via::V5(MqttRequester::connect(&broker).await),
        Via::V311(broker.port, mqtt_subscribe(&broker, "comfyui/local/response/#").await),
        Via::Nats(client),
    ];
    let big = "x".repeat(100 * 1024);
    for mut via in ways {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("status", json!({}), "ok"),
            ("templates", json!({}), "ok"),
            ("patch", json!({"template": "probe", "set": {"2.seed": 1}}), "ok"),
            ("upload", json!({"filename": "in.png", "data_base64": "AAAA"}), "ok"),
            ("free", json!({"free_memory": true}), "ok"),
            ("clear", json!({}), "ok"),
            ("interrupt", json!({}), "ok"),
            ("queue", json!({"template": "probe"}), "ok"),
            ("cancel", json!({"prompt_id": "nobody"}), "not_found"),
            ("queue", json!({"template": "probe", "pad": big}), "payload_too_large"),
            ("nope", json!({}), "unknown_command"),
        ];
        for (i, (command, mut body, expected)) in cases.into_iter().enumerate() {
            let id = format!("{}-{i}", via.name());
            body["id"] = json!(id);
            let answer = via.ask(command, &body).await;
            let outcome = answer["error"]["code"].as_str().unwrap_or(answer["status"].as_str().unwrap_or("?"));
            assert_eq!(outcome, expected, "{} {command}: {answer}", via.name());
            if expected != "payload_too_large" {
                assert_eq!(answer["id"], json!(id), "{} {command}: the id is echoed", via.name());
            }
        }
    }
    assert_eq!(posted_prompts(&sim).len(), 3, "one prompt per way in");
    daemon.stop().await;
}

/// `commands.enabled = false` is a read-only bridge: events flow, requests go unheard and nothing reaches
/// ComfyUI.
#[tokio::test]
async fn a_read_only_bridge_takes_no_requests() {
    let setup = start(0.0, |s| s.commands.enabled = false).await;
    let mut requester = MqttRequester::connect(&setup.broker).await;
    requester.send("comfyui/local/request/queue", r#"{"template":"probe"}"#, b"c").await;
    requester.send("comfyui/local/request/status", "{}", b"d").await;
    requester.expect_silence(Duration::from_millis(800)).await;
    assert!(posted_prompts(&setup.sim).is_empty());
    let mut events = mqtt_subscribe(&setup.broker, "comfyui/local/prompt/#").await;
    let pid = setup.sim.play("a_success").await.expect("plays");
    events.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), WAIT).await;
    setup.daemon.stop().await;
}
