//! The WebSocket connection to ComfyUI: connect, negotiate, read, ping, and reconnect forever.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest as _, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument as _};

use super::deaf::{self, DeafWatch};
use super::http::ComfyHttp;
use super::tap::{self, TapSender, TapWatch};
use super::Inbound;
use crate::backoff;
use crate::config::ComfySettings;
use crate::telemetry;

/// Sent as the first message so previews arrive as type 4, with their prompt and node (docs/PROTOCOL.md §2.3),
/// and so the tap extension, where installed, makes this socket a tap (extension/README.md).
const FEATURE_FLAGS: &str =
    r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"comfy_bridge_tap":true}}"#;
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of frames waiting in the channel to the router (which also bounds them by count): beyond it
/// the read waits, which is back-pressure like a full channel. One frame always fits, however large
/// (tungstenite caps a message at 64 MiB).
pub const INBOUND_MAX_BYTES: usize = 64 * 1024 * 1024;
/// How often a read held back by [`INBOUND_MAX_BYTES`] looks whether the router has taken frames.
const INBOUND_POLL: Duration = Duration::from_millis(5);

/// The sizes of the frames in the channel to the router, oldest first. The WebSocket task is the channel's
/// only sender, so the channel's length says how many of the frames sent are still in it.
#[derive(Debug, Default)]
struct InFlight {
    sizes: std::collections::VecDeque<usize>,
    bytes: usize,
}

impl InFlight {
    /// Whether a frame of `size` bytes may be sent now that `queued` messages are in the channel.
    fn admits(&mut self, size: usize, queued: usize, max_bytes: usize) -> bool {
        while self.sizes.len() > queued {
            self.bytes -= self.sizes.pop_front().unwrap_or(0);
        }
        self.sizes.is_empty() || self.bytes + size <= max_bytes
    }

    /// A message of `size` bytes was sent.
    fn sent(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.bytes += size;
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The URL or a header could not be used.
    #[error("invalid websocket request: {0}")]
    Request(String),
    /// Connecting failed.
    #[error("connect failed: {0}")]
    Connect(tungstenite::Error),
    /// Connecting took longer than the timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The socket failed while open.
    #[error("websocket error: {0}")]
    Socket(tungstenite::Error),
    /// No frame (pong or other) within two ping intervals of reading; time the router's channel was full
    /// does not count.
    #[error("no pong within {0:?}")]
    PongTimeout(Duration),
    /// The server closed the connection.
    #[error("closed by server")]
    RemoteClosed,
    /// The socket stayed open but was deaf: the bridge's running prompt sent nothing to it for this long while
    /// broadcasts kept coming (ComfyUI issue 16010).
    #[error("deaf socket: nothing addressed to the bridge for {0:?}")]
    Deaf(Duration),
}

/// The WebSocket actor: owns the socket; sends [`Inbound`] to the router.
pub struct WsClient {
    url: String,
    headers: Vec<(String, String)>,
    reconnect_max_ms: u64,
    ping_interval: Duration,
    /// To the router; closing it (dropping this actor) tells the router the source is gone.
    inbound_tx: mpsc::Sender<Inbound>,
    /// For `wss://`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// What is in `inbound_tx`'s channel, in bytes.
    in_flight: std::sync::Mutex<InFlight>,
    /// What the tap extension said on the current connection.
    tap: TapSender,
    /// The tap version last logged (`Some(None)`: logged as absent), so each change is logged once.
    tap_logged: std::sync::Mutex<Option<Option<String>>>,
    /// Where the extension's messages other than its hello go (`Bus Publish`, `Bus Ask`).
    extension_tx: Option<mpsc::Sender<tap::Message>>,
    /// This socket's client id, to tell the bridge's prompts in `GET /queue`.
    client_id: String,
    /// `comfyui.deaf_after_ms`.
    deaf_after: Duration,
    /// For the deaf check's `GET /queue` (the app's own client, [`WsClient::with_http`]); without one the
    /// check is off.
    http: Option<ComfyHttp>,
}

/// `http(s)://host/base[?query]` → `ws(s)://host/base/ws?[query&]clientId=<id>` (a proxy's `?token=…` stays).
pub fn ws_url(http_base: &str, client_id: &str) -> String {
    let (base, query) = match http_base.split_once('?') {
        Some((base, query)) => (base, format!("{query}&")),
        None => (http_base, String::new()),
    };
    let base = base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", base.trim_start_matches("http://"))
    };
    let id = super::percent_encode(client_id);
    format!("{ws}/ws?{query}clientId={id}")
}

impl WsClient {
    /// A client for ComfyUI at `comfyui.url` with the given client id; fails only on unusable TLS files.
    pub fn new(
        comfyui: &ComfySettings,
        client_id: &str,
        inbound_tx: mpsc::Sender<Inbound>,
    ) -> Result<Self, crate::tls::TlsError> {
        let url = ws_url(comfyui.base(), client_id);
        // Loading the root certificates costs about a megabyte: only for `wss://`.
        let tls = match url.starts_with("wss://") {
            true => Some(crate::tls::client_config(comfyui.ca_file.as_deref(), None, None)?),
            false => None,
        };
        Ok(Self {
            tls,
            url,
            headers: comfyui.headers.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
            reconnect_max_ms: comfyui.reconnect_max_ms,
            ping_interval: Duration::from_millis(comfyui.ping_interval_ms.max(100)),
            inbound_tx,
            in_flight: std::sync::Mutex::default(),
            tap: tap::channel().0,
            tap_logged: std::sync::Mutex::default(),
            extension_tx: None,
            client_id: client_id.to_string(),
            deaf_after: Duration::from_millis(comfyui.deaf_after_ms),
            http: None,
        })
    }

    /// What the tap extension says on each connection (its version, and the secret of its answer route).
    pub fn tap(&self) -> TapWatch {
        self.tap.subscribe()
    }

    /// Checks for a deaf socket with `http` (`GET /queue`: is the running prompt the bridge's?).
    pub fn with_http(mut self, http: ComfyHttp) -> Self {
        self.http = Some(http);
        self
    }

    /// Hands the extension's messages (`comfy_bridge.publish`, `.ask`, `.ask_done`) to `tx`; without it they
    /// are dropped. Never sent to the router: they are not ComfyUI events.
    pub fn with_extension(mut self, tx: mpsc::Sender<tap::Message>) -> Self {
        self.extension_tx = Some(tx);
        self
    }

    /// Sends to the router, first waiting while the frames in its channel hold [`INBOUND_MAX_BYTES`].
    async fn send(&self, inbound: Inbound) {
        let size = match &inbound {
            Inbound::Text(text, _) => text.len(),
            Inbound::Binary(bytes, _) => bytes.len(),
            Inbound::Connected | Inbound::Disconnected => 0,
        };
        let tx = &self.inbound_tx;
        let in_flight = || self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut inbound = inbound;
        // Room in the channel and in the byte budget is the usual case: one lock, no future.
        {
            let mut guard = in_flight();
            if guard.admits(size, tx.max_capacity() - tx.capacity(), INBOUND_MAX_BYTES) {
                match tx.try_send(inbound) {
                    Ok(()) => return guard.sent(size),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(back)) => inbound = back,
                }
            }
        }
        while !in_flight().admits(size, tx.max_capacity() - tx.capacity(), INBOUND_MAX_BYTES) && !tx.is_closed() {
            tokio::time::sleep(INBOUND_POLL).await;
        }
        // Awaiting here is the back-pressure that keeps frame order; the router never blocks for long.
        if tx.send(inbound).await.is_ok() {
            in_flight().sent(size);
        }
    }

    /// Connects and reconnects until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("comfy_ws", url = %self.url.split('?').next().unwrap_or_default());
        async move {
            let mut attempt = 0u32;
            loop {
                let outcome = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    outcome = self.connect_and_read(&shutdown) => outcome,
                };
                match outcome {
                    Ok(true) => attempt = 0,
                    Ok(false) => {}
                    Err(e) => telemetry::reconnecting("comfyui", attempt, &e),
                }
                if shutdown.is_cancelled() {
                    break;
                }
                let delay = backoff::delay(attempt, self.reconnect_max_ms);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            info!("comfyui websocket stopped");
        }
        .instrument(span)
        .await
    }

    /// One connection: `Ok(true)` if it was up and later ended cleanly by shutdown or close.
    async fn connect_and_read(&self, shutdown: &CancellationToken) -> Result<bool, WsError> {
        let mut request = self.url.as_str().into_client_request().map_err(|e| WsError::Request(e.to_string()))?;
        for (name, value) in &self.headers {
            let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| WsError::Request(e.to_string()))?;
            let value = value.parse().map_err(|_| WsError::Request(format!("header {name}")))?;
            request.headers_mut().insert(name, value);
        }
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let connect = tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector);
        let (mut socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| WsError::ConnectTimeout)?
            .map_err(WsError::Connect)?;
        socket.send(Message::text(FEATURE_FLAGS)).await.map_err(WsError::Socket)?;
        self.tap.connected();
        info!("connected to comfyui");
        self.send(Inbound::Connected).await;
        let result = self.read_loop(&mut socket, shutdown).await;
        // The secret belongs to this connection: a restarted ComfyUI has a new one.
        self.tap.disconnected();
        self.send(Inbound::Disconnected).await;
        // Close (or at least drop) this socket before a new one registers the same client id: a half-open old
        // socket would later unregister the new one (docs/PROTOCOL.md §2.1).
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
        drop(socket);
        result.map(|()| true)
    }

    async fn read_loop<S>(&self, socket: &mut S, shutdown: &CancellationToken) -> Result<(), WsError>
    where
        S: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
            + futures_util::Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = tokio::time::Instant::now();
        let mut watch = DeafWatch::new(self.deaf_after, std::time::Instant::now());
        // A quarter of the window, so a deaf socket is found within 1.25 windows; never when the check is off.
        let mut deaf_tick = tokio::time::interval((self.deaf_after / 4).max(Duration::from_millis(50)));
        deaf_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deaf_check = !self.deaf_after.is_zero() && self.http.is_some();
        // One waiter for the whole connection, not one per frame.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                _ = ping.tick() => {
                    if last_seen.elapsed() > self.ping_interval * 2 {
                        return Err(WsError::PongTimeout(self.ping_interval * 2));
                    }
                    socket.send(Message::Ping(Default::default())).await.map_err(WsError::Socket)?;
                }
                _ = deaf_tick.tick(), if deaf_check => {
                    if watch.suspect(std::time::Instant::now()) {
                        self.check_deaf(&mut watch).await?;
                        // Time spent asking ComfyUI, like a full router channel, does not count towards the pong.
                        last_seen = tokio::time::Instant::now();
                    }
                }
                frame = socket.next() => {
                    match frame {
                        None => return Err(WsError::RemoteClosed),
                        Some(Err(e)) => return Err(WsError::Socket(e)),
                        Some(Ok(msg)) => {
                            if let Some(heard) = deaf::heard(&msg) {
                                watch.heard(heard, std::time::Instant::now());
                            }
                            if !self.forward(msg).await { return Err(WsError::RemoteClosed) }
                        }
                    }
                    // Only time spent reading counts towards the pong deadline: while the router's channel
                    // is full (a bus stall) this loop reads nothing, so no pong could have been seen.
                    last_seen = tokio::time::Instant::now();
                }
            }
        }
    }

    /// The socket may be deaf: it is when `GET /queue` says the running prompt is the bridge's (queued with its
    /// client id). Then the error ends the connection and a fresh socket replaces it; otherwise (or when
    /// ComfyUI does not answer within a ping interval) the watch starts a new window.
    async fn check_deaf(&self, watch: &mut DeafWatch) -> Result<(), WsError> {
        let Some(http) = &self.http else { return Ok(()) };
        let queue = tokio::time::timeout(self.ping_interval, http.queue()).await;
        let ours = match &queue {
            Ok(Ok(queue)) => queue.running.iter().find(|i| i.client_id() == Some(self.client_id.as_str())),
            _ => None,
        };
        let silent = watch.silent(std::time::Instant::now());
        if let Some(item) = ours {
            telemetry::deaf_socket(silent, &item.prompt_id);
            return Err(WsError::Deaf(silent));
        }
        debug!(silent_ms = silent.as_millis() as u64, "quiet socket, but no prompt of the bridge runs");
        watch.cleared(std::time::Instant::now());
        Ok(())
    }

    /// Hands a frame to the router; `false` when the socket was closed by the server.
    async fn forward(&self, msg: Message) -> bool {
        let now = now_ms();
        let inbound = match msg {
            Message::Text(text) => match tap::classify(text.as_str()) {
                tap::Frame::Other => Inbound::Text(text, now),
                tap::Frame::FeatureFlags => {
                    self.tap_flags(text.as_str());
                    Inbound::Text(text, now)
                }
                tap::Frame::Extension => {
                    telemetry::frame_received();
                    self.extension(text.as_str()).await;
                    return true;
                }
            },
            Message::Binary(bytes) => Inbound::Binary(bytes, now),
            Message::Close(frame) => {
                debug!(?frame, "server closed the websocket");
                return false;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return true,
        };
        telemetry::frame_received();
        self.send(inbound).await;
        true
    }
}

impl WsClient {
    /// The server's `feature_flags` reply: the tap is active when it carries the tap's version.
    fn tap_flags(&self, frame: &str) {
        let version = tap::version_in_flags(frame);
        self.tap.feature_flags(version.clone());
        let mut logged = self.tap_logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.as_ref() != Some(&version) {
            match &version {
                Some(v) => info!(version = %v, "comfyui tap active: every prompt's events reach the bridge"),
                None => info!("comfyui tap absent: prompts queued by others show only as state and result"),
            }
            *logged = Some(version);
        }
    }

    /// A `comfy_bridge.*` message: the hello is kept here (its secret never leaves this task but through the
    /// watch), the rest goes to the extension's handler.
    async fn extension(&self, frame: &str) {
        let Some(msg) = tap::parse(frame) else {
            return telemetry::frame_skipped("bad_extension_message", &"not a comfy_bridge message with data");
        };
        if msg.kind == "hello" {
            match tap::hello(&msg.data) {
                Some((secret, version)) => {
                    self.tap.hello(version, secret);
                    debug!("tap hello received");
                }
                None => telemetry::frame_skipped("bad_extension_message", &"comfy_bridge.hello without a secret"),
            }
            return;
        }
        match &self.extension_tx {
            Some(tx) => {
                let _ = tx.send(msg).await;
            }
            None => debug!(kind = %msg.kind, "extension message ignored"),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The persisted client id under `state_dir`, created on first use. A configured id wins.
pub fn client_id(configured: Option<&str>, state_dir: &std::path::Path) -> std::io::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = state_dir.join("client_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id: String = (0..32).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
    let id = format!("comfy-bridge-{id}");
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join("client_id.tmp");
    std::fs::write(&tmp, &id)?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn websocket_url_is_derived_from_the_http_url() {
        assert_eq!(ws_url("http://127.0.0.1:8188/", "abc"), "ws://127.0.0.1:8188/ws?clientId=abc");
        assert_eq!(ws_url("https://gpu.example/comfy", "a b"), "wss://gpu.example/comfy/ws?clientId=a%20b");
        assert_eq!(
            ws_url("https://proxy.example/comfy/?token=s3cret", "id"),
            "wss://proxy.example/comfy/ws?token=s3cret&clientId=id",
            "a proxy's token stays"
        );
    }

    #[test]
    fn frames_waiting_for_the_router_are_bounded_in_bytes() {
        let mut in_flight = InFlight::default();
        assert!(in_flight.admits(100, 0, 64), "one frame always fits, however large");
        in_flight.sent(100);
        assert!(!in_flight.admits(1, 1, 64), "still in the channel");
        assert!(in_flight.admits(40, 0, 64), "the router took it");
        in_flight.sent(40);
        in_flight.sent(0);
        assert!(in_flight.admits(24, 2, 64));
        assert!(!in_flight.admits(25, 2, 64));
        assert!(in_flight.admits(64, 1, 64), "the 40-byte frame was taken: only the empty message is left");
    }

    #[test]
    fn client_id_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = client_id(None, dir.path()).expect("id");
        assert_eq!(client_id(None, dir.path()).expect("id"), first);
        assert_ne!(client_id(None, tempfile::tempdir().expect("dir").path()).expect("id"), first);
        assert_eq!(client_id(Some("fixed"), dir.path()).expect("id"), "fixed");
    }

    /// A server that records the first message of each connection, sends one frame, then closes.
    async fn flaky_server() -> (std::net::SocketAddr, mpsc::Receiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (first_tx, first_rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { continue };
                if let Some(Ok(Message::Text(first))) = ws.next().await {
                    let _ = first_tx.send(first.as_str().to_owned()).await;
                }
                let _ = ws.send(Message::text(r#"{"type":"status","data":{}}"#)).await;
                let _ = ws.close(None).await;
            }
        });
        (addr, first_rx)
    }

    /// A server that sends `frames` numbered frames on each connection, then stays open answering pings.
    async fn steady_server(frames: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
                    let (mut tx, mut rx) = ws.split();
                    tokio::spawn(async move {
                        for i in 0..frames {
                            if tx.send(Message::text(format!("{{\"n\":{i}}}"))).await.is_err() {
                                return;
                            }
                        }
                        // Keep the write half (and so the connection) open.
                        std::future::pending::<()>().await;
                    });
                    // Reading answers the client's pings.
                    while let Some(Ok(_)) = rx.next().await {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stalled_router_does_not_cost_the_connection() {
        let addr = steady_server(200).await;
        let mut settings = Settings::default();
        settings.comfyui.url = format!("http://{addr}");
        settings.comfyui.ping_interval_ms = 100;
        let (tx, mut rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(WsClient::new(&settings.comfyui, "stall", tx).expect("client").run(shutdown.clone()));
        let wait = Duration::from_secs(5);
        assert!(matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(Inbound::Connected))));
        // The buses stall: nothing is taken from the channel for ten ping intervals.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        for i in 0..200 {
            let next = tokio::time::timeout(wait, rx.recv()).await.expect("a frame in time");
            assert!(matches!(&next, Some(Inbound::Text(t, _)) if *t == format!("{{\"n\":{i}}}")), "{i}: {next:?}");
        }
        shutdown.cancel();
        tokio::time::timeout(wait, task).await.expect("stops").expect("no panic");
    }

    #[tokio::test]
    async fn sends_feature_flags_first_forwards_frames_and_reconnects() {
        let (addr, mut first_rx) = flaky_server().await;
        let mut settings = Settings::default();
        settings.comfyui.url = format!("http://{addr}");
        settings.comfyui.reconnect_max_ms = 50;
        let (tx, mut rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let client = WsClient::new(&settings.comfyui, "test-id", tx).expect("client");
        let task = tokio::spawn(client.run(shutdown.clone()));
        let wait = Duration::from_secs(5);
        for _ in 0..2 {
            let first = tokio::time::timeout(wait, first_rx.recv()).await.expect("connected").expect("first");
            assert_eq!(first, FEATURE_FLAGS);
            assert!(matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(Inbound::Connected))));
            let frame = tokio::time::timeout(wait, rx.recv()).await.expect("frame");
            assert!(matches!(frame, Some(Inbound::Text(ref t, _)) if t.contains("status")), "{frame:?}");
            assert!(matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(Inbound::Disconnected))));
        }
        shutdown.cancel();
        tokio::time::timeout(wait, task).await.expect("stops").expect("no panic");
    }

    /// A server with the tap extension: answers the feature flags with its version, says hello, sends one
    /// extension message and one event, then closes once `close` fires.
    async fn tap_server(close: tokio::sync::oneshot::Receiver<()>) -> (std::net::SocketAddr, mpsc::Receiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (first_tx, first_rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else { return };
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
            if let Some(Ok(Message::Text(first))) = ws.next().await {
                let _ = first_tx.send(first.as_str().to_owned()).await;
            }
            for frame in [
                r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true, "comfy_bridge_tap": "0.1.0"}}"#,
                r#"{"type": "comfy_bridge.hello", "data": {"version": "0.1.0", "secret": "per-start-secret"}}"#,
                r#"{"type": "comfy_bridge.ask", "data": {"ask_id": "a1", "subject": "prompt"}}"#,
                r#"{"type": "status", "data": {}}"#,
            ] {
                let _ = ws.send(Message::text(frame)).await;
            }
            let _ = close.await;
            let _ = ws.close(None).await;
        });
        (addr, first_rx)
    }

    #[tokio::test]
    async fn the_tap_is_detected_its_messages_are_no_events_and_its_secret_ends_with_the_connection() {
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let (addr, mut first_rx) = tap_server(close_rx).await;
        let mut settings = Settings::default();
        settings.comfyui.url = format!("http://{addr}");
        settings.comfyui.reconnect_max_ms = 60_000;
        let (tx, mut rx) = mpsc::channel(64);
        let (ext_tx, mut ext_rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let client = WsClient::new(&settings.comfyui, "tap-id", tx).expect("client").with_extension(ext_tx);
        let tap = client.tap();
        let task = tokio::spawn(client.run(shutdown.clone()));
        let wait = Duration::from_secs(5);
        let first = tokio::time::timeout(wait, first_rx.recv()).await.expect("connected").expect("first");
        let first: serde_json::Value = serde_json::from_str(&first).expect("json");
        assert_eq!(first["data"]["comfy_bridge_tap"], true, "the bridge asks to be a tap");
        assert!(matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(Inbound::Connected))));
        let flags = tokio::time::timeout(wait, rx.recv()).await.expect("frame");
        assert!(matches!(&flags, Some(Inbound::Text(t, _)) if t.contains("feature_flags")), "{flags:?}");
        let next = tokio::time::timeout(wait, rx.recv()).await.expect("frame");
        assert!(
            matches!(&next, Some(Inbound::Text(t, _)) if t.contains("\"status\"")),
            "hello and ask are no events: {next:?}"
        );
        let ask = tokio::time::timeout(wait, ext_rx.recv()).await.expect("ask").expect("ask");
        assert_eq!((ask.kind.as_str(), &ask.data["ask_id"]), ("ask", &serde_json::json!("a1")));
        assert_eq!(tap.version().as_deref(), Some("0.1.0"));
        assert_eq!(tap.secret().map(|s| s.expose().to_string()).as_deref(), Some("per-start-secret"));
        let _ = close_tx.send(());
        assert!(matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(Inbound::Disconnected))));
        assert_eq!((tap.version(), tap.secret()), (None, None), "forgotten with the connection");
        shutdown.cancel();
        tokio::time::timeout(wait, task).await.expect("stops").expect("no panic");
    }
}
