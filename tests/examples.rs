//! The examples a user imports (examples/): the ComfyUI workflows with `Bus Ask`, the Node-RED flow that answers
//! `ask/prompt`, and the Home Assistant approval automation, checked against what the bridge really publishes.

use std::process::{Command, Stdio};

use comfy_bridge::config::Settings;
use comfy_bridge::flow::{self, Flow, Ids};
use comfy_bridge::homeassistant::Device;
use serde_json::{json, Value};

/// The repository's root, where `examples/` is.
fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `[node, output]` link of an API-format workflow names a node of it.
fn assert_links_resolve(path: &str, workflow: &Value) {
    for (id, node) in workflow.as_object().expect("object") {
        for (input, value) in node["inputs"].as_object().expect("inputs") {
            if let Some(link) = value.as_array() {
                let target = link[0].as_str().expect("a node id");
                assert!(workflow.get(target).is_some(), "{path}: {id}.{input} links to missing node {target}");
            }
        }
    }
}

/// The question the bridge publishes for a `Bus Ask` of `subject` (through the same code as the daemon).
fn ask(subject: &str, with_image: bool) -> (Value, Value) {
    let mut settings = Settings::default();
    settings.homeassistant.enabled = true;
    let mut data = json!({"ask_id": "Kd9_x-2", "prompt_id": "p-1", "node_id": "10", "subject": subject,
                          "payload": "Keep this image?", "timeout_seconds": 600});
    if with_image {
        data["image"] = json!({"filename": "comfy_bridge_temp_a_00001_.png", "subfolder": "", "type": "temp"});
    }
    let message = comfy_bridge::comfy::tap::Message { kind: "ask".into(), data };
    let handled = Flow::new(&flow::Config::from(&settings)).handle(&message, Ids::default()).expect("a valid ask");
    let question: Value = serde_json::from_slice(&handled.messages[0].payload).expect("json");
    let change = handled.ask.expect("an ask");
    let ha = Device::default().ask("local", &change);
    let asked = ha.iter().find(|m| m.route.as_str() == "local/ha/asked").expect("the asked event");
    (question, serde_json::from_slice(&asked.payload).expect("json"))
}

#[test]
fn the_workflows_ask_where_the_flow_and_the_automation_listen() {
    let template = load("examples/templates/txt2img.json");
    for (path, subject) in
        [("examples/workflows/ask-prompt.json", "prompt"), ("examples/workflows/ask-approve.json", "approve")]
    {
        let workflow = load(path);
        assert_links_resolve(path, &workflow);
        let asks: Vec<&Value> =
            workflow.as_object().expect("object").values().filter(|n| n["class_type"] == "Bus Ask").collect();
        assert_eq!(asks.len(), 1, "{path}");
        assert_eq!(asks[0]["inputs"]["subject"], subject, "{path}");
        // The rest is the text-to-image template.
        for id in ["3", "4", "5", "7", "8"] {
            assert_eq!(workflow[id], template[id], "{path}: node {id}");
        }
    }
    let prompt = load("examples/workflows/ask-prompt.json");
    assert_eq!(prompt["6"]["inputs"]["text"], json!(["10", 0]), "the answer is the positive prompt");
    let approve = load("examples/workflows/ask-approve.json");
    assert_eq!(approve["10"]["inputs"]["image"], json!(["8", 0]), "the image goes with the question");
    assert_eq!(approve["9"]["inputs"]["filename_prefix"], json!(["11", 0]), "saving waits for the answer");
}

#[test]
fn the_node_red_flow_answers_the_prompt_question_on_its_reply_topic() {
    let flow = load("examples/node-red/ask-prompt-flow.json");
    let nodes = flow.as_array().expect("a flow is a list of nodes");
    let core = ["tab", "mqtt-broker", "mqtt in", "mqtt out", "function", "debug"];
    for node in nodes {
        assert!(core.contains(&node["type"].as_str().unwrap_or_default()), "only core nodes: {node}");
        for wire in node["wires"].as_array().into_iter().flatten().flat_map(|w| w.as_array().into_iter().flatten()) {
            assert!(nodes.iter().any(|n| n["id"] == *wire), "wired to a missing node: {wire}");
        }
    }
    let input = nodes.iter().find(|n| n["type"] == "mqtt in").expect("mqtt in");
    let (question, _) = ask("prompt", false);
    let route = comfy_bridge::bus::topics::Route::for_subject("local", "ask", &["prompt"], None);
    assert_eq!(input["topic"], route.mqtt_topic("comfyui"));
    assert_eq!(input["datatype"], "json");
    let function = nodes.iter().find(|n| n["type"] == "function").expect("function")["func"].as_str().expect("code");
    assert!(function.contains("question.reply_to.mqtt") && question["reply_to"]["mqtt"].is_string(), "{question}");
    let output = nodes.iter().find(|n| n["type"] == "mqtt out").expect("mqtt out");
    assert_eq!(output["topic"], "", "the answer topic comes from msg.topic");
}

/// Renders the automation's templates as Home Assistant would for one `asked` event, with Jinja2 in strict
/// mode; returns what each rendered to, keyed by where it is.
fn render_automation(asked: &Value, pressed: &str) -> Value {
    const SCRIPT: &str = r#"
import json, sys
try:
    import jinja2, yaml
except ImportError as e:
    sys.exit("python3 needs jinja2 and PyYAML (pip install jinja2 pyyaml): %s" % e)
path, attributes, pressed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
automation = yaml.safe_load(open(path))
env = jinja2.Environment(undefined=jinja2.StrictUndefined)
env.filters["tojson"] = lambda v: json.dumps(v)
scope = {"trigger": {"to_state": {"attributes": attributes}}}
render = lambda t: env.from_string(t).render(**scope)
out = {"condition": render(automation["conditions"][0]["value_template"])}
for key, value in automation["actions"][0]["variables"].items():
    scope[key] = attributes if key == "ask" else render(value)
notify = automation["actions"][1]
out["notify"] = notify["action"]
out["message"] = render(notify["data"]["message"])
out["image"] = render(notify["data"]["data"]["image"])
out["buttons"] = [render(a["action"]) for a in notify["data"]["data"]["actions"]]
out["waits_for"] = [render(t["event_data"]["action"]) for t in automation["actions"][2]["wait_for_trigger"]]
scope["wait"] = {"trigger": {"event": {"data": {"action": scope["action_" + pressed]}}}}
branch = automation["actions"][3]
taken = branch["then"] if render(branch["if"][0]["value_template"]) == "True" else branch["else"]
out["publish"] = {"topic": render(taken[0]["data"]["topic"]), "payload": render(taken[0]["data"]["payload"])}
print(json.dumps(out))
"#;
    let path = root().join("examples/homeassistant/ask-approve.yaml");
    let child = Command::new("python3")
        .args(["-c", SCRIPT, &path.to_string_lossy(), &asked.to_string(), pressed])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("json")
}

#[test]
fn the_approval_automation_notifies_with_the_image_and_answers_or_cancels() {
    let (question, asked) = ask("approve", true);
    let yes = render_automation(&asked, "yes");
    assert_eq!(yes["condition"], "True");
    assert_eq!(yes["message"], "Keep this image?");
    assert_eq!(yes["image"], question["image"]["url"]);
    assert_eq!(yes["buttons"], yes["waits_for"]);
    assert_eq!(yes["publish"], json!({"topic": question["reply_to"]["mqtt"], "payload": "yes"}));
    let no = render_automation(&asked, "no");
    assert_eq!(no["publish"]["topic"], "comfyui/local/request/cancel");
    let cancel: Value = serde_json::from_str(no["publish"]["payload"].as_str().expect("text")).expect("a request");
    assert_eq!(cancel, json!({"prompt_id": question["prompt_id"]}));
    // Other questions are not this automation's.
    let (_, other) = ask("prompt", true);
    assert_eq!(render_automation(&other, "yes")["condition"], "False");
}
