//! Every Home Assistant discovery config checked against Home Assistant's own rules: the keys each platform
//! requires, `default_entity_id` in the platform's domain, `origin`, and every template rendered with Jinja2
//! (Python's `jinja2`, the engine Home Assistant uses) against the `ha/state` payloads and against a result of
//! each status, among them one without an error and one without outputs. Undefined values are errors here
//! (`StrictUndefined`), where Home Assistant logs a warning for each.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use comfy_bridge::config::Settings;
use comfy_bridge::flow::{Ask, AskChange};
use comfy_bridge::homeassistant::{self as ha, DeviceState};
use serde_json::{json, Value};

/// Renders `(template, payload)` pairs as Home Assistant does (`value` and `value_json`); `Err` for a failure.
fn render(jobs: &[(String, String)]) -> Vec<Result<String, String>> {
    const SCRIPT: &str = r#"
import json, sys
try:
    import jinja2
except ImportError:
    sys.exit("python3 has no jinja2: install python3-jinja2 (Debian) or `pip install jinja2`")
env = jinja2.Environment(undefined=jinja2.StrictUndefined)
out = []
for template, payload in json.load(sys.stdin):
    try:
        try:
            value_json = json.loads(payload)
        except ValueError:
            value_json = None
        out.append({"ok": env.from_string(template).render(value=payload, value_json=value_json)})
    except Exception as e:
        out.append({"err": "%s: %s" % (type(e).__name__, e)})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (the templates are rendered with Jinja2)");
    let input = serde_json::to_vec(jobs).expect("json");
    child.stdin.take().expect("stdin").write_all(&input).expect("write");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).expect("rendered json");
    results
        .into_iter()
        .map(|r| match r["ok"].as_str() {
            Some(text) => Ok(text.to_string()),
            None => Err(r["err"].as_str().unwrap_or("?").to_string()),
        })
        .collect()
}

/// `(platform, object id) -> config` of everything a bridge with commands and templates announces.
fn configs() -> BTreeMap<(String, String), Value> {
    let mut settings = Settings::default();
    settings.homeassistant.enabled = true;
    let templates = ["txt2img".to_string()];
    ha::discovery(&ha::Config::from(&settings), &templates, true)
        .into_iter()
        .map(|(topic, payload)| {
            let parts: Vec<&str> = topic.split('/').collect();
            assert_eq!(
                (parts.len(), parts[0], parts[2], parts[4]),
                (5, "homeassistant", "comfy_bridge_local", "config")
            );
            let config = serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
            ((parts[1].to_string(), parts[3].to_string()), config)
        })
        .collect()
}

#[test]
fn every_config_has_what_its_platform_requires_and_the_documented_entity_id() {
    let all = configs();
    assert_eq!(all.len(), 17);
    for ((platform, object), config) in &all {
        let what = format!("{platform}.{object}: {config}");
        let has = |key: &str| config[key].as_str().is_some_and(|s| !s.is_empty());
        let required: &[&str] = match platform.as_str() {
            "sensor" | "binary_sensor" => &["state_topic"],
            "button" | "text" => &["command_topic"],
            "select" => &["command_topic"],
            "event" => &["state_topic"],
            "image" => &[],
            other => panic!("unexpected platform {other}"),
        };
        for key in required {
            assert!(has(key), "{what} needs {key}");
        }
        match platform.as_str() {
            "select" => assert!(config["options"].as_array().is_some_and(|o| !o.is_empty()), "{what}"),
            "event" => assert!(config["event_types"].as_array().is_some_and(|t| !t.is_empty()), "{what}"),
            // Exactly one of the two (they are exclusive).
            "image" => assert!(has("url_topic") != has("image_topic"), "{what}"),
            _ => {}
        }
        // The entity id automations are written against, in the platform's own domain.
        assert_eq!(config["default_entity_id"], format!("{platform}.comfy_bridge_local_{object}"), "{what}");
        assert!(config.get("object_id").is_none(), "removed in Home Assistant 2026.4: {what}");
        assert_eq!(config["unique_id"], format!("comfy_bridge_local_{object}"), "{what}");
        assert_eq!(config["origin"]["name"], "comfy-bridge", "{what}");
        assert_eq!(config["origin"]["sw_version"], env!("CARGO_PKG_VERSION"), "{what}");
        assert!(config["device"]["name"].is_string() && config["device"]["identifiers"].is_array(), "{what}");
        let availability = config["availability"].as_array().expect("availability list");
        assert!(availability.iter().all(|a| a["topic"].is_string()), "{what}");
        assert!(matches!(config["availability_mode"].as_str(), None | Some("all" | "any" | "latest")), "{what}");
        if config["device_class"] == "duration" {
            assert!(matches!(config["unit_of_measurement"].as_str(), Some("s" | "min" | "h" | "d" | "ms")), "{what}");
        }
    }
}

#[test]
fn every_template_renders_for_every_state_and_every_result_status() {
    let states = [
        DeviceState::default(),
        DeviceState { busy: true, queue: 2, progress: 43, node: Some("3".into()), ..DeviceState::default() },
        DeviceState {
            last_state: Some("error".into()),
            last_duration: Some(1.5),
            last_error: Some("CUDA out of memory".into()),
            ..DeviceState::default()
        },
    ]
    .map(|s| String::from_utf8_lossy(&s.render()).into_owned());
    let image =
        json!({"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output", "url": "http://x/view"}]}});
    let error = json!({"node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
                       "exception_message": "CUDA out of memory"});
    let results = [
        json!({"prompt_id": "p", "status": "success", "outputs": image, "duration_ms": 1500}),
        json!({"prompt_id": "p", "status": "success", "outputs": {}, "duration_ms": 3}),
        json!({"prompt_id": "p", "status": "error", "outputs": {}, "duration_ms": 900, "error": error}),
        json!({"prompt_id": "p", "status": "error", "outputs": {}, "error": {"exception_message": null}}),
        json!({"prompt_id": "p", "status": "interrupted", "outputs": {}, "duration_ms": 200}),
        json!({"prompt_id": "p", "status": "cancelled", "outputs": {}}),
    ]
    .map(|r| r.to_string());

    // What the Question sensor reads on `ha/ask`: a question that waits (text or JSON), then none.
    let mut device = ha::Device::default();
    let asked = |payload: Value| {
        AskChange::Waiting(Ask {
            prompt_id: "p".into(),
            ask_id: "k".into(),
            node_id: Some("1".into()),
            subject: "approve".into(),
            payload,
            answer_topic: Some("comfyui/local/answer/k".into()),
            image_url: None,
        })
    };
    let done = AskChange::Done { prompt_id: "p".into(), ask_id: "k".into(), outcome: "answered".into() };
    let mut asks = Vec::new();
    for change in [asked(json!("Publish it?")), done.clone(), asked(json!({"q": 1})), done] {
        let out = device.ask("local", &change);
        asks.push(String::from_utf8_lossy(&out[0].payload).into_owned());
    }

    let mut jobs = Vec::new();
    let mut checks: Vec<(String, String, &str)> = Vec::new();
    for ((platform, object), config) in configs() {
        let entity = format!("{platform}.{object}");
        let state_topic = config["state_topic"].as_str().unwrap_or_default();
        let payloads: &[String] = match state_topic {
            t if t.ends_with("/ha/state") => &states,
            t if t.ends_with("/ha/ask") => &asks,
            _ => &[],
        };
        if let Some(template) = config["value_template"].as_str() {
            for payload in payloads {
                jobs.push((template.to_string(), payload.clone()));
                checks.push((entity.clone(), payload.clone(), "value"));
            }
        }
        if config["json_attributes_topic"].as_str().is_some_and(|t| t.ends_with("/ha/last")) {
            let template = config["json_attributes_template"].as_str().unwrap_or("{{ value }}");
            for payload in &results {
                jobs.push((template.to_string(), payload.clone()));
                checks.push((entity.clone(), payload.clone(), "attributes"));
            }
        }
    }
    assert!(jobs.len() > 20, "templates found: {}", jobs.len());
    let rendered = render(&jobs);
    let mut seen = BTreeMap::new();
    for ((entity, payload, kind), out) in checks.into_iter().zip(rendered) {
        let out = out.unwrap_or_else(|e| panic!("{entity} {kind} template fails for {payload}: {e}"));
        let input: Value = serde_json::from_str(&payload).expect("json");
        match kind {
            // Attributes must be a JSON object; the Last error sensor's are the result's error, or none.
            "attributes" => {
                let attributes: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
                assert!(attributes.is_object(), "{entity} attributes for {payload}: {out}");
                if entity == "sensor.last_error" {
                    assert_eq!(attributes, input.get("error").cloned().unwrap_or(json!({})), "{payload}");
                }
            }
            _ => {
                let key = entity.split('.').nth(1).unwrap_or_default();
                let field = if key == "busy" { "busy" } else { key };
                let unknown = out == "None";
                match field {
                    "busy" => assert!(out == "ON" || out == "OFF", "{entity}: {out}"),
                    "queue" | "progress" => assert!(out.parse::<f64>().is_ok(), "{entity}: {out}"),
                    "last_duration" => assert!(unknown || out.parse::<f64>().is_ok(), "{entity}: {out}"),
                    // Nothing to show is unknown (`None`), never an empty string.
                    _ => {
                        assert!(!out.is_empty(), "{entity} renders an empty state for {payload}");
                        assert_eq!(unknown, input[field].is_null(), "{entity} for {payload}: {out}");
                    }
                }
            }
        }
        *seen.entry(entity).or_insert(0) += 1;
    }
    let checked = [
        "sensor.node",
        "sensor.last_error",
        "sensor.last_state",
        "sensor.queue",
        "binary_sensor.busy",
        "sensor.question",
    ];
    for entity in checked {
        assert!(seen.contains_key(entity), "{entity} not checked: {seen:?}");
    }
}
