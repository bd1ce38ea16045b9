//! The device: what Home Assistant's sensors show of ComfyUI and of the last finished prompt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::{route, state_text};
use crate::bus::Outbound;
use crate::flow::AskChange;

/// Largest question kept whole among the Question sensor's attributes.
const MAX_ATTRIBUTE_BYTES: usize = 4096;

/// Least time between two device states that differ only in progress.
const INTERVAL: Duration = Duration::from_secs(1);

/// The device state: what the last result said, and what was last published, when.
#[derive(Debug, Default)]
pub struct Device {
    last: DeviceState,
    published: DeviceState,
    at: Option<Instant>,
    /// The `Bus Ask` the Question sensor shows.
    asking: Option<String>,
}

impl Device {
    /// `ha/state` of `instance`, when it changed (progress at most every [`INTERVAL`]): `running` is the running
    /// prompt's node and whole-prompt fraction, `queue` ComfyUI's queue length.
    pub fn state(
        &mut self,
        instance: &str,
        running: Option<(Option<&str>, Option<f64>)>,
        queue: u64,
        now: Instant,
    ) -> Option<Arc<Outbound>> {
        let state = DeviceState {
            busy: running.is_some(),
            queue,
            progress: running.and_then(|(_, f)| f).map_or(0, |f| (f * 100.0).round() as u8),
            node: running.and_then(|(node, _)| node).map(str::to_string),
            ..self.last.clone()
        };
        if state == self.published {
            return None;
        }
        let progress_only = DeviceState { progress: self.published.progress, ..state.clone() } == self.published;
        if progress_only && self.at.is_some_and(|t| now.duration_since(t) < INTERVAL) {
            return None;
        }
        self.published = state;
        self.at = Some(now);
        Some(Outbound::lifecycle(route(instance, &["state"]), self.published.render(), true))
    }

    /// Home Assistant's view of a finished prompt of `instance` (its result object): last-result sensors,
    /// image URL, the `finished` event.
    pub fn result(&mut self, instance: &str, result: &Value) -> Vec<Arc<Outbound>> {
        self.last.last_state = result["status"].as_str().map(str::to_string);
        self.last.last_duration = result["duration_ms"].as_f64().map(|ms| ms / 1000.0);
        self.last.last_error = result["error"]["exception_message"].as_str().map(str::to_string);
        let mut out = vec![Outbound::lifecycle(route(instance, &["last"]), result.to_string(), true)];
        let image = result["outputs"]
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .find_map(|o| o["images"].as_array()?.iter().find_map(|i| i["url"].as_str().map(str::to_string)));
        if let Some(url) = image {
            out.push(Outbound::lifecycle(route(instance, &["image_url"]), url, true));
        }
        let event = json!({
            "event_type": result["status"], "prompt_id": result["prompt_id"], "duration_ms": result["duration_ms"],
        });
        out.push(Outbound::lifecycle(route(instance, &["finished"]), event.to_string(), false));
        out
    }
}

impl Device {
    /// Home Assistant's view of a `Bus Ask`: `ha/ask` (retained; the Question sensor and its attributes) says
    /// what waits for an answer, and the `asked` event fires for each new question, with the topic to answer on.
    pub fn ask(&mut self, instance: &str, change: &AskChange) -> Vec<Arc<Outbound>> {
        match change {
            AskChange::Waiting(ask) => {
                if self.asking.as_deref() == Some(ask.ask_id.as_str()) {
                    return Vec::new();
                }
                self.asking = Some(ask.ask_id.clone());
                let question = match &ask.payload {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                let mut body = json!({
                    "waiting": true, "question": state_text(&question), "ask_id": ask.ask_id, "subject": ask.subject,
                    "prompt_id": ask.prompt_id, "node_id": ask.node_id, "answer_topic": ask.answer_topic,
                    "image_url": ask.image_url,
                });
                // The whole question as an attribute while it is small: Home Assistant warns about (and its
                // recorder drops) attributes over 16 KiB, and the bus carries the question in full anyway.
                if question.len() <= MAX_ATTRIBUTE_BYTES {
                    body["payload"] = ask.payload.clone();
                }
                let state = Outbound::lifecycle(route(instance, &["ask"]), body.to_string(), true);
                body["event_type"] = json!("asked");
                let event = Outbound::lifecycle(route(instance, &["asked"]), body.to_string(), false);
                vec![state, event]
            }
            AskChange::Done { ask_id, outcome, .. } if self.asking.as_deref() == Some(ask_id.as_str()) => {
                self.asking = None;
                let body = json!({"waiting": false, "question": null, "ask_id": ask_id, "outcome": outcome});
                vec![Outbound::lifecycle(route(instance, &["ask"]), body.to_string(), true)]
            }
            AskChange::Done { .. } => Vec::new(),
        }
    }
}

/// What the device's `ha/state` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceState {
    /// A prompt is running.
    pub busy: bool,
    /// ComfyUI's pending + running prompts.
    pub queue: u64,
    /// Whole-prompt progress of the running prompt, in percent.
    pub progress: u8,
    /// The running prompt's current node; `None` (unknown in Home Assistant) when nothing runs.
    pub node: Option<String>,
    /// Status of the last finished prompt; `None` before the first.
    pub last_state: Option<String>,
    /// Its duration in seconds.
    pub last_duration: Option<f64>,
    /// Its error message, cut to fit a state; `None` when it had none.
    pub last_error: Option<String>,
}

impl DeviceState {
    /// The `ha/state` payload.
    pub fn render(&self) -> Bytes {
        let body = json!({
            "busy": if self.busy { "ON" } else { "OFF" },
            "queue": self.queue,
            "progress": self.progress,
            "node": self.node.as_deref().filter(|n| !n.is_empty()),
            "last_state": self.last_state.as_deref().filter(|s| !s.is_empty()),
            "last_duration": self.last_duration,
            "last_error": self.last_error.as_deref().filter(|e| !e.is_empty()).map(state_text),
        });
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Ask;

    #[test]
    fn a_big_question_is_cut_in_the_state_and_left_out_of_the_attributes() {
        let ask = |payload: Value| {
            AskChange::Waiting(Ask {
                prompt_id: "p".into(),
                ask_id: "k".into(),
                node_id: None,
                subject: "s".into(),
                payload,
                answer_topic: None,
                image_url: None,
            })
        };
        let body = |out: &[Arc<Outbound>]| serde_json::from_slice::<Value>(&out[0].payload).expect("json");
        let small = body(&Device::default().ask("local", &ask(json!({"q": 1}))));
        assert_eq!(small["payload"], json!({"q": 1}));
        let big = body(&Device::default().ask("local", &ask(json!("x".repeat(20_000)))));
        assert!(big.get("payload").is_none(), "left out");
        assert!(big["question"].as_str().expect("text").chars().count() <= 251);
    }

    #[test]
    fn long_errors_are_cut_to_fit_a_state() {
        let state = DeviceState { last_error: Some("é".repeat(1000)), ..DeviceState::default() };
        let v: Value = serde_json::from_slice(&state.render()).expect("json");
        assert!(v["last_error"].as_str().expect("text").chars().count() <= 255);
        assert_eq!(v["busy"], "OFF");
    }
}
