//! Hostile and careless clients against the buses (issue 8): a message the broker cannot take is that
//! message's failure, never the bus's; topics and subjects stay within what brokers carry; headers carry only
//! safe values; no subscriber can hold up delivery; the outbox is bounded in bytes; shutdown keeps its grace.

mod common;

use std::time::Duration;

use comfy_bridge::config::Settings;
use comfy_sim::Simulator;
use common::daemon::{settings, simulator, Daemon, SUCCESS};
use common::hostile::{free_port, get, metric, metrics_until, nats_raw};
use common::requester::{nats_client, MqttRequester};
use common::*;
use futures_util::StreamExt as _;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// Both brokers, the simulator and a ready bridge, with subscribers on both buses' `bridge/availability`
/// from before the bridge started (each reconnect republishes `online`).
struct Rig {
    broker: Mosquitto,
    nats: NatsServer,
    sim: Simulator,
    daemon: Daemon,
    port: u16,
    mqtt_availability: MqttSub,
    nats_availability: NatsSub,
}

async fn rig(tune: impl FnOnce(&mut Settings)) -> Rig {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let mqtt_availability = mqtt_subscribe(&broker, "comfyui/local/bridge/availability").await;
    let nats_availability = nats_subscribe(&nats, "comfyui.local.bridge.availability").await;
    let (mut s, state) = settings(&sim, Some(&broker), Some(&nats));
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    tune(&mut s);
    let daemon = Daemon::start(s, state);
    sim.wait_for_client(WAIT).await.expect("bridge connects to comfyui");
    let rig = Rig { broker, nats, sim, daemon, port, mqtt_availability, nats_availability };
    rig.until_ready().await;
    rig
}

/// Polls `/readyz` until it answers `want`.
async fn readyz_until(port: u16, want: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(port, "/readyz").await;
        if status == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never {want}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Rig {
    async fn until_ready(&self) {
        readyz_until(self.port, 200).await;
    }

    /// A fresh prompt's result arrives on both buses.
    async fn results_still_arrive(&self) {
        let mut mqtt = mqtt_subscribe(&self.broker, "comfyui/local/prompt/+/result").await;
        let mut nats = nats_subscribe(&self.nats, "comfyui.local.prompt.*.result").await;
        let pid = self.sim.play("a_success").await.expect("plays");
        mqtt.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), WAIT).await;
        nats.expect(|m| m.subject == format!("comfyui.local.prompt.{pid}.result"), WAIT).await;
    }

    /// Neither bus reconnected: each said `online` exactly once.
    async fn no_reconnect(&mut self) {
        for (bus, onlines) in [
            ("mqtt", drain(&mut self.mqtt_availability).await.iter().filter(|m| &m.payload[..] == b"online").count()),
            ("nats", drain(&mut self.nats_availability).await.iter().filter(|m| &m.payload[..] == b"online").count()),
        ] {
            assert_eq!(onlines, 1, "{bus} reconnected");
        }
    }

    /// A NATS request, retried while the request subscription is not there yet ("no responders").
    async fn nats_request(&self, subject: &str) -> Value {
        let client = nats_client(&self.nats).await;
        for _ in 0..100 {
            let ask = client.request(subject.to_string(), "{}".into());
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_millis(500), ask).await {
                return serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no answer on {subject}");
    }
}

/// Everything the subscriber has received so far.
async fn drain<T>(inbox: &mut common::subscribers::Inbox<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(m) = inbox.next(Duration::from_millis(200)).await {
        out.push(m);
    }
    out
}

/// Whether `/metrics` accounts for a refused MQTT response topic: dropped and counted by the publisher under
/// `reason`, or (when the command plane checks reply topics itself, a layer before the bus) answered
/// `invalid_request`. Either way it is accounted for, and never retried.
fn refused(metrics: &str, reason: &str) -> bool {
    metric(metrics, &format!(r#"comfy_bridge_messages_dropped_total{{bus="mqtt",reason="{reason}"}}"#)) >= 1.0
        || metric(metrics, r#"comfy_bridge_requests_total{command="status",outcome="invalid_request"}"#) >= 1.0
}

/// Finding 1: a response topic with a wildcard is refused by the client; that response is dropped and counted,
/// and the next request is answered as if nothing happened.
#[tokio::test]
async fn a_wildcard_response_topic_drops_that_response_only() {
    let mut rig = rig(|_| {}).await;
    let mut requester = MqttRequester::connect(&rig.broker).await;
    let own = std::mem::replace(&mut requester.response_topic, "rel/+/x".into());
    requester.send("comfyui/local/request/status", "{}", b"wild").await;
    requester.response_topic = own;
    let answer = requester.request("comfyui/local/request/status", "{}", WAIT).await;
    assert_eq!(answer["status"], "ok", "{answer}");
    metrics_until(rig.port, |m| refused(m, "invalid_topic")).await;
    rig.results_still_arrive().await;
    assert_eq!(get(rig.port, "/readyz").await.0, 200);
    rig.no_reconnect().await;
    rig.daemon.stop().await;
}

/// Finding 2: NATS messages whose subject or reply subject is not UTF-8 do not take the NATS side down, and
/// cost no other request: the ones sent right behind them, in the same write, are answered; so is the one
/// whose command is not UTF-8 (an unknown command), while the one with a reply subject that is not UTF-8,
/// which cannot be answered, is counted.
#[tokio::test]
async fn non_utf8_subjects_do_not_kill_nats() {
    let mut rig = rig(|_| {}).await;
    rig.nats_request("comfyui.local.request.status").await;
    let client = nats_client(&rig.nats).await;
    let mut answers = client.subscribe("answers.>").await.expect("subscribe");
    common::subscribers::nats_round_trip(&client).await;
    nats_raw(
        &rig.nats,
        b"PUB comfyui.local.request.\xff\xfe answers.poison 2\r\n{}\r\n\
          PUB comfyui.local.request.status answers.behind 2\r\n{}\r\n\
          PUB comfyui.local.request.status \xc3\x28 2\r\n{}\r\n\
          PUB comfyui.local.request.status answers.last 2\r\n{}\r\n",
    )
    .await;
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 3 {
        let msg = tokio::time::timeout(WAIT, answers.next()).await;
        let msg = msg.unwrap_or_else(|_| panic!("only {got:?} answered")).expect("subscription open");
        let answer: Value = serde_json::from_slice(&msg.payload).expect("json");
        got.insert(msg.subject.to_string(), answer);
    }
    assert_eq!(got["answers.behind"]["status"], "ok", "{got:?}");
    assert_eq!(got["answers.last"]["status"], "ok", "{got:?}");
    assert_eq!(got["answers.poison"]["error"]["code"], "unknown_command", "{got:?}");
    metrics_until(rig.port, |m| {
        metric(m, "comfy_bridge_requests_ignored_total{bus=\"nats\",reason=\"reply_not_utf8\"}") == 1.0
    })
    .await;
    rig.results_still_arrive().await;
    rig.until_ready().await;
    // The garbage reached only the request intake's own connection: the event stream never reconnected, and
    // neither did the intake.
    rig.no_reconnect().await;
    let metrics = get(rig.port, "/metrics").await.1;
    assert_eq!(metric(&metrics, "comfy_bridge_reconnects_total{component=\"nats_intake\"}"), 0.0, "{metrics}");
    rig.daemon.stop().await;
}

/// Finding 3: a 1,400-dot prompt id, a 22,000-dot MQTT request level, a 1,400-`%` NATS request and a
/// 22,000-byte response topic. Long levels become hashed levels, a topic over the limit is dropped and
/// counted, and neither bus reconnects.
#[tokio::test]
async fn overlong_levels_and_reply_topics_are_bounded_on_both_buses() {
    let mut rig = rig(|_| {}).await;
    let mut mqtt_events = mqtt_subscribe(&rig.broker, "comfyui/local/#").await;
    let mut nats_events = nats_subscribe(&rig.nats, "comfyui.local.>").await;
    let dots = ".".repeat(1_400);
    let start = serde_json::json!({"type": "execution_start", "data": {"prompt_id": dots, "timestamp": 1}});
    rig.sim.send_raw_text(&start.to_string());
    let hashed_start = |t: &str| t.contains("prompt/~") && t.ends_with("/execution_start");
    mqtt_events.expect(|m| hashed_start(&m.topic), WAIT).await;
    nats_events.expect(|m| hashed_start(&m.subject.replace('.', "/")), WAIT).await;

    mqtt_publish(&rig.broker, &format!("comfyui/local/request/{}", ".".repeat(22_000)), b"{}", false).await;
    let response = mqtt_events.expect(|m| m.topic.starts_with("comfyui/local/response/~"), WAIT).await;
    assert!(response.topic.len() < 100, "{}", response.topic);
    let client = nats_client(&rig.nats).await;
    client.publish(format!("comfyui.local.request.{}", "%".repeat(1_400)), "{}".into()).await.expect("publish");
    client.flush().await.expect("flush");
    let response = nats_events.expect(|m| m.subject.starts_with("comfyui.local.response.~"), WAIT).await;
    assert!(response.subject.len() < 100, "{}", response.subject);

    let mut requester = MqttRequester::connect(&rig.broker).await;
    let own = std::mem::replace(&mut requester.response_topic, format!("r/{}", "x".repeat(22_000)));
    requester.send("comfyui/local/request/status", "{}", b"long").await;
    requester.response_topic = own;
    requester.request("comfyui/local/request/status", "{}", WAIT).await;
    metrics_until(rig.port, |m| refused(m, "topic_too_long")).await;

    rig.results_still_arrive().await;
    rig.no_reconnect().await;
    rig.daemon.stop().await;
}

/// Finding 6: preview metadata with CR/LF cannot add headers (`Nats-Msg-Id` or any other) on NATS; the
/// unsafe headers are left out, the preview still goes out, and NATS keeps publishing.
#[tokio::test]
async fn preview_metadata_cannot_inject_nats_headers() {
    let rig = rig(|_| {}).await;
    let mut previews = nats_subscribe(&rig.nats, "comfyui.local.prompt.>").await;
    let meta = serde_json::json!({
        "prompt_id": "p1\r\nNats-Msg-Id: injected",
        "node_id": "3\r\nX-Evil: 1",
        "image_type": "image/png",
    })
    .to_string();
    let mut frame = 4u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    frame.extend_from_slice(meta.as_bytes());
    frame.extend_from_slice(b"\x89PNG\r\n\x1a\nnot really");
    rig.sim.send_raw_binary(frame);
    let preview = previews.expect(|m| m.subject.ends_with(".preview"), WAIT).await;
    let names: Vec<_> = preview.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    assert!(!names.iter().any(|n| n == "nats-msg-id" || n == "x-evil"), "{:?}", preview.headers);
    assert!(preview.headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])), "{:?}", preview.headers);
    assert!(names.iter().any(|n| n == "content-type"), "{:?}", preview.headers);
    rig.results_still_arrive().await;
    rig.daemon.stop().await;
}

/// Finding 7: a client subscribed to `>` sees everything the bridge publishes, confirmations included, and
/// still cannot hold up delivery: every event arrives exactly once and nothing is republished.
#[tokio::test]
async fn a_subscriber_on_everything_does_not_hold_up_nats_delivery() {
    let mut rig = rig(|s| s.nats.publish_timeout_ms = 300).await;
    let _everything = nats_subscribe(&rig.nats, ">").await;
    let mut events = nats_subscribe(&rig.nats, "comfyui.local.prompt.>").await;
    for _ in 0..2 {
        let pid = rig.sim.play("a_success").await.expect("plays");
        let msgs = events.collect_until(|m| m.subject == format!("comfyui.local.prompt.{pid}.result"), WAIT).await;
        let mut seqs: Vec<u64> = msgs
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .filter_map(|v| v["seq"].as_u64())
            .collect();
        let n = seqs.len();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), n, "an event arrived twice");
        assert!(n > 5, "{n} events");
    }
    rig.no_reconnect().await;
    rig.daemon.stop().await;
}

/// Finding 10: with the broker away, the outbox keeps at most `bridge.outbox_max_bytes`; what does not fit
/// is dropped and counted.
#[tokio::test]
async fn the_outbox_is_bounded_in_bytes_while_the_broker_is_away() {
    let sim = simulator(SUCCESS, 0.0).await;
    let nowhere = free_port();
    let (mut s, state) = settings(&sim, None, None);
    s.mqtt.enabled = true;
    s.mqtt.url = format!("mqtt://127.0.0.1:{nowhere}");
    s.bridge.outbox_max_bytes = 1 << 20;
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);
    sim.wait_for_client(WAIT).await.expect("bridge connects to comfyui");
    let big = "x".repeat(300_000);
    for i in 0..10 {
        let frame = serde_json::json!({"type": "executed", "data": {"prompt_id": format!("big{i}"), "node": "1", "output": {"text": [big]}}});
        sim.send_raw_text(&frame.to_string());
    }
    // 10 x 300 kB into 1 MiB: at least 7 dropped.
    metrics_until(port, |m| {
        metric(m, r#"comfy_bridge_messages_dropped_total{bus="mqtt",reason="outbox_full"}"#) >= 7.0
    })
    .await;
    daemon.stop().await;
}

/// Finding 15: a graceful stop leaves `comfyui/availability` `offline` too, and with the broker gone the
/// stop takes no longer than the grace period (it does not wait for a broker that is not there).
#[tokio::test]
async fn shutdown_marks_comfyui_offline_and_keeps_its_grace_without_a_broker() {
    let rig = rig(|_| {}).await;
    let broker = rig.broker;
    rig.daemon.stop().await;
    let mut late = mqtt_subscribe(&broker, "comfyui/local/+/availability").await;
    for _ in 0..2 {
        let retained = late.next(WAIT).await.expect("retained availability");
        assert_eq!((&retained.payload[..], retained.retain), (&b"offline"[..], true), "{}", retained.topic);
    }

    let mut broker = Mosquitto::start();
    let sim = simulator(SUCCESS, 0.0).await;
    let (mut s, state) = settings(&sim, Some(&broker), None);
    s.bridge.shutdown_grace_ms = 1_000;
    // Production-like backoff: the MQTT side is asleep between reconnect attempts when the stop comes.
    s.comfyui.reconnect_max_ms = 30_000;
    let port = free_port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);
    sim.wait_for_client(WAIT).await.expect("bridge connects to comfyui");
    readyz_until(port, 200).await;
    broker.stop();
    readyz_until(port, 503).await;
    sim.play("a_success").await.expect("plays");
    let started = std::time::Instant::now();
    daemon.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1_000 + 1_000), "shutdown took {took:?} with a grace of 1 s");
}

/// Finding 15, the stale `online`: over MQTT v5 the retained `online` carries a message expiry (refreshed
/// while the bridge lives), so a broker that was killed and comes back after the bridge died stops saying
/// `online` for it; `offline` carries none.
#[tokio::test]
async fn the_retained_online_expires_unless_refreshed() {
    let rig = rig(|_| {}).await;
    let (_client, mut rx) = common::subscribers::subscribe_v5(
        &rig.broker,
        format!("test-expiry-{}", fastrand::u64(..)),
        "comfyui/local/bridge/availability",
        |p| (p.payload, p.retain, p.properties.and_then(|pr| pr.message_expiry_interval)),
    )
    .await;
    let (payload, retain, expiry) = tokio::time::timeout(WAIT, rx.recv()).await.expect("in time").expect("open");
    assert_eq!((&payload[..], retain), (&b"online"[..], true));
    let expiry = expiry.expect("the retained online expires");
    assert!((60..=300).contains(&expiry), "{expiry} s");
    let broker = rig.broker;
    rig.daemon.stop().await;
    let (_client, mut rx) = common::subscribers::subscribe_v5(
        &broker,
        format!("test-expiry-{}", fastrand::u64(..)),
        "comfyui/local/bridge/availability",
        |p| (p.payload, p.properties.and_then(|pr| pr.message_expiry_interval)),
    )
    .await;
    let (payload, expiry) = tokio::time::timeout(WAIT, rx.recv()).await.expect("in time").expect("open");
    assert_eq!((&payload[..], expiry), (&b"offline"[..], None));
}

/// `/readyz` tells the truth: a NATS server that keeps the connection open but takes nothing (frozen) makes
/// the bus read as not ready as soon as a batch goes unconfirmed, and ready again once it moves; nothing is
/// lost meanwhile.
#[tokio::test]
async fn a_server_that_takes_nothing_reads_as_not_ready() {
    let rig = rig(|s| s.nats.publish_timeout_ms = 300).await;
    let mut results = nats_subscribe(&rig.nats, "comfyui.local.prompt.*.result").await;
    rig.nats.freeze(true);
    let pid = rig.sim.play("a_success").await.expect("plays");
    readyz_until(rig.port, 503).await;
    let (_, body) = get(rig.port, "/readyz").await;
    rig.nats.freeze(false);
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((ready["mqtt"].as_str(), ready["nats"].as_str()), (Some("connected"), Some("disconnected")));
    results.expect(|m| m.subject == format!("comfyui.local.prompt.{pid}.result"), WAIT).await;
    rig.until_ready().await;
    rig.daemon.stop().await;
}

/// The same for MQTT: a broker that keeps the connection open but takes nothing reads as not ready.
#[tokio::test]
async fn a_broker_that_takes_nothing_reads_as_not_ready() {
    let rig = rig(|_| {}).await;
    let mut results = mqtt_subscribe(&rig.broker, "comfyui/local/prompt/+/result").await;
    rig.broker.freeze(true);
    let pid = rig.sim.play("a_success").await.expect("plays");
    readyz_until(rig.port, 503).await;
    let (_, body) = get(rig.port, "/readyz").await;
    rig.broker.freeze(false);
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((ready["mqtt"].as_str(), ready["nats"].as_str()), (Some("disconnected"), Some("connected")));
    results.expect(|m| m.topic == format!("comfyui/local/prompt/{pid}/result"), WAIT).await;
    rig.until_ready().await;
    rig.daemon.stop().await;
}
