//! The tap extension (`extension/comfy_bridge_tap`), as the simulator plays it when started with
//! [`crate::SimOptions::tap`]: tap sockets, the `comfy_bridge.*` messages of `Bus Publish` and `Bus Ask`, and
//! the answer route `POST /comfy_bridge/answer` with the extension's status table (extension/README.md).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::http::Response;
use super::server::Request;
use super::Shared;

/// The version the simulated extension announces.
pub const VERSION: &str = "0.1.0";
/// The client and server feature flag.
pub(crate) const FLAG: &str = "comfy_bridge_tap";
/// Most bytes of an answer request's body.
const MAX_ANSWER_BODY: usize = 1024 * 1024;
/// Ended asks remembered, so their answers are `late`, not `unknown`.
const ENDED_MEMORY: usize = 1024;

/// The image a simulated `Bus Publish` saved in the temp folder (`GET /view?filename=comfy_bridge_<node>.png`):
/// a 1×1 PNG.
pub(crate) const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0, 0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d,
    0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// An unguessable id or secret: `n` random bytes as URL-safe base64 without padding (`secrets.token_urlsafe`).
pub(crate) fn token(n: usize) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..n).map(|_| fastrand::u8(..)).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A `Bus Ask` waiting for its answer.
#[derive(Debug)]
struct Pending {
    /// The `comfy_bridge.ask` data (re-sent to a tap that connects while it waits).
    message: Value,
    answer: Option<String>,
    answered: Arc<Notify>,
}

/// The asks of the simulated extension.
#[derive(Debug, Default)]
pub(crate) struct Asks {
    pending: HashMap<String, Pending>,
    ended: HashSet<String>,
    ended_order: VecDeque<String>,
    /// Answers accepted, in order: (ask id, answer).
    pub accepted: Vec<(String, String)>,
}

impl Asks {
    /// The `comfy_bridge.ask` messages of asks still waiting for an answer.
    pub fn waiting(&self) -> Vec<Value> {
        self.pending.values().filter(|p| p.answer.is_none()).map(|p| p.message.clone()).collect()
    }

    fn close(&mut self, ask_id: &str) -> Option<Pending> {
        let pending = self.pending.remove(ask_id)?;
        self.ended.insert(ask_id.to_string());
        self.ended_order.push_back(ask_id.to_string());
        if self.ended_order.len() > ENDED_MEMORY {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        Some(pending)
    }

    /// `accepted`, `late` or `unknown`, as the extension's registry answers.
    fn answer(&mut self, ask_id: &str, text: &str) -> &'static str {
        match self.pending.get_mut(ask_id) {
            None if self.ended.contains(ask_id) => "late",
            None => "unknown",
            Some(p) if p.answer.is_some() => "late",
            Some(p) => {
                p.answer = Some(text.to_string());
                p.answered.notify_one();
                self.accepted.push((ask_id.to_string(), text.to_string()));
                "accepted"
            }
        }
    }
}

/// How a `Bus Ask` ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AskEnd {
    /// The first answer arrived (or the timeout gave the default): the workflow goes on.
    Continue,
    /// No answer in time and `on_timeout` is `error`: the node fails with this message.
    Failed(String),
    /// ComfyUI's interrupt ended the wait.
    Interrupted,
}

/// Runs one `Bus Ask` of `prompt_id`: sends `comfy_bridge.ask` to the taps, waits for the answer route, the
/// timeout (real seconds, whatever the replay speed) or `cancel`, then sends `comfy_bridge.ask_done`.
pub(crate) async fn ask(shared: &Shared, prompt_id: &str, spec: &Value, cancel: &CancellationToken) -> AskEnd {
    let ask_id = token(16);
    let node_id = spec["node_id"].clone();
    let subject = spec["subject"].as_str().unwrap_or("prompt").to_string();
    let timeout = spec["timeout_seconds"].as_f64().filter(|t| t.is_finite() && *t >= 0.0).unwrap_or(60.0);
    let mut message = json!({
        "ask_id": ask_id, "prompt_id": prompt_id, "node_id": node_id, "subject": subject,
        "payload": spec["payload"], "timeout_seconds": timeout,
    });
    if spec["image"].is_object() {
        message["image"] = spec["image"].clone();
    }
    let answered = Arc::new(Notify::new());
    shared
        .lock()
        .asks
        .pending
        .insert(ask_id.clone(), Pending { message: message.clone(), answer: None, answered: answered.clone() });
    shared.send_to_taps("comfy_bridge.ask", &message);
    let wait = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::from_secs(60));
    let outcome = tokio::select! {
        _ = answered.notified() => "answered",
        _ = tokio::time::sleep(wait) => "timeout",
        _ = cancel.cancelled() => "interrupted",
    };
    let closed = shared.lock().asks.close(&ask_id);
    // An answer that raced the deadline still counts, as in the extension.
    let outcome = if closed.is_some_and(|p| p.answer.is_some()) { "answered" } else { outcome };
    let done = json!({"ask_id": ask_id, "prompt_id": prompt_id, "node_id": node_id, "outcome": outcome});
    shared.send_to_taps("comfy_bridge.ask_done", &done);
    match outcome {
        "answered" => AskEnd::Continue,
        "interrupted" => AskEnd::Interrupted,
        _ if spec["on_timeout"] == "default" => AskEnd::Continue,
        _ => AskEnd::Failed(format!("Bus Ask: no answer on ask/{subject} within {timeout} s (ask {ask_id})")),
    }
}

/// `POST /comfy_bridge/answer`: the extension's checks in its order (secret 403, size 413, shape 400, then
/// the ask: 200 or 409).
pub(crate) fn answer(shared: &Shared, req: &Request) -> Response {
    let refuse = |status, reason: &str, error: &str| {
        Response::json(status, &json!({"accepted": false, "reason": reason, "error": error}))
    };
    if req.header("x-comfy-bridge-secret") != Some(shared.secret.as_str()) {
        return refuse(403, "forbidden", "missing or wrong secret");
    }
    if req.body.len() > MAX_ANSWER_BODY {
        return refuse(413, "too_large", "body over 1048576 bytes");
    }
    let Ok(doc) = serde_json::from_slice::<Value>(&req.body) else {
        return refuse(400, "bad_request", "body is not JSON");
    };
    if !doc.is_object() {
        return refuse(400, "bad_request", "body is not a JSON object");
    }
    let Some(ask_id) = doc["ask_id"].as_str().filter(|s| !s.is_empty()) else {
        return refuse(400, "bad_request", "ask_id must be a non-empty string");
    };
    let Some(text) = doc.get("answer") else { return refuse(400, "bad_request", "answer is missing") };
    let Some(text) = text.as_str() else { return refuse(400, "bad_request", "answer must be a string") };
    match shared.lock().asks.answer(ask_id, text) {
        "accepted" => Response::json(200, &json!({"accepted": true})),
        reason => Response::json(409, &json!({"accepted": false, "reason": reason})),
    }
}
