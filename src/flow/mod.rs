//! Workflows as actors: what the tap extension's `Bus Publish` and `Bus Ask` nodes send (extension/README.md)
//! becomes messages on the buses, and answers go back to the node that asked.
//!
//! * [`Flow`] (pure, held by the router) turns the extension's messages into bus messages:
//!   `comfy_bridge.publish` becomes an envelope on `flow/<subject…>` and a [`Fetch`] of its image for
//!   `flow/<subject…>/image`; `comfy_bridge.ask` becomes the question on `ask/<subject…>` (its image on
//!   `ask/<subject…>/image`), published once per ask id and asked with request-reply on NATS (reply subject
//!   `answer.<ask id>`). An ask and its
//!   `comfy_bridge.ask_done` also tell the tracker (the prompt's `state` is `waiting`) and Home Assistant
//!   ([`AskChange`]).
//! * [`fetch`]: the task that reads a published image from ComfyUI's `/view` and publishes its bytes.
//! * Answers come back as the `answer` command (`src/commands/answer.rs`), raw on `answer/<ask id>` or as a
//!   request, under the command policy; the extension's answer route decides which answer came first.

pub mod fetch;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

pub use self::fetch::Fetch;
use crate::bus::topics::{self, Route};
use crate::bus::{Class, Outbound};
use crate::comfy::tap::Message;
use crate::comfy::urls::view_url;

/// Most levels a subject may have.
pub const MAX_LEVELS: usize = 16;
/// Longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 1024;
/// Ask ids remembered as asked, so an ask the extension sends again (to a tap that connected while it waits)
/// is not published twice.
const ASKED_MEMORY: usize = 1024;

/// What a message from the extension is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Bus Publish` ran.
    Publish,
    /// `Bus Ask` waits for an answer.
    Ask,
    /// The ask ended.
    AskDone,
}

/// Where what came from the extension goes.
#[derive(Debug, Default)]
pub struct Handled {
    /// To publish on every bus.
    pub messages: Vec<Arc<Outbound>>,
    /// An image to read from ComfyUI and publish.
    pub fetch: Option<Fetch>,
    /// For the tracker and Home Assistant.
    pub ask: Option<AskChange>,
}

/// A `Bus Ask` started or ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AskChange {
    /// It waits for an answer.
    Waiting(Ask),
    /// It ended: `outcome` is `answered`, `timeout`, `interrupted` or `failed`.
    Done {
        /// The prompt it belongs to.
        prompt_id: String,
        /// The ask.
        ask_id: String,
        /// How it ended.
        outcome: String,
    },
}

/// A waiting `Bus Ask`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    /// The prompt it belongs to.
    pub prompt_id: String,
    /// Its id (unguessable: the extension's `secrets.token_urlsafe(16)`).
    pub ask_id: String,
    /// Its node.
    pub node_id: Option<String>,
    /// Its subject, the levels joined by `/`.
    pub subject: String,
    /// The question.
    pub payload: Value,
    /// Where to answer on MQTT, when MQTT is on: `<base>/<inst>/answer/<ask id>`.
    pub answer_topic: Option<String>,
    /// The `/view` URL of the image sent with the question, if any.
    pub image_url: Option<String>,
}

/// The envelope fields the router knows: the frame's sequence number and receipt time, and the prompt's
/// request and client ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ids<'a> {
    /// Sequence number of the frame.
    pub seq: u64,
    /// Receipt time, ms since the epoch.
    pub ts: u64,
    /// The `id` of the request that queued the prompt.
    pub request_id: Option<&'a str>,
    /// Who queued the prompt.
    pub client_id: Option<&'a str>,
}

/// The messages of the extension, turned into bus messages.
#[derive(Debug)]
pub struct Flow {
    instance: String,
    /// `comfyui.public_url`: images are named with their `/view` URL on it.
    public_base: String,
    /// `<base>/<inst>/answer/` with MQTT on.
    mqtt_answers: Option<String>,
    /// `<prefix>.<inst>.answer.` with NATS on.
    nats_answers: Option<String>,
    asked: HashSet<String>,
    asked_order: VecDeque<String>,
}

/// What the flow uses of the configuration (`app` builds it from `Settings`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `bridge.instance`.
    pub instance: String,
    /// `comfyui.public_url` (or `comfyui.url`): the base of `/view` links.
    pub public_base: String,
    /// `mqtt.base_topic` with MQTT on: questions name `<base>/<inst>/answer/<ask id>`.
    pub mqtt_base_topic: Option<String>,
    /// `nats.subject_prefix` with NATS on: questions name `<prefix>.<inst>.answer.<ask id>`.
    pub nats_subject_prefix: Option<String>,
}

impl Flow {
    /// The flow of `config`'s instance.
    pub fn new(config: &Config) -> Self {
        let answers = Route::fixed(&config.instance, &[topics::ANSWER]);
        Self {
            instance: config.instance.clone(),
            public_base: config.public_base.clone(),
            mqtt_answers: config.mqtt_base_topic.as_ref().map(|base| answers.mqtt_topic(base) + "/"),
            nats_answers: config.nats_subject_prefix.as_ref().map(|prefix| answers.nats_subject(prefix) + "."),
            asked: HashSet::new(),
            asked_order: VecDeque::new(),
        }
    }

    /// What `kind` and prompt a message is about, before [`Flow::handle`]: the router looks up the prompt's
    /// ids with it. `None` for a message this bridge does not know (a newer extension's).
    pub fn about(message: &Message) -> Option<(Kind, Option<&str>)> {
        let kind = match message.kind.as_str() {
            "publish" => Kind::Publish,
            "ask" => Kind::Ask,
            "ask_done" => Kind::AskDone,
            _ => return None,
        };
        Some((kind, message.data["prompt_id"].as_str()))
    }

    /// Turns one extension message into bus messages; a message that is not what the extension sends is
    /// skipped and counted (`Err` says why).
    pub fn handle(&mut self, message: &Message, ids: Ids<'_>) -> Result<Handled, &'static str> {
        let Some((kind, _)) = Self::about(message) else { return Err("unknown comfy_bridge message type") };
        let data = &message.data;
        let prompt_id = data["prompt_id"].as_str().filter(|p| !p.is_empty()).ok_or("no prompt_id")?;
        let node_id = id_text(&data["node_id"]);
        match kind {
            Kind::Publish => {
                let levels = subject_levels(&data["subject"])?;
                Ok(self.publish(prompt_id, node_id, &levels, data, ids))
            }
            Kind::Ask => {
                let ask_id = ask_id(&data["ask_id"])?;
                let levels = subject_levels(&data["subject"])?;
                Ok(self.ask(prompt_id, node_id, ask_id, &levels, data, ids))
            }
            Kind::AskDone => {
                let ask_id = ask_id(&data["ask_id"])?.to_string();
                let outcome = data["outcome"].as_str().unwrap_or("ended").chars().take(32).collect();
                let ask = Some(AskChange::Done { prompt_id: prompt_id.to_string(), ask_id, outcome });
                Ok(Handled { ask, ..Handled::default() })
            }
        }
    }

    fn publish(
        &self,
        prompt_id: &str,
        node_id: Option<String>,
        levels: &[&str],
        data: &Value,
        ids: Ids<'_>,
    ) -> Handled {
        COUNTERS.published.fetch_add(1, Relaxed);
        let subject = levels.join("/");
        let mut body = json!({ "subject": subject, "payload": data["payload"] });
        let fetch = self.image(&data["image"], topics::FLOW, levels, prompt_id, node_id.as_deref());
        if let Some((_, described)) = &fetch {
            body["image"] = described.clone();
        }
        let mut envelope = Map::new();
        envelope.insert("type".into(), json!("publish"));
        envelope.insert("data".into(), body);
        put_ids(&mut envelope, &self.instance, prompt_id, node_id.as_deref(), ids);
        let route = Route::for_subject(&self.instance, topics::FLOW, levels, None);
        let message = Outbound::lifecycle(route, Value::Object(envelope).to_string(), false);
        Handled { messages: vec![message], fetch: fetch.map(|(fetch, _)| fetch), ask: None }
    }

    /// The read of a node's image for `<first>/<subject…>/image`, and the image as messages describe it
    /// (`{filename, subfolder, type, url}`); `None` without a usable image.
    fn image(
        &self,
        value: &Value,
        first: &str,
        levels: &[&str],
        prompt_id: &str,
        node_id: Option<&str>,
    ) -> Option<(Fetch, Value)> {
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        let filename = text("filename").filter(|f| !f.is_empty())?;
        let (subfolder, kind) = (text("subfolder").unwrap_or_default(), text("type").unwrap_or_else(|| "temp".into()));
        let mut described = json!({ "filename": filename, "subfolder": subfolder, "type": kind });
        if let Some(url) = view_url(&self.public_base, &described) {
            described["url"] = json!(url);
        }
        let mut headers = vec![("Content-Type", "image/png".to_string()), ("Comfy-Prompt-Id", prompt_id.to_string())];
        headers.extend(node_id.map(|n| ("Comfy-Node-Id", n.to_string())));
        let route = Route::for_subject(&self.instance, first, levels, Some("image"));
        Some((Fetch { route, filename, subfolder, kind, headers }, described))
    }

    fn ask(
        &mut self,
        prompt_id: &str,
        node_id: Option<String>,
        ask_id: &str,
        levels: &[&str],
        data: &Value,
        ids: Ids<'_>,
    ) -> Handled {
        let answers = Route::for_subject(&self.instance, topics::ANSWER, &[ask_id], None);
        let answer_topic = self.mqtt_answers.as_ref().map(|prefix| format!("{prefix}{}", answers.last()));
        let fetch = self.image(&data["image"], topics::ASK, levels, prompt_id, node_id.as_deref());
        let ask = Ask {
            prompt_id: prompt_id.to_string(),
            ask_id: ask_id.to_string(),
            node_id: node_id.clone(),
            subject: levels.join("/"),
            payload: data["payload"].clone(),
            answer_topic: answer_topic.clone(),
            image_url: fetch.as_ref().and_then(|(_, d)| d["url"].as_str().map(str::to_string)),
        };
        let change = Some(AskChange::Waiting(ask.clone()));
        if !self.first_time(ask_id) {
            // The extension tells a tap that connects about the asks that wait: asked once is enough.
            return Handled { ask: change, ..Handled::default() };
        }
        COUNTERS.asked.fetch_add(1, Relaxed);
        let mut reply_to = Map::new();
        if let Some(topic) = answer_topic {
            reply_to.insert("mqtt".into(), json!(topic));
        }
        if let Some(prefix) = &self.nats_answers {
            reply_to.insert("nats".into(), json!(format!("{prefix}{}", answers.last())));
        }
        let mut question = Map::new();
        question.insert("ask_id".into(), json!(ask_id));
        question.insert("subject".into(), json!(ask.subject));
        question.insert("payload".into(), ask.payload);
        question.insert("timeout_seconds".into(), data["timeout_seconds"].clone());
        question.insert("reply_to".into(), Value::Object(reply_to));
        if let Some((_, described)) = &fetch {
            question.insert("image".into(), described.clone());
        }
        put_ids(&mut question, &self.instance, prompt_id, node_id.as_deref(), ids);
        let route = Route::for_subject(&self.instance, topics::ASK, levels, None);
        let message = Arc::new(Outbound {
            route,
            payload: Bytes::from(Value::Object(question).to_string()),
            qos: 1,
            retain: false,
            class: Class::Lifecycle,
            headers: vec![("Content-Type", "application/json".to_string())],
            reply: None,
            reply_to: Some(answers),
        });
        Handled { messages: vec![message], fetch: fetch.map(|(fetch, _)| fetch), ask: change }
    }

    /// Whether `ask_id` is new; remembers it.
    fn first_time(&mut self, ask_id: &str) -> bool {
        if !self.asked.insert(ask_id.to_string()) {
            return false;
        }
        self.asked_order.push_back(ask_id.to_string());
        if self.asked_order.len() > ASKED_MEMORY {
            if let Some(old) = self.asked_order.pop_front() {
                self.asked.remove(&old);
            }
        }
        true
    }
}

/// The envelope's fields after `data` (docs/INTERFACE.md §2).
fn put_ids(obj: &mut Map<String, Value>, instance: &str, prompt_id: &str, node_id: Option<&str>, ids: Ids<'_>) {
    obj.insert("instance".into(), json!(instance));
    obj.insert("prompt_id".into(), json!(prompt_id));
    if let Some(node_id) = node_id {
        obj.insert("node_id".into(), json!(node_id));
    }
    obj.insert("seq".into(), json!(ids.seq));
    obj.insert("ts".into(), json!(ids.ts));
    if let Some(request_id) = ids.request_id {
        obj.insert("request_id".into(), json!(request_id));
    }
    if let Some(client_id) = ids.client_id {
        obj.insert("client_id".into(), json!(client_id));
    }
}

/// A node id as text (ComfyUI's are strings; a number is taken as its digits).
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The levels of a subject: `/`-separated, empty levels left out, at most [`MAX_LEVELS`].
fn subject_levels(value: &Value) -> Result<Vec<&str>, &'static str> {
    let subject = value.as_str().ok_or("no subject")?;
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err("subject too long");
    }
    let levels: Vec<&str> = subject.split('/').map(str::trim).filter(|l| !l.is_empty()).collect();
    match levels.len() {
        0 => Err("empty subject"),
        n if n > MAX_LEVELS => Err("subject has too many levels"),
        _ => Ok(levels),
    }
}

/// An ask id as the extension makes them (`secrets.token_urlsafe`), else why not.
fn ask_id(value: &Value) -> Result<&str, &'static str> {
    let id = value.as_str().ok_or("no ask_id")?;
    let valid = !id.is_empty()
        && id.len() <= crate::commands::answer::MAX_ASK_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then_some(id).ok_or("bad ask_id")
}

/// The flow's counters, for `/metrics`.
struct Counters {
    published: AtomicU64,
    asked: AtomicU64,
    images: [AtomicU64; 3],
    answers: [AtomicU64; 4],
}

static COUNTERS: Counters = Counters {
    published: AtomicU64::new(0),
    asked: AtomicU64::new(0),
    images: [const { AtomicU64::new(0) }; 3],
    answers: [const { AtomicU64::new(0) }; 4],
};

/// Outcomes of image fetches, as counted.
const IMAGE_OUTCOMES: [&str; 3] = ["published", "failed", "dropped"];
/// Outcomes of answers, as counted.
pub const ANSWER_OUTCOMES: [&str; 4] = ["accepted", "late", "unknown", "failed"];

/// An image fetch ended `outcome` (one of `published`, `failed`, `dropped`).
pub fn image_counted(outcome: &str) {
    if let Some(i) = IMAGE_OUTCOMES.iter().position(|o| *o == outcome) {
        COUNTERS.images[i].fetch_add(1, Relaxed);
    }
}

/// An answer ended `outcome` (one of [`ANSWER_OUTCOMES`]).
pub fn answer_counted(outcome: &str) {
    if let Some(i) = ANSWER_OUTCOMES.iter().position(|o| *o == outcome) {
        COUNTERS.answers[i].fetch_add(1, Relaxed);
    }
}

/// The flow's lines for `/metrics` (Prometheus text format).
pub fn render_metrics() -> String {
    use std::fmt::Write as _;
    let c = &COUNTERS;
    let mut out = String::new();
    let _ = write!(
        out,
        "# HELP comfy_bridge_flow_messages_total Messages of Bus Publish and Bus Ask nodes published, by kind.\n\
         # TYPE comfy_bridge_flow_messages_total counter\n\
         comfy_bridge_flow_messages_total{{kind=\"publish\"}} {}\n\
         comfy_bridge_flow_messages_total{{kind=\"ask\"}} {}\n",
        c.published.load(Relaxed),
        c.asked.load(Relaxed)
    );
    out.push_str(
        "# HELP comfy_bridge_flow_images_total Images of Bus Publish nodes, by outcome.\n\
         # TYPE comfy_bridge_flow_images_total counter\n",
    );
    for (outcome, n) in IMAGE_OUTCOMES.iter().zip(&c.images) {
        let _ = writeln!(out, "comfy_bridge_flow_images_total{{outcome=\"{outcome}\"}} {}", n.load(Relaxed));
    }
    out.push_str(
        "# HELP comfy_bridge_answers_total Answers handed to Bus Ask nodes, by outcome (late: another answer was \
         first or the ask had ended).\n# TYPE comfy_bridge_answers_total counter\n",
    );
    for (outcome, n) in ANSWER_OUTCOMES.iter().zip(&c.answers) {
        let _ = writeln!(out, "comfy_bridge_answers_total{{outcome=\"{outcome}\"}} {}", n.load(Relaxed));
    }
    out
}

#[cfg(test)]
mod tests;
