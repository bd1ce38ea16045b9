//! The command plane task: takes requests from an [`Outlet`] and answers each exactly once.
//!
//! The task owns the templates and the record of answered request ids. Parsing, permission checks, template
//! edits and duplicate detection happen here, synchronously; whatever talks to ComfyUI runs as a job of its
//! own (at most [`CONCURRENCY`] at a time, the rest wait in a bounded [`WaitQueue`]), so a slow ComfyUI never
//! holds up other requests or any event, and a flood is answered `busy` instead of piling up.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument as _};

use super::inbox::{Entry, Held, Next, Outlet, Overflow, WaitQueue};
use super::policy::Policy;
use super::reply::ReplyRules;
use super::request::{self, Command, QueuePrompt, Source, Upload};
use super::response::{self, Code, Failure, Outcome};
use crate::bus::{topics, Bus, Class, Inquiry, InquiryKind, Outbound, Reply, Route};
use crate::comfy::http::{ComfyHttp, HttpError};
use crate::config::Settings;
use crate::ha;
use crate::telemetry;
use crate::tracker::Control;
use crate::workflow::patch;
use crate::workflow::template::{TemplateError, Templates};
use crate::workflow::Edits;

/// Most requests talking to ComfyUI at once.
pub const CONCURRENCY: usize = 8;
/// How long a request id is remembered: a repeat within this gets the first response again.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// Most request ids remembered; the oldest are forgotten first beyond this.
const REMEMBER_MAX: usize = 10_000;
/// Most repeats of one request id waiting for its first answer; more are answered `busy`.
const MAX_REPEATS_WAITING: usize = 16;

/// Where a response goes.
#[derive(Debug, Clone)]
struct Target {
    bus: Bus,
    reply: Option<Reply>,
    command: String,
}

/// What a request id has led to so far.
enum Answer {
    /// Being worked on; repeats wait for the same response.
    Pending(Vec<Target>),
    /// Answered at this time with this response.
    Done(Bytes, Instant),
}

/// A finished request: who asked, and what came of it.
struct Finished {
    target: Target,
    id: Option<String>,
    started: Instant,
    outcome: Outcome,
    /// What the answer does to the record of its request id.
    record: Record,
    /// The request's payload bytes, released once answered.
    held: Held,
}

/// What an answer does to the record of its request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Carried out: repeats of the id get this answer again.
    Remember,
    /// Turned away after it was recorded as pending (busy, waited too long): the repeats waiting for it get the
    /// same answer, and the id is forgotten, so a retry is carried out.
    Release,
    /// Rejected before it was recorded (unparsable, refused reply, not allowed, no room): the record of the id,
    /// if another request with it is pending, is not this request's.
    Untouched,
}

/// The work of a request that talks to ComfyUI, made into a future when it starts.
enum Work {
    /// `POST /prompt` with this body.
    Queue(Value),
    /// One of the other commands that call ComfyUI.
    Call(Command),
}

/// A request waiting for a free slot.
struct Job {
    target: Target,
    id: Option<String>,
    started: Instant,
    held: Held,
    work: Work,
    span: tracing::Span,
}

impl Job {
    /// Answered without being started.
    fn turned_away(self, failure: Failure) -> Finished {
        let Job { target, id, started, held, .. } = self;
        Finished { target, id, started, outcome: Err(failure), record: Record::Release, held }
    }
}

/// The command plane's state.
pub struct Plane {
    instance: String,
    policy: Policy,
    replies: ReplyRules,
    deny_node_classes: Vec<String>,
    max_payload_bytes: usize,
    client_id: String,
    http: ComfyHttp,
    templates: Templates,
    control: mpsc::Sender<Control>,
    buses: HashMap<Bus, mpsc::Sender<Arc<Outbound>>>,
    answers: HashMap<(String, String), Answer>,
    waiting: WaitQueue<Job>,
    rng: fastrand::Rng,
    ha: Option<HomeAssistant>,
}

/// Home Assistant's select and text entities: the one place their values live.
struct HomeAssistant {
    settings: Settings,
    selected: Option<String>,
    prompt: String,
}

impl Plane {
    /// A plane answering on `buses`, telling the tracker about prompts it queues through `control`.
    pub fn new(
        settings: &Settings,
        client_id: &str,
        http: ComfyHttp,
        control: mpsc::Sender<Control>,
        buses: HashMap<Bus, mpsc::Sender<Arc<Outbound>>>,
    ) -> Self {
        let templates = Templates::load(&settings.commands.templates_dir, &settings.state.dir);
        for (file, error) in templates.errors() {
            warn!(file, error, "template skipped");
        }
        let deadline = Duration::from_millis(settings.comfyui.request_timeout_ms);
        let mut plane = Self {
            instance: settings.bridge.instance.clone(),
            policy: Policy::new(&settings.commands),
            replies: ReplyRules::new(settings),
            deny_node_classes: settings.commands.deny_node_classes.clone(),
            max_payload_bytes: settings.commands.max_payload_bytes,
            client_id: client_id.to_string(),
            http,
            templates,
            control,
            buses,
            answers: HashMap::new(),
            waiting: WaitQueue::new(settings.commands.max_waiting_requests, deadline),
            rng: fastrand::Rng::new(),
            ha: None,
        };
        if settings.homeassistant.enabled && settings.mqtt.enabled {
            let selected = plane.templates.names().next().map(str::to_string);
            plane.ha = Some(HomeAssistant { settings: settings.clone(), selected, prompt: String::new() });
        }
        plane
    }

    /// Answers requests until `shutdown`; then answers what already arrived and waits (up to `grace`) for
    /// running jobs. Dropping the bus senders on return lets the publishers finish.
    pub async fn run(mut self, mut outlet: Outlet, shutdown: CancellationToken, grace: Duration) {
        let mut jobs = JoinSet::new();
        let (mut open, mut overflow_open) = (true, true);
        self.announce().await;
        loop {
            let expiry = self.waiting.next_expiry();
            tokio::select! {
                biased;
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    match done {
                        Ok(finished) => self.finish(finished).await,
                        Err(e) => warn!(error = %e, "a request job failed"),
                    }
                    self.start_waiting(&mut jobs).await;
                }
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now).into()), if expiry.is_some() => {
                    while let Some((job, waited)) = self.waiting.expired(Instant::now()) {
                        self.finish(job.turned_away(waited_too_long(waited))).await;
                    }
                }
                notice = outlet.overflow.recv(), if overflow_open => match notice {
                    Some(notice) => self.busy(notice).await,
                    None => overflow_open = false,
                },
                entry = outlet.entries.recv(), if open => match entry {
                    Some(entry) => self.take(entry, &mut jobs).await,
                    None => open = false,
                },
                _ = shutdown.cancelled(), if open => {
                    // Stop taking new requests; those already received are still answered.
                    outlet.close();
                }
            }
            if !open && jobs.is_empty() && self.waiting.is_empty() {
                break;
            }
            if !open && shutdown.is_cancelled() {
                while let Some(notice) = outlet.overflow.recv().await {
                    self.busy(notice).await;
                }
                let drain = async {
                    loop {
                        self.start_waiting(&mut jobs).await;
                        let Some(done) = jobs.join_next().await else { break };
                        if let Ok(finished) = done {
                            self.finish(finished).await;
                        }
                    }
                };
                if tokio::time::timeout(grace, drain).await.is_err() {
                    warn!("requests still running at shutdown were abandoned");
                }
                break;
            }
        }
        debug!("command plane stopped");
    }

    /// Handles one inquiry up to the point where it needs ComfyUI.
    async fn take(&mut self, entry: Entry, jobs: &mut JoinSet<Finished>) {
        match entry.inquiry.kind {
            InquiryKind::Request if self.policy.enabled => self.take_request(entry, jobs).await,
            InquiryKind::Request => telemetry::request_ignored(entry.inquiry.bus, "read_only", &entry.inquiry.path),
            InquiryKind::HomeAssistantStatus if &entry.inquiry.payload[..] == b"online" => self.announce().await,
            InquiryKind::HomeAssistantStatus => {}
            InquiryKind::HomeAssistantSet => self.home_assistant_set(entry, jobs).await,
        }
    }

    /// A request the inbox had no room for.
    async fn busy(&mut self, notice: Overflow) {
        let Overflow { bus, command, reply, payload, received } = notice;
        let reply = reply.filter(|r| self.replies.check(bus, &r.to).is_ok());
        let command = topics::unescape(&command).unwrap_or(command);
        let target = Target { bus, reply, command };
        let id = request::id_of(&payload);
        let failure = Failure::new(Code::Busy, "the bridge has no room for more requests: try again later");
        let outcome = Err(failure);
        self.finish(Finished { target, id, started: received, outcome, record: Record::Untouched, held: Held::none() })
            .await;
    }

    /// Publishes the Home Assistant discovery configs and the select's and text's states (all retained).
    async fn announce(&mut self) {
        let Some(ha) = &self.ha else { return };
        let names: Vec<String> = self.templates.names().map(str::to_string).collect();
        let mut messages = ha::discovery(&ha.settings, &names, self.policy.enabled);
        let base = &ha.settings.mqtt.base_topic;
        let inst = &ha.settings.bridge.instance;
        if let Some(selected) = &ha.selected {
            messages.push((ha::route(inst, &["template"]).mqtt_topic(base), Bytes::from(selected.clone())));
        }
        messages.push((ha::route(inst, &["prompt"]).mqtt_topic(base), Bytes::from(ha.prompt.clone())));
        for (topic, payload) in messages {
            self.publish_mqtt(topic, payload, true).await;
        }
    }

    /// A Home Assistant select or text entity was set. Both exist to queue prompts, so both need what a
    /// `queue` request needs.
    async fn home_assistant_set(&mut self, entry: Entry, jobs: &mut JoinSet<Finished>) {
        let Some(ha) = &mut self.ha else { return };
        let Entry { inquiry, received, held, .. } = entry;
        let Inquiry { path: entity, payload, .. } = inquiry;
        if let Err(failure) = self.policy.permits("queue") {
            let reason = if self.policy.enabled { "not_allowed" } else { "read_only" };
            warn!(entity, %failure, "home assistant set ignored");
            return telemetry::request_ignored(Bus::Mqtt, reason, &entity);
        }
        let value = String::from_utf8_lossy(&payload).into_owned();
        let (base, inst) = (ha.settings.mqtt.base_topic.clone(), ha.settings.bridge.instance.clone());
        match entity.as_str() {
            "template" if self.templates.get(&value).is_some() => {
                ha.selected = Some(value.clone());
                self.publish_mqtt(ha::route(&inst, &["template"]).mqtt_topic(&base), Bytes::from(value), true).await;
            }
            "prompt" => {
                ha.prompt = ha::state_text(&value);
                let Some(template) = ha.selected.clone() else {
                    warn!("home assistant prompt set, but no template to queue");
                    return;
                };
                let input = ha.settings.homeassistant.prompt_input.clone();
                let prompt = Bytes::from(ha.prompt.clone());
                self.publish_mqtt(ha::route(&inst, &["prompt"]).mqtt_topic(&base), prompt, true).await;
                let queue = QueuePrompt {
                    source: Source::Template(template),
                    edits: Edits { set: vec![(input, json!(value))], ..Edits::default() },
                    front: false,
                    number: None,
                    partial_execution_targets: None,
                    extra_data: None,
                };
                let target = Target { bus: Bus::Mqtt, reply: None, command: "queue".into() };
                let span = tracing::info_span!("home_assistant", command = "queue", prompt_id = tracing::field::Empty);
                let request = Received { target, id: None, started: received, held };
                self.execute(Command::Queue(queue), request, jobs, span).await;
            }
            other => warn!(entity = other, value, "home assistant set ignored"),
        }
    }

    async fn publish_mqtt(&self, topic: String, payload: Bytes, retain: bool) {
        let Some(tx) = self.buses.get(&Bus::Mqtt) else { return };
        let route = Route::fixed(&self.instance, &[]);
        let msg = Outbound {
            route,
            payload,
            qos: 1,
            retain,
            class: Class::Lifecycle,
            headers: Vec::new(),
            reply: Some(Reply { to: topic, correlation: None }),
        };
        let _ = tx.send(Arc::new(msg)).await;
    }

    /// A request on `request/<command>`.
    async fn take_request(&mut self, entry: Entry, jobs: &mut JoinSet<Finished>) {
        let Entry { inquiry, received: started, size, held } = entry;
        let command = request::command_of(&inquiry.path);
        // A refused reply is answered on the default topic, and the request does nothing.
        let (reply, refused) = match inquiry.reply {
            Some(reply) => match self.replies.check(inquiry.bus, &reply.to) {
                Ok(()) => (Some(reply), None),
                Err(why) => (None, Some(why)),
            },
            None => (None, None),
        };
        let target = Target { bus: inquiry.bus, reply, command };
        let parsed = request::parse_path(&inquiry.path, inquiry.payload, size, self.max_payload_bytes);
        let request = match parsed {
            Ok(request) => request,
            Err(rejected) => {
                let outcome = Err(rejected.failure);
                return self
                    .finish(Finished { target, id: rejected.id, started, outcome, record: Record::Untouched, held })
                    .await;
            }
        };
        let id = request.id.clone();
        let refuse = |failure| Finished {
            target: target.clone(),
            id: id.clone(),
            started,
            outcome: Err(failure),
            record: Record::Untouched,
            held: Held::none(),
        };
        if let Some(why) = refused {
            let failure = Failure::new(Code::InvalidRequest, format!("{why}; nothing was done"))
                .with_details(json!({ "field": "reply" }));
            return self.finish(refuse(failure)).await;
        }
        if let Err(failure) = self.policy.permits(request.command.name()) {
            return self.finish(refuse(failure)).await;
        }
        let span = tracing::info_span!(
            "request",
            command = request.command.name(),
            id = id.as_deref(),
            prompt_id = tracing::field::Empty
        );
        if let Some(id) = &id {
            let key = (request.command.name().to_string(), id.clone());
            match self.answers.get_mut(&key) {
                Some(Answer::Done(response, at)) if at.elapsed() < REMEMBER => {
                    debug!(parent: &span, "repeated request id: first response again");
                    let response = response.clone();
                    return self.send(&target, response).await;
                }
                Some(Answer::Pending(waiting)) if waiting.len() < MAX_REPEATS_WAITING => {
                    waiting.push(target);
                    return;
                }
                Some(Answer::Pending(_)) => {
                    let failure = Failure::new(Code::Busy, "too many repeats of this id wait for its answer");
                    return self.finish(refuse(failure)).await;
                }
                _ => {
                    self.answers.insert(key, Answer::Pending(Vec::new()));
                }
            }
        }
        self.execute(request.command, Received { target, id, started, held }, jobs, span).await;
    }

    /// Carries out a command that passed every check: at once, or as a job when it needs ComfyUI.
    async fn execute(
        &mut self,
        command: Command,
        request: Received,
        jobs: &mut JoinSet<Finished>,
        span: tracing::Span,
    ) {
        let outcome = match command {
            Command::Templates => Ok(self.templates.describe()),
            Command::Patch { template, edits } => self.patch_template(&template, &edits),
            Command::Queue(queue) => match self.prepare(queue) {
                Ok(body) => {
                    let prompt_id = body["prompt_id"].as_str().unwrap_or_default().to_string();
                    span.record("prompt_id", prompt_id.as_str());
                    return self.enqueue(jobs, request, Work::Queue(body), span).await;
                }
                Err(failure) => Err(failure),
            },
            command => return self.enqueue(jobs, request, Work::Call(command), span).await,
        };
        let Received { target, id, started, held } = request;
        self.finish(Finished { target, id, started, outcome, record: Record::Remember, held }).await;
    }

    /// Starts `work` now if a slot is free, else queues it; a full queue answers `busy`.
    async fn enqueue(&mut self, jobs: &mut JoinSet<Finished>, request: Received, work: Work, span: tracing::Span) {
        let Received { target, id, started, held } = request;
        let job = Job { target, id, started, held, work, span };
        if jobs.len() < CONCURRENCY && self.waiting.is_empty() {
            return self.start(jobs, job);
        }
        if let Err(job) = self.waiting.push(started, job) {
            let waiting = self.waiting.len();
            let failure =
                Failure::new(Code::Busy, format!("{waiting} requests already wait for ComfyUI: try again later"))
                    .with_details(json!({ "waiting": waiting }));
            self.finish(job.turned_away(failure)).await;
        }
    }

    /// Starts waiting jobs while slots are free; those that waited too long are answered instead.
    async fn start_waiting(&mut self, jobs: &mut JoinSet<Finished>) {
        while jobs.len() < CONCURRENCY {
            match self.waiting.next(Instant::now()) {
                Some(Next::Start(job)) => self.start(jobs, job),
                Some(Next::Expired(job, waited)) => self.finish(job.turned_away(waited_too_long(waited))).await,
                None => break,
            }
        }
    }

    /// Runs `job` in one of the [`CONCURRENCY`] slots.
    fn start(&self, jobs: &mut JoinSet<Finished>, job: Job) {
        let Job { target, id, started, held, work, span } = job;
        let work: Pin<Box<dyn Future<Output = Outcome> + Send>> = match work {
            Work::Queue(body) => Box::pin(queue_prompt(self.http.clone(), self.control.clone(), body, id.clone())),
            Work::Call(command) => Box::pin(call(self.http.clone(), command)),
        };
        jobs.spawn(
            async move {
                let outcome = work.await;
                Finished { target, id, started, outcome, record: Record::Remember, held }
            }
            .instrument(span),
        );
    }

    /// Answers, remembers the answer for repeats of its id, and answers those repeats too.
    async fn finish(&mut self, finished: Finished) {
        let Finished { target, id, started, outcome, record, held } = finished;
        let code = outcome.as_ref().err().map(|f| f.code.as_str());
        telemetry::request_answered(&target.command, code, started.elapsed());
        let response = response::render(id.as_deref(), &outcome);
        let mut waiting = Vec::new();
        if let Some(id) = id.filter(|_| record != Record::Untouched) {
            self.forget_old();
            let key = (target.command.clone(), id);
            // Only a request that got as far as being carried out is remembered: a rejected one did nothing.
            if let Some(Answer::Pending(w)) = self.answers.remove(&key) {
                waiting = w;
                if record == Record::Remember {
                    self.answers.insert(key, Answer::Done(response.clone(), Instant::now()));
                }
            }
        }
        self.send(&target, response.clone()).await;
        for target in waiting {
            self.send(&target, response.clone()).await;
        }
        drop(held);
    }

    fn forget_old(&mut self) {
        self.answers.retain(|_, a| !matches!(a, Answer::Done(_, at) if at.elapsed() >= REMEMBER));
        if self.answers.len() > REMEMBER_MAX {
            let mut done: Vec<_> = self
                .answers
                .iter()
                .filter_map(|(k, a)| match a {
                    Answer::Done(_, at) => Some((*at, k.clone())),
                    Answer::Pending(_) => None,
                })
                .collect();
            done.sort();
            for (_, key) in done.into_iter().take(self.answers.len() - REMEMBER_MAX) {
                self.answers.remove(&key);
            }
        }
    }

    async fn send(&self, target: &Target, payload: Bytes) {
        let Some(tx) = self.buses.get(&target.bus) else { return };
        let msg = Arc::new(Outbound {
            route: Route::for_response(&self.instance, &target.command),
            payload,
            qos: 1,
            retain: false,
            class: Class::Lifecycle,
            headers: Vec::new(),
            reply: target.reply.clone(),
        });
        if tx.send(msg).await.is_err() {
            warn!(bus = target.bus.name(), "response lost: publisher gone");
        }
    }

    fn patch_template(&mut self, name: &str, edits: &Edits) -> Outcome {
        match self.templates.patch(name, edits, &mut self.rng) {
            Ok(changed) => Ok(json!({ "template": name, "changed": changed })),
            Err(e) => Err(template_failure(e, &self.templates)),
        }
    }

    /// The `POST /prompt` body for a queue request: template or workflow, edited and checked.
    fn prepare(&mut self, queue: QueuePrompt) -> Result<Value, Failure> {
        let mut workflow = match queue.source {
            Source::Template(name) => match self.templates.get(&name) {
                Some(workflow) => workflow.clone(),
                None => return Err(template_failure(TemplateError::Unknown(name), &self.templates)),
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
            patch::apply(&mut workflow, &queue.edits, &mut self.rng)
                .map_err(|e| Failure::new(Code::PatchFailed, e.to_string()).with_details(e.details()))?;
        }
        let denied: Vec<String> = workflow
            .iter()
            .filter_map(|(id, node)| {
                let class = node.get("class_type")?.as_str()?;
                self.deny_node_classes.iter().any(|d| d == class).then(|| format!("{id} ({class})"))
            })
            .collect();
        if !denied.is_empty() {
            let message =
                format!("the workflow contains node classes that are not allowed here: {}", denied.join(", "));
            return Err(Failure::new(Code::NotAllowed, message).with_details(json!({ "nodes": denied })));
        }
        let mut body = json!({
            "prompt": workflow,
            "client_id": self.client_id,
            "prompt_id": new_prompt_id(&mut self.rng),
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
}

/// A request that passed its checks: who asked, and its payload bytes.
struct Received {
    target: Target,
    id: Option<String>,
    started: Instant,
    held: Held,
}

/// The answer to a request that could not start within `comfyui.request_timeout_ms`.
fn waited_too_long(waited: Duration) -> Failure {
    let message = format!(
        "the request waited {} ms for ComfyUI, longer than comfyui.request_timeout_ms; nothing was done",
        waited.as_millis()
    );
    Failure::new(Code::ComfyuiUnavailable, message)
}

/// A random UUID v4 in its usual text form: ComfyUI takes any string, the web UI shows these.
fn new_prompt_id(rng: &mut fastrand::Rng) -> String {
    let mut b: [u8; 16] = std::array::from_fn(|_| rng.u8(..));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn template_failure(error: TemplateError, templates: &Templates) -> Failure {
    match error {
        TemplateError::Unknown(name) => Failure::new(Code::UnknownTemplate, templates.unknown(&name)),
        TemplateError::Patch(e) => Failure::new(Code::PatchFailed, e.to_string()).with_details(e.details()),
        other => Failure::new(Code::PatchFailed, other.to_string()),
    }
}

/// What a failed HTTP call to ComfyUI means for the requester.
fn http_failure(error: HttpError) -> Failure {
    match error {
        HttpError::Unavailable { .. } | HttpError::Status { status: 502..=504, .. } => {
            Failure::new(Code::ComfyuiUnavailable, error.to_string())
        }
        HttpError::Status { json: Some(body), .. } if body.get("error").is_some() => {
            let message = body["error"]["message"].as_str().or(body["error"].as_str()).unwrap_or("rejected");
            let details =
                json!({ "error": body["error"], "node_errors": body.get("node_errors").cloned().unwrap_or(json!({})) });
            Failure::new(Code::ComfyuiRejected, format!("ComfyUI rejected the request: {message}"))
                .with_details(details)
        }
        other => Failure::new(Code::ComfyuiRejected, other.to_string()),
    }
}

/// Posts a prompt, telling the tracker before (so no event overtakes it) and after.
async fn queue_prompt(
    http: ComfyHttp,
    control: mpsc::Sender<Control>,
    body: Value,
    request_id: Option<String>,
) -> Outcome {
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

/// The commands that are one or two calls to ComfyUI.
async fn call(http: ComfyHttp, command: Command) -> Outcome {
    let result = match command {
        Command::Interrupt { prompt_id } => interrupt(&http, prompt_id).await,
        Command::Cancel { prompt_id } => cancel(&http, &prompt_id).await,
        Command::Clear => clear(&http).await,
        Command::Status => return Ok(status(&http).await),
        Command::Upload(upload) => upload_image(&http, upload).await,
        Command::Free { unload_models, free_memory } => {
            http.free(unload_models, free_memory).await.map(|()| Ok(json!({})))
        }
        Command::Queue(_) | Command::Patch { .. } | Command::Templates => {
            return Err(Failure::new(Code::InvalidRequest, "not a ComfyUI call"))
        }
    };
    result.map_err(http_failure)?
}

type Called = Result<Outcome, HttpError>;

async fn interrupt(http: &ComfyHttp, prompt_id: Option<String>) -> Called {
    let queue = http.queue().await?;
    let running = queue.running.first().map(|i| i.prompt_id.clone());
    let target = match (prompt_id, running) {
        (Some(wanted), Some(running)) if wanted == running => running,
        (None, Some(running)) => running,
        (wanted, _) => return Ok(Ok(json!({ "interrupted": false, "prompt_id": wanted }))),
    };
    // Targeted even when the request named no prompt, so an interrupt cannot hit the next prompt instead.
    http.interrupt(Some(&target)).await?;
    Ok(Ok(json!({ "interrupted": true, "prompt_id": target })))
}

async fn cancel(http: &ComfyHttp, prompt_id: &str) -> Called {
    let queue = http.queue().await?;
    if queue.running.iter().any(|i| i.prompt_id == prompt_id) {
        http.interrupt(Some(prompt_id)).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "running", "prompt_id": prompt_id })));
    }
    if queue.pending.iter().any(|i| i.prompt_id == prompt_id) {
        http.delete_pending(&[prompt_id.to_string()]).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "pending", "prompt_id": prompt_id })));
    }
    let message = format!("prompt `{prompt_id}` is neither running nor pending");
    Ok(Err(Failure::new(Code::NotFound, message).with_details(json!({ "prompt_id": prompt_id }))))
}

async fn clear(http: &ComfyHttp) -> Called {
    let pending = http.queue().await?.pending.len();
    http.clear_pending().await?;
    Ok(Ok(json!({ "cleared": pending })))
}

async fn upload_image(http: &ComfyHttp, upload: Upload) -> Called {
    let Upload { filename, data, subfolder, overwrite } = upload;
    let answer = http.upload_image(&filename, data, &subfolder, overwrite).await?;
    Ok(Ok(json!({ "name": answer["name"], "subfolder": answer["subfolder"], "type": answer["type"] })))
}

/// Never an error: an unreachable ComfyUI is part of the status.
async fn status(http: &ComfyHttp) -> Value {
    let (queue, stats) = tokio::join!(http.queue(), http.system_stats());
    let bridge = json!({ "version": env!("CARGO_PKG_VERSION") });
    let ids = |items: &[crate::comfy::queue::QueueItem]| items.iter().map(|i| i.prompt_id.clone()).collect::<Vec<_>>();
    match (queue, stats) {
        (Ok(queue), stats) => json!({
            "comfyui": {
                "reachable": true,
                "version": stats.ok().and_then(|s| s.pointer("/system/comfyui_version").cloned()),
            },
            "queue": { "running": ids(&queue.running), "pending": ids(&queue.pending) },
            "bridge": bridge,
        }),
        (Err(e), _) => json!({
            "comfyui": { "reachable": false, "error": e.to_string() },
            "bridge": bridge,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
