//! The command task: takes requests from an [`Outlet`] and answers each exactly once.
//!
//! The task owns the templates and the [`Ledger`] of answered request ids. Parsing, permission checks, template
//! edits and duplicate detection happen here, synchronously; whatever talks to ComfyUI runs as a job of its
//! own (at most [`CONCURRENCY`] at a time, the rest wait in a bounded [`WaitQueue`]), so a slow ComfyUI never
//! holds up other requests or any event, and a flood is answered `busy` instead of piling up. What each command
//! does is in its own file ([`Command::apply`]); this loop only routes requests and answers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument as _};

use super::inbox::{Entry, Held, Next, Outlet, Overflow, WaitQueue};
use super::ledger::{Ledger, Record, Seen};
use super::policy::Policy;
use super::queue::{QueuePrompt, Source};
use super::reply::ReplyRules;
use super::response::{self, Code, Failure, Outcome};
use super::{Applied, Command, Context, Work};
use crate::bus::{topics, Bus, Class, Inquiry, InquiryKind, Outbound, Reply, Route};
use crate::comfy::http::ComfyHttp;
use crate::config::CommandSettings;
use crate::homeassistant::{self, Entities, Set};
use crate::telemetry;
use crate::tracker::Control;
use crate::workflow::template::Templates;
use crate::workflow::Edits;

/// Most requests talking to ComfyUI at once.
pub const CONCURRENCY: usize = 8;

/// Where a response goes.
#[derive(Debug, Clone)]
struct Target {
    bus: Bus,
    reply: Option<Reply>,
    command: String,
    /// Nothing is published for it (a raw answer without a reply topic: there is no `response/answer` for
    /// those); it is still counted and logged.
    silent: bool,
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

/// What the command task uses of the configuration (`app` builds it from `Settings`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `bridge.instance`.
    pub instance: String,
    /// `[commands]`.
    pub commands: CommandSettings,
    /// `state.dir`: where the patched copies of templates are kept.
    pub state_dir: PathBuf,
    /// `comfyui.request_timeout_ms`: the longest a request waits for a free slot.
    pub request_timeout: Duration,
    /// Where responses may go (from `mqtt.base_topic`, `nats.subject_prefix`, their limits and
    /// `homeassistant.discovery_prefix`).
    pub replies: ReplyRules,
    /// Home Assistant's part, when it is on: the task holds its select and text entities.
    pub home_assistant: Option<homeassistant::Config>,
}

/// The command task's state.
pub struct CommandTask {
    instance: String,
    policy: Policy,
    replies: ReplyRules,
    deny_node_classes: Vec<String>,
    max_payload_bytes: usize,
    client_id: String,
    http: ComfyHttp,
    templates: Templates,
    /// To the router task (which holds the receiver); prompts queued are announced on it.
    control: mpsc::Sender<Control>,
    /// To each bus's publisher; dropping them on return lets the publishers drain and finish.
    buses: HashMap<Bus, mpsc::Sender<Arc<Outbound>>>,
    ledger: Ledger<Target>,
    waiting: WaitQueue<Job>,
    rng: fastrand::Rng,
    ha: Option<Entities>,
}

/// Home Assistant's select and text entities: the one place their values live.
impl CommandTask {
    /// A command task answering on `buses`, telling the tracker about prompts it queues through `control`.
    pub fn new(
        config: Config,
        client_id: &str,
        http: ComfyHttp,
        control: mpsc::Sender<Control>,
        buses: HashMap<Bus, mpsc::Sender<Arc<Outbound>>>,
    ) -> Self {
        let Config { instance, commands, state_dir, request_timeout, replies, home_assistant } = config;
        let templates = Templates::load(&commands.templates_dir, &state_dir);
        for (file, error) in templates.errors() {
            warn!(file, error, "template skipped");
        }
        let mut task = Self {
            instance,
            policy: Policy::new(&commands),
            replies,
            deny_node_classes: commands.deny_node_classes.clone(),
            max_payload_bytes: commands.max_payload_bytes,
            client_id: client_id.to_string(),
            http,
            templates,
            control,
            buses,
            ledger: Ledger::default(),
            waiting: WaitQueue::new(commands.max_waiting_requests, request_timeout),
            rng: fastrand::Rng::new(),
            ha: None,
        };
        if let Some(home_assistant) = home_assistant {
            task.ha = Some(Entities::new(home_assistant, task.templates.names().next().map(str::to_string)));
        }
        task
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
        debug!("command task stopped");
    }

    /// Handles one inquiry up to the point where it needs ComfyUI.
    async fn take(&mut self, entry: Entry, jobs: &mut JoinSet<Finished>) {
        match entry.inquiry.kind {
            InquiryKind::Request | InquiryKind::Answer if self.policy.enabled => self.take_request(entry, jobs).await,
            InquiryKind::Request | InquiryKind::Answer => {
                telemetry::request_ignored(entry.inquiry.bus, "read_only", &entry.inquiry.path)
            }
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
        let target = Target { bus, reply, command, silent: false };
        let id = super::id_of(&payload);
        let failure = Failure::new(Code::Busy, "the bridge has no room for more requests: try again later");
        let outcome = Err(failure);
        self.finish(Finished { target, id, started: received, outcome, record: Record::Untouched, held: Held::none() })
            .await;
    }

    /// Publishes the Home Assistant discovery configs and the select's and text's states (all retained).
    async fn announce(&mut self) {
        let Some(ha) = &self.ha else { return };
        let names: Vec<String> = self.templates.names().map(str::to_string).collect();
        for (topic, payload) in ha.announce(&names, self.policy.enabled) {
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
        let templates = &self.templates;
        match ha.set(&entity, &value, |name| templates.get(name).is_some()) {
            Set::State(topic, state) => self.publish_mqtt(topic, state, true).await,
            Set::Queue { state: (topic, state), template, input, text } => {
                self.publish_mqtt(topic, state, true).await;
                let queue = QueuePrompt {
                    source: Source::Template(template),
                    edits: Edits { set: vec![(input, json!(text))], ..Edits::default() },
                    front: false,
                    number: None,
                    partial_execution_targets: None,
                    extra_data: None,
                };
                let target = Target { bus: Bus::Mqtt, reply: None, command: "queue".into(), silent: false };
                let span = tracing::info_span!("home_assistant", command = "queue", prompt_id = tracing::field::Empty);
                let request = Received { target, id: None, started: received, held };
                self.execute(Command::Queue(queue), request, jobs, span).await;
            }
            Set::Ignored(why) => warn!(entity, value, why, "home assistant set ignored"),
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
            reply_to: None,
        };
        let _ = tx.send(Arc::new(msg)).await;
    }

    /// A request on `request/<command>`, or a raw answer on `answer/<ask id>` (answered only where its sender
    /// asked: a reply topic or subject).
    async fn take_request(&mut self, entry: Entry, jobs: &mut JoinSet<Finished>) {
        let Entry { inquiry, received: started, size, held } = entry;
        let raw_answer = inquiry.kind == InquiryKind::Answer;
        let command = match raw_answer {
            true => <super::answer::Answer as super::Spec>::NAME.to_string(),
            false => super::command_of(&inquiry.path),
        };
        // A refused reply is answered on the default topic, and the request does nothing.
        let (reply, refused) = match inquiry.reply {
            Some(reply) => match self.replies.check(inquiry.bus, &reply.to) {
                Ok(()) => (Some(reply), None),
                Err(why) => (None, Some(why)),
            },
            None => (None, None),
        };
        let silent = raw_answer && reply.is_none();
        let target = Target { bus: inquiry.bus, reply, command, silent };
        let parsed = match raw_answer {
            true => super::answer::parse_raw(&inquiry.path, inquiry.payload, size, self.max_payload_bytes),
            false => super::parse_path(&inquiry.path, inquiry.payload, size, self.max_payload_bytes),
        };
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
        let target = match &id {
            Some(id) => match self.ledger.check(request.command.name(), id, target, Instant::now()) {
                Seen::New(target) => target,
                Seen::Answered(response, target) => {
                    debug!(parent: &span, "repeated request id: first response again");
                    return self.send(&target, response).await;
                }
                Seen::Waiting => return,
                Seen::Full(target) => {
                    let failure = Failure::new(Code::Busy, "too many repeats of this id wait for its answer");
                    let (outcome, record, held) = (Err(failure), Record::Untouched, Held::none());
                    return self
                        .finish(Finished { target, id: Some(id.clone()), started, outcome, record, held })
                        .await;
                }
            },
            None => target,
        };
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
        let mut cx = Context {
            templates: &mut self.templates,
            rng: &mut self.rng,
            http: &self.http,
            control: &self.control,
            client_id: &self.client_id,
            deny_node_classes: &self.deny_node_classes,
            request_id: request.id.as_deref(),
        };
        let outcome = match command.apply(&mut cx) {
            Applied::Done(outcome) => outcome,
            Applied::Call { work, prompt_id } => {
                if let Some(prompt_id) = prompt_id {
                    span.record("prompt_id", prompt_id.as_str());
                }
                return self.enqueue(jobs, request, work, span).await;
            }
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
        // The work is a future that has done nothing yet: it starts here, in its slot.
        let Job { target, id, started, held, work, span } = job;
        jobs.spawn(
            async move {
                let outcome = work().await;
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
        let waiting = match &id {
            Some(id) => self.ledger.answered(&target.command, id, &response, record, Instant::now()),
            None => Vec::new(),
        };
        self.send(&target, response.clone()).await;
        for target in waiting {
            self.send(&target, response.clone()).await;
        }
        drop(held);
    }

    async fn send(&self, target: &Target, payload: Bytes) {
        if target.silent {
            return debug!(command = %target.command, response = %String::from_utf8_lossy(&payload), "not answered");
        }
        let Some(tx) = self.buses.get(&target.bus) else { return };
        let msg = Arc::new(Outbound {
            route: Route::for_response(&self.instance, &target.command),
            payload,
            qos: 1,
            retain: false,
            class: Class::Lifecycle,
            headers: Vec::new(),
            reply: target.reply.clone(),
            reply_to: None,
        });
        if tx.send(msg).await.is_err() {
            warn!(bus = target.bus.name(), "response lost: publisher gone");
        }
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
