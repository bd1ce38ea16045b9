//! A ComfyUI simulator: replays recorded transcripts over a real HTTP + WebSocket server.
//!
//! One TCP listener serves the ComfyUI HTTP API subset a bridge uses and `GET /ws`.
//! Prompts posted to `/prompt` are answered from the recorded scenario whose prompt
//! matches (else `a_success`, else the first), replayed with fresh prompt ids and routed
//! like ComfyUI does (docs/PROTOCOL.md §3). See [`Simulator`].
//!
//! This crate imports nothing from the bridge. The bridge's binary ships it as `comfy-bridge simulate`
//! ([`run_cli`]), and the bridge's tests use it as their ComfyUI. The built-in sessions are the workspace's
//! `tests/fixtures/transcripts/*.jsonl`, embedded at compile time, so the binary replays them from any directory.

mod frames;
mod http;
mod jobs;
#[cfg(test)]
mod newer_tests;
mod queue;
mod server;
mod synth;
mod tap;
#[cfg(test)]
mod tests;
mod transcript;
mod upload;
mod version;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use frames::{Payload, Target};
use transcript::Scenario;

pub use tap::VERSION as TAP_VERSION;
pub use version::{ComfyVersion, VersionError};

/// Options for [`Simulator::start`].
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Transcript files, or directories containing `.jsonl` transcripts; empty plays the sessions built into
    /// the binary (success, cached, node error, validation errors, interrupt, three queued prompts).
    pub transcripts: Vec<PathBuf>,
    /// Playback speed: 1.0 = recorded timing; 0.0 or infinity = no delays.
    pub speed: f64,
    /// Replay all scenarios continuously to every socket, with fresh prompt ids each round.
    pub autoplay: bool,
    /// Play the tap extension (extension/README.md): the server's feature flags carry its version, sockets
    /// whose first message asks for `comfy_bridge_tap` get its hello and a copy of what is sent to other
    /// sockets, `Bus Publish` / `Bus Ask` nodes send its messages, and `POST /comfy_bridge/answer` answers.
    pub tap: bool,
    /// The ComfyUI version played (default 0.3.64, the recordings'). Newer versions serve the jobs API
    /// (`/api/jobs`), refuse a `prompt_id` that is not a lowercase UUID with 400, and write a finished prompt's
    /// history entry without its outputs first, adding them a moment after `execution_success`.
    pub comfyui_version: ComfyVersion,
}

/// Errors of [`Simulator::play`].
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No loaded scenario has that name.
    #[error("unknown scenario {0:?}")]
    UnknownScenario(String),
    /// The simulator is shutting down.
    #[error("simulator stopped")]
    Stopped,
}

/// A message for one socket's writer task.
#[derive(Debug)]
pub(crate) enum Out {
    /// Send this frame.
    Msg(Message),
    /// Send a close frame and drop the connection.
    Close,
}

/// A registered WebSocket.
#[derive(Debug)]
pub(crate) struct Client {
    /// Connection serial, to tell a replaced socket from its successor.
    pub conn: u64,
    /// Writer channel.
    pub tx: mpsc::UnboundedSender<Out>,
    /// Whether the socket negotiated `supports_preview_metadata`.
    pub preview_metadata: bool,
    /// Whether the socket is a tap (its first message asked for `comfy_bridge_tap`, and the tap is on).
    pub tap: bool,
    /// Deaf ([`Simulator::deafen_next_reconnect`]): gets broadcasts, but nothing sent to its client id.
    pub deaf: bool,
}

/// Mutable simulator state.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Registered sockets by client id.
    pub clients: HashMap<String, Client>,
    /// The prompt being replayed.
    pub running: Option<queue::Job>,
    /// Prompts waiting to run.
    pub pending: Vec<queue::Job>,
    /// Prompts of scenarios replayed to every socket ([`Simulator::play`], `--loop`), until they end.
    pub played: Vec<queue::Played>,
    /// ComfyUI's prompt counter.
    pub counter: i64,
    /// Finished prompts, oldest first.
    pub history: Vec<(String, Value)>,
    /// HTTP requests received.
    pub requests: Vec<(String, String, Value)>,
    /// Uploaded files by `type/subfolder/name` (`/upload/image`).
    pub uploads: HashMap<String, Vec<u8>>,
    /// The tap extension's asks.
    pub asks: tap::Asks,
    /// Client ids that have had a socket, so a reconnect with the same id is known as one.
    pub seen_clients: HashSet<String>,
}

impl State {
    /// `queue_remaining` as ComfyUI reports it.
    pub fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some()) + self.played.len()
    }
}

/// State shared by all tasks of one simulator.
#[derive(Debug)]
pub(crate) struct Shared {
    pub scenarios: Vec<Arc<Scenario>>,
    pub speed: f64,
    pub state: Mutex<State>,
    /// Wakes the queue worker.
    pub wake: Notify,
    /// Cancelled when the simulator is dropped.
    pub shutdown: CancellationToken,
    pub next_conn: AtomicU64,
    /// Answer WebSocket upgrades with 503 (a proxy in front of a restarting ComfyUI).
    pub refuse_websockets: std::sync::atomic::AtomicBool,
    /// Milliseconds every HTTP request waits before it is handled (a slow ComfyUI).
    pub http_delay_ms: AtomicU64,
    /// Whether the tap extension is installed.
    pub tap: bool,
    /// The extension's per-start secret (sent to tap sockets only).
    pub secret: String,
    /// The ComfyUI version played.
    pub version: ComfyVersion,
    /// The next socket that reconnects with a client id seen before goes deaf.
    pub deafen_next: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Lock the state, ignoring poisoning.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send a payload to the targeted sockets. With the tap, a message for one socket that is not a tap (or
    /// for a client id with no socket) is copied to every tap, and what ComfyUI sends nobody (lifecycle events
    /// of a prompt without a client id) goes to the taps.
    pub fn send(&self, target: &Target, payload: &Payload) {
        let st = self.lock();
        let send_as = |c: &Client, metadata: bool| {
            let msg = match payload {
                Payload::Text(t) => Message::text(t.clone()),
                Payload::Binary(b) => Message::binary(b.clone()),
                Payload::Preview { type4, .. } if metadata => Message::binary(type4.clone()),
                Payload::Preview { type1, .. } => Message::binary(type1.clone()),
            };
            let _ = c.tx.send(Out::Msg(msg));
        };
        let send_one = |c: &Client| send_as(c, c.preview_metadata);
        let taps = || st.clients.values().filter(|c| self.tap && c.tap);
        match target {
            Target::All => st.clients.values().for_each(send_one),
            Target::Only(id) => {
                let target = st.clients.get(id);
                target.filter(|c| !c.deaf).into_iter().for_each(send_one);
                if !target.is_some_and(|c| c.tap) {
                    // The bytes the target gets (type-4 previews when it negotiated them), unchanged.
                    taps().for_each(|c| send_as(c, target.map_or(c.preview_metadata, |t| t.preview_metadata)));
                }
            }
            Target::Nobody => taps().for_each(send_one),
        }
    }

    /// Sends the extension's message `{"type": kind, "data": data}` to the tap sockets only.
    pub fn send_to_taps(&self, kind: &str, data: &Value) {
        if !self.tap {
            return;
        }
        let text = json!({"type": kind, "data": data}).to_string();
        let st = self.lock();
        for c in st.clients.values().filter(|c| c.tap) {
            let _ = c.tx.send(Out::Msg(Message::text(text.clone())));
        }
    }

    /// Broadcast a `status` frame with the given `queue_remaining`.
    pub fn broadcast_status_n(&self, remaining: usize) {
        let frame = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}});
        self.send(&Target::All, &Payload::Text(frame.to_string()));
    }

    /// Broadcast a `status` frame with the current queue length.
    pub fn broadcast_status(&self) {
        let n = self.lock().queue_remaining();
        self.broadcast_status_n(n);
    }

    /// Delay for a recorded time span, scaled by speed; `None` means no delay.
    pub fn scaled(&self, secs: f64) -> Option<Duration> {
        if !(self.speed.is_finite() && self.speed > 0.0) || secs <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(secs / self.speed).ok()
    }

    fn scenario(&self, name: &str) -> Option<Arc<Scenario>> {
        self.scenarios.iter().find(|s| s.name == name).cloned()
    }
}

/// A running simulator. Dropping it stops every task and closes every socket.
#[derive(Debug)]
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Simulator {
    /// Bind `listen`, load the transcripts and start serving.
    pub async fn start(listen: SocketAddr, opts: SimOptions) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let scenarios = match opts.transcripts.is_empty() {
            true => transcript::built_in(),
            false => transcript::load_all(&opts.transcripts),
        };
        let shared = Arc::new(Shared {
            scenarios: scenarios.into_iter().map(Arc::new).collect(),
            speed: opts.speed,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            next_conn: AtomicU64::new(1),
            refuse_websockets: std::sync::atomic::AtomicBool::new(false),
            http_delay_ms: AtomicU64::new(0),
            tap: opts.tap,
            secret: tap::token(32),
            version: opts.comfyui_version,
            deafen_next: std::sync::atomic::AtomicBool::new(false),
        });
        spawn_guarded(&shared, server::accept_loop(shared.clone(), listener));
        spawn_guarded(&shared, queue::worker(shared.clone()));
        if opts.autoplay {
            spawn_guarded(&shared, queue::autoplay(shared.clone()));
        }
        Ok(Simulator { shared, addr })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:8188`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Names (file stems) of the loaded scenarios.
    pub fn scenarios(&self) -> Vec<String> {
        self.shared.scenarios.iter().map(|s| s.name.clone()).collect()
    }

    /// Replay one scenario to every connected socket now, as if each were the recorded
    /// primary client. Returns the new id of the scenario's first prompt once done.
    pub async fn play(&self, scenario: &str) -> Result<String, SimError> {
        let sc = self.shared.scenario(scenario).ok_or_else(|| SimError::UnknownScenario(scenario.to_string()))?;
        tokio::select! {
            id = queue::play_all(&self.shared, &sc) => Ok(id),
            _ = self.shared.shutdown.cancelled() => Err(SimError::Stopped),
        }
    }

    /// Queues `prompt` as another client would (`client_id` of a browser tab, or `None`, as a script that sends
    /// none): the bridge's socket gets its events only through the tap. Returns the prompt id, or ComfyUI's
    /// 400/500 answer.
    pub fn queue_as(&self, prompt: &Value, client_id: Option<&str>) -> Result<String, Value> {
        let mut body = json!({"prompt": prompt});
        if let Some(id) = client_id {
            body["client_id"] = json!(id);
        }
        let resp = http::post_prompt(&self.shared, body.to_string().as_bytes());
        let answer: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        match (resp.status, answer["prompt_id"].as_str()) {
            (200, Some(id)) => Ok(id.to_string()),
            _ => Err(answer),
        }
    }

    /// Answers the tap's answer route accepted so far: (ask id, answer), in order.
    pub fn accepted_answers(&self) -> Vec<(String, String)> {
        self.shared.lock().asks.accepted.clone()
    }

    /// The `comfy_bridge.ask` data of the asks waiting for an answer now.
    pub fn waiting_asks(&self) -> Vec<Value> {
        self.shared.lock().asks.waiting()
    }

    /// Prompts running or pending.
    pub fn queue_remaining(&self) -> usize {
        self.shared.lock().queue_remaining()
    }

    /// Client ids of the registered sockets.
    pub fn connected_clients(&self) -> Vec<String> {
        let mut ids: Vec<(u64, String)> =
            self.shared.lock().clients.iter().map(|(id, c)| (c.conn, id.clone())).collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    /// Wait until a socket is registered; returns the newest client id.
    pub async fn wait_for_client(&self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(id) = self.connected_clients().pop() {
                return Some(id);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// While `refuse` is set, WebSocket upgrades get 503: clients cannot reconnect, HTTP still works.
    pub fn refuse_websockets(&self, refuse: bool) {
        self.shared.refuse_websockets.store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next socket that connects with a client id that had a socket before goes deaf, as the new socket
    /// can on ComfyUI (its issue 16010: the old handler's cleanup unregisters the new socket): it keeps
    /// getting broadcasts (`status`, custom events) but nothing sent to its client id, not even its own
    /// prompts' events. Only that one socket: a later reconnect is heard again.
    pub fn deafen_next_reconnect(&self) {
        self.shared.deafen_next.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The ComfyUI version played.
    pub fn comfyui_version(&self) -> ComfyVersion {
        self.shared.version
    }

    /// From now on every HTTP request waits `delay` before it is handled (a slow or overloaded ComfyUI).
    pub fn set_http_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.http_delay_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Close every open WebSocket from the server side.
    pub fn disconnect_all(&self) {
        let clients = std::mem::take(&mut self.shared.lock().clients);
        for c in clients.values() {
            let _ = c.tx.send(Out::Close);
        }
    }

    /// Send a text frame verbatim to every socket.
    pub fn send_raw_text(&self, text: &str) {
        self.shared.send(&Target::All, &Payload::Text(text.to_string()));
    }

    /// Send a binary frame verbatim to every socket.
    pub fn send_raw_binary(&self, bytes: Vec<u8>) {
        self.shared.send(&Target::All, &Payload::Binary(bytes));
    }

    /// HTTP requests received so far: method, path (without `/api` prefix and query),
    /// JSON body or `Null`.
    pub fn requests(&self) -> Vec<(String, String, Value)> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.disconnect_all();
    }
}

/// Spawn a task that ends when the simulator shuts down.
pub(crate) fn spawn_guarded<F>(shared: &Arc<Shared>, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = shared.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = stop.cancelled() => {}
        }
    });
}

/// Run the simulator until `shutdown` resolves (for `comfy-bridge simulate`).
pub async fn run_cli(
    listen: SocketAddr,
    opts: SimOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let sim = Simulator::start(listen, opts).await?;
    tracing::info!(url = %sim.url(), scenarios = ?sim.scenarios(), "ComfyUI simulator listening");
    if sim.scenarios().is_empty() {
        tracing::warn!("no transcripts loaded");
    }
    shutdown.await;
    tracing::info!("ComfyUI simulator stopping");
    drop(sim);
    Ok(())
}
