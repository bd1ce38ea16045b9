//! Workflows as actors (issue 13): a workflow's `Bus Ask` asks on both buses and waits; an answer on MQTT, a
//! NATS reply, or none at all (timeout) decides how it goes on; the first answer wins; an interrupt ends the
//! wait; `Bus Publish` (and its image) reaches both buses; who may answer is the command policy's call.

mod common;

use std::time::Duration;

use common::daemon::{tap_simulator, Daemon};
use common::requester::{nats_client, nats_request, MqttRequester};
use common::*;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// A workflow that asks on `ask/prompt/llm`, then publishes on `flow/done` (with an image).
fn ask_workflow(timeout: f64, on_timeout: &str) -> Value {
    json!({
        "1": {"class_type": "Bus Ask", "inputs": {"subject": "prompt/llm", "payload": "{\"q\": \"a cat?\"}",
              "timeout_seconds": timeout, "on_timeout": on_timeout, "default": "fallback"}},
        "2": {"class_type": "Bus Publish", "inputs": {"subject": "done", "payload": "{\"ok\": true}", "image": ["1", 0]}},
    })
}

fn ends_with(topic: &str, suffix: &str) -> bool {
    topic.ends_with(suffix)
}

/// Starts a tap simulator and a bridge on both buses.
async fn setup(
    broker: &Mosquitto,
    nats: &NatsServer,
    configure: impl FnOnce(&mut comfy_bridge::config::Settings),
) -> (comfy_sim::Simulator, Daemon) {
    let sim = tap_simulator("a_success.jsonl", 0.0).await;
    let port = probe::free_port();
    let listen = |s: &mut comfy_bridge::config::Settings| s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::builder(&sim).mqtt(broker).nats(nats).with(listen).with(configure).start().await;
    // Until the bridge's socket is a tap that got the extension's hello (so it can answer).
    probe::tap_active(port).await;
    (sim, daemon)
}

#[tokio::test]
async fn an_ask_appears_on_both_buses_and_an_mqtt_answer_lets_the_workflow_go_on() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let mut flow = mqtt_subscribe(&broker, "comfyui/local/flow/#").await;
    let mut states = mqtt_subscribe(&broker, "comfyui/local/prompt/+/state").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let mut nats_asks = nats_subscribe(&nats, "comfyui.local.ask.>").await;
    let mut nats_flow = nats_subscribe(&nats, "comfyui.local.flow.>").await;
    let (sim, daemon) = setup(&broker, &nats, |_| {}).await;

    let pid = sim.queue_as(&ask_workflow(30.0, "error"), Some("browser")).expect("queued");
    let question = asks.expect(|m| m.topic == "comfyui/local/ask/prompt/llm", WAIT).await;
    let question = json(&question.payload);
    let ask_id = question["ask_id"].as_str().expect("ask id").to_string();
    assert_eq!((question["prompt_id"].as_str(), question["node_id"].as_str()), (Some(pid.as_str()), Some("1")));
    assert_eq!(question["payload"], json!({"q": "a cat?"}));
    assert_eq!(question["reply_to"]["mqtt"], format!("comfyui/local/answer/{ask_id}"));
    assert_eq!(question["reply_to"]["nats"], format!("comfyui.local.answer.{ask_id}"));
    let on_nats = nats_asks.expect(|m| m.subject.as_str() == "comfyui.local.ask.prompt.llm", WAIT).await;
    assert_eq!(json(&on_nats.payload)["ask_id"], ask_id);
    assert_eq!(on_nats.reply.as_deref(), Some(format!("comfyui.local.answer.{ask_id}").as_str()));

    let waiting = states.expect(|m| json(&m.payload)["state"] == "waiting", WAIT).await;
    assert_eq!(json(&waiting.payload)["ask"], json!({"ask_id": ask_id, "subject": "prompt/llm"}));

    mqtt_publish(&broker, &format!("comfyui/local/answer/{ask_id}"), b"a grey cat", false).await;
    let result = results.expect(|m| m.topic.contains(&pid), WAIT).await;
    assert_eq!(json(&result.payload)["status"], "success");
    assert_eq!(sim.accepted_answers(), vec![(ask_id.clone(), "a grey cat".to_string())]);

    // `Bus Publish` after it: the envelope and the image's bytes, on both buses.
    let published = flow.collect_until(|m| ends_with(&m.topic, "/image"), WAIT).await;
    let envelope = published.iter().find(|m| m.topic == "comfyui/local/flow/done").expect("flow/done");
    let envelope = json(&envelope.payload);
    assert_eq!((envelope["type"].as_str(), envelope["prompt_id"].as_str()), (Some("publish"), Some(pid.as_str())));
    assert_eq!(
        (envelope["data"]["subject"].as_str(), &envelope["data"]["payload"]),
        (Some("done"), &json!({"ok": true}))
    );
    let image = published.last().expect("image");
    assert_eq!(image.topic, "comfyui/local/flow/done/image");
    assert!(image.payload.starts_with(b"\x89PNG"), "the image's bytes");
    let on_nats = nats_flow.collect_until(|m| m.subject.ends_with(".image"), WAIT).await;
    assert!(on_nats.iter().any(|m| m.subject.as_str() == "comfyui.local.flow.done"));
    let image = on_nats.last().expect("image");
    assert!(image.headers.contains(&("Content-Type".to_string(), "image/png".to_string())), "{:?}", image.headers);
    daemon.stop().await;
}

#[tokio::test]
async fn a_nats_reply_to_the_question_answers_it_and_a_second_answer_is_late() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let answerer = nats_client(&nats).await;
    let mut questions = answerer.subscribe("comfyui.local.ask.>").await.expect("subscribe");
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon) = setup(&broker, &nats, |_| {}).await;

    let pid = sim.queue_as(&ask_workflow(30.0, "error"), None).expect("queued");
    let question = tokio::time::timeout(WAIT, questions.next()).await.expect("a question").expect("open");
    let ask_id = json(&question.payload)["ask_id"].as_str().expect("ask id").to_string();
    // What `nats reply` or a NATS micro service does.
    answerer.publish(question.reply.expect("a reply subject"), "yes".into()).await.expect("reply");
    let result = results.expect(|m| m.topic.contains(&pid), WAIT).await;
    assert_eq!(json(&result.payload)["status"], "success");
    assert_eq!(sim.accepted_answers(), vec![(ask_id.clone(), "yes".to_string())]);

    // First answer wins: a later one is told so, and the node kept the first.
    let mut requester = MqttRequester::connect(&broker).await;
    let late = json!({"id": "a2", "ask_id": ask_id, "answer": "no"}).to_string();
    let response = requester.request("comfyui/local/request/answer", late, WAIT).await;
    assert_eq!(response["status"], "ok", "{response}");
    assert_eq!(
        (&response["data"]["accepted"], &response["data"]["reason"]),
        (&json!(false), &json!("late")),
        "{response}"
    );
    let unknown = json!({"ask_id": "nope", "answer": "no"}).to_string();
    let response = nats_request(&answerer, "comfyui.local.request.answer", unknown).await;
    assert_eq!(response["error"]["code"], "not_found", "{response}");
    assert_eq!(sim.accepted_answers().len(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn an_unanswered_ask_times_out_into_an_error_and_the_state_stops_waiting() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let mut states = mqtt_subscribe(&broker, "comfyui/local/prompt/+/state").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon) = setup(&broker, &nats, |_| {}).await;

    let pid = sim.queue_as(&ask_workflow(0.5, "error"), Some("browser")).expect("queued");
    let ask_id = json(&asks.expect(|_| true, WAIT).await.payload)["ask_id"].as_str().expect("id").to_string();
    let result = results.expect(|m| m.topic.contains(&pid), WAIT).await;
    let result = json(&result.payload);
    assert_eq!(result["status"], "error", "{result}");
    assert!(result["error"]["exception_message"].as_str().is_some_and(|m| m.contains("no answer")), "{result}");
    let seen: Vec<Value> = states
        .collect_until(|m| json(&m.payload)["state"] == "error", WAIT)
        .await
        .iter()
        .map(|m| json(&m.payload))
        .collect();
    assert!(seen.iter().any(|s| s["state"] == "waiting"), "{seen:?}");
    assert!(seen.last().is_some_and(|s| s.get("ask").is_none()));

    // An answer after the timeout reaches nobody.
    let mut requester = MqttRequester::connect(&broker).await;
    let response = requester
        .request("comfyui/local/request/answer", json!({"ask_id": ask_id, "answer": "x"}).to_string(), WAIT)
        .await;
    assert_eq!(response["data"]["accepted"], false, "{response}");
    assert!(sim.accepted_answers().is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn an_interrupt_ends_the_wait_at_once() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon) = setup(&broker, &nats, |_| {}).await;
    let client = nats_client(&nats).await;

    let pid = sim.queue_as(&ask_workflow(60.0, "error"), Some("browser")).expect("queued");
    asks.expect(|_| true, WAIT).await;
    let started = std::time::Instant::now();
    let response =
        nats_request(&client, "comfyui.local.request.interrupt", json!({"prompt_id": pid}).to_string()).await;
    assert_eq!(response["data"]["interrupted"], true, "{response}");
    let result = results.expect(|m| m.topic.contains(&pid), WAIT).await;
    assert_eq!(json(&result.payload)["status"], "interrupted");
    assert!(started.elapsed() < Duration::from_secs(10), "the 60 s wait ended with the interrupt");
    assert!(sim.waiting_asks().is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn the_command_policy_decides_who_may_answer() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon) = setup(&broker, &nats, |s| s.commands.allow = vec!["status".into()]).await;
    let pid = sim.queue_as(&ask_workflow(1.5, "default"), Some("browser")).expect("queued");
    let ask_id = json(&asks.expect(|_| true, WAIT).await.payload)["ask_id"].as_str().expect("id").to_string();
    let client = nats_client(&nats).await;
    // A raw answer with a reply subject is answered with why not.
    let response = nats_request(&client, &format!("comfyui.local.answer.{ask_id}"), "yes").await;
    assert_eq!(response["error"]["code"], "not_allowed", "{response}");
    mqtt_publish(&broker, &format!("comfyui/local/answer/{ask_id}"), b"yes", false).await;
    // The default, after the timeout: no answer got through.
    assert_eq!(json(&results.expect(|m| m.topic.contains(&pid), WAIT).await.payload)["status"], "success");
    assert!(sim.accepted_answers().is_empty());
    daemon.stop().await;

    // A read-only bridge takes no answers at all.
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let (sim, daemon) = setup(&broker, &nats, |s| s.commands.enabled = false).await;
    sim.queue_as(&ask_workflow(1.0, "default"), Some("browser")).expect("queued");
    let ask_id = json(&asks.expect(|_| true, WAIT).await.payload)["ask_id"].as_str().expect("id").to_string();
    mqtt_publish(&broker, &format!("comfyui/local/answer/{ask_id}"), b"yes", false).await;
    let client = nats_client(&nats).await;
    client.publish(format!("comfyui.local.answer.{ask_id}"), "yes".into()).await.expect("publish");
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sim.accepted_answers().is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn home_assistant_shows_the_question_and_where_to_answer() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut ha = mqtt_subscribe(&broker, "comfyui/local/ha/+").await;
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let (sim, daemon) = setup(&broker, &nats, |s| s.homeassistant.enabled = true).await;
    sim.queue_as(&ask_workflow(30.0, "error"), Some("browser")).expect("queued");
    let ask_id = json(&asks.expect(|_| true, WAIT).await.payload)["ask_id"].as_str().expect("id").to_string();
    let sensor = ha.expect(|m| m.topic == "comfyui/local/ha/ask" && json(&m.payload)["waiting"] == true, WAIT).await;
    let sensor = json(&sensor.payload);
    assert_eq!(sensor["question"], r#"{"q":"a cat?"}"#);
    assert_eq!(sensor["answer_topic"], format!("comfyui/local/answer/{ask_id}"));
    let event = ha.expect(|m| m.topic == "comfyui/local/ha/asked", WAIT).await;
    assert_eq!(
        (json(&event.payload)["event_type"].as_str(), json(&event.payload)["ask_id"].as_str()),
        (Some("asked"), Some(ask_id.as_str()))
    );
    // What an automation does with the notification's answer.
    mqtt_publish(&broker, sensor["answer_topic"].as_str().expect("topic"), b"yes", false).await;
    let done = ha.expect(|m| m.topic == "comfyui/local/ha/ask" && json(&m.payload)["waiting"] == false, WAIT).await;
    assert_eq!(json(&done.payload)["outcome"], "answered");
    daemon.stop().await;
}

#[tokio::test]
async fn an_approval_shows_its_image_and_a_no_cancels_the_prompt() {
    let (broker, nats) = (Mosquitto::start(), NatsServer::start());
    let mut asks = mqtt_subscribe(&broker, "comfyui/local/ask/#").await;
    let mut results = mqtt_subscribe(&broker, "comfyui/local/prompt/+/result").await;
    let (sim, daemon) = setup(&broker, &nats, |_| {}).await;
    let approve = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "Bus Ask", "inputs": {"subject": "approve", "payload": "Keep this one?", "timeout_seconds": 30,
              "on_timeout": "error", "default": "", "image": ["1", 0]}},
        "3": {"class_type": "Bus Publish", "inputs": {"subject": "approved", "payload": ["2", 0]}},
    });
    let pid = sim.queue_as(&approve, Some("browser")).expect("queued");
    let got = asks.collect_until(|m| m.topic == "comfyui/local/ask/approve/image", WAIT).await;
    let question = json(&got.iter().find(|m| m.topic == "comfyui/local/ask/approve").expect("question").payload);
    let url = question["image"]["url"].as_str().expect("the image's /view url");
    assert!(url.starts_with(&sim.url()) && url.contains("comfy_bridge_2.png"), "{url}");
    assert!(got.last().expect("image").payload.starts_with(b"\x89PNG"));
    // What the approval flow does with "no": cancel the prompt, which ends the wait at once.
    let client = nats_client(&nats).await;
    let response = nats_request(&client, "comfyui.local.request.cancel", json!({"prompt_id": pid}).to_string()).await;
    assert_eq!(response["data"]["cancelled"], true, "{response}");
    assert_eq!(json(&results.expect(|m| m.topic.contains(&pid), WAIT).await.payload)["status"], "interrupted");
    assert!(sim.accepted_answers().is_empty());
    daemon.stop().await;
}
