//! Sessions shaped like a posted workflow that no recording matches: its own node ids run in dependency
//! order, its samplers report progress over their `steps`, its output nodes report images. So progress and
//! `nodes_total` make sense for whatever template was queued (a recording of another workflow would name
//! nodes the queued one does not have).

use serde_json::{json, Map, Value};

use super::frames;
use super::transcript::{Frame, FrameBody, RecordedPost, Scenario};

/// The prompt id the frames are written with; the replay maps it to the posted one.
const ID: &str = "synthetic";
/// Seconds each node takes, and each progress step.
const NODE_SECS: f64 = 0.1;
const STEP_SECS: f64 = 0.05;
/// Most progress steps reported per sampler.
const MAX_STEPS: u64 = 20;

/// Whether `a` and `b` have the same node ids with the same classes (edits of inputs do not change a shape).
pub(crate) fn same_shape(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return false };
    a.len() == b.len() && a.iter().all(|(id, node)| b.get(id).is_some_and(|o| o["class_type"] == node["class_type"]))
}

/// A successful run of `prompt`, with the first preview of `like` (if any) shown by its first sampler; `None`
/// when it has no output node (ComfyUI would refuse it: the recording is replayed instead).
pub(crate) fn session(prompt: &Value, like: &Scenario) -> Option<Scenario> {
    let nodes = prompt.as_object().cloned().unwrap_or_default();
    if !nodes.values().any(|n| output(n).is_some() || n["class_type"] == "Bus Publish") {
        return None;
    }
    let mut frames = Vec::new();
    let mut t = 0.0;
    frames.push(text(t, "execution_start", json!({"prompt_id": ID, "timestamp": 0})));
    frames.push(text(t, "execution_cached", json!({"nodes": [], "prompt_id": ID, "timestamp": 0})));
    let mut previewed = false;
    for id in order(&nodes) {
        let node = &nodes[&id];
        frames.push(text(t, "executing", json!({"node": id, "display_node": id, "prompt_id": ID})));
        let steps = node["inputs"]["steps"].as_u64().unwrap_or(0).min(MAX_STEPS);
        for step in 1..=steps {
            t += STEP_SECS;
            frames.push(text(t, "progress", json!({"value": step, "max": steps, "prompt_id": ID, "node": id})));
        }
        if steps > 0 && !previewed {
            previewed = true;
            if let Some(bytes) = preview(like, &id) {
                frames.push(Frame { t, body: FrameBody::Binary(bytes) });
            }
        }
        t += NODE_SECS;
        if let Some(frame) = bus_node(t, &id, node) {
            frames.push(frame);
        }
        if let Some(output) = output(node) {
            frames.push(text(
                t,
                "executed",
                json!({"node": id, "display_node": id, "output": output, "prompt_id": ID}),
            ));
        }
    }
    frames.push(text(t, "execution_success", json!({"prompt_id": ID, "timestamp": 0})));
    frames.push(text(t, "executing", json!({"node": null, "prompt_id": ID})));
    let posts = vec![RecordedPost { prompt_id: ID.to_string(), prompt: prompt.clone() }];
    Some(Scenario { name: "synthetic".into(), frames, posts, rejections: Vec::new(), prompt_ids: vec![ID.to_string()] })
}

fn text(t: f64, kind: &str, data: Value) -> Frame {
    Frame { t, body: FrameBody::Text(json!({"type": kind, "data": data})) }
}

/// Node ids, every node after the nodes its inputs link to (`["id", slot]`); ties in natural order.
fn order(nodes: &Map<String, Value>) -> Vec<String> {
    let deps = |node: &Value| -> Vec<String> {
        let inputs = node["inputs"].as_object().into_iter().flat_map(|i| i.values());
        inputs
            .filter_map(|v| v.as_array().filter(|a| a.len() == 2)?.first()?.as_str().map(str::to_string))
            .filter(|id| nodes.contains_key(id))
            .collect()
    };
    let mut ids: Vec<&String> = nodes.keys().collect();
    ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.to_string()));
    let mut done: Vec<String> = Vec::new();
    while done.len() < ids.len() {
        let ready =
            ids.iter().find(|id| !done.contains(id) && deps(&nodes[id.as_str()]).iter().all(|d| done.contains(d)));
        // A cycle: take the rest as they come.
        let next = ready.or_else(|| ids.iter().find(|id| !done.contains(id)));
        match next {
            Some(id) => done.push(id.to_string()),
            None => break,
        }
    }
    done
}

/// What the extension sends for a `Bus Publish` or `Bus Ask` node (extension/README.md); the replay sends
/// the first to the taps and runs the second (waits for its answer).
fn bus_node(t: f64, id: &str, node: &Value) -> Option<Frame> {
    let inputs = &node["inputs"];
    let subject = inputs["subject"].as_str().unwrap_or("status").trim_matches('/').to_string();
    let text = inputs["payload"].as_str().unwrap_or("{}");
    // JSON when it parses as JSON, else the text.
    let payload = serde_json::from_str::<Value>(text).unwrap_or_else(|_| json!(text));
    match node["class_type"].as_str()? {
        "Bus Publish" => {
            let mut data = json!({"prompt_id": ID, "node_id": id, "subject": subject, "payload": payload});
            if inputs["image"].is_array() {
                data["image"] = json!({"filename": format!("comfy_bridge_{id}.png"), "subfolder": "", "type": "temp"});
            }
            Some(Frame { t, body: FrameBody::Text(json!({"type": "comfy_bridge.publish", "data": data})) })
        }
        "Bus Ask" => {
            let mut data = json!({
                "prompt_id": ID, "node_id": id, "subject": subject, "payload": payload,
                "timeout_seconds": inputs["timeout_seconds"].as_f64().unwrap_or(60.0),
                "on_timeout": inputs["on_timeout"].as_str().unwrap_or("error"),
                "default": inputs["default"].as_str().unwrap_or(""),
            });
            if inputs["image"].is_array() {
                data["image"] = json!({"filename": format!("comfy_bridge_{id}.png"), "subfolder": "", "type": "temp"});
            }
            Some(Frame { t, body: FrameBody::Text(json!({"type": "comfy_bridge.ask", "data": data})) })
        }
        _ => None,
    }
}

/// What an output node reports: images named like ComfyUI names them.
/// The ids of a prompt's output nodes, as ComfyUI lists them in a queue item's `outputs_to_execute`: without a
/// node catalogue, the `Save…` and `Preview…` nodes.
pub(crate) fn output_nodes(prompt: &Value) -> Vec<String> {
    let nodes = prompt.as_object().into_iter().flatten();
    let class = |n: &Value| n["class_type"].as_str().map(|c| c.starts_with("Save") || c.starts_with("Preview"));
    nodes.filter(|(_, n)| class(n) == Some(true)).map(|(id, _)| id.clone()).collect()
}

fn output(node: &Value) -> Option<Value> {
    let class = node["class_type"].as_str()?;
    let kind = match class {
        c if c.starts_with("Save") => "output",
        c if c.starts_with("Preview") => "temp",
        _ => return None,
    };
    let prefix = node["inputs"]["filename_prefix"].as_str().unwrap_or("ComfyUI");
    let name = format!("{prefix}_{:05}_.png", fastrand::u32(1..100_000));
    Some(json!({"images": [{"filename": name, "subfolder": "", "type": kind}]}))
}

/// The first type-4 preview of `sc`, as shown by `node` of this session.
fn preview(sc: &Scenario, node: &str) -> Option<Vec<u8>> {
    sc.frames.iter().find_map(|f| {
        let FrameBody::Binary(bytes) = &f.body else { return None };
        let (mut meta, image) = frames::parse_type4(bytes)?;
        meta["node_id"] = json!(node);
        meta["display_node_id"] = json!(node);
        meta["real_node_id"] = json!(node);
        meta["prompt_id"] = json!(ID);
        Some(frames::encode_type4(&meta, image))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_runs_the_workflows_own_nodes_in_dependency_order() {
        let txt2img: Value =
            serde_json::from_str(include_str!("../../examples/templates/txt2img.json")).expect("template");
        let like =
            Scenario { name: "none".into(), frames: vec![], posts: vec![], rejections: vec![], prompt_ids: vec![] };
        let sc = session(&txt2img, &like).expect("txt2img has an output node");
        assert!(session(&json!({"1": {"class_type": "X", "inputs": {}}}), &like).is_none());
        let texts: Vec<&Value> = sc
            .frames
            .iter()
            .filter_map(|f| match &f.body {
                FrameBody::Text(v) => Some(v),
                FrameBody::Binary(_) => None,
            })
            .collect();
        let executing: Vec<&str> =
            texts.iter().filter(|v| v["type"] == "executing").filter_map(|v| v["data"]["node"].as_str()).collect();
        assert_eq!(executing.len(), 7, "{executing:?}");
        let at = |id: &str| executing.iter().position(|n| *n == id).expect("ran");
        assert!(at("4") < at("6") && at("6") < at("3") && at("3") < at("8") && at("8") < at("9"), "{executing:?}");
        let executed: Vec<&Value> = texts.iter().filter(|v| v["type"] == "executed").copied().collect();
        assert_eq!(executed.len(), 1);
        assert_eq!(executed[0]["data"]["node"], "9");
        assert!(texts.iter().any(|v| v["type"] == "progress" && v["data"]["node"] == "3"));
        assert!(same_shape(&txt2img, &txt2img) && !same_shape(&txt2img, &json!({"3": txt2img["3"]})));
    }
}
