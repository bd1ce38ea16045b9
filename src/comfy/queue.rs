//! ComfyUI's queue as `GET /queue` reports it (docs/PROTOCOL.md §8): the running prompt and the pending ones.

use serde_json::Value;

/// One queue entry: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    /// Priority; lower runs first (negative for `front`).
    pub number: f64,
    /// The prompt id.
    pub prompt_id: String,
    /// The API-format workflow.
    pub prompt: Value,
    /// `extra_data`, with `client_id` when the submitter gave one.
    pub extra_data: Value,
}

impl QueueItem {
    /// Parses one 5-element queue array; `None` if it is not one.
    pub fn parse(item: &Value) -> Option<Self> {
        let item = item.as_array()?;
        let prompt_id = match item.get(1)? {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(Self {
            number: item.first()?.as_f64()?,
            prompt_id,
            prompt: item.get(2).cloned().unwrap_or(Value::Null),
            extra_data: item.get(3).cloned().unwrap_or(Value::Null),
        })
    }

    /// The client id that submitted it, if any.
    pub fn client_id(&self) -> Option<&str> {
        self.extra_data.get("client_id")?.as_str()
    }
}

/// The whole queue, pending in run order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSnapshot {
    /// The prompt(s) executing now (ComfyUI runs one at a time).
    pub running: Vec<QueueItem>,
    /// Waiting prompts, sorted by `(number, prompt_id)`: the order they will run in.
    pub pending: Vec<QueueItem>,
}

impl QueueSnapshot {
    /// Parses `GET /queue`'s body; malformed items are skipped. `None` if the body is not a queue at all.
    pub fn parse(body: &Value) -> Option<Self> {
        let list = |key: &str| -> Option<Vec<QueueItem>> {
            Some(body.get(key)?.as_array()?.iter().filter_map(QueueItem::parse).collect())
        };
        let mut pending = list("queue_pending")?;
        pending.sort_by(|a, b| a.number.total_cmp(&b.number).then_with(|| a.prompt_id.cmp(&b.prompt_id)));
        Some(Self { running: list("queue_running")?, pending })
    }

    /// Whether `prompt_id` is in the queue, and where: `Some(0)` running, `Some(n)` n-th pending (1-based).
    pub fn position(&self, prompt_id: &str) -> Option<usize> {
        if self.running.iter().any(|i| i.prompt_id == prompt_id) {
            return Some(0);
        }
        self.pending.iter().position(|i| i.prompt_id == prompt_id).map(|p| p + 1)
    }
}

/// Whether a history entry (docs/PROTOCOL.md §8) still lacks outputs it will have: it ended without error, its
/// queue item names output nodes (`outputs_to_execute`) and `outputs` is empty. Newer servers show an entry so
/// for a moment after `execution_success` (§11); read it again a little later.
pub fn history_outputs_missing(entry: &Value) -> bool {
    let status = entry.get("status");
    let failed = status.and_then(|s| s.get("status_str")).and_then(Value::as_str) == Some("error");
    let messages = status.and_then(|s| s.get("messages")).and_then(Value::as_array).into_iter().flatten();
    let stopped =
        messages.filter_map(|m| m.get(0)?.as_str()).any(|k| matches!(k, "execution_error" | "execution_interrupted"));
    let output_nodes = entry.pointer("/prompt/4").and_then(Value::as_array).is_some_and(|o| !o.is_empty());
    let no_outputs = entry.get("outputs").and_then(Value::as_object).is_none_or(|o| o.is_empty());
    !failed && !stopped && output_nodes && no_outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_entry_lacks_outputs_only_when_it_succeeded_with_output_nodes_and_has_none() {
        let entry = |status: &str, last: &str, outputs_to_execute: Value, outputs: Value| {
            json!({"prompt": [1, "p", {}, {}, outputs_to_execute], "outputs": outputs,
                   "status": {"status_str": status, "messages": [["execution_start", {}], [last, {}]]}})
        };
        let missing = |e: Value| history_outputs_missing(&e);
        assert!(missing(entry("success", "execution_success", json!(["9"]), json!({}))));
        assert!(!missing(entry("success", "execution_success", json!(["9"]), json!({"9": {"images": []}}))));
        assert!(!missing(entry("success", "execution_success", json!([]), json!({}))), "no output nodes");
        assert!(!missing(entry("error", "execution_error", json!(["9"]), json!({}))), "failed: none to come");
        assert!(!missing(entry("error", "execution_interrupted", json!(["9"]), json!({}))));
        assert!(missing(json!({"prompt": [1, "p", {}, {}, ["9"]]})), "no outputs and no status yet");
    }

    #[test]
    fn pending_is_sorted_into_run_order_and_bad_items_are_skipped() {
        let body = json!({
            "queue_running": [[3, "r", {}, {"client_id": "me"}, []]],
            "queue_pending": [[-19, "front", {}, {}, []], [18, "b", {}, {}, []], [17, "a", {}, {}, []], ["x"], 5]
        });
        let q = QueueSnapshot::parse(&body).expect("a queue");
        let order: Vec<_> = q.pending.iter().map(|i| i.prompt_id.as_str()).collect();
        assert_eq!(order, ["front", "a", "b"]);
        assert_eq!(q.running[0].client_id(), Some("me"));
        assert_eq!((q.position("r"), q.position("a"), q.position("zz")), (Some(0), Some(2), None));
        assert!(QueueSnapshot::parse(&json!({"queue_running": []})).is_none());
    }
}
