//! Per-prompt state and its transitions. No I/O, no async: events, queue snapshots and history entries go in,
//! `state` and `result` objects (docs/INTERFACE.md §2) and history lookups come out.
//!
//! A prompt is known from whichever comes first: the bridge submitting it ([`Tracker::expect`]), one of its
//! execution events (prompts the bridge queued before a restart keep sending them: the client id is
//! persistent), or a `GET /queue` snapshot (prompts queued by others). It ends exactly once, from its terminal
//! event or, when that was never seen, from its history entry; a prompt that left the queue without reaching
//! history was deleted and ends `cancelled`.
//!
//! Everything is bounded: at most [`MAX_LIVE`] live prompts (beyond it the oldest prompt the bridge did not
//! submit is forgotten, counted), at most [`MAX_PENDING_LOOKUPS`] history lookups asked for at a time (the rest
//! wait their turn, each asked once), ids of others longer than [`MAX_ID_BYTES`] are not tracked, and the
//! outputs gathered from events are limited to [`MAX_OUTPUT_BYTES`] in all. Each input costs work in
//! proportion to itself, never to the number of prompts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::comfy::event::{Kind, TextEvent};
use crate::comfy::queue::{history_outputs_missing, QueueItem, QueueSnapshot};
use crate::comfy::urls::view_url;

/// Least time between two `state` messages that only report progress.
pub const STATE_INTERVAL: Duration = Duration::from_millis(200);
/// How many finished prompts are remembered, so late events and lookups do not bring them back.
const FINISHED_MEMORY: usize = 4096;
/// Most prompts tracked at once. ComfyUI runs one prompt at a time, so this is a queue of a thousand.
pub const MAX_LIVE: usize = 1024;
/// Most `GET /history/<id>` lookups asked for and not answered yet.
pub const MAX_PENDING_LOOKUPS: usize = 32;
/// A lookup not answered after this long (the resync worker gave up) is asked again later.
const LOOKUP_TIMEOUT_MS: u64 = 180_000;
/// A prompt whose last event (other than `executing: null`) is this recent is executing now: absent from
/// queue and history it is still running, not cancelled (a ComfyUI that does not list what it runs).
const EXECUTING_MS: u64 = 60_000;
/// Longest prompt id of a prompt the bridge did not submit that is tracked (ComfyUI's own are 36 bytes).
pub const MAX_ID_BYTES: usize = 4096;
/// Most bytes of node outputs (as their events carried them) held for all live prompts together.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// Longest submitter client id kept for the envelope (ComfyUI's own are 32 hex digits).
const MAX_CLIENT_ID_BYTES: usize = 256;
/// Most cached node ids remembered for a prompt whose workflow is not known.
const MAX_UNKNOWN_DONE: usize = 1024;

/// Where a prompt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The bridge is posting it; nothing published yet.
    Submitting,
    /// In ComfyUI's queue.
    Queued,
    /// Executing.
    Running,
    /// Finished without error.
    Success,
    /// Failed in a node.
    Error,
    /// Interrupted while running.
    Interrupted,
    /// Deleted from the queue before it ran.
    Cancelled,
}

impl Phase {
    /// The name used in `state` and `result` objects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitting | Self::Queued => "queued",
            Self::Running => "running",
            Self::Success => "success",
            Self::Error => "error",
            Self::Interrupted => "interrupted",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Which derived topic an [`Update`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// `prompt/<pid>/state`.
    State,
    /// `prompt/<pid>/result`.
    Result,
}

/// A message to publish for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The prompt.
    pub prompt_id: String,
    /// `state` or `result`.
    pub topic: Topic,
    /// The JSON object.
    pub payload: Bytes,
    /// False for a `state` that only reports progress (may be dropped under pressure).
    pub lifecycle: bool,
    /// A result's object itself (what `payload` renders), so Home Assistant reads it without parsing it back.
    pub result: Option<Value>,
}

/// What the tracker wants done after an input.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    /// Messages to publish, in order.
    pub updates: Vec<Update>,
    /// Prompts that left the queue without a terminal event: read `GET /history/<id>` and call
    /// [`Tracker::on_history`].
    pub lookups: Vec<String>,
}

impl Effects {
    /// Appends `other`.
    pub fn extend(&mut self, other: Effects) {
        self.updates.extend(other.updates);
        self.lookups.extend(other.lookups);
    }
}

#[derive(Debug)]
struct Prompt {
    id: String,
    /// Tells this prompt from an earlier one with the same id in the tracker's queues.
    seq: u64,
    /// Submitted by the bridge ([`Tracker::expect`]): forgotten only when nothing else is left to forget.
    own: bool,
    /// Wants a lookup, but [`MAX_PENDING_LOOKUPS`] are out already.
    waiting: bool,
    /// Bytes of the events whose outputs are in `outputs`.
    output_bytes: usize,
    phase: Phase,
    request_id: Option<String>,
    /// Who queued it (`extra_data.client_id` of its queue entry), for prompts of others.
    client_id: Option<String>,
    /// When the tracker first knew it: a queue snapshot requested before this cannot say it vanished.
    known_since: Instant,
    queue_position: Option<usize>,
    /// The workflow's node ids, when known: the denominator of `fraction`.
    nodes: Option<HashSet<String>>,
    /// Workflow nodes finished or cached.
    done: HashSet<String>,
    /// The executing node (display id) and the workflow node it counts for.
    current: Option<(String, Option<String>)>,
    progress: Option<(f64, f64)>,
    queued_at: Option<u64>,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    outputs: Map<String, Value>,
    error: Option<Value>,
    last_state: Option<Instant>,
    /// When its last execution event came, until `executing: null` ends it.
    last_event_ms: Option<u64>,
    /// The `Bus Ask` it waits on: (ask id, subject).
    ask: Option<(String, String)>,
    /// Its history entry came without the outputs it will have, and was asked for once more.
    history_retried: bool,
}

impl Prompt {
    fn new(id: &str, phase: Phase, now: Instant) -> Self {
        Self {
            id: id.to_string(),
            seq: 0,
            own: false,
            waiting: false,
            output_bytes: 0,
            phase,
            request_id: None,
            client_id: None,
            known_since: now,
            queue_position: None,
            nodes: None,
            done: HashSet::new(),
            current: None,
            progress: None,
            queued_at: None,
            started_at: None,
            finished_at: None,
            outputs: Map::new(),
            error: None,
            last_state: None,
            last_event_ms: None,
            ask: None,
            history_retried: false,
        }
    }

    fn set_workflow(&mut self, workflow: &Value) {
        if self.nodes.is_none() {
            if let Some(map) = workflow.as_object().filter(|m| !m.is_empty()) {
                self.nodes = Some(map.keys().cloned().collect());
            }
        }
    }

    /// The workflow node an executing id counts for: itself, else its display node (expansions, subgraphs).
    fn workflow_node(&self, node: &str, display: Option<&str>) -> Option<String> {
        let nodes = self.nodes.as_ref()?;
        [Some(node), display].into_iter().flatten().find(|n| nodes.contains(*n)).map(str::to_string)
    }

    fn fraction(&self) -> Option<f64> {
        let total = self.nodes.as_ref()?.len();
        if self.phase == Phase::Success {
            return Some(1.0);
        }
        let current = self.current.as_ref().and_then(|(_, w)| w.as_ref());
        let done = self.done.iter().filter(|n| Some(*n) != current).count() as f64;
        let partial = match (current, self.progress) {
            (Some(_), Some((value, max))) if max > 0.0 => (value / max).clamp(0.0, 1.0),
            _ => 0.0,
        };
        Some(((done + partial) / total.max(1) as f64).clamp(0.0, 1.0))
    }

    fn state_object(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("prompt_id".into(), json!(self.id));
        let ask = self.ask.as_ref().filter(|_| self.phase == Phase::Running);
        obj.insert("state".into(), json!(if ask.is_some() { "waiting" } else { self.phase.as_str() }));
        if let Some((ask_id, subject)) = ask {
            obj.insert("ask".into(), json!({"ask_id": ask_id, "subject": subject}));
        }
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                obj.insert(key.into(), value);
            }
        };
        let running = self.phase == Phase::Running;
        put("queue_position", self.queue_position.filter(|_| self.phase == Phase::Queued).map(|p| json!(p)));
        put("node_id", self.current.as_ref().filter(|_| running).map(|(n, _)| json!(n)));
        put("progress", self.progress.filter(|_| running).map(|(value, max)| json!({"value": value, "max": max})));
        put("fraction", self.fraction().map(|f| json!(f)));
        put("nodes_done", self.nodes.as_ref().map(|_| json!(self.done.len())));
        put("nodes_total", self.nodes.as_ref().map(|n| json!(n.len())));
        put("queued_at", self.queued_at.map(|t| json!(t)));
        put("started_at", self.started_at.map(|t| json!(t)));
        put("finished_at", self.finished_at.map(|t| json!(t)));
        put("request_id", self.request_id.as_ref().map(|r| json!(r)));
        put("error", self.error.clone());
        Value::Object(obj)
    }

    fn result_object(&self, public_base: &str) -> Value {
        let mut outputs = self.outputs.clone();
        for output in outputs.values_mut() {
            add_view_urls(output, public_base);
        }
        let mut obj = Map::new();
        obj.insert("prompt_id".into(), json!(self.id));
        obj.insert("status".into(), json!(self.phase.as_str()));
        obj.insert("outputs".into(), Value::Object(outputs));
        let start = self.started_at.or(self.queued_at);
        if let (Some(start), Some(end)) = (start, self.finished_at) {
            obj.insert("duration_ms".into(), json!(end.saturating_sub(start)));
        }
        if let Some(r) = &self.request_id {
            obj.insert("request_id".into(), json!(r));
        }
        if let Some(e) = &self.error {
            obj.insert("error".into(), e.clone());
        }
        Value::Object(obj)
    }
}

/// Adds `url` (a `/view` link) to every `{filename, subfolder, type}` entry of a node's UI output.
fn add_view_urls(output: &mut Value, public_base: &str) {
    let Some(output) = output.as_object_mut() else { return };
    for item in output.values_mut().filter_map(Value::as_array_mut).flatten() {
        if let Some(url) = view_url(public_base, item) {
            item["url"] = json!(url);
        }
    }
}

/// The fields of `data` the tracker reads; the rest is the router's business.
#[derive(Deserialize, Default)]
struct Data {
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    nodes: Option<Value>,
    #[serde(default)]
    node: Option<Value>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    node_id: Option<Value>,
    #[serde(default)]
    node_type: Option<Value>,
    #[serde(default)]
    exception_type: Option<Value>,
    #[serde(default)]
    exception_message: Option<Value>,
}

/// The one owner of per-prompt state.
#[derive(Debug)]
pub struct Tracker {
    public_base: String,
    prompts: HashMap<String, Prompt>,
    /// Recently finished prompts and their request ids, oldest first.
    finished: VecDeque<(String, Option<String>)>,
    finished_ids: HashMap<String, Option<String>>,
    /// Some prompt was given a `request_id` ([`Tracker::expect`]): until then no lookup can find one.
    any_request_id: bool,
    /// Some prompt of others was given a client id (from its queue entry): only then is it looked up.
    any_client_id: bool,
    /// Whether recent history has been read once: what was there before the bridge looked is not news.
    history_baseline: bool,
    /// The next [`Prompt::seq`].
    next_seq: u64,
    /// Live prompts of others, then the bridge's own, oldest first: who is forgotten first. Entries of prompts
    /// gone since are skipped (and compacted away).
    foreign_order: VecDeque<(u64, String)>,
    own_order: VecDeque<(u64, String)>,
    /// Prompts waiting for a lookup slot, in the order they asked.
    waiting: VecDeque<(u64, String)>,
    /// Lookups asked for and not answered, and since when (ms). A slot is freed by the answer (or a timeout),
    /// never by forgetting the prompt: the lookup is still on its way.
    pending: HashMap<String, u64>,
    /// `pending` oldest first; entries answered since are skipped (and compacted away).
    pending_order: VecDeque<(u64, String)>,
    /// The sum of every live prompt's `output_bytes`.
    output_bytes: usize,
    /// Prompts forgotten to stay within [`MAX_LIVE`].
    forgotten: u64,
    /// Lookups asked for, ever.
    lookups_requested: u64,
    /// The submitter of the prompt of others that finished last, for the envelopes of its terminal events.
    last_finished_client: Option<(String, String)>,
}

impl Tracker {
    /// A tracker whose results link images on `public_base` (`comfyui.public_url`).
    pub fn new(public_base: &str) -> Self {
        Self {
            public_base: public_base.trim_end_matches('/').to_string(),
            prompts: HashMap::new(),
            finished: VecDeque::new(),
            finished_ids: HashMap::new(),
            any_request_id: false,
            any_client_id: false,
            history_baseline: false,
            next_seq: 0,
            foreign_order: VecDeque::new(),
            own_order: VecDeque::new(),
            waiting: VecDeque::new(),
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            output_bytes: 0,
            forgotten: 0,
            lookups_requested: 0,
            last_finished_client: None,
        }
    }

    /// Prompts forgotten so far to stay within [`MAX_LIVE`].
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// History lookups asked for so far.
    pub fn lookups_requested(&self) -> u64 {
        self.lookups_requested
    }

    /// Lookups asked for and not answered yet.
    pub fn lookups_pending(&self) -> usize {
        self.pending.len()
    }

    /// Starts tracking `id` unless it is tracked already; makes room by forgetting the oldest prompt of others
    /// (or, failing that, the oldest own one). `false` if it is not tracked: a foreign id that is too long.
    fn admit(&mut self, id: &str, phase: Phase, now: Instant, own: bool) -> bool {
        if self.prompts.contains_key(id) {
            return true;
        }
        if !own && id.len() > MAX_ID_BYTES {
            return false;
        }
        while self.prompts.len() >= MAX_LIVE && self.forget_oldest() {}
        let mut prompt = Prompt::new(id, phase, now);
        prompt.seq = self.next_seq;
        prompt.own = own;
        self.next_seq += 1;
        self.order(own).push_back((prompt.seq, id.to_string()));
        self.prompts.insert(id.to_string(), prompt);
        true
    }

    /// The eviction queue for own or foreign prompts, compacted when it is mostly stale.
    fn order(&mut self, own: bool) -> &mut VecDeque<(u64, String)> {
        let (order, prompts) = match own {
            true => (&mut self.own_order, &self.prompts),
            false => (&mut self.foreign_order, &self.prompts),
        };
        if order.len() >= 2 * MAX_LIVE {
            order.retain(|(seq, id)| prompts.get(id).is_some_and(|p| p.seq == *seq && p.own == own));
        }
        order
    }

    /// Forgets the oldest live prompt of others, else the oldest own one; `false` if there is none.
    fn forget_oldest(&mut self) -> bool {
        let prompts = &self.prompts;
        let oldest = |order: &mut VecDeque<(u64, String)>, own: bool| {
            while let Some((seq, id)) = order.pop_front() {
                if prompts.get(&id).is_some_and(|p| p.seq == seq && p.own == own) {
                    return Some(id);
                }
            }
            None
        };
        let Some(id) = oldest(&mut self.foreign_order, false).or_else(|| oldest(&mut self.own_order, true)) else {
            return false;
        };
        self.remove(&id);
        self.forgotten += 1;
        crate::telemetry::prompt_forgotten();
        true
    }

    /// Stops tracking a prompt, releasing its output bytes.
    fn remove(&mut self, id: &str) -> Option<Prompt> {
        let prompt = self.prompts.remove(id)?;
        self.output_bytes -= prompt.output_bytes;
        Some(prompt)
    }

    /// Asks for `pid`'s history, unless asked already; with [`MAX_PENDING_LOOKUPS`] out, it waits its turn.
    fn request_lookup(&mut self, pid: &str, now_ms: u64, effects: &mut Effects) {
        let Some(prompt) = self.prompts.get_mut(pid) else { return };
        if prompt.waiting || self.pending.contains_key(pid) {
            return;
        }
        if self.pending.len() < MAX_PENDING_LOOKUPS {
            self.pending.insert(pid.to_string(), now_ms);
            self.pending_order.push_back((now_ms, pid.to_string()));
            self.lookups_requested += 1;
            effects.lookups.push(pid.to_string());
            let pending = &self.pending;
            if self.pending_order.len() >= 4 * MAX_PENDING_LOOKUPS {
                self.pending_order.retain(|(since, id)| pending.get(id) == Some(since));
            }
        } else {
            prompt.waiting = true;
            self.waiting.push_back((prompt.seq, pid.to_string()));
            let prompts = &self.prompts;
            if self.waiting.len() >= 2 * MAX_LIVE {
                self.waiting.retain(|(seq, id)| prompts.get(id).is_some_and(|p| p.seq == *seq && p.waiting));
            }
        }
    }

    /// Lookups unanswered for [`LOOKUP_TIMEOUT_MS`] (the worker gave up) wait again; waiting ones take the
    /// free slots.
    fn pump_lookups(&mut self, now_ms: u64, effects: &mut Effects) {
        while let Some((since, id)) = self.pending_order.front() {
            // Oldest first: nothing behind a recent entry has timed out (no hashing per event for that). A
            // recent entry answered since stays until it would have timed out, or the order is compacted.
            if now_ms.saturating_sub(*since) < LOOKUP_TIMEOUT_MS {
                break;
            }
            let current = self.pending.get(id) == Some(since);
            let Some((_, id)) = self.pending_order.pop_front() else { break };
            if current {
                self.pending.remove(&id);
                if let Some(prompt) = self.prompts.get_mut(&id) {
                    prompt.waiting = true;
                    self.waiting.push_back((prompt.seq, id));
                }
            }
        }
        while self.pending.len() < MAX_PENDING_LOOKUPS {
            let Some((seq, id)) = self.waiting.pop_front() else { break };
            if let Some(prompt) = self.prompts.get_mut(&id).filter(|p| p.seq == seq && p.waiting) {
                prompt.waiting = false;
                self.request_lookup(&id, now_ms, effects);
            }
        }
    }

    /// The bus request that queued `prompt_id`, for the envelope's `request_id`.
    pub fn request_id(&self, prompt_id: &str) -> Option<&str> {
        if !self.any_request_id {
            return None;
        }
        match self.prompts.get(prompt_id) {
            Some(p) => p.request_id.as_deref(),
            None => self.finished_ids.get(prompt_id)?.as_deref(),
        }
    }

    /// Who queued `prompt_id`, when it is a prompt of others whose queue entry named its client id (the
    /// envelope's `client_id`).
    pub fn client_id(&self, prompt_id: &str) -> Option<&str> {
        self.envelope_ids(prompt_id).1
    }

    /// The envelope's `request_id` and `client_id` of `prompt_id`, in one lookup; none without hashing until
    /// some prompt was given either.
    pub fn envelope_ids(&self, prompt_id: &str) -> (Option<&str>, Option<&str>) {
        if !self.any_request_id && !self.any_client_id {
            return (None, None);
        }
        match self.prompts.get(prompt_id) {
            Some(p) => (p.request_id.as_deref(), p.client_id.as_deref().filter(|_| !p.own)),
            None => (
                self.finished_ids.get(prompt_id).and_then(Option::as_deref),
                self.last_finished_client.as_ref().filter(|(p, _)| p == prompt_id).map(|(_, c)| c.as_str()),
            ),
        }
    }

    /// The running prompt's current node and whole-prompt fraction, if a prompt is running.
    pub fn running(&self) -> Option<(Option<&str>, Option<f64>)> {
        let prompt = self.prompts.values().find(|p| p.phase == Phase::Running)?;
        Some((prompt.current.as_ref().map(|(node, _)| node.as_str()), prompt.fraction()))
    }

    /// Prompts not finished yet.
    pub fn live(&self) -> usize {
        self.prompts.len()
    }

    /// The bridge is about to post `prompt_id`: remember who asked and what the workflow is, so that even
    /// events racing the HTTP answer carry the `request_id`.
    pub fn expect(&mut self, prompt_id: &str, request_id: Option<String>, workflow: &Value, now: Instant) {
        self.admit(prompt_id, Phase::Submitting, now, true);
        let Some(prompt) = self.prompts.get_mut(prompt_id) else { return };
        self.any_request_id |= request_id.is_some();
        prompt.request_id = request_id;
        prompt.set_workflow(workflow);
        if !prompt.own {
            // Seen in an event first: now the bridge's own.
            prompt.own = true;
            let seq = prompt.seq;
            self.order(true).push_back((seq, prompt_id.to_string()));
        }
    }

    /// ComfyUI accepted a prompt the bridge posted.
    pub fn accepted(&mut self, prompt_id: &str, now_ms: u64, now: Instant) -> Effects {
        let Some(prompt) = self.prompts.get_mut(prompt_id) else { return Effects::default() };
        prompt.queued_at.get_or_insert(now_ms);
        if prompt.phase != Phase::Submitting {
            return Effects::default();
        }
        prompt.phase = Phase::Queued;
        prompt.known_since = now;
        self.publish_state(prompt_id, true, now)
    }

    /// ComfyUI refused (or never got) a prompt the bridge tried to post: forget it.
    pub fn rejected(&mut self, prompt_id: &str) {
        if self.prompts.get(prompt_id).is_some_and(|p| p.phase == Phase::Submitting) {
            self.remove(prompt_id);
        }
    }

    /// Whether `prompt_id` has ended (and is still remembered).
    pub fn is_finished(&self, prompt_id: &str) -> bool {
        self.finished_ids.contains_key(prompt_id)
    }

    /// A `Bus Ask` node of `pid` waits for an answer: its `state` says `waiting`, with the ask's id and
    /// subject, until [`Tracker::ask_ended`] (or the prompt ends).
    pub fn ask_started(&mut self, pid: &str, ask_id: &str, subject: &str, now: Instant) -> Effects {
        if self.is_finished(pid) || !self.admit(pid, Phase::Running, now, false) {
            return Effects::default();
        }
        let Some(prompt) = self.prompts.get_mut(pid) else { return Effects::default() };
        if prompt.ask.as_ref().is_some_and(|(id, _)| id == ask_id) {
            return Effects::default();
        }
        if prompt.phase == Phase::Queued {
            prompt.phase = Phase::Running;
        }
        prompt.ask = Some((ask_id.to_string(), subject.to_string()));
        state_update(prompt, pid, true, now)
    }

    /// The ask `ask_id` of `pid` ended: the prompt runs on (or ends by its own events).
    pub fn ask_ended(&mut self, pid: &str, ask_id: &str, now: Instant) -> Effects {
        match self.prompts.get_mut(pid) {
            Some(prompt) if prompt.ask.as_ref().is_some_and(|(id, _)| id == ask_id) => {
                prompt.ask = None;
                state_update(prompt, pid, true, now)
            }
            _ => Effects::default(),
        }
    }

    /// A text event from ComfyUI.
    pub fn on_event(&mut self, event: &TextEvent, now_ms: u64, now: Instant) -> Effects {
        let Some(pid) = event.prompt_id() else { return Effects::default() };
        let relevant = matches!(
            event.kind,
            Kind::ExecutionStart
                | Kind::ExecutionCached
                | Kind::Executing
                | Kind::Progress
                | Kind::Executed
                | Kind::ExecutionSuccess
                | Kind::ExecutionError
                | Kind::ExecutionInterrupted
        );
        if !relevant {
            return Effects::default();
        }
        let mut effects = Effects::default();
        self.pump_lookups(now_ms, &mut effects);
        effects.extend(self.on_tracked_event(event, pid, now_ms, now));
        effects
    }

    /// An execution event of `pid`, which is tracked from now on unless it has ended (or is a foreign id too
    /// long to track). One map lookup for a prompt tracked already, the usual case.
    fn on_tracked_event(&mut self, event: &TextEvent, pid: &str, now_ms: u64, now: Instant) -> Effects {
        let after = match self.prompts.get_mut(pid) {
            Some(prompt) => on_prompt_event(prompt, &mut self.output_bytes, event, pid, now_ms, now),
            None => {
                if self.is_finished(pid) || !self.admit(pid, Phase::Running, now, false) {
                    return Effects::default();
                }
                match self.prompts.get_mut(pid) {
                    Some(prompt) => on_prompt_event(prompt, &mut self.output_bytes, event, pid, now_ms, now),
                    None => return Effects::default(),
                }
            }
        };
        match after {
            After::Done(effects) => effects,
            After::Lookup => {
                let mut effects = Effects::default();
                self.request_lookup(pid, now_ms, &mut effects);
                effects
            }
            After::Finish(phase, at, error) => self.finish(pid, phase, at, error),
        }
    }

    /// A `GET /queue` snapshot, requested at `requested`. Adds prompts queued by others, updates positions,
    /// and asks for the history of prompts that left the queue unseen.
    pub fn on_queue(&mut self, queue: &QueueSnapshot, requested: Instant, now_ms: u64, now: Instant) -> Effects {
        let mut effects = Effects::default();
        let mut seen = HashSet::new();
        let items = queue.running.iter().map(|i| (i, 0)).chain(queue.pending.iter().zip(1..));
        for (item, position) in items {
            seen.insert(item.prompt_id.as_str());
            effects.extend(self.on_queue_item(item, position, now_ms, now));
        }
        let mut left: Vec<String> = self
            .prompts
            .values()
            .filter(|p| !seen.contains(p.id.as_str()) && p.known_since < requested)
            .filter(|p| matches!(p.phase, Phase::Queued | Phase::Running))
            .map(|p| p.id.clone())
            .collect();
        left.sort();
        for id in left {
            self.request_lookup(&id, now_ms, &mut effects);
        }
        self.pump_lookups(now_ms, &mut effects);
        effects
    }

    fn on_queue_item(&mut self, item: &QueueItem, position: usize, now_ms: u64, now: Instant) -> Effects {
        if self.is_finished(&item.prompt_id) {
            return Effects::default();
        }
        let pid = item.prompt_id.as_str();
        // Deep in a long queue, prompts of others are tracked once they come within reach.
        let tracked =
            self.prompts.contains_key(pid) || (position < MAX_LIVE && self.admit(pid, Phase::Queued, now, false));
        let Some(prompt) = self.prompts.get_mut(pid).filter(|_| tracked) else { return Effects::default() };
        prompt.set_workflow(&item.prompt);
        if prompt.client_id.is_none() {
            let client_id = item.extra_data.get("client_id").and_then(Value::as_str);
            prompt.client_id =
                client_id.filter(|c| !c.is_empty() && c.len() <= MAX_CLIENT_ID_BYTES).map(str::to_string);
            self.any_client_id |= prompt.client_id.is_some();
        }
        if let Some(t) = item.extra_data.get("create_time").and_then(Value::as_u64) {
            prompt.queued_at.get_or_insert(t);
        }
        prompt.queued_at.get_or_insert(now_ms);
        let changed = match (prompt.phase, position) {
            (Phase::Submitting, _) => {
                prompt.phase = if position == 0 { Phase::Running } else { Phase::Queued };
                prompt.queue_position = Some(position);
                true
            }
            (Phase::Queued, 0) => {
                prompt.phase = Phase::Running;
                prompt.started_at.get_or_insert(now_ms);
                prompt.queue_position = Some(0);
                true
            }
            (Phase::Queued, n) => prompt.queue_position.replace(n) != Some(n),
            _ => false,
        };
        let first = prompt.last_state.is_none();
        if changed || first {
            self.publish_state(pid, true, now)
        } else {
            Effects::default()
        }
    }

    /// The most recent history entries (`GET /history?max_items=…`): finishes prompts that ended unseen,
    /// including prompts of others that came and went between two queue reads. The first read only sets the
    /// baseline: prompts that ended before the bridge started are not reported.
    pub fn on_recent_history(&mut self, recent: &[(String, Value)], now_ms: u64, now: Instant) -> Effects {
        let baseline = !std::mem::replace(&mut self.history_baseline, true);
        let mut effects = Effects::default();
        for (id, entry) in recent {
            if self.is_finished(id) {
                continue;
            }
            if !self.prompts.contains_key(id) {
                if baseline {
                    self.remember_finished(id.clone(), None);
                    continue;
                }
                if !self.admit(id, Phase::Queued, now, false) {
                    continue;
                }
            }
            effects.extend(self.on_history(id, Some(entry), now_ms));
        }
        effects
    }

    /// The history entry of a prompt that left the queue (`None`: ComfyUI does not know it, so it was deleted).
    pub fn on_history(&mut self, prompt_id: &str, entry: Option<&Value>, now_ms: u64) -> Effects {
        self.pending.remove(prompt_id);
        if let Some(prompt) = self.prompts.get_mut(prompt_id) {
            prompt.waiting = false;
        }
        let mut effects = self.history_entry(prompt_id, entry, now_ms);
        self.pump_lookups(now_ms, &mut effects);
        effects
    }

    fn history_entry(&mut self, prompt_id: &str, entry: Option<&Value>, now_ms: u64) -> Effects {
        let Some(prompt) = self.prompts.get_mut(prompt_id) else { return Effects::default() };
        let Some(entry) = entry else {
            let executing = prompt.last_event_ms.is_some_and(|t| now_ms.saturating_sub(t) < EXECUTING_MS);
            if prompt.phase == Phase::Submitting || executing {
                return Effects::default();
            }
            return self.finish(prompt_id, Phase::Cancelled, now_ms, None);
        };
        // Read right after `execution_success`, a newer server's entry may not have its outputs yet: once more.
        if !std::mem::replace(&mut prompt.history_retried, true) && history_outputs_missing(entry) {
            let mut effects = Effects::default();
            self.request_lookup(prompt_id, now_ms, &mut effects);
            return effects;
        }
        if let Some(item) = entry.get("prompt") {
            if let Some(item) = QueueItem::parse(item) {
                prompt.set_workflow(&item.prompt);
            }
        }
        if let Some(outputs) = entry.get("outputs").and_then(Value::as_object) {
            for (node, output) in outputs {
                prompt.outputs.entry(node.clone()).or_insert_with(|| output.clone());
            }
        }
        let status = entry.get("status");
        let messages = status.and_then(|s| s.get("messages")).and_then(Value::as_array);
        let message = |kind: &str| {
            messages?.iter().find(|m| m.get(0).and_then(Value::as_str) == Some(kind)).and_then(|m| m.get(1))
        };
        let timestamp = |kind: &str| message(kind)?.get("timestamp")?.as_u64();
        if let Some(t) = timestamp("execution_start") {
            prompt.started_at = Some(t);
        }
        let (phase, at, error) = if let Some(data) = message("execution_interrupted") {
            (Phase::Interrupted, data.get("timestamp").and_then(Value::as_u64), None)
        } else if let Some(data) = message("execution_error") {
            let error = json!({
                "node_id": data.get("node_id"), "node_type": data.get("node_type"),
                "exception_type": data.get("exception_type"), "exception_message": data.get("exception_message"),
            });
            (Phase::Error, data.get("timestamp").and_then(Value::as_u64), Some(error))
        } else if status.and_then(|s| s.get("status_str")).and_then(Value::as_str) == Some("error") {
            (Phase::Error, None, Some(json!({"exception_message": "ComfyUI reported an error"})))
        } else {
            (Phase::Success, timestamp("execution_success"), None)
        };
        self.finish(prompt_id, phase, at.unwrap_or(now_ms), error)
    }

    fn finish(&mut self, pid: &str, phase: Phase, at: u64, error: Option<Value>) -> Effects {
        let Some(mut prompt) = self.remove(pid) else { return Effects::default() };
        prompt.phase = phase;
        prompt.finished_at = Some(at);
        prompt.error = error;
        prompt.queue_position = None;
        if phase == Phase::Success {
            if let Some(nodes) = &prompt.nodes {
                prompt.done = nodes.clone();
            }
        }
        let state = Update {
            prompt_id: pid.to_string(),
            topic: Topic::State,
            payload: to_bytes(&prompt.state_object()),
            lifecycle: true,
            result: None,
        };
        let object = prompt.result_object(&self.public_base);
        let result = Update {
            prompt_id: pid.to_string(),
            topic: Topic::Result,
            payload: to_bytes(&object),
            lifecycle: true,
            result: Some(object),
        };
        if let Some(client_id) = prompt.client_id.filter(|_| !prompt.own) {
            self.last_finished_client = Some((prompt.id.clone(), client_id));
        }
        self.remember_finished(prompt.id, prompt.request_id);
        Effects { updates: vec![state, result], lookups: Vec::new() }
    }

    fn remember_finished(&mut self, id: String, request_id: Option<String>) {
        if self.finished.len() >= FINISHED_MEMORY {
            if let Some((old, _)) = self.finished.pop_front() {
                self.finished_ids.remove(&old);
            }
        }
        self.finished_ids.insert(id.clone(), request_id.clone());
        self.finished.push_back((id, request_id));
    }

    /// A `state` update for `pid`: always for lifecycle changes, at most every [`STATE_INTERVAL`] otherwise.
    fn publish_state(&mut self, pid: &str, lifecycle: bool, now: Instant) -> Effects {
        match self.prompts.get_mut(pid) {
            Some(prompt) => state_update(prompt, pid, lifecycle, now),
            None => Effects::default(),
        }
    }
}

/// What is left to do after an event changed a tracked prompt (what needs the whole tracker).
enum After {
    Done(Effects),
    /// `executing: null` without a terminal event: history says how it ended.
    Lookup,
    /// A terminal event: the prompt ends.
    Finish(Phase, u64, Option<Value>),
}

/// Applies an execution event to its (tracked) prompt; `output_bytes` is the tracker's total.
fn on_prompt_event(
    prompt: &mut Prompt,
    output_bytes: &mut usize,
    event: &TextEvent,
    pid: &str,
    now_ms: u64,
    now: Instant,
) -> After {
    // Progress is most of the traffic: its two numbers were found when the frame was parsed.
    let data: Data = if event.kind == Kind::Progress {
        let (value, max) = event.progress().unzip();
        Data { value, max, ..Data::default() }
    } else {
        serde_json::from_str(event.data()).unwrap_or_default()
    };
    let at = data.timestamp.map_or(now_ms, |t| t as u64);
    prompt.last_event_ms = Some(now_ms);
    let was = prompt.phase;
    if matches!(prompt.phase, Phase::Submitting | Phase::Queued) {
        prompt.phase = Phase::Running;
    }
    let mut lifecycle = was != prompt.phase;
    match event.kind {
        Kind::ExecutionStart => {
            prompt.started_at = Some(at);
            lifecycle = true;
        }
        Kind::ExecutionCached => {
            let cached = data.nodes.as_ref().and_then(Value::as_array).into_iter().flatten();
            for node in cached.filter_map(Value::as_str) {
                let keep = match &prompt.nodes {
                    Some(nodes) => nodes.contains(node),
                    None => prompt.done.len() < MAX_UNKNOWN_DONE,
                };
                if keep {
                    prompt.done.insert(node.to_string());
                }
            }
            lifecycle = true;
        }
        Kind::Executing => match as_text(&data.node) {
            Some(node) => {
                let display = event.node_id().map(str::to_string).unwrap_or_else(|| node.clone());
                let workflow_node = prompt.workflow_node(&node, Some(&display));
                let previous = prompt.current.take().and_then(|(_, w)| w);
                if let Some(previous) = previous.filter(|p| Some(p) != workflow_node.as_ref()) {
                    prompt.done.insert(previous);
                }
                lifecycle |= prompt.current.as_ref().map(|(d, _)| d) != Some(&display);
                // A node that runs on is past any ask (its `ask_done` may have been lost with a tap socket).
                lifecycle |= prompt.ask.take().is_some();
                prompt.current = Some((display, workflow_node));
                prompt.progress = None;
            }
            // `node: null`: the prompt is over. Without a terminal event before it, history says how.
            None => {
                prompt.last_event_ms = None;
                return After::Lookup;
            }
        },
        Kind::Progress => {
            if let (Some(value), Some(max)) = (data.value, data.max) {
                prompt.progress = Some((value, max));
            }
        }
        Kind::Executed => {
            let node = event.node_id().map(str::to_string).or_else(|| as_text(&data.node));
            if let (Some(node), Some(output)) = (node, data.output.filter(|o| !o.is_null())) {
                let size = event.data().len();
                if *output_bytes + size <= MAX_OUTPUT_BYTES {
                    *output_bytes += size;
                    prompt.output_bytes += size;
                    merge_output(prompt.outputs.entry(node).or_insert(Value::Null), output);
                } else if crate::telemetry::warn_allowed("tracker", "outputs_full") {
                    tracing::warn!(prompt_id = pid, size, "node outputs not kept: too many held for live prompts");
                }
            }
            if let Some(workflow_node) = as_text(&data.node).and_then(|n| prompt.workflow_node(&n, event.node_id())) {
                prompt.done.insert(workflow_node);
            }
        }
        Kind::ExecutionSuccess => return After::Finish(Phase::Success, at, None),
        Kind::ExecutionError => {
            if as_text(&data.exception_type).as_deref() == Some("ExecutionBlocked") {
                return After::Done(Effects::default());
            }
            let error = json!({
                "node_id": data.node_id, "node_type": data.node_type,
                "exception_type": data.exception_type, "exception_message": data.exception_message,
            });
            return After::Finish(Phase::Error, at, Some(error));
        }
        Kind::ExecutionInterrupted => return After::Finish(Phase::Interrupted, at, None),
        _ => {}
    }
    After::Done(state_update(prompt, pid, lifecycle, now))
}

/// The `state` of `prompt` when it is due: always on a lifecycle change, else at most every [`STATE_INTERVAL`].
fn state_update(prompt: &mut Prompt, pid: &str, lifecycle: bool, now: Instant) -> Effects {
    if prompt.phase == Phase::Submitting {
        return Effects::default();
    }
    let due = prompt.last_state.is_none_or(|last| now.duration_since(last) >= STATE_INTERVAL);
    if !lifecycle && !due {
        return Effects::default();
    }
    prompt.last_state = Some(now);
    let update = Update {
        prompt_id: pid.to_string(),
        topic: Topic::State,
        payload: to_bytes(&prompt.state_object()),
        lifecycle,
        result: None,
    };
    Effects { updates: vec![update], lookups: Vec::new() }
}

/// A node may report outputs more than once (expansions): lists are concatenated, other keys replaced.
fn merge_output(into: &mut Value, output: Value) {
    match (into, output) {
        (Value::Object(into), Value::Object(output)) => {
            for (key, value) in output {
                match (into.get_mut(&key), value) {
                    (Some(Value::Array(list)), Value::Array(more)) => list.extend(more),
                    (_, value) => {
                        into.insert(key, value);
                    }
                }
            }
        }
        (into, output) => *into = output,
    }
}

fn as_text(value: &Option<Value>) -> Option<String> {
    match value.as_ref()? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

#[cfg(test)]
mod tests;
