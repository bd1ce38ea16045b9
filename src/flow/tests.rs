use serde_json::{json, Value};

use super::*;
use crate::comfy::tap::Message;
use crate::config::Settings;

fn flow() -> Flow {
    let mut settings = Settings::default();
    settings.mqtt.enabled = true;
    settings.nats.enabled = true;
    Flow::new(&Config::from(&settings))
}

fn message(kind: &str, data: Value) -> Message {
    Message { kind: kind.to_string(), data }
}

fn ids() -> Ids<'static> {
    Ids { seq: 7, ts: 1_000, request_id: Some("req-1"), client_id: None }
}

fn body(msg: &Outbound) -> Value {
    serde_json::from_slice(&msg.payload).expect("json")
}

#[test]
fn a_publish_is_an_envelope_on_flow_with_its_subject_escaped_and_its_image_fetched() {
    let data = json!({"prompt_id": "p1", "node_id": "5", "subject": "/garden/cam 1/", "payload": {"n": 1},
                      "image": {"filename": "comfy_bridge_5.png", "subfolder": "", "type": "temp"}});
    let handled = flow().handle(&message("publish", data), ids()).expect("valid");
    let [msg] = handled.messages.as_slice() else { panic!("one message") };
    assert_eq!(msg.route.as_str(), "local/flow/garden/cam=201");
    assert_eq!((msg.qos, msg.retain, msg.class), (1, false, Class::Lifecycle));
    let envelope = body(msg);
    assert_eq!(envelope["type"], "publish");
    assert_eq!(envelope["data"]["subject"], "garden/cam 1");
    assert_eq!(envelope["data"]["payload"], json!({"n": 1}));
    assert_eq!(envelope["data"]["image"]["filename"], "comfy_bridge_5.png");
    let url = envelope["data"]["image"]["url"].as_str().expect("a /view url");
    assert!(url.ends_with("/view?filename=comfy_bridge_5.png&subfolder=&type=temp"), "{url}");
    assert_eq!((&envelope["prompt_id"], &envelope["node_id"]), (&json!("p1"), &json!("5")));
    assert_eq!(
        (&envelope["seq"], &envelope["ts"], &envelope["request_id"]),
        (&json!(7), &json!(1000), &json!("req-1"))
    );
    let fetch = handled.fetch.expect("an image to read");
    assert_eq!(fetch.route.as_str(), "local/flow/garden/cam=201/image");
    assert_eq!((fetch.filename.as_str(), fetch.kind.as_str()), ("comfy_bridge_5.png", "temp"));
    assert!(fetch.headers.contains(&("Comfy-Node-Id", "5".to_string())));
    assert_eq!(handled.ask, None);
}

#[test]
fn an_ask_is_published_once_with_where_to_answer_and_tells_the_tracker_each_time() {
    let mut flow = flow();
    let data = json!({"ask_id": "Abc-_1", "prompt_id": "p1", "node_id": "3", "subject": "approve",
                      "payload": "ok?", "timeout_seconds": 60});
    let handled = flow.handle(&message("ask", data.clone()), ids()).expect("valid");
    let [msg] = handled.messages.as_slice() else { panic!("one message") };
    assert_eq!(msg.route.as_str(), "local/ask/approve");
    assert_eq!(msg.reply_to.as_ref().map(Route::as_str), Some("local/answer/Abc-_1"));
    let question = body(msg);
    assert_eq!(
        (&question["ask_id"], &question["payload"], &question["subject"]),
        (&json!("Abc-_1"), &json!("ok?"), &json!("approve"))
    );
    assert_eq!(
        question["reply_to"],
        json!({"mqtt": "comfyui/local/answer/Abc-_1", "nats": "comfyui.local.answer.Abc-_1"})
    );
    assert_eq!(
        (&question["prompt_id"], &question["node_id"], &question["timeout_seconds"]),
        (&json!("p1"), &json!("3"), &json!(60))
    );
    let Some(AskChange::Waiting(ask)) = handled.ask else { panic!("waiting") };
    assert_eq!((ask.ask_id.as_str(), ask.subject.as_str()), ("Abc-_1", "approve"));
    assert_eq!(ask.answer_topic.as_deref(), Some("comfyui/local/answer/Abc-_1"));

    // The extension sends a waiting ask again to a tap that connects: the bus hears it once.
    let again = flow.handle(&message("ask", data), ids()).expect("valid");
    assert!(again.messages.is_empty());
    assert!(matches!(again.ask, Some(AskChange::Waiting(_))));

    let done =
        flow.handle(&message("ask_done", json!({"ask_id": "Abc-_1", "prompt_id": "p1", "outcome": "timeout"})), ids());
    let expected = AskChange::Done { prompt_id: "p1".into(), ask_id: "Abc-_1".into(), outcome: "timeout".into() };
    assert_eq!(done.expect("valid").ask, Some(expected));
}

#[test]
fn without_nats_the_question_names_only_the_mqtt_answer_topic() {
    let mut settings = Settings::default();
    settings.mqtt.enabled = true;
    settings.nats.enabled = false;
    let data = json!({"ask_id": "k", "prompt_id": "p", "subject": "q", "payload": 1});
    let handled = Flow::new(&Config::from(&settings)).handle(&message("ask", data), ids()).expect("valid");
    assert_eq!(body(&handled.messages[0])["reply_to"], json!({"mqtt": "comfyui/local/answer/k"}));
}

#[test]
fn messages_the_extension_does_not_send_are_refused_with_a_reason() {
    let mut flow = flow();
    let cases = [
        ("publish", json!({"prompt_id": "p", "payload": 1}), "no subject"),
        ("publish", json!({"prompt_id": "p", "subject": " / /", "payload": 1}), "empty subject"),
        ("publish", json!({"prompt_id": "p", "subject": "a/".repeat(MAX_LEVELS + 1)}), "subject has too many levels"),
        ("publish", json!({"prompt_id": "p", "subject": "a".repeat(MAX_SUBJECT_BYTES + 1)}), "subject too long"),
        ("publish", json!({"subject": "a"}), "no prompt_id"),
        ("ask", json!({"prompt_id": "p", "subject": "a", "ask_id": "a.b"}), "bad ask_id"),
        ("ask", json!({"prompt_id": "p", "subject": "a"}), "no ask_id"),
        ("hello_again", json!({"prompt_id": "p"}), "unknown comfy_bridge message type"),
    ];
    for (kind, data, why) in cases {
        assert_eq!(flow.handle(&message(kind, data.clone()), ids()).err(), Some(why), "{kind} {data}");
    }
}

#[test]
fn a_long_subject_level_is_hashed_and_the_route_stays_short() {
    let data = json!({"prompt_id": "p", "subject": format!("a/{}", "%".repeat(1000)), "payload": 1});
    let handled = flow().handle(&message("publish", data), ids()).expect("valid");
    let route = handled.messages[0].route.as_str().to_string();
    assert!(route.starts_with("local/flow/a/~") && route.len() < 64, "{route}");
}

#[test]
fn the_metrics_name_every_outcome() {
    answer_counted("late");
    let metrics = render_metrics();
    for outcome in ANSWER_OUTCOMES {
        assert!(metrics.contains(&format!("comfy_bridge_answers_total{{outcome=\"{outcome}\"}}")), "{metrics}");
    }
    assert!(!metrics.contains("comfy_bridge_answers_total{outcome=\"late\"} 0"), "{metrics}");
    assert!(metrics.contains("comfy_bridge_flow_images_total{outcome=\"dropped\"}"));
}

#[test]
fn an_ask_with_an_image_shows_it_and_has_it_read_for_ask_image() {
    let data = json!({"ask_id": "k", "prompt_id": "p", "node_id": "4", "subject": "approve", "payload": "keep it?",
                      "image": {"filename": "comfy_bridge_4.png", "subfolder": "", "type": "temp"}});
    let handled = flow().handle(&message("ask", data), ids()).expect("valid");
    let question = body(&handled.messages[0]);
    assert!(question["image"]["url"].as_str().is_some_and(|u| u.contains("filename=comfy_bridge_4.png")), "{question}");
    assert_eq!(handled.fetch.expect("the image is read").route.as_str(), "local/ask/approve/image");
    let Some(AskChange::Waiting(ask)) = handled.ask else { panic!("waiting") };
    assert_eq!(ask.image_url.as_deref(), question["image"]["url"].as_str());
}
