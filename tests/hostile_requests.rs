//! Hostile and careless requesters: replies aimed into the bridge's own tree, Home Assistant commands past the
//! command policy, floods of command names and of requests, and requests larger than the limits. Each is
//! answered (or ignored and counted) and never makes the bridge act, publish as itself, or fall over.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use comfy_bridge::config::Settings;
use comfy_sim::Simulator;
use common::daemon::{simulator, Daemon, ALL};
use common::probe::{free_port, metrics_until, nats_ready, sample};
use common::requester::{mqtt311_publish, nats_client, nats_request, MqttRequester};
use common::*;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn count(sim: &Simulator, method: &str, path: &str) -> usize {
    sim.requests().iter().filter(|(m, p, _)| m == method && p == path).count()
}

/// A templates directory holding `probe` (the recorded success workflow).
fn templates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("templates dir");
    std::fs::copy(fixtures::workflow_path("a_success__prompt"), dir.path().join("probe.json")).expect("template");
    dir
}

/// Settings that take their templates from `dir`.
fn from(dir: &tempfile::TempDir) -> impl FnOnce(&mut Settings) + '_ {
    |s| s.commands.templates_dir = dir.path().to_path_buf()
}

/// A bridge on NATS only, with `/metrics` on a port of its own, answering requests.
struct NatsBridge {
    _nats: NatsServer,
    sim: Simulator,
    daemon: Daemon,
    client: async_nats::Client,
    /// The `/metrics` port.
    port: u16,
}

async fn start_nats(configure: impl FnOnce(&mut Settings)) -> NatsBridge {
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let port = free_port();
    let metrics = |s: &mut Settings| s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::builder(&sim).nats(&nats).with(metrics).with(configure).start().await;
    let client = nats_client(&nats).await;
    nats_ready(&client, "comfyui.local").await;
    NatsBridge { _nats: nats, sim, daemon, client, port }
}

/// A requester allowed to publish only requests cannot make the bridge publish, as itself, a result of someone
/// else's prompt, its own availability, a Home Assistant config, a command to itself or a JetStream API call:
/// every such reply is refused with `invalid_request` on `response/<command>`, and the request does nothing.
#[tokio::test]
async fn replies_into_the_bridges_tree_or_home_assistants_are_refused_on_both_buses() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(ALL, 0.0).await;
    let templates = templates();
    let daemon = Daemon::builder(&sim)
        .mqtt(&broker)
        .nats(&nats)
        .with(|s| s.homeassistant.enabled = true)
        .with(from(&templates))
        .start()
        .await;
    let client = nats_client(&nats).await;
    nats_ready(&client, "comfyui.local").await;

    // MQTT v5: response topics inside the bridge's tree, Home Assistant's, or not publishable at all.
    let mut everything = mqtt_subscribe(&broker, "#").await;
    let victims = [
        "comfyui/local/prompt/victim/result",
        "comfyui/local/bridge/availability",
        "comfyui/local/ha/prompt/set",
        "comfyui/local/request/free",
        "homeassistant/sensor/comfy_bridge_local/fake/config",
        "rel/+/x",
        "$SYS/fake",
    ];
    let mut requester = MqttRequester::connect(&broker).await;
    let own = requester.response_topic.clone();
    for (i, victim) in victims.iter().enumerate() {
        requester.response_topic = victim.to_string();
        requester.send("comfyui/local/request/free", json!({ "id": format!("spoof-{i}") }).to_string(), b"c").await;
    }
    let mut refused = BTreeMap::new();
    while refused.len() < victims.len() {
        let msg = everything.next(WAIT).await.unwrap_or_else(|| panic!("refusals so far: {refused:?}"));
        // The requests themselves pass by on `request/free`; a response never may.
        let spoofed =
            victims.iter().any(|v| msg.topic == *v) && !msg.retain && json(&msg.payload)["status"] != Value::Null;
        assert!(!spoofed, "the bridge published to {}: {:?}", msg.topic, msg.payload);
        if msg.topic == "comfyui/local/response/free" {
            let body = json(&msg.payload);
            assert_eq!(
                (&body["status"], &body["error"]["code"]),
                (&json!("error"), &json!("invalid_request")),
                "{body}"
            );
            let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
            assert!(message.starts_with("the response topic "), "{message}");
            refused.insert(body["id"].as_str().unwrap_or_default().to_string(), message);
        }
    }
    assert!(refused["spoof-0"].contains("inside `comfyui/`"), "{refused:?}");
    assert!(refused["spoof-4"].contains("inside `homeassistant/`"), "{refused:?}");
    assert!(refused["spoof-5"].contains("wildcard"), "{refused:?}");

    // NATS: reply subjects inside the bridge's tree, Home Assistant's (as NATS maps MQTT) or the JetStream API.
    let victims = [
        "comfyui.local.prompt.victim.result",
        "comfyui.local.bridge.availability",
        "homeassistant.sensor.comfy_bridge_local.fake.config",
        "$JS.API.STREAM.DELETE.victim",
    ];
    let mut planted = Vec::new();
    for victim in victims {
        planted.push(client.subscribe(victim.to_string()).await.expect("subscribe"));
    }
    let mut responses = client.subscribe("comfyui.local.response.free".to_string()).await.expect("subscribe");
    client.flush().await.expect("flush");
    for (i, victim) in victims.iter().enumerate() {
        let payload = Bytes::from(json!({ "id": format!("nats-spoof-{i}") }).to_string());
        client.publish_with_reply("comfyui.local.request.free", victim.to_string(), payload).await.expect("publish");
    }
    for _ in victims {
        let msg = tokio::time::timeout(WAIT, responses.next()).await.expect("a refusal in time").expect("open");
        let body = json(&msg.payload);
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.starts_with("the reply subject ")), "{body}");
    }
    for mut sub in planted {
        let nothing = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
        assert!(nothing.is_err(), "the bridge published to a planted subject: {nothing:?}");
    }

    // None of them did anything; a request with a reply of its own still works.
    assert_eq!(count(&sim, "POST", "/free"), 0, "a refused request must not act");
    assert_eq!(count(&sim, "POST", "/prompt"), 0, "a response fed back as a Home Assistant command");
    requester.response_topic = own;
    let answer = requester.request("comfyui/local/request/free", "{}", WAIT).await;
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(count(&sim, "POST", "/free"), 1);
    daemon.stop().await;
}

/// With Home Assistant on, its entity commands go through the command policy: a read-only bridge, and one
/// whose `commands.allow` lacks `queue`, ignore (and count) a prompt typed in Home Assistant.
#[tokio::test]
async fn home_assistant_commands_obey_read_only_and_the_allow_list() {
    for (read_only, reason) in [(true, "read_only"), (false, "not_allowed")] {
        let broker = Mosquitto::start();
        let sim = simulator(ALL, 0.0).await;
        let templates = templates();
        let port = free_port();
        let configure = |s: &mut Settings| {
            s.http.listen = Some(format!("127.0.0.1:{port}"));
            s.homeassistant.enabled = true;
            s.commands.enabled = !read_only;
            s.commands.allow = vec!["status".into()];
        };
        let mut selected = mqtt_subscribe(&broker, "comfyui/local/ha/template").await;
        let daemon = Daemon::builder(&sim).mqtt(&broker).with(from(&templates)).with(configure).start().await;
        selected.expect(|m| &m.payload[..] == b"probe", WAIT).await;

        let series = format!(r#"comfy_bridge_requests_ignored_total{{bus="mqtt",reason="{reason}"}}"#);
        let before = sample(&metrics_until(port, |b| b.contains("requests_ignored_total")).await, &series);
        mqtt311_publish(broker.port, "comfyui/local/ha/prompt/set", b"a red fox", false).await;
        metrics_until(port, |b| sample(b, &series) > before).await;
        assert_eq!(count(&sim, "POST", "/prompt"), 0, "read_only={read_only}: a prompt was queued");
        daemon.stop().await;
    }
}

/// 2,000 made-up command names are each answered `unknown_command`, but count as one `other` label: `/metrics`
/// stays small.
#[tokio::test]
async fn unknown_command_names_do_not_grow_the_metrics() {
    let bridge = start_nats(|_| {}).await;
    let (client, port) = (&bridge.client, bridge.port);

    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.expect("subscribe");
    for batch in 0..10 {
        for i in 0..200 {
            let subject = format!("comfyui.local.request.made-up-{batch}-{i}");
            client.publish_with_reply(subject, inbox.clone(), Bytes::new()).await.expect("publish");
        }
        for _ in 0..200 {
            let msg = tokio::time::timeout(WAIT, answers.next()).await.expect("an answer in time").expect("open");
            assert_eq!(json(&msg.payload)["error"]["code"], "unknown_command");
        }
    }
    let series = r#"comfy_bridge_requests_total{command="other",outcome="unknown_command"}"#;
    let body = metrics_until(port, |b| sample(b, series) >= 2000.0).await;
    let requests = body.lines().filter(|l| l.starts_with("comfy_bridge_requests_total{")).count();
    assert!(requests < 60, "{requests} requests_total series");
    assert!(!body.contains("made-up"), "no label carries a made-up name");
    assert!(body.len() < 64 * 1024, "/metrics is {} bytes", body.len());
    bridge.daemon.stop().await;
}

/// A flood of `status` requests while ComfyUI is slow: the excess is answered `busy` at once, those that waited
/// longer than `comfyui.request_timeout_ms` get `comfyui_unavailable`, every request gets exactly one answer,
/// and a `queue` request sent afterwards is answered within seconds.
#[tokio::test]
async fn a_request_flood_is_answered_busy_and_a_later_request_still_gets_through() {
    // 32 waiting for 8 slots at 600 ms a request: the last of them wait longer than the timeout, however
    // fast the flood arrives.
    let bridge = start_nats(|s| {
        s.commands.max_waiting_requests = 32;
        s.comfyui.request_timeout_ms = 1_000;
    })
    .await;
    let (sim, client, port) = (&bridge.sim, &bridge.client, bridge.port);
    sim.set_http_delay(Duration::from_millis(600));

    const FLOOD: usize = 400;
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.expect("subscribe");
    for i in 0..FLOOD {
        let payload = Bytes::from(json!({ "id": format!("flood-{i}") }).to_string());
        client.publish_with_reply("comfyui.local.request.status", inbox.clone(), payload).await.expect("publish");
    }
    let mut codes: BTreeMap<String, String> = BTreeMap::new();
    while codes.len() < FLOOD {
        let msg = tokio::time::timeout(WAIT, answers.next()).await;
        let msg = msg.unwrap_or_else(|_| panic!("{} of {FLOOD} answered", codes.len())).expect("open");
        let body = json(&msg.payload);
        let code = body["error"]["code"].as_str().unwrap_or("ok").to_string();
        if code == "comfyui_unavailable" {
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("waited")), "{body}");
        }
        let id = body["id"].as_str().unwrap_or_else(|| panic!("no id: {body}")).to_string();
        assert!(codes.insert(id, code).is_none(), "answered twice: {body}");
    }
    let tally = |want: &str| codes.values().filter(|c| *c == want).count();
    let (ok, busy, late) = (tally("ok"), tally("busy"), tally("comfyui_unavailable"));
    assert_eq!(ok + busy + late, FLOOD, "only ok, busy or comfyui_unavailable: {codes:?}");
    assert!(busy >= FLOOD - 60, "the excess is answered busy: ok {ok}, busy {busy}, late {late}");
    assert!(ok >= 8 && late >= 1, "ok {ok}, busy {busy}, late {late}");

    let workflow = workflow("a_success__prompt");
    let queued = nats_request(client, "comfyui.local.request.queue", json!({ "workflow": workflow }).to_string()).await;
    assert_eq!(queued["status"], "ok", "{queued}");

    let series = r#"comfy_bridge_requests_total{command="status",outcome="busy"}"#;
    metrics_until(port, |b| sample(b, series) >= busy as f64).await;
    bridge.daemon.stop().await;
}

/// `{"id":"big","pad":"xxx…"}`, `len` bytes long.
fn padded(len: usize) -> Vec<u8> {
    let mut body = br#"{"id":"big","pad":""#.to_vec();
    body.resize(len - 2, b'x');
    body.extend_from_slice(br#""}"#);
    body
}

/// With the default limits, a request one byte over `commands.max_payload_bytes` is answered
/// `payload_too_large` over MQTT v5, MQTT v3.1.1 and NATS; a packet over `mqtt.max_packet_bytes` cannot be
/// answered, but does not keep the bridge from answering the next request.
#[tokio::test]
async fn a_request_over_the_limit_is_answered_payload_too_large_on_every_transport() {
    let broker = Mosquitto::start();
    let conf = tempfile::tempdir().expect("nats conf");
    let path = conf.path().join("nats.conf");
    std::fs::write(&path, "max_payload: 16777216\n").expect("write nats.conf");
    let nats = NatsServer::start_with(&["-c", path.to_str().expect("utf-8 path")]);
    let sim = simulator(ALL, 0.0).await;
    let limit = Settings::default().commands.max_payload_bytes;
    let too_big = padded(limit + 1);

    let v5 = Daemon::builder(&sim).mqtt(&broker).nats(&nats).start().await;
    let old = |s: &mut Settings| {
        s.bridge.instance = "old".into();
        s.mqtt.protocol = comfy_bridge::config::MqttProtocol::V311;
    };
    let v311 = Daemon::builder(&sim).mqtt(&broker).with(old).start().await;
    let client = nats_client(&nats).await;
    nats_ready(&client, "comfyui.local").await;

    let check = |body: &Value| {
        assert_eq!(
            body["error"]["code"],
            "payload_too_large",
            "{}",
            &body.to_string()[..200.min(body.to_string().len())]
        );
        assert_eq!(body["error"]["details"]["max_bytes"], limit);
        assert_eq!(body["error"]["details"]["bytes"], limit + 1);
    };
    let mut requester = MqttRequester::connect(&broker).await;
    check(&requester.request("comfyui/local/request/status", too_big.clone(), WAIT).await);
    check(&nats_request(&client, "comfyui.local.request.status", too_big.clone()).await);
    let mut responses = mqtt_subscribe(&broker, "comfyui/old/response/status").await;
    mqtt311_publish(broker.port, "comfyui/old/request/status", &too_big, false).await;
    check(&json(&responses.next(WAIT).await.expect("a v3.1.1 answer").payload));

    // Over the packet limit: the v5 broker never delivers it, the v3.1.1 bridge is cut off and reconnects.
    let huge = padded(17 * 1024 * 1024);
    requester.send("comfyui/local/request/status", huge.clone(), b"huge").await;
    mqtt311_publish(broker.port, "comfyui/old/request/status", &huge, false).await;
    let answer = requester.request("comfyui/local/request/status", "{}", WAIT).await;
    assert_eq!(answer["status"], "ok", "{answer}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        mqtt311_publish(broker.port, "comfyui/old/request/status", br#"{"id":"after"}"#, false).await;
        if let Some(msg) = responses.next(Duration::from_millis(500)).await {
            let body = json(&msg.payload);
            if body["id"] == "after" {
                assert_eq!(body["status"], "ok", "{body}");
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the v3.1.1 bridge never answered again");
    }
    v311.stop().await;
    v5.stop().await;
}
