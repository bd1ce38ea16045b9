//! The prompt queue, the replay engine and history entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::frames::{self, Payload, Target};
use super::tap;
use super::transcript::{Frame, FrameBody, Scenario};
use super::Shared;

/// History is capped like ComfyUI's.
const MAX_HISTORY: usize = 10_000;
/// How long a newer version's history entry lacks its outputs after the prompt's terminal event.
pub(crate) const HISTORY_LAG: Duration = Duration::from_millis(150);

/// A queued prompt.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// Priority as reported (`number`).
    pub number: Value,
    /// Priority used for ordering.
    pub sort_key: f64,
    pub id: String,
    pub prompt: Value,
    pub extra_data: Value,
    pub client_id: Option<String>,
    pub scenario: Arc<Scenario>,
    /// Cancelled by `/interrupt`.
    pub cancel: CancellationToken,
}

impl Job {
    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    pub fn queue_item(&self) -> Value {
        json!([self.number, self.id, self.prompt, self.extra_data, super::synth::output_nodes(&self.prompt)])
    }
}

/// A prompt of a scenario replayed to every socket: in `/queue` from the start of the replay until its
/// terminal event, then in `/history`, as ComfyUI would list it.
#[derive(Debug, Clone)]
pub(crate) struct Played {
    pub id: String,
    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    pub item: Value,
    /// Between its `execution_start` and its end.
    pub running: bool,
}

/// What the replay saw for one prompt id.
#[derive(Debug, Default)]
struct Record {
    outputs: Map<String, Value>,
    meta: Map<String, Value>,
    messages: Vec<Value>,
    error: bool,
    completed: bool,
}

/// One replay of a list of frames.
struct Replay<'a> {
    shared: &'a Shared,
    map: HashMap<String, String>,
    /// `None`: send everything to everyone; `Some(cid)`: route like ComfyUI.
    routing: Option<Option<String>>,
    records: HashMap<String, Record>,
    current_node: Option<String>,
    /// A live `status` was sent after the terminal event.
    status_sent: bool,
    /// A newer version's queued prompt: its queue item, for the history entry written at its terminal event.
    early: Option<Value>,
    /// That entry was written (without outputs).
    early_written: bool,
}

impl<'a> Replay<'a> {
    fn new(shared: &'a Shared, map: HashMap<String, String>, routing: Option<Option<String>>) -> Self {
        Replay {
            shared,
            map,
            routing,
            records: HashMap::new(),
            current_node: None,
            status_sent: false,
            early: None,
            early_written: false,
        }
    }

    /// Play frames with recorded timing; returns true if cancelled.
    async fn run(&mut self, frames: &[&Frame], cancel: &CancellationToken) -> bool {
        let start = tokio::time::Instant::now();
        let t0 = frames.first().map_or(0.0, |f| f.t);
        for f in frames {
            if let Some(d) = self.shared.scaled(f.t - t0) {
                tokio::select! {
                    _ = tokio::time::sleep_until(start + d) => {}
                    _ = cancel.cancelled() => return true,
                }
            }
            if cancel.is_cancelled() {
                return true;
            }
            match Self::extension(f) {
                Some(("comfy_bridge.ask", spec)) => match self.ask(spec, cancel).await {
                    tap::AskEnd::Continue => {}
                    tap::AskEnd::Interrupted => return true,
                    tap::AskEnd::Failed(_) => return false,
                },
                Some((kind, data)) => {
                    let data = frames::rewrite_text(&json!({"data": data}), &self.map);
                    self.shared.send_to_taps(kind, &data["data"]);
                }
                None => self.emit(f),
            }
        }
        false
    }

    /// A `comfy_bridge.*` frame of a synthetic session (a `Bus Publish` or `Bus Ask` node): its type and data.
    fn extension(f: &Frame) -> Option<(&str, &Value)> {
        let FrameBody::Text(v) = &f.body else { return None };
        let kind = v["type"].as_str().filter(|k| k.starts_with("comfy_bridge."))?;
        Some((kind, &v["data"]))
    }

    /// Runs a `Bus Ask`; on a timeout with `on_timeout: error` the node fails as ComfyUI reports it.
    async fn ask(&mut self, spec: &Value, cancel: &CancellationToken) -> tap::AskEnd {
        let spec = frames::rewrite_text(&json!({"data": spec}), &self.map)["data"].clone();
        let pid = spec["prompt_id"].as_str().unwrap_or_default().to_string();
        let end = tap::ask(self.shared, &pid, &spec, cancel).await;
        if let tap::AskEnd::Failed(message) = &end {
            let error = json!({
                "prompt_id": pid, "node_id": spec["node_id"], "node_type": "Bus Ask", "executed": [],
                "exception_message": message, "exception_type": "TimeoutError", "traceback": [],
                "current_inputs": {}, "current_outputs": {}, "timestamp": frames::now_ms(),
            });
            self.emit_text(FrameBody::Text(json!({"type": "execution_error", "data": error})));
            self.emit_text(FrameBody::Text(json!({"type": "executing", "data": {"node": null, "prompt_id": pid}})));
        }
        end
    }

    fn target(&self, body: &FrameBody) -> Target {
        match &self.routing {
            None => Target::All,
            Some(cid) => frames::route(body, cid.as_deref()),
        }
    }

    fn emit(&mut self, frame: &Frame) {
        match &frame.body {
            FrameBody::Text(data) => {
                let body = FrameBody::Text(frames::rewrite_text(data, &self.map));
                self.emit_text(body);
            }
            FrameBody::Binary(bytes) => {
                let mut payload = frames::rewrite_binary(bytes, &self.map);
                let anonymous = matches!(self.routing, Some(None));
                if let (true, Payload::Preview { type1, .. }) = (anonymous, &payload) {
                    payload = Payload::Binary(type1.clone());
                }
                self.shared.send(&self.target(&frame.body), &payload);
            }
        }
    }

    fn emit_text(&mut self, body: FrameBody) {
        let FrameBody::Text(v) = &body else { return };
        self.record(v);
        self.shared.send(&self.target(&body), &Payload::Text(v.to_string()));
        if matches!(v["type"].as_str(), Some("execution_success" | "execution_error" | "execution_interrupted")) {
            self.write_early(v);
        }
        let terminal = matches!(v["type"].as_str(), Some("execution_success" | "execution_error"));
        if terminal && self.routing.is_some() {
            let pending = self.shared.lock().pending.len();
            self.shared.broadcast_status_n(pending);
            self.status_sent = true;
        }
    }

    fn record(&mut self, v: &Value) {
        let data = &v["data"];
        let Some(kind) = v["type"].as_str() else {
            return;
        };
        if kind == "executing" {
            self.current_node = data["node"].as_str().map(str::to_string);
        }
        let Some(pid) = data["prompt_id"].as_str() else {
            return;
        };
        let rec = self.records.entry(pid.to_string()).or_default();
        match kind {
            "execution_start" | "execution_cached" => {}
            "execution_success" => rec.completed = true,
            "execution_error" | "execution_interrupted" => rec.error = true,
            "executed" => {
                let node = data["node"].as_str().unwrap_or_default().to_string();
                rec.outputs.insert(node.clone(), data["output"].clone());
                let meta = json!({"node_id": node, "display_node": data["display_node"], "parent_node": null, "real_node_id": node});
                rec.meta.insert(node, meta);
                return;
            }
            _ => return,
        }
        rec.messages.push(json!([kind, data]));
        if self.routing.is_none() {
            played_event(self.shared, pid, kind, rec);
        }
    }

    /// A newer version, right after a prompt's terminal event: the prompt leaves the queue and its history
    /// entry appears, still without outputs (they follow [`HISTORY_LAG`] later, see [`finish_job`]).
    fn write_early(&mut self, v: &Value) {
        let (Some(item), false) = (&self.early, self.early_written) else { return };
        let Some(rec) = v["data"]["prompt_id"].as_str().and_then(|pid| self.records.get(pid)) else { return };
        let mut entry = history_entry(item.clone(), rec);
        entry["outputs"] = json!({});
        entry["meta"] = json!({});
        let mut st = self.shared.lock();
        st.running = None;
        let id = item[1].as_str().unwrap_or_default().to_string();
        push_history(&mut st.history, id, entry);
        self.early_written = true;
    }

    /// Emit what ComfyUI sends when a running prompt is interrupted.
    fn interrupted(&mut self, job: &Job) {
        let node = self.current_node.clone();
        let node_type = node.as_deref().and_then(|n| job.prompt[n]["class_type"].as_str()).map(str::to_string);
        let data = json!({"prompt_id": job.id, "node_id": node, "node_type": node_type, "executed": [], "timestamp": frames::now_ms()});
        self.emit_text(FrameBody::Text(json!({"type": "execution_interrupted", "data": data})));
        let pending = self.shared.lock().pending.len();
        self.shared.broadcast_status_n(pending);
        self.status_sent = true;
        let end = json!({"type": "executing", "data": {"node": null, "prompt_id": job.id}});
        self.emit_text(FrameBody::Text(end));
    }
}

/// The recorded prompt id a posted prompt corresponds to.
fn recorded_id(sc: &Scenario, prompt: &Value) -> Option<String> {
    sc.posts
        .iter()
        .find(|p| &p.prompt == prompt)
        .or_else(|| sc.posts.first())
        .map(|p| p.prompt_id.clone())
        .or_else(|| sc.prompt_ids.first().cloned())
}

/// Frames of one recorded prompt: from its first to its last mention, minus `status`
/// frames (the queue sends live ones) and frames of other prompts.
fn job_frames<'s>(sc: &'s Scenario, recorded: &str) -> Vec<&'s Frame> {
    let mentions = |f: &Frame| frames::frame_prompt_id(&f.body);
    let first = sc.frames.iter().position(|f| mentions(f).as_deref() == Some(recorded));
    let last = sc.frames.iter().rposition(|f| mentions(f).as_deref() == Some(recorded));
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    sc.frames[first..=last]
        .iter()
        .filter(|f| mentions(f).is_none_or(|id| id == recorded))
        .filter(|f| !matches!(&f.body, FrameBody::Text(v) if v["type"] == "status"))
        .collect()
}

/// Run queued prompts one at a time, forever.
pub(crate) async fn worker(shared: Arc<Shared>) {
    loop {
        let Some(job) = next_job(&shared) else {
            shared.wake.notified().await;
            continue;
        };
        shared.broadcast_status();
        let record = run_job(&shared, &job).await;
        finish_job(&shared, &job, record);
    }
}

fn next_job(shared: &Shared) -> Option<Job> {
    let mut st = shared.lock();
    let idx = (0..st.pending.len()).min_by(|&a, &b| {
        let (x, y) = (&st.pending[a], &st.pending[b]);
        x.sort_key.total_cmp(&y.sort_key).then_with(|| x.id.cmp(&y.id))
    })?;
    let job = st.pending.remove(idx);
    st.running = Some(job.clone());
    Some(job)
}

/// How a replayed job ended: its record, whether the final `status` was already sent, and whether its history
/// entry was already written without outputs (newer versions).
struct Ended {
    record: Record,
    status_sent: bool,
    early: bool,
}

/// Replay a job.
async fn run_job(shared: &Shared, job: &Job) -> Ended {
    let recorded = recorded_id(&job.scenario, &job.prompt).unwrap_or_default();
    let frames = job_frames(&job.scenario, &recorded);
    let map = HashMap::from([(recorded, job.id.clone())]);
    let mut replay = Replay::new(shared, map, Some(job.client_id.clone()));
    replay.early = shared.version.is_newer().then(|| job.queue_item());
    if replay.run(&frames, &job.cancel).await {
        replay.interrupted(job);
    }
    let record = replay.records.remove(&job.id).unwrap_or_default();
    Ended { record, status_sent: replay.status_sent, early: replay.early_written }
}

fn finish_job(shared: &Arc<Shared>, job: &Job, ended: Ended) {
    let Ended { mut record, status_sent, early } = ended;
    if record.messages.is_empty() {
        let ts = frames::now_ms();
        record.messages.push(json!(["execution_start", {"prompt_id": job.id, "timestamp": ts}]));
        record.messages.push(json!(["execution_success", {"prompt_id": job.id, "timestamp": ts}]));
        record.completed = true;
    }
    let entry = history_entry(job.queue_item(), &record);
    if early {
        // The outputs reach the entry only now, after `execution_success` (ComfyUI issue 11540).
        let (shared2, id) = (shared.clone(), job.id.clone());
        super::spawn_guarded(shared, async move {
            tokio::time::sleep(HISTORY_LAG).await;
            let mut st = shared2.lock();
            if let Some(slot) = st.history.iter_mut().find(|(k, _)| *k == id) {
                slot.1 = entry;
            }
        });
    } else {
        let mut st = shared.lock();
        st.running = None;
        push_history(&mut st.history, job.id.clone(), entry);
    }
    if !status_sent {
        shared.broadcast_status();
    }
}

fn push_history(history: &mut Vec<(String, Value)>, id: String, entry: Value) {
    history.retain(|(k, _)| *k != id);
    history.push((id, entry));
    if history.len() > MAX_HISTORY {
        history.remove(0);
    }
}

/// Moves a played prompt to running on its start, and from the queue to history on its end (before the
/// event is sent: a client that looks the prompt up on its terminal event finds it).
fn played_event(shared: &Shared, pid: &str, kind: &str, rec: &Record) {
    let mut st = shared.lock();
    let Some(i) = st.played.iter().position(|p| p.id == pid) else { return };
    match kind {
        "execution_start" => st.played[i].running = true,
        "execution_success" | "execution_error" | "execution_interrupted" => {
            let played = st.played.remove(i);
            push_history(&mut st.history, played.id, history_entry(played.item, rec));
        }
        _ => {}
    }
}

fn history_entry(item: Value, rec: &Record) -> Value {
    let status_str = if rec.error { "error" } else { "success" };
    json!({
        "prompt": item,
        "outputs": rec.outputs,
        "status": {"status_str": status_str, "completed": rec.completed && !rec.error, "messages": rec.messages},
        "meta": rec.meta,
    })
}

/// Interrupt the running prompt if `prompt_id` is `None` or matches it.
pub(crate) fn interrupt(shared: &Shared, prompt_id: Option<&str>) {
    let st = shared.lock();
    if let Some(job) = &st.running {
        if prompt_id.is_none_or(|id| id == job.id) {
            job.cancel.cancel();
        }
    }
}

/// Replay a whole scenario to every socket with fresh prompt ids; returns the first new id. Its prompts are
/// in `/queue` from the start until each ends, then in `/history` (ComfyUI's own view of them).
pub(crate) async fn play_all(shared: &Shared, sc: &Scenario) -> String {
    let map: HashMap<String, String> = sc.prompt_ids.iter().map(|id| (id.clone(), frames::new_uuid())).collect();
    let first = sc.prompt_ids.first().and_then(|id| map.get(id).cloned()).unwrap_or_else(frames::new_uuid);
    {
        let mut st = shared.lock();
        for old in &sc.prompt_ids {
            let Some(id) = map.get(old) else { continue };
            let prompt = sc.posts.iter().find(|p| &p.prompt_id == old).map_or_else(|| json!({}), |p| p.prompt.clone());
            let number = st.counter;
            st.counter += 1;
            let outputs = super::synth::output_nodes(&prompt);
            st.played.push(Played { id: id.clone(), item: json!([number, id, prompt, {}, outputs]), running: false });
        }
    }
    let frames: Vec<&Frame> = sc.frames.iter().collect();
    let mut replay = Replay::new(shared, map.clone(), None);
    replay.run(&frames, &CancellationToken::new()).await;
    // Prompts that never reached a terminal event: to history if they ran, else gone (deleted).
    let mut st = shared.lock();
    let ours: Vec<Played> = st.played.iter().filter(|p| map.values().any(|id| *id == p.id)).cloned().collect();
    st.played.retain(|p| !map.values().any(|id| *id == p.id));
    for played in ours {
        if let Some(record) = replay.records.get(&played.id).filter(|r| !r.messages.is_empty()) {
            let entry = history_entry(played.item, record);
            push_history(&mut st.history, played.id, entry);
        }
    }
    first
}

/// Replay every scenario in turn, forever, whenever a socket is connected.
pub(crate) async fn autoplay(shared: Arc<Shared>) {
    if shared.scenarios.is_empty() {
        tracing::warn!("autoplay: no scenarios loaded");
        return;
    }
    loop {
        for sc in &shared.scenarios {
            while shared.lock().clients.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!(scenario = %sc.name, "autoplay");
            play_all(&shared, sc).await;
            let pause = shared.scaled(0.5).unwrap_or_default();
            tokio::time::sleep(pause.max(Duration::from_millis(20))).await;
        }
    }
}
