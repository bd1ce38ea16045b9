//! The fleet worker: sets up the stream, consumer and buckets, pulls jobs while there is room, and runs each
//! in a job task that follows its prompt through the bridge's own topics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, kv, stream, AckKind, Message};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::dispatch::{decide, Decision, Room, Seen};
use super::job::{kv_key, JobRecord, JobState};
use super::{Config, FleetError, Names, Timing};
use crate::comfy::http::ComfyHttp;
use crate::commands::response::Code;

/// Tries of a bucket read or write that fails (not a conflict), [`STORE_RETRY`] apart: rides out a NATS
/// server failing over (20 s: a stream's new leader on a loaded 3-node cluster can take several seconds).
const STORE_TRIES: usize = 80;
const STORE_RETRY: Duration = Duration::from_millis(250);

/// How long one `queue` request waits for its answer before it is sent again (the bridge answers a repeated
/// `id` from memory, or with the first request's answer when that comes).
const ASK_TURN: Duration = Duration::from_secs(3);

/// How long a job that could not be queued (ComfyUI busy or away) waits before it is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Something for a job task.
#[derive(Debug)]
enum Update {
    /// The prompt's `state` object.
    State(Value),
    /// The prompt's `result` object.
    Result(Value),
    /// Another delivery of the job's message (to keep alive and ack with the first).
    Message(Box<Message>),
}

/// The jobs this bridge follows: by job id, and by prompt id once queued.
#[derive(Debug, Default)]
struct Active {
    jobs: HashMap<String, mpsc::UnboundedSender<Update>>,
    prompts: HashMap<String, String>,
}

/// What every task of the worker shares.
pub(crate) struct Shared {
    pub(crate) names: Names,
    pub(crate) me: String,
    pub(crate) prefix: String,
    pub(crate) capacity: usize,
    pub(crate) max_deliver: u64,
    pub(crate) timing: Timing,
    pub(crate) request_timeout: Duration,
    pub(crate) client: async_nats::Client,
    pub(crate) jobs: kv::Store,
    pub(crate) bridges: kv::Store,
    pub(crate) http: ComfyHttp,
    /// The fleet's own MQTT connection, when MQTT is enabled.
    mqtt: Option<rumqttc::v5::AsyncClient>,
    active: Mutex<Active>,
    room: Notify,
    reachable: AtomicBool,
    pub(crate) shutdown: CancellationToken,
}

/// Connects the worker's own NATS client and spawns it on `tasks`; it sets the fleet up (retrying until
/// JetStream answers) and then pulls jobs until `shutdown`.
pub async fn spawn(config: Config, tasks: &TaskTracker, shutdown: CancellationToken) -> Result<(), FleetError> {
    let (event_tx, _) = mpsc::channel(1);
    let client = crate::bus::nats::connect(&config.nats, &config.instance, event_tx).await?;
    let http = ComfyHttp::new(&config.comfyui)?;
    let mqtt = match config.mqtt.enabled {
        true => Some(super::mqtt::start(&config, jetstream::new(client.clone()), tasks, shutdown.clone())?),
        false => None,
    };
    let inner = tasks.clone();
    tasks.spawn(async move {
        let Some(shared) = setup(&config, client, http, mqtt, shutdown.clone()).await else { return };
        info!(fleet = %config.fleet.name, stream = %shared.names.stream, "fleet worker ready");
        inner.spawn(heartbeat(shared.clone()));
        inner.spawn(events(shared.clone()));
        inner.spawn(super::commands::serve(shared.clone(), inner.clone()));
        resume(&shared, &inner).await;
        pull(shared, inner).await;
    });
    Ok(())
}

/// The stream, the consumer and the buckets, created idempotently; retried until they exist or `shutdown`.
async fn setup(
    config: &Config,
    client: async_nats::Client,
    http: ComfyHttp,
    mqtt: Option<rumqttc::v5::AsyncClient>,
    shutdown: CancellationToken,
) -> Option<Arc<Shared>> {
    let names = Names::new(config);
    let f = &config.fleet;
    let js = jetstream::new(client.clone());
    loop {
        match try_setup(&js, &names, config).await {
            Ok((jobs, bridges)) => {
                return Some(Arc::new(Shared {
                    names,
                    me: config.instance.clone(),
                    prefix: config.nats.subject_prefix.clone(),
                    capacity: f.capacity,
                    max_deliver: f.max_deliver,
                    timing: Timing::new(f),
                    request_timeout: Duration::from_millis(config.comfyui.request_timeout_ms + 5_000),
                    client,
                    jobs,
                    bridges,
                    http,
                    mqtt: mqtt.clone(),
                    active: Mutex::default(),
                    room: Notify::new(),
                    reachable: AtomicBool::new(false),
                    shutdown,
                }));
            }
            Err(e) => warn!(error = %e, "fleet: cannot set up the stream and buckets yet (is JetStream enabled?)"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

type SetupResult = Result<(kv::Store, kv::Store), Box<dyn std::error::Error + Send + Sync>>;

async fn try_setup(js: &jetstream::Context, names: &Names, config: &Config) -> SetupResult {
    let f = &config.fleet;
    let stream = js
        .get_or_create_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.queue_subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: f.replicas,
            duplicate_window: Duration::from_secs(120),
            max_message_size: i32::try_from(config.max_payload_bytes).unwrap_or(i32::MAX),
            ..Default::default()
        })
        .await?;
    // One delivery more than `max_deliver`: the extra one is the bridge that ends a job run too often with
    // an error (else the server would just stop delivering it, and nobody would say so).
    let deliveries = i64::try_from(f.max_deliver).unwrap_or(i64::MAX - 1) + 1;
    stream
        .get_or_create_consumer(
            &names.consumer,
            consumer::pull::Config {
                durable_name: Some(names.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_millis(f.ack_wait_ms),
                max_deliver: deliveries,
                ..Default::default()
            },
        )
        .await?;
    let jobs = bucket(js, &names.jobs_bucket, f.replicas, Duration::ZERO).await?;
    let bridges = bucket(js, &names.bridges_bucket, f.replicas, Duration::from_secs(60)).await?;
    Ok((jobs, bridges))
}

/// A KV bucket, created idempotently. Its stream is made here with the configuration a KV bucket has
/// (`KV_<bucket>` on `$KV.<bucket>.>`), because async-nats 0.51 creates buckets only after reading account
/// info in a shape nats-server 2.9 does not send.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, Box<dyn std::error::Error + Send + Sync>> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(name).await?)
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Shared {
    fn active(&self) -> MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn room(&self) -> Room {
        Room {
            capacity: self.capacity,
            active: self.active().jobs.len(),
            reachable: self.reachable.load(Ordering::Relaxed),
        }
    }

    /// The record of `id` and its revision, if there is one. A failed read (a NATS server failing over) is
    /// retried for a few seconds before it counts as no record.
    pub(crate) async fn read(&self, id: &str) -> Option<Seen> {
        for _ in 0..STORE_TRIES {
            match self.jobs.entry(kv_key(id)).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    return Some(Seen { record: JobRecord::parse(&entry.value)?, revision: entry.revision });
                }
                Ok(_) => return None,
                Err(e) => debug!(error = %e, job = id, "fleet: cannot read the job record yet"),
            }
            tokio::time::sleep(STORE_RETRY).await;
        }
        warn!(job = id, "fleet: cannot read the job record");
        None
    }

    /// Creates (`revision` `None`) or updates the record at `revision`; the new revision, `None` when the
    /// record changed meanwhile (or cannot be written for several seconds). Other failures are retried.
    pub(crate) async fn write(&self, record: &JobRecord, revision: Option<u64>) -> Option<u64> {
        let key = kv_key(&record.id);
        for _ in 0..STORE_TRIES {
            let (written, conflict) = match revision {
                None => match self.jobs.create(&key, record.to_json()).await {
                    Ok(rev) => (Ok(rev), false),
                    Err(e) => (Err(e.to_string()), e.kind() == kv::CreateErrorKind::AlreadyExists),
                },
                Some(rev) => match self.jobs.update(&key, record.to_json(), rev).await {
                    Ok(rev) => (Ok(rev), false),
                    Err(e) => (Err(e.to_string()), e.kind() == kv::UpdateErrorKind::WrongLastRevision),
                },
            };
            match written {
                Ok(rev) => return Some(rev),
                Err(e) if conflict => {
                    debug!(error = %e, job = %record.id, "fleet: record changed meanwhile");
                    return None;
                }
                Err(e) => debug!(error = %e, job = %record.id, "fleet: cannot write the job record yet"),
            }
            tokio::time::sleep(STORE_RETRY).await;
        }
        warn!(job = %record.id, "fleet: cannot write the job record");
        None
    }

    /// Publishes the record on the job's `state` subject, and on `result` when it is over (on MQTT too).
    pub(crate) async fn publish(&self, record: &JobRecord) {
        let body = record.to_json();
        let _ = self.client.publish(self.names.job_subject(&record.id, "state"), body.clone()).await;
        if record.state.is_terminal() {
            let _ = self.client.publish(self.names.job_subject(&record.id, "result"), body.clone()).await;
        }
        if let Some(mqtt) = &self.mqtt {
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            let _ = mqtt.publish(self.names.job_topic(&record.id, "state"), qos, false, body.clone()).await;
            if record.state.is_terminal() {
                let _ = mqtt.publish(self.names.job_topic(&record.id, "result"), qos, false, body).await;
            }
        }
    }

    /// Whether `instance` heartbeats: its entry is there and its last beat is less than three beats old.
    pub(crate) async fn alive(&self, instance: &str) -> bool {
        let Ok(Some(entry)) = self.bridges.entry(instance).await else { return false };
        let Ok(beat) = serde_json::from_slice::<Value>(&entry.value) else { return false };
        let (Some(seen), Some(every)) = (beat["last_seen"].as_u64(), beat["interval_ms"].as_u64()) else {
            return false;
        };
        entry.operation == kv::Operation::Put && now_ms().saturating_sub(seen) < every.saturating_mul(3)
    }

    /// A request to bridge `instance`'s own command plane; its answer.
    pub(crate) async fn ask(&self, instance: &str, command: &str, body: Bytes) -> Result<Value, String> {
        self.ask_within(instance, command, body, self.request_timeout).await
    }

    /// [`Shared::ask`], waiting at most `timeout` for the answer.
    async fn ask_within(&self, instance: &str, command: &str, body: Bytes, timeout: Duration) -> Result<Value, String> {
        let subject = Names::request_subject(&self.prefix, instance, command);
        let request = async_nats::Request::new().payload(body).timeout(Some(timeout));
        let reply = self.client.send_request(subject, request).await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|e| format!("unreadable answer: {e}"))
    }

    fn register(&self, id: &str) -> Option<mpsc::UnboundedReceiver<Update>> {
        let mut active = self.active();
        if active.jobs.contains_key(id) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        active.jobs.insert(id.to_string(), tx);
        Some(rx)
    }

    fn unregister(&self, id: &str) {
        let mut active = self.active();
        active.jobs.remove(id);
        active.prompts.retain(|_, job| job != id);
        drop(active);
        self.room.notify_one();
    }
}

/// How soon a failed heartbeat is tried again.
const HEARTBEAT_RETRY: Duration = Duration::from_millis(250);

/// Heartbeats into the bridges bucket and looks at ComfyUI's queue (reachability, length) every beat.
async fn heartbeat(shared: Arc<Shared>) {
    let every = shared.timing.heartbeat;
    loop {
        let (reachable, queue) = match shared.http.queue().await {
            Ok(q) => (true, q.running.len() + q.pending.len()),
            Err(_) => (false, 0),
        };
        let was = shared.reachable.swap(reachable, Ordering::Relaxed);
        if reachable && !was {
            shared.room.notify_one();
        }
        let beat = json!({
            "instance": shared.me,
            "capacity": shared.capacity,
            "running": shared.active().jobs.len(),
            "queue": queue,
            "reachable": reachable,
            "last_seen": now_ms(),
            "interval_ms": u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        });
        // A failed beat (the bucket failing over) is tried again soon, not a whole beat later.
        let next = match shared.bridges.put(&shared.me, beat.to_string().into()).await {
            Ok(_) => every,
            Err(e) => {
                warn!(error = %e, "fleet: heartbeat failed");
                every.min(HEARTBEAT_RETRY)
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Follows this bridge's `prompt.*.state` and `prompt.*.result` and hands each to the job it belongs to.
async fn events(shared: Arc<Shared>) {
    let base = format!("{}.prompt.*", shared.names.instance_subject);
    let subscribe = |last: &str| shared.client.subscribe(format!("{base}.{last}"));
    let (Ok(mut states), Ok(mut results)) = (subscribe("state").await, subscribe("result").await) else {
        warn!("fleet: cannot subscribe to this bridge's prompt subjects");
        return;
    };
    loop {
        let (message, is_result) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            Some(m) = states.next() => (m, false),
            Some(m) = results.next() => (m, true),
            else => return,
        };
        let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else { continue };
        let active = shared.active();
        let by_prompt = body["prompt_id"].as_str().and_then(|p| active.prompts.get(p)).cloned();
        // Before the answer to `queue` names the prompt, its `request_id` names the job.
        let by_request = || body["request_id"].as_str().filter(|id| active.jobs.contains_key(*id)).map(str::to_string);
        let job = by_prompt.or_else(by_request);
        if let Some(tx) = job.and_then(|id| active.jobs.get(&id)) {
            let _ = tx.send(if is_result { Update::Result(body) } else { Update::State(body) });
        }
    }
}

/// Jobs this bridge claimed before it restarted: followed if its ComfyUI still has the prompt (in `/queue`),
/// finished from `/history` if it ended meanwhile, released for another run otherwise.
async fn resume(shared: &Arc<Shared>, tasks: &TaskTracker) {
    let Ok(mut keys) = shared.jobs.keys().await else { return };
    let mut mine = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(entry)) = shared.jobs.entry(&key).await {
            if let Some(record) = JobRecord::parse(&entry.value) {
                if record.state.is_active() && record.instance.as_deref() == Some(&shared.me) {
                    mine.push(Seen { record, revision: entry.revision });
                }
            }
        }
    }
    for seen in mine {
        info!(job = %seen.record.id, "fleet: resuming a job claimed before the restart");
        if let Some(job) = reclaim(shared, seen, None).await {
            tasks.spawn(job.drive(shared.clone()));
        }
    }
}

/// Looks for a job's prompt in ComfyUI. `Some(job)`: it is still in the queue, follow it. `None`: it was
/// finished from history, or released (`message`, if any, is then handed back).
async fn reclaim(shared: &Arc<Shared>, seen: Seen, message: Option<Message>) -> Option<Job> {
    let Seen { mut record, revision } = seen;
    let pid = record.prompt_id.clone();
    let in_queue = match (&pid, shared.http.queue().await) {
        (Some(pid), Ok(q)) => q.running.iter().chain(&q.pending).any(|i| &i.prompt_id == pid),
        _ => false,
    };
    if in_queue {
        let rx = shared.register(&record.id)?;
        if let Some(pid) = &pid {
            shared.active().prompts.insert(pid.clone(), record.id.clone());
        }
        let messages = message.into_iter().collect();
        return Some(Job { record, revision, messages, rx, payload: Bytes::new() });
    }
    let entry = match &pid {
        Some(pid) => shared.http.history(pid).await.ok().flatten(),
        None => None,
    };
    if let (Some(entry), Some(pid)) = (entry, &pid) {
        record.finish(history_result(pid, &entry));
        if shared.write(&record, Some(revision)).await.is_some() {
            shared.publish(&record).await;
        }
        if let Some(m) = message {
            let _ = m.double_ack().await;
        }
        return None;
    }
    release(shared, &mut record, revision).await;
    if let Some(m) = message {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
    None
}

/// A result read from ComfyUI's history entry of `pid`, for a prompt whose `result` this worker did not see
/// (it ended while the bridge was down, or while the worker's connection was).
fn history_result(pid: &str, entry: &Value) -> Value {
    let status = entry.pointer("/status/status_str").and_then(Value::as_str).unwrap_or("success");
    let status = if status == "success" { "success" } else { "error" };
    json!({"prompt_id": pid, "status": status, "outputs": entry["outputs"], "from_history": true})
}

/// Gives a job back to the stream: `waiting`, this run not counted.
async fn release(shared: &Shared, record: &mut JobRecord, revision: u64) {
    record.state = JobState::Waiting;
    record.instance = None;
    record.prompt_id = None;
    record.attempt = record.attempt.saturating_sub(1);
    if shared.write(record, Some(revision)).await.is_some() {
        shared.publish(record).await;
    }
}

/// Pulls one job at a time while there is room, until shutdown.
async fn pull(shared: Arc<Shared>, tasks: TaskTracker) {
    let consumer: consumer::PullConsumer = loop {
        let js = jetstream::new(shared.client.clone());
        let found =
            async { js.get_stream(&shared.names.stream).await.ok()?.get_consumer(&shared.names.consumer).await.ok() };
        if let Some(c) = found.await {
            break c;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    while !shared.shutdown.is_cancelled() {
        if !shared.room().can_fetch() {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = shared.room.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let batch = consumer.fetch().max_messages(1).expires(Duration::from_secs(1)).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                debug!(error = %e, "fleet: fetch failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                next = batch.next() => next,
            };
            match next {
                Some(Ok(message)) => take(&shared, &tasks, message).await,
                Some(Err(e)) => {
                    debug!(error = %e, "fleet: fetch failed");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Decides what to do with one delivered job, and does it.
async fn take(shared: &Arc<Shared>, tasks: &TaskTracker, message: Message) {
    let Some(id) = job_id(&message.payload) else {
        warn!("fleet: a job without a string `id` (or not a JSON object) is dropped");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    for _ in 0..3 {
        let seen = shared.read(&id).await;
        let here = shared.active().jobs.get(&id).cloned();
        let owners = seen.as_ref().and_then(|s| s.record.instance.clone());
        let alive = match &owners {
            Some(owner) if owner != &shared.me => shared.alive(owner).await,
            _ => false,
        };
        let decision = decide(&shared.me, seen.as_ref(), here.is_some(), shared.max_deliver, |_| alive);
        debug!(job = %id, ?decision, "fleet: delivered");
        match decision {
            Decision::Done => {
                let _ = message.double_ack().await;
            }
            Decision::Hold => match here {
                Some(tx) => {
                    let _ = tx.send(Update::Message(Box::new(message)));
                }
                None => {
                    tasks.spawn(hold(shared.clone(), id, message));
                }
            },
            Decision::Exhausted { attempts, revision } => {
                let Some(Seen { mut record, .. }) = seen else { return };
                let why = format!(
                    "the job ran {attempts} time(s) without finishing (fleet.max_deliver = {})",
                    shared.max_deliver
                );
                record.fail("max_deliver", why, json!({"attempts": attempts}));
                if shared.write(&record, Some(revision)).await.is_none() {
                    continue;
                }
                shared.publish(&record).await;
                let _ = message.ack_with(AckKind::Term).await;
            }
            Decision::Reclaim { revision } => {
                let Some(seen) = seen else { return };
                if let Some(job) = reclaim(shared, Seen { revision, ..seen }, Some(message)).await {
                    tasks.spawn(job.drive(shared.clone()));
                }
            }
            Decision::Run { attempt, revision } => {
                let record = JobRecord::claimed(&id, &shared.me, attempt);
                let Some(revision) = shared.write(&record, revision).await else { continue };
                let Some(rx) = shared.register(&id) else { return };
                shared.publish(&record).await;
                let payload = message.payload.clone();
                let job = Job { record, revision, messages: vec![message], rx, payload };
                tasks.spawn(job.drive(shared.clone()));
            }
        }
        return;
    }
    // The record kept changing under us: let the job come back.
    let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
}

/// The `id` of a job: a JSON object with a string `id`.
fn job_id(payload: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(payload).ok()?;
    body.as_object()?.get("id")?.as_str().map(str::to_string)
}

/// Keeps a job another live bridge runs alive, until it is over (then acks it) or that bridge is gone
/// (then hands it back to the stream at once).
async fn hold(shared: Arc<Shared>, id: String, message: Message) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.timing.progress) => {}
        }
        let _ = message.ack_with(AckKind::Progress).await;
        let seen = shared.read(&id).await;
        let record = seen.as_ref().map(|s| &s.record);
        if record.is_some_and(|r| r.state.is_terminal()) {
            let _ = message.double_ack().await;
            return;
        }
        let owner = record.filter(|r| r.state.is_active()).and_then(|r| r.instance.clone());
        let kept = match owner {
            Some(owner) => shared.alive(&owner).await,
            None => false,
        };
        if !kept {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
    }
}

/// One job this bridge runs.
struct Job {
    record: JobRecord,
    revision: u64,
    /// Its deliveries (the first, and any that came back while it ran).
    messages: Vec<Message>,
    rx: mpsc::UnboundedReceiver<Update>,
    /// The `queue` request; empty for a resumed job (it is queued already).
    payload: Bytes,
}

/// How a job task ends.
enum End {
    /// Over: ack (or term) the messages.
    Over { term: bool },
    /// Given back: nak the messages.
    Released,
    /// Someone else's now, or shutdown: leave the messages alone.
    Leave,
}

impl Job {
    async fn drive(mut self, shared: Arc<Shared>) {
        let id = self.record.id.clone();
        let end = self.run(&shared).await;
        shared.unregister(&id);
        for m in &self.messages {
            let _ = match end {
                End::Over { term: false } => m.double_ack().await,
                End::Over { term: true } => m.ack_with(AckKind::Term).await,
                End::Released => m.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await,
                End::Leave => Ok(()),
            };
        }
    }

    async fn run(&mut self, shared: &Shared) -> End {
        if self.record.prompt_id.is_none() {
            if let Some(end) = self.queue(shared).await {
                return end;
            }
        }
        let mut tick = tokio::time::interval(shared.timing.progress);
        tick.tick().await;
        // Ticks in a row the prompt was not in ComfyUI's queue.
        let mut gone = 0;
        loop {
            let update = tokio::select! {
                _ = shared.shutdown.cancelled() => return End::Leave,
                _ = tick.tick() => {
                    for m in &self.messages {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                    if let Some(result) = self.look(shared, &mut gone).await {
                        shared.unregister(&self.record.id);
                        let mut record = self.record.clone();
                        record.finish(result);
                        return self.store(shared, record).await.unwrap_or(End::Over { term: false });
                    }
                    continue;
                }
                update = self.rx.recv() => update,
            };
            match update {
                None => return End::Leave,
                Some(Update::Message(m)) => self.messages.push(*m),
                Some(Update::State(state)) => {
                    let next = state["state"].as_str().and_then(JobState::from_prompt);
                    let mut record = self.record.clone();
                    if next.is_some_and(|s| !s.is_terminal() && record.advance(s)) {
                        if let Some(end) = self.store(shared, record).await {
                            return end;
                        }
                    }
                }
                Some(Update::Result(result)) => {
                    // The prompt has left ComfyUI's queue: its room is free now, before the bookkeeping.
                    shared.unregister(&self.record.id);
                    let mut record = self.record.clone();
                    record.finish(result);
                    return self.store(shared, record).await.unwrap_or(End::Over { term: false });
                }
            }
        }
    }

    /// Looks at ComfyUI on a tick: core NATS delivers at most once, so a `result` published while the worker's
    /// connection was reconnecting is lost to it. A prompt missing from `/queue` for two ticks in a row that
    /// has a history entry is over: its result, read from history.
    async fn look(&self, shared: &Shared, gone: &mut u32) -> Option<Value> {
        let pid = self.record.prompt_id.as_deref()?;
        let queue = shared.http.queue().await.ok()?;
        if queue.running.iter().chain(&queue.pending).any(|i| i.prompt_id == pid) {
            *gone = 0;
            return None;
        }
        *gone += 1;
        if *gone < 2 {
            return None;
        }
        let entry = shared.http.history(pid).await.ok()??;
        warn!(job = %self.record.id, "fleet: the prompt's result never came; it is taken from ComfyUI's history");
        Some(history_result(pid, &entry))
    }

    /// Sends the job to this bridge's `queue` command. `None`: queued, follow it; else how the job ends.
    async fn queue(&mut self, shared: &Shared) -> Option<End> {
        // A reply lost on the way (the worker's connection reconnecting) must not queue the job twice, nor make
        // the job wait a whole timeout: the same request again, with the same `id`, waits for (or gets) the
        // bridge's first answer and queues nothing. So ask in short turns until `request_timeout` is over.
        let deadline = tokio::time::Instant::now() + shared.request_timeout;
        let answer = loop {
            let answer = shared.ask_within(&shared.me, "queue", self.payload.clone(), ASK_TURN).await;
            match &answer {
                Err(e) if tokio::time::Instant::now() < deadline => {
                    debug!(job = %self.record.id, error = %e, "fleet: no answer to queue yet; asking again");
                    tokio::time::sleep(STORE_RETRY).await;
                }
                _ => break answer,
            }
        };
        let data = match answer {
            Ok(a) if a["status"] == "ok" => a["data"].clone(),
            Ok(a) => {
                let code = a.pointer("/error/code").and_then(Value::as_str).unwrap_or("unknown").to_string();
                // A code that says the job itself is wrong: answered, never retried.
                if Code::ALL.iter().any(|c| c.as_str() == code && c.is_final()) {
                    let mut record = self.record.clone();
                    let message = a.pointer("/error/message").and_then(Value::as_str).unwrap_or_default();
                    record.fail(
                        &code,
                        message.to_string(),
                        a.pointer("/error/details").cloned().unwrap_or(Value::Null),
                    );
                    return Some(self.store(shared, record).await.unwrap_or(End::Over { term: true }));
                }
                info!(job = %self.record.id, %code, "fleet: this bridge cannot queue the job now; it goes back");
                release(shared, &mut self.record, self.revision).await;
                return Some(End::Released);
            }
            Err(e) => {
                warn!(job = %self.record.id, error = %e, "fleet: no answer from this bridge's queue command");
                release(shared, &mut self.record, self.revision).await;
                return Some(End::Released);
            }
        };
        let Some(pid) = data["prompt_id"].as_str().map(str::to_string) else {
            release(shared, &mut self.record, self.revision).await;
            return Some(End::Released);
        };
        shared.active().prompts.insert(pid.clone(), self.record.id.clone());
        let mut record = self.record.clone();
        record.prompt_id = Some(pid);
        record.advance(JobState::Queued);
        self.store(shared, record).await
    }

    /// Writes `record` (revision-checked) and publishes it. `None`: go on; `Some(end)`: the job ends, because
    /// it is over, or because the record changed under it (cancelled, or taken over by another bridge).
    async fn store(&mut self, shared: &Shared, record: JobRecord) -> Option<End> {
        match shared.write(&record, Some(self.revision)).await {
            Some(revision) => {
                self.revision = revision;
                self.record = record;
                shared.publish(&self.record).await;
                self.record.state.is_terminal().then_some(End::Over { term: false })
            }
            None => {
                let now = shared.read(&self.record.id).await;
                let pid = record.prompt_id.clone();
                match now {
                    Some(seen) if seen.record.state.is_terminal() => {
                        // Cancelled while being queued: take the prompt back out of ComfyUI.
                        if let (Some(pid), JobState::Cancelled) = (pid, seen.record.state) {
                            let body = json!({"prompt_id": pid}).to_string();
                            let _ = shared.ask(&shared.me, "cancel", body.into()).await;
                        }
                        Some(End::Over { term: false })
                    }
                    Some(seen) if seen.record.instance.as_deref() == Some(&shared.me) => {
                        // Our own record at another revision: write again on top of it.
                        self.revision = seen.revision;
                        Box::pin(self.store(shared, record)).await
                    }
                    Some(_) => {
                        // Our beats stopped for longer than the job's redelivery (a NATS outage): the other
                        // bridge runs it now, so take our prompt back out of ComfyUI.
                        warn!(job = %self.record.id, "fleet: another bridge took the job over");
                        if let Some(pid) = pid {
                            let body = json!({"prompt_id": pid}).to_string();
                            let _ = shared.ask(&shared.me, "cancel", body.into()).await;
                        }
                        Some(End::Leave)
                    }
                    // The bucket cannot be read (still failing over). An end is left unacked: the job comes back
                    // and is finished from ComfyUI's history then. Anything else: go on, write on the next change.
                    None if record.state.is_terminal() => Some(End::Leave),
                    None => {
                        self.record = record;
                        None
                    }
                }
            }
        }
    }
}
