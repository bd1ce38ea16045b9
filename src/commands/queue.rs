//! `queue`: a workflow or a template, edited and checked, posted to ComfyUI as a prompt the bridge follows.

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::fields::{self, invalid, Body};
use super::response::{http_failure, template_failure, Code, Failure, Outcome};
use super::{Applied, Context, Spec};
use crate::comfy::http::ComfyHttp;
use crate::tracker::Control;
use crate::workflow::patch;
use crate::workflow::template::TemplateError;
use crate::workflow::Edits;

/// The arguments of `queue`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePrompt {
    /// The workflow to start from.
    pub source: Source,
    /// Edits to make before queueing.
    pub edits: Edits,
    /// Queue at the front.
    pub front: bool,
    /// ComfyUI's queue `number` (priority), passed through.
    pub number: Option<f64>,
    /// ComfyUI's `partial_execution_targets` (output node ids), passed through.
    pub partial_execution_targets: Option<Vec<String>>,
    /// ComfyUI's `extra_data`, passed through.
    pub extra_data: Option<Map<String, Value>>,
}

/// Where a queued workflow comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An API-format workflow in the request (non-empty; not validated further here).
    Workflow(Map<String, Value>),
    /// A stored template, by name.
    Template(String),
}

impl Spec for QueuePrompt {
    const NAME: &'static str = "queue";
    const FIELDS: &'static [&'static str] = &[
        "workflow",
        "template",
        "set",
        "merge",
        "randomize",
        "front",
        "number",
        "partial_execution_targets",
        "extra_data",
    ];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        let source = match (body.object("workflow")?, body.non_empty_string("template")?) {
            (Some(workflow), None) if workflow.is_empty() => {
                return Err(invalid("workflow", "`workflow` must not be empty".to_owned()))
            }
            (Some(workflow), None) => Source::Workflow(workflow),
            (None, Some(template)) => Source::Template(template),
            (Some(_), Some(_)) => {
                return Err(Failure::new(Code::InvalidRequest, "give either `workflow` or `template`, not both")
                    .with_details(json!({ "fields": ["workflow", "template"] })))
            }
            (None, None) => {
                return Err(Failure::new(Code::InvalidRequest, "`queue` needs `workflow` or `template`")
                    .with_details(json!({ "fields": ["workflow", "template"] })))
            }
        };
        Ok(QueuePrompt {
            source,
            edits: fields::edits(body)?,
            front: body.bool("front")?.unwrap_or(false),
            number: body.number("number")?,
            partial_execution_targets: body.strings("partial_execution_targets")?,
            extra_data: body.object("extra_data")?,
        })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        match prepare(self, cx) {
            Ok(body) => {
                let prompt_id = body["prompt_id"].as_str().unwrap_or_default().to_string();
                let request_id = cx.request_id.map(str::to_string);
                let (http, control) = (cx.http.clone(), cx.control.clone());
                let work = Box::new(move || -> super::Call { Box::pin(post(http, control, body, request_id)) });
                Applied::Call { work, prompt_id: Some(prompt_id) }
            }
            Err(failure) => Applied::Done(Err(failure)),
        }
    }
}

/// The `POST /prompt` body for a queue request: template or workflow, edited and checked.
fn prepare(queue: QueuePrompt, cx: &mut Context<'_>) -> Result<Value, Failure> {
    let mut workflow = match queue.source {
        Source::Template(name) => match cx.templates.get(&name) {
            Some(workflow) => workflow.clone(),
            None => return Err(template_failure(TemplateError::Unknown(name), cx.templates)),
        },
        Source::Workflow(workflow) => {
            let value = Value::Object(workflow);
            patch::validate(&value).map_err(|e| Failure::new(Code::InvalidRequest, format!("`workflow`: {e}")))?;
            match value {
                Value::Object(map) => map,
                _ => Map::new(),
            }
        }
    };
    if !queue.edits.is_empty() {
        patch::apply(&mut workflow, &queue.edits, cx.rng)
            .map_err(|e| Failure::new(Code::PatchFailed, e.to_string()).with_details(e.details()))?;
    }
    let denied: Vec<String> = workflow
        .iter()
        .filter_map(|(id, node)| {
            let class = node.get("class_type")?.as_str()?;
            cx.deny_node_classes.iter().any(|d| d == class).then(|| format!("{id} ({class})"))
        })
        .collect();
    if !denied.is_empty() {
        let message = format!("the workflow contains node classes that are not allowed here: {}", denied.join(", "));
        return Err(Failure::new(Code::NotAllowed, message).with_details(json!({ "nodes": denied })));
    }
    let mut body = json!({
        "prompt": workflow,
        "client_id": cx.client_id,
        "prompt_id": new_prompt_id(cx.rng),
    });
    if let Some(number) = queue.number {
        body["number"] = json!(number);
    } else if queue.front {
        body["front"] = json!(true);
    }
    if let Some(targets) = queue.partial_execution_targets {
        body["partial_execution_targets"] = json!(targets);
    }
    if let Some(extra) = queue.extra_data {
        body["extra_data"] = Value::Object(extra);
    }
    Ok(body)
}

/// Posts a prompt, telling the tracker before (so no event overtakes it) and after.
async fn post(http: ComfyHttp, control: mpsc::Sender<Control>, body: Value, request_id: Option<String>) -> Outcome {
    let prompt_id = body["prompt_id"].as_str().unwrap_or_default().to_string();
    let expect = Control::Expect { prompt_id: prompt_id.clone(), request_id, workflow: body["prompt"].clone() };
    if control.send(expect).await.is_err() {
        return Err(Failure::new(Code::ComfyuiUnavailable, "the bridge is shutting down"));
    }
    match http.post_prompt(&body).await {
        Ok(answer) => {
            let _ = control.send(Control::Accepted { prompt_id: prompt_id.clone() }).await;
            Ok(json!({
                "prompt_id": answer.get("prompt_id").cloned().unwrap_or(json!(prompt_id)),
                "number": answer.get("number").cloned().unwrap_or(Value::Null),
                "node_errors": answer.get("node_errors").cloned().unwrap_or(json!({})),
            }))
        }
        Err(e) => {
            let _ = control.send(Control::Rejected { prompt_id }).await;
            Err(http_failure(e))
        }
    }
}

/// A random UUID v4 in its canonical text form (lowercase, hyphenated): ComfyUI 0.3.x takes any string, newer
/// servers refuse anything else with 400 (docs/PROTOCOL.md §11).
fn new_prompt_id(rng: &mut fastrand::Rng) -> String {
    let mut b: [u8; 16] = std::array::from_fn(|_| rng.u8(..));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `id` is a UUID in canonical lowercase hyphenated form (what newer ComfyUI demands).
    fn canonical_uuid(id: &str) -> bool {
        id.len() == 36
            && id.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => matches!(c, '0'..='9' | 'a'..='f'),
            })
    }

    #[test]
    fn the_prompt_id_is_the_bridges_lowercase_uuid_whatever_the_request_carries() {
        let dir = tempfile::tempdir().expect("dir");
        let mut templates = crate::workflow::template::Templates::load(dir.path(), dir.path());
        let mut rng = fastrand::Rng::with_seed(1);
        let http = ComfyHttp::new(&crate::config::Settings::default().comfyui).expect("client");
        let (control, _rx) = mpsc::channel(1);
        let mut cx = Context {
            templates: &mut templates,
            rng: &mut rng,
            http: &http,
            control: &control,
            client_id: "bridge-client",
            deny_node_classes: &[],
            request_id: None,
        };
        let request = json!({
            "workflow": {"prompt_id": {"class_type": "SaveImage", "inputs": {"prompt_id": "MINE"}}},
            "extra_data": {"prompt_id": "NOT-A-UUID", "client_id": "someone", "extra_pnginfo": {"id": "X"}},
        });
        let Ok(crate::commands::Request { command: crate::commands::Command::Queue(queue), .. }) =
            crate::commands::parse("queue", request.to_string().as_bytes(), 1 << 20)
        else {
            panic!("a queue request");
        };
        let mut ids = Vec::new();
        for _ in 0..50 {
            let body = prepare(queue.clone(), &mut cx).expect("prepared");
            let id = body["prompt_id"].as_str().expect("an id").to_string();
            assert!(canonical_uuid(&id), "{id}");
            assert_eq!(body["client_id"], "bridge-client", "the bridge's socket gets the events");
            assert_eq!(body["extra_data"]["prompt_id"], "NOT-A-UUID", "extra_data passes through, untouched");
            ids.push(id);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50, "a fresh id for every prompt");
        let id_field = crate::commands::parse("queue", br#"{"template": "t", "prompt_id": "MINE"}"#, 1 << 20);
        assert!(id_field.is_err(), "a request cannot name the prompt id");
    }

    #[test]
    fn prompt_ids_are_uuid_v4_text() {
        let mut rng = fastrand::Rng::with_seed(7);
        let id = new_prompt_id(&mut rng);
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert!(matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{id}");
        assert_ne!(id, new_prompt_id(&mut rng));
    }
}
