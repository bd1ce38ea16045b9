//! HTTP routes of the simulated ComfyUI API.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::queue::{self, Job};
use super::server::Request;
use super::upload;
use super::Shared;

/// An HTTP response.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, v: &Value) -> Self {
        Response { status, content_type: "application/json; charset=utf-8", body: v.to_string().into_bytes() }
    }

    /// A plain-text response.
    pub fn text(status: u16, s: &str) -> Self {
        Response { status, content_type: "text/plain; charset=utf-8", body: s.as_bytes().to_vec() }
    }

    /// Empty 200, as ComfyUI answers `/interrupt`, `POST /queue`, `/free`.
    pub fn empty() -> Self {
        Response::text(200, "")
    }
}

/// Server feature flags (`GET /features` and the WebSocket answer); with the tap, its version.
pub(crate) fn server_features(shared: &Shared) -> Value {
    let mut flags = json!({"supports_preview_metadata": true, "max_upload_size": 104_857_600});
    if shared.tap {
        flags[super::tap::FLAG] = json!(super::tap::VERSION);
    }
    flags
}

/// Route one request. Unknown routes are 404, among them `GET /api/jobs` when playing 0.3.64 (docs/PROTOCOL.md
/// §11); newer versions serve the jobs API under `/api` only.
pub(crate) async fn handle(shared: &Arc<Shared>, req: Request) -> Response {
    let delay = shared.http_delay_ms.load(std::sync::atomic::Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    shared.lock().requests.push((req.method.clone(), req.path.clone(), body.clone()));
    let path = req.path.as_str();
    if shared.version.is_newer() && req.api {
        if let Some(response) = jobs_route(shared, &req) {
            return response;
        }
    }
    match (req.method.as_str(), path) {
        ("POST", "/prompt") => post_prompt(shared, &req.body),
        ("GET", "/prompt") => {
            let n = shared.lock().queue_remaining();
            Response::json(200, &json!({"exec_info": {"queue_remaining": n}}))
        }
        ("GET", "/queue") => get_queue(shared),
        // ComfyUI reads these bodies with `request.json()`: a body that is not JSON fails with 500.
        ("POST", "/queue" | "/history" | "/free") if body.is_null() => internal_error(),
        ("POST", "/queue") => post_queue(shared, &body),
        ("GET", "/history") => Response::json(200, &history_all(shared, &req)),
        ("POST", "/history") => post_history(shared, &body),
        ("POST", "/interrupt") => {
            queue::interrupt(shared, body["prompt_id"].as_str());
            Response::empty()
        }
        ("POST", "/free") => Response::empty(),
        ("GET", "/system_stats") => Response::json(200, &system_stats(shared)),
        ("GET", "/features") => Response::json(200, &server_features(shared)),
        ("POST", "/comfy_bridge/answer") if shared.tap => super::tap::answer(shared, &req),
        ("GET", "/view")
            if shared.tap && req.query_param("filename").is_some_and(|f| f.starts_with("comfy_bridge_")) =>
        {
            Response { status: 200, content_type: "image/png", body: super::tap::PNG.to_vec() }
        }
        ("GET", "/embeddings" | "/extensions" | "/models") => Response::json(200, &json!([])),
        ("POST", "/upload/image" | "/upload/mask") => upload::upload(shared, &req),
        ("GET", p) if p.starts_with("/history/") => history_one(shared, &percent_decode(&p["/history/".len()..])),
        ("GET", p) if p == "/object_info" || p.starts_with("/object_info/") => Response::json(200, &json!({})),
        _ => Response::text(404, "404: Not Found"),
    }
}

/// The jobs API of newer versions: `GET /api/jobs`, `GET /api/jobs/{id}`, `POST /api/jobs/{id}/cancel`.
fn jobs_route(shared: &Shared, req: &Request) -> Option<Response> {
    let rest = req.path.strip_prefix("/jobs")?;
    let id = rest.strip_prefix('/').map(percent_decode);
    Some(match (req.method.as_str(), id) {
        ("GET", None) if rest.is_empty() => super::jobs::list(shared, req),
        ("GET", Some(id)) if !id.contains('/') => super::jobs::one(shared, &id),
        ("POST", Some(id)) => match id.strip_suffix("/cancel").filter(|id| !id.is_empty() && !id.contains('/')) {
            Some(id) => super::jobs::cancel(shared, id),
            None => return None,
        },
        _ => return None,
    })
}

/// aiohttp's answer to an unhandled exception in a handler.
pub(crate) fn internal_error() -> Response {
    Response::text(500, "500 Internal Server Error\n\nServer got itself in trouble")
}

/// ComfyUI's 400 body for a prompt rejected as a whole (`node_errors` empty).
fn rejected(kind: &str, message: &str, details: &str) -> Response {
    let error = json!({"type": kind, "message": message, "details": details, "extra_info": {}});
    Response::json(400, &json!({"error": error, "node_errors": {}}))
}

/// What `validate_prompt` would say about `prompt` that the simulator can know without a node catalogue:
/// the recorded answer for a prompt a transcript saw rejected, or a node without `class_type`.
fn validate(shared: &Shared, prompt: &Value) -> Option<Response> {
    let Some(nodes) = prompt.as_object() else {
        return Some(internal_error());
    };
    let recorded = shared.scenarios.iter().flat_map(|sc| &sc.rejections).find(|r| &r.prompt == prompt);
    if let Some(r) = recorded {
        return Some(Response::json(400, &r.response));
    }
    let missing = nodes.iter().find(|(_, node)| node.get("class_type").is_none());
    missing.map(|(id, _)| {
        let message = "Cannot execute because a node is missing the class_type property.";
        rejected("invalid_prompt", message, &format!("Node ID '#{id}'"))
    })
}

pub(crate) fn post_prompt(shared: &Arc<Shared>, raw: &[u8]) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(raw) else {
        return internal_error();
    };
    let (number, sort_key) = {
        let mut st = shared.lock();
        match body["number"].as_f64() {
            Some(n) => (json!(n), n),
            None => {
                let c = st.counter;
                st.counter += 1;
                let n = if body["front"] == Value::Bool(true) { -c } else { c };
                (json!(n), n as f64)
            }
        }
    };
    let Some(prompt) = body.get("prompt").filter(|p| !p.is_null()) else {
        return rejected("no_prompt", "No prompt provided", "No prompt provided");
    };
    if let Some(rejection) = validate(shared, prompt) {
        return rejection;
    }
    let Some(scenario) = pick_scenario(shared, prompt) else {
        return rejected("prompt_no_outputs", "Simulator has no scenarios loaded", "");
    };
    let id = match &body["prompt_id"] {
        Value::Null => super::frames::new_uuid(),
        Value::String(s) if !shared.version.is_newer() || super::jobs::is_canonical_uuid(s) => s.clone(),
        other if !shared.version.is_newer() => other.to_string(),
        _ => {
            let details = "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one";
            return rejected("invalid_prompt_id", "prompt_id must be a valid UUID", details);
        }
    };
    let client_id = body["client_id"].as_str().map(str::to_string);
    let job = Job {
        number: number.clone(),
        sort_key,
        id: id.clone(),
        prompt: prompt.clone(),
        extra_data: extra_data(&body, client_id.as_deref(), shared.version.is_newer()),
        client_id,
        scenario,
        cancel: CancellationToken::new(),
    };
    shared.lock().pending.push(job);
    shared.broadcast_status();
    shared.wake.notify_one();
    Response::json(200, &json!({"prompt_id": id, "number": number, "node_errors": {}}))
}

/// The stored `extra_data`: the posted one with the submitter's `client_id`; newer servers stamp `create_time`.
fn extra_data(body: &Value, client_id: Option<&str>, newer: bool) -> Value {
    let mut extra = body["extra_data"].as_object().cloned().unwrap_or_default();
    if let Some(cid) = client_id {
        extra.insert("client_id".into(), json!(cid));
    }
    if newer {
        extra.insert("create_time".into(), json!(super::frames::now_ms()));
    }
    Value::Object(extra)
}

/// The recording of this very prompt; else, for a workflow with output nodes and another shape than the success
/// run, a session shaped like the workflow itself; else the success run (else the first recording).
fn pick_scenario(shared: &Shared, prompt: &Value) -> Option<Arc<super::Scenario>> {
    let s = &shared.scenarios;
    if let Some(recorded) = s.iter().find(|sc| sc.posts.iter().any(|p| &p.prompt == prompt)) {
        return Some(recorded.clone());
    }
    let fallback = s.iter().find(|sc| sc.name == "a_success").or_else(|| s.first())?;
    let same_shape = fallback.posts.first().is_some_and(|p| super::synth::same_shape(&p.prompt, prompt));
    match super::synth::session(prompt, fallback).filter(|_| !same_shape) {
        Some(shaped) => Some(Arc::new(shaped)),
        None => Some(fallback.clone()),
    }
}

/// The running and the pending queue items, as `GET /queue` lists them (pending unsorted).
pub(crate) fn queue_items(st: &super::State) -> (Vec<Value>, Vec<Value>) {
    let played = |running: bool| st.played.iter().filter(move |p| p.running == running).map(|p| p.item.clone());
    let running: Vec<Value> = st.running.iter().map(Job::queue_item).chain(played(true)).collect();
    let pending: Vec<Value> = st.pending.iter().map(Job::queue_item).chain(played(false)).collect();
    (running, pending)
}

fn get_queue(shared: &Shared) -> Response {
    let (running, pending) = queue_items(&shared.lock());
    Response::json(200, &json!({"queue_running": running, "queue_pending": pending}))
}

fn post_queue(shared: &Shared, body: &Value) -> Response {
    let changed = {
        let mut st = shared.lock();
        let before = st.pending.len();
        if body["clear"] == Value::Bool(true) {
            st.pending.clear();
        }
        for id in body["delete"].as_array().into_iter().flatten() {
            if let Some(i) = st.pending.iter().position(|j| Some(j.id.as_str()) == id.as_str()) {
                st.pending.remove(i);
            }
        }
        before != st.pending.len()
    };
    if changed {
        shared.broadcast_status();
    }
    Response::empty()
}

fn history_all(shared: &Shared, req: &Request) -> Value {
    let st = shared.lock();
    let n = st.history.len();
    let max = req.query_param("max_items").and_then(|v| v.parse::<usize>().ok());
    let offset = req.query_param("offset").and_then(|v| v.parse::<usize>().ok());
    let start = match (max, offset) {
        (_, Some(o)) => o.min(n),
        (Some(m), None) => n.saturating_sub(m),
        (None, None) => 0,
    };
    let take = max.unwrap_or(n);
    let map: Map<String, Value> = st.history[start..].iter().take(take).cloned().collect();
    Value::Object(map)
}

fn history_one(shared: &Shared, id: &str) -> Response {
    let st = shared.lock();
    let map: Map<String, Value> = st.history.iter().filter(|(k, _)| k == id).cloned().collect();
    Response::json(200, &Value::Object(map))
}

fn post_history(shared: &Shared, body: &Value) -> Response {
    let mut st = shared.lock();
    if body["clear"] == Value::Bool(true) {
        st.history.clear();
    }
    for id in body["delete"].as_array().into_iter().flatten() {
        st.history.retain(|(k, _)| Some(k.as_str()) != id.as_str());
    }
    Response::empty()
}

fn system_stats(shared: &Shared) -> Value {
    json!({
        "system": {
            "os": std::env::consts::OS, "ram_total": 0, "ram_free": 0,
            "comfyui_version": format!("{}-sim", shared.version), "required_frontend_version": "",
            "installed_templates_version": "", "required_templates_version": "",
            "python_version": "simulated", "pytorch_version": "simulated",
            "embedded_python": false, "argv": ["comfy-bridge", "simulate"]
        },
        "devices": []
    })
}

/// Undo `%XX` escapes (a path segment as aiohttp hands it to a handler).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
