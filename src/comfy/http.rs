//! ComfyUI's HTTP API (docs/PROTOCOL.md §8): queue prompts, read the queue and history, interrupt, upload; and
//! on newer servers the jobs API (§11), whose presence is probed once per WebSocket connection.
//!
//! [`ComfyHttp`] is a cheap handle on one `reqwest::Client` (a connection pool), so every task that talks to
//! ComfyUI clones it. Every call names its endpoint in its [`HttpError`]: `Unavailable` when ComfyUI cannot be
//! reached in time, `Status` when it answers with an error status (the 400 of `POST /prompt` keeps its JSON),
//! `BadResponse` when a 2xx answer is not what the endpoint promises. Endpoints that answer an empty 200
//! (docs/PROTOCOL.md §1) are never parsed. No `Origin` header is ever sent: ComfyUI answers 403 to one that does
//! not match the host (§1).

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, ORIGIN};
use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, Url};
use serde_json::{json, Value};
use tracing::debug;

use super::jobs::Job;
use super::queue::QueueSnapshot;
use crate::config::ComfySettings;

/// Sent as `User-Agent` with every request.
const USER_AGENT: &str = concat!("comfy-bridge/", env!("CARGO_PKG_VERSION"));
/// Longest a TCP (and TLS) connect may take, unless the request timeout is shorter.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Uploads may take this many request timeouts.
const UPLOAD_TIMEOUT_FACTOR: u32 = 4;
/// Longest body excerpt kept in [`HttpError::Status`], in characters.
const MAX_EXCERPT_CHARS: usize = 512;
/// [`ComfyHttp::jobs_api`]'s answer, in the low bits of its cache (the connection it holds for is above them).
const JOBS_PRESENT: u64 = 1;
const JOBS_ABSENT: u64 = 2;

/// Why a call to ComfyUI's HTTP API failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The settings cannot make a client (base URL, a header, the timeout); only [`ComfyHttp::new`] returns it.
    #[error("cannot build the comfyui http client: {reason}")]
    InvalidSettings {
        /// What is wrong, naming the configuration key.
        reason: String,
    },
    /// Could not reach ComfyUI or it did not answer in time (connect refused, DNS, timeout, connection reset).
    #[error("{endpoint}: comfyui unavailable: {reason}")]
    Unavailable {
        /// Method and path, e.g. `POST /prompt`.
        endpoint: &'static str,
        /// The transport error and its causes.
        reason: String,
    },
    /// ComfyUI answered with a non-2xx status.
    #[error("{endpoint}: comfyui answered {status}: {body}")]
    Status {
        /// Method and path, e.g. `POST /prompt`.
        endpoint: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the body (at most 512 characters).
        body: String,
        /// The body when it parses as JSON (`POST /prompt`'s 400 carries `{"error", "node_errors"}`).
        json: Option<Value>,
    },
    /// A 2xx answer that is not what the endpoint promises (e.g. not JSON where JSON is due).
    #[error("{endpoint}: unexpected answer from comfyui: {reason}")]
    BadResponse {
        /// Method and path, e.g. `POST /prompt`.
        endpoint: &'static str,
        /// What is wrong with the answer.
        reason: String,
    },
    /// The answer's body is longer than `comfyui.max_body_bytes`; the read stopped there.
    #[error("{endpoint}: comfyui's answer exceeds comfyui.max_body_bytes ({limit} bytes)")]
    TooLarge {
        /// Method and path, e.g. `GET /queue`.
        endpoint: &'static str,
        /// The limit that was hit.
        limit: usize,
    },
}

/// A client for one ComfyUI server; cheap to clone.
#[derive(Debug, Clone)]
pub struct ComfyHttp {
    client: reqwest::Client,
    /// `comfyui.url`, which may carry a path prefix (a reverse proxy); never cannot-be-a-base.
    base: Url,
    upload_timeout: Duration,
    /// Longest body read from any answer (`comfyui.max_body_bytes`).
    max_body: usize,
    /// What the tap extension said on the WebSocket (its version, the secret of its answer route), and which
    /// connection is the current one.
    tap: super::tap::TapWatch,
    /// Whether the jobs API exists, and for which connection: `connection << 2 | JOBS_*` (0: not probed).
    /// Shared by every clone, so one probe serves them all.
    jobs: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ComfyHttp {
    /// A client for ComfyUI at `comfyui.url`, with its extra headers, request timeout, CA and body cap.
    pub fn new(comfyui: &ComfySettings) -> Result<Self, HttpError> {
        let invalid = |reason: String| HttpError::InvalidSettings { reason };
        let mut base = Url::parse(comfyui.base()).map_err(|e| invalid(format!("comfyui.url: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("comfyui.url: must be an http:// or https:// URL".into()));
        }
        // A query (a proxy's `?token=…`) stays on every request.
        base.set_fragment(None);
        let mut headers = HeaderMap::new();
        for (name, value) in &comfyui.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("comfyui.headers: {name:?} is not a header name")))?;
            if header == ORIGIN {
                return Err(invalid(
                    "comfyui.headers: Origin is never sent (ComfyUI answers 403 to a foreign one)".into(),
                ));
            }
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| invalid(format!("comfyui.headers.{name}: not a valid header value")))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        if comfyui.max_body_bytes == 0 {
            return Err(invalid("comfyui.max_body_bytes: must be at least 1".into()));
        }
        if comfyui.request_timeout_ms == 0 {
            return Err(invalid("comfyui.request_timeout_ms: must be at least 1".into()));
        }
        let timeout = Duration::from_millis(comfyui.request_timeout_ms);
        let mut builder = reqwest::Client::builder();
        if base.scheme() == "http" {
            // Plain HTTP needs no root certificates (loading them costs about a megabyte).
            builder = builder.tls_built_in_root_certs(false);
        } else if let Some(ca_file) = comfyui.ca_file.as_deref() {
            let config = crate::tls::client_config(Some(ca_file), None, None)
                .map_err(|e| invalid(format!("comfyui.ca_file: {e}")))?;
            builder = builder.use_preconfigured_tls((*config).clone());
        }
        let client = builder
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .build()
            .map_err(|e| invalid(format!("http client: {}", error_chain(&e))))?;
        Ok(Self {
            client,
            base,
            upload_timeout: timeout.saturating_mul(UPLOAD_TIMEOUT_FACTOR),
            max_body: usize::try_from(comfyui.max_body_bytes).unwrap_or(usize::MAX),
            tap: super::tap::TapWatch::absent(),
            jobs: std::sync::Arc::default(),
        })
    }

    /// This client with what the WebSocket task learns of the tap extension.
    pub fn with_tap(mut self, tap: super::tap::TapWatch) -> Self {
        self.tap = tap;
        self
    }

    /// What the tap extension said on the current WebSocket connection.
    pub fn tap(&self) -> &super::tap::TapWatch {
        &self.tap
    }

    /// `POST /prompt`: queues `body` (`{"prompt", "client_id", "prompt_id", ...}`); returns the 200 JSON
    /// `{"prompt_id", "number", "node_errors"}`. A rejected workflow is [`HttpError::Status`] 400 with JSON.
    pub async fn post_prompt(&self, body: &Value) -> Result<Value, HttpError> {
        const ENDPOINT: &str = "POST /prompt";
        let answer = self.send_json(ENDPOINT, self.client.post(self.url(&["prompt"])), body).await?;
        let answer = parse_json(ENDPOINT, &answer)?;
        if answer.get("prompt_id").is_none() {
            return Err(bad_response(ENDPOINT, "no prompt_id in the answer"));
        }
        Ok(answer)
    }

    /// `GET /queue`: the running and pending prompts, pending in run order.
    pub async fn queue(&self) -> Result<QueueSnapshot, HttpError> {
        const ENDPOINT: &str = "GET /queue";
        let body = self.send(ENDPOINT, self.client.get(self.url(&["queue"]))).await?;
        QueueSnapshot::parse(&parse_json(ENDPOINT, &body)?).ok_or_else(|| bad_response(ENDPOINT, "not a queue"))
    }

    /// `GET /history/{prompt_id}`: the history entry, or `None` when ComfyUI has none (`{}`).
    ///
    /// The ids `.` and `..` cannot be put in a URL path, so they are never found.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<Value>, HttpError> {
        const ENDPOINT: &str = "GET /history/{id}";
        if matches!(prompt_id, "." | "..") {
            return Ok(None);
        }
        let body = self.send(ENDPOINT, self.client.get(self.url(&["history", prompt_id]))).await?;
        let Value::Object(mut entries) = parse_json(ENDPOINT, &body)? else {
            return Err(bad_response(ENDPOINT, "not a JSON object"));
        };
        match entries.remove(prompt_id) {
            Some(entry) => Ok(Some(entry)),
            None if entries.is_empty() => Ok(None),
            None => Err(bad_response(ENDPOINT, "entries for other prompts only")),
        }
    }

    /// `GET /history?max_items=n`: the `n` most recently finished prompts, oldest first.
    pub async fn history_recent(&self, max_items: usize) -> Result<Vec<(String, Value)>, HttpError> {
        const ENDPOINT: &str = "GET /history";
        let mut url = self.url(&["history"]);
        url.query_pairs_mut().append_pair("max_items", &max_items.to_string());
        let body = self.send(ENDPOINT, self.client.get(url)).await?;
        match parse_json(ENDPOINT, &body)? {
            // Never more than asked for, whatever the server sends.
            Value::Object(entries) => Ok(entries.into_iter().take(max_items).collect()),
            _ => Err(bad_response(ENDPOINT, "not a JSON object")),
        }
    }

    /// `POST /interrupt`: stops `prompt_id` if it is the running prompt, or whatever runs when `None`.
    /// ComfyUI's answer does not say whether anything was interrupted.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), HttpError> {
        let body = match prompt_id {
            Some(id) => json!({"prompt_id": id}),
            None => json!({}),
        };
        self.send_json("POST /interrupt", self.client.post(self.url(&["interrupt"])), &body).await.map(drop)
    }

    /// `POST /queue {"delete": ids}`: removes these prompts if they are pending (running ones stay).
    pub async fn delete_pending(&self, ids: &[String]) -> Result<(), HttpError> {
        let body = json!({"delete": ids});
        self.send_json("POST /queue", self.client.post(self.url(&["queue"])), &body).await.map(drop)
    }

    /// `POST /queue {"clear": true}`: removes every pending prompt (the running one stays).
    pub async fn clear_pending(&self) -> Result<(), HttpError> {
        let body = json!({"clear": true});
        self.send_json("POST /queue", self.client.post(self.url(&["queue"])), &body).await.map(drop)
    }

    /// Whether ComfyUI has the jobs API (`GET /api/jobs` answers with a page of jobs; 404 means it does not):
    /// asked once per WebSocket connection, since the server may be replaced by another version behind it.
    pub async fn jobs_api(&self) -> Result<bool, HttpError> {
        use std::sync::atomic::Ordering::Relaxed;
        const ENDPOINT: &str = "GET /api/jobs";
        let connection = self.tap.connection();
        let known = self.jobs.load(Relaxed);
        if known >> 2 == connection && known & 3 != 0 {
            return Ok(known & 3 == JOBS_PRESENT);
        }
        let mut url = self.url(&["api", "jobs"]);
        url.query_pairs_mut().append_pair("limit", "1");
        let present = match self.send(ENDPOINT, self.client.get(url)).await {
            Ok(body) => serde_json::from_slice(&body).is_ok_and(|page| super::jobs::is_jobs_page(&page)),
            Err(HttpError::Status { status: 404 | 405, .. }) => false,
            Err(e) => return Err(e),
        };
        self.jobs.store(connection << 2 | if present { JOBS_PRESENT } else { JOBS_ABSENT }, Relaxed);
        debug!(present, "comfyui jobs api probed");
        Ok(present)
    }

    /// `GET /api/jobs/{id}`: the prompt as the jobs API sees it, `None` when the server does not know it (404).
    pub async fn job(&self, prompt_id: &str) -> Result<Option<Job>, HttpError> {
        const ENDPOINT: &str = "GET /api/jobs/{id}";
        if matches!(prompt_id, "." | "..") {
            return Ok(None);
        }
        match self.send(ENDPOINT, self.client.get(self.url(&["api", "jobs", prompt_id]))).await {
            Ok(body) => {
                Job::parse(&parse_json(ENDPOINT, &body)?).map(Some).ok_or_else(|| bad_response(ENDPOINT, "not a job"))
            }
            Err(HttpError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /api/jobs/{id}/cancel`: interrupts the prompt if it is still the one running, else removes it if it
    /// is pending, both under ComfyUI's queue lock (never another prompt); `false` when it had ended or was
    /// never there.
    pub async fn cancel_job(&self, prompt_id: &str) -> Result<bool, HttpError> {
        const ENDPOINT: &str = "POST /api/jobs/{id}/cancel";
        if matches!(prompt_id, "." | "..") {
            return Ok(false);
        }
        let url = self.url(&["api", "jobs", prompt_id, "cancel"]);
        let answer = parse_json(ENDPOINT, &self.send(ENDPOINT, self.client.post(url)).await?)?;
        answer.get("cancelled").and_then(Value::as_bool).ok_or_else(|| bad_response(ENDPOINT, "no cancelled flag"))
    }

    /// `POST /free`: unload models and/or free memory once ComfyUI is between prompts.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), HttpError> {
        let body = json!({"unload_models": unload_models, "free_memory": free_memory});
        self.send_json("POST /free", self.client.post(self.url(&["free"])), &body).await.map(drop)
    }

    /// `POST /upload/image` into the `input` folder; returns `{"name", "subfolder", "type"}`. Without
    /// `overwrite`, ComfyUI renames on a clash with different bytes, so use the returned `name`.
    pub async fn upload_image(
        &self,
        filename: &str,
        data: Bytes,
        subfolder: &str,
        overwrite: bool,
    ) -> Result<Value, HttpError> {
        const ENDPOINT: &str = "POST /upload/image";
        let form = Form::new()
            .part("image", Part::stream(data).file_name(filename.to_string()))
            .text("type", "input")
            .text("subfolder", subfolder.to_string())
            .text("overwrite", if overwrite { "true" } else { "false" });
        let request = self.client.post(self.url(&["upload", "image"])).multipart(form).timeout(self.upload_timeout);
        let answer = parse_json(ENDPOINT, &self.send(ENDPOINT, request).await?)?;
        if !answer.get("name").is_some_and(Value::is_string) {
            return Err(bad_response(ENDPOINT, "no name in the answer"));
        }
        Ok(answer)
    }

    /// `GET /system_stats`: versions, RAM and devices; a good health probe.
    pub async fn system_stats(&self) -> Result<Value, HttpError> {
        const ENDPOINT: &str = "GET /system_stats";
        let stats = parse_json(ENDPOINT, &self.send(ENDPOINT, self.client.get(self.url(&["system_stats"]))).await?)?;
        if !stats.is_object() {
            return Err(bad_response(ENDPOINT, "not a JSON object"));
        }
        Ok(stats)
    }

    /// `POST /comfy_bridge/answer` (the tap extension's route) with its per-start `secret`: hands `answer` to
    /// the `Bus Ask` waiting as `ask_id`. `Ok` is the 200 (`accepted`); a 409 (`late`, `unknown`), 403, 400 or
    /// 413 is [`HttpError::Status`] with the extension's JSON (extension/README.md).
    pub async fn answer(&self, secret: &str, ask_id: &str, answer: &str) -> Result<(), HttpError> {
        const ENDPOINT: &str = "POST /comfy_bridge/answer";
        let request = self.client.post(self.url(&["comfy_bridge", "answer"])).header("X-Comfy-Bridge-Secret", secret);
        self.send_json(ENDPOINT, request, &json!({"ask_id": ask_id, "answer": answer})).await.map(drop)
    }

    /// `GET /view`: the bytes of an image ComfyUI saved (`{filename, subfolder, type}` as its outputs name
    /// them), at most `comfyui.max_body_bytes`.
    pub async fn view(&self, filename: &str, subfolder: &str, kind: &str) -> Result<Bytes, HttpError> {
        const ENDPOINT: &str = "GET /view";
        let mut url = self.url(&["view"]);
        url.query_pairs_mut()
            .append_pair("filename", filename)
            .append_pair("subfolder", subfolder)
            .append_pair("type", kind);
        self.send(ENDPOINT, self.client.get(url)).await
    }

    /// The base URL with these path segments appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` refuses cannot-be-a-base URLs, the only ones without path segments.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends `body` as JSON; returns the answer's body.
    async fn send_json(
        &self,
        endpoint: &'static str,
        request: RequestBuilder,
        body: &Value,
    ) -> Result<Bytes, HttpError> {
        self.send(endpoint, request.header(CONTENT_TYPE, "application/json").body(body.to_string())).await
    }

    /// Sends the request and reads the whole answer, at most `max_body` bytes of it; a non-2xx status is
    /// [`HttpError::Status`], a longer body [`HttpError::TooLarge`] (the connection is dropped, not drained).
    async fn send(&self, endpoint: &'static str, request: RequestBuilder) -> Result<Bytes, HttpError> {
        let unavailable = |e: reqwest::Error| {
            let reason = error_chain(&e.without_url());
            debug!(endpoint, error = %reason, "comfyui unavailable");
            HttpError::Unavailable { endpoint, reason }
        };
        let too_large = || {
            debug!(endpoint, limit = self.max_body, "comfyui answer too large");
            HttpError::TooLarge { endpoint, limit: self.max_body }
        };
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status();
        let declared = response.content_length().and_then(|n| usize::try_from(n).ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if chunk.len() > self.max_body - body.len() {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let body = Bytes::from(body);
        debug!(endpoint, status = status.as_u16(), bytes = body.len(), "comfyui answered");
        if !status.is_success() {
            let json = serde_json::from_slice(&body).ok();
            return Err(HttpError::Status { endpoint, status: status.as_u16(), body: excerpt(&body), json });
        }
        Ok(body)
    }
}

fn parse_json(endpoint: &'static str, body: &[u8]) -> Result<Value, HttpError> {
    serde_json::from_slice(body).map_err(|e| bad_response(endpoint, &format!("not JSON ({e}): {}", excerpt(body))))
}

fn bad_response(endpoint: &'static str, reason: &str) -> HttpError {
    HttpError::BadResponse { endpoint, reason: reason.to_string() }
}

/// The start of a body as text, at most [`MAX_EXCERPT_CHARS`] characters.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(MAX_EXCERPT_CHARS).collect()
}

/// An error and its causes, `: `-separated (reqwest's own message alone says little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::path::PathBuf;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::comfy::jobs::{JobStatus, Outcome};
    use crate::config::{Secret, Settings};
    use comfy_sim::{SimOptions, Simulator};

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transcripts")
    }

    fn settings(url: &str, request_timeout_ms: u64) -> Settings {
        let mut settings = Settings::default();
        settings.comfyui.url = url.to_string();
        settings.comfyui.request_timeout_ms = request_timeout_ms;
        settings
    }

    /// A simulator and a client for it. At speed 1.0 a prompt runs for ~1.9 s unless interrupted.
    async fn sim(speed: f64) -> (Simulator, ComfyHttp) {
        let opts = SimOptions { transcripts: vec![fixtures()], speed, ..SimOptions::default() };
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("sim starts");
        let http = ComfyHttp::new(&settings(&sim.url(), 5_000).comfyui).expect("client");
        (sim, http)
    }

    /// A simulator playing `version` and a client for it that knows the WebSocket's connections.
    async fn sim_version(version: &str, speed: f64) -> (Simulator, ComfyHttp, super::super::tap::TapSender) {
        let comfyui_version = version.parse().expect("version");
        let opts = SimOptions { transcripts: vec![fixtures()], speed, comfyui_version, ..SimOptions::default() };
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("sim starts");
        let (connections, watch) = super::super::tap::channel();
        let http = ComfyHttp::new(&settings(&sim.url(), 5_000).comfyui).expect("client").with_tap(watch);
        (sim, http, connections)
    }

    /// Polls `check` every 10 ms until it yields a value; fails after 5 s.
    async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finished(http: &ComfyHttp, id: &str) -> Value {
        eventually("the history entry", || async { http.history(id).await.expect("history") }).await
    }

    async fn running(http: &ComfyHttp, id: &str) {
        let is_running = || async { (http.queue().await.expect("queue").position(id) == Some(0)).then_some(()) };
        eventually("the prompt to run", is_running).await;
    }

    fn prompt(id: &str) -> Value {
        let graph =
            json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "PreviewImage", "inputs": {}}});
        json!({"prompt": graph, "client_id": "bridge-test", "prompt_id": id})
    }

    fn pending_ids(queue: &QueueSnapshot) -> Vec<&str> {
        queue.pending.iter().map(|i| i.prompt_id.as_str()).collect()
    }

    /// Accepts one connection, answers `response` verbatim and returns the request head it read.
    async fn serve_once(response: String) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut chunk = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.expect("read");
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&chunk[..n]);
            }
            stream.write_all(response.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        (url, task)
    }

    fn answer(status: &str, content_type: &str, body: &str) -> String {
        let len = body.len();
        let head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n");
        format!("{head}Connection: close\r\n\r\n{body}")
    }

    #[tokio::test]
    async fn prompt_with_caller_ids_lands_in_history_under_an_encoded_path() {
        let (_sim, http) = sim(0.0).await;
        let id = "bridge 1/ü?&#";
        let answer = http.post_prompt(&prompt(id)).await.expect("queued");
        assert_eq!(answer["prompt_id"], id);
        assert!(answer["number"].is_number());
        assert_eq!(answer["node_errors"], json!({}));
        let entry = finished(&http, id).await;
        assert_eq!(entry["prompt"][1], id);
        assert_eq!(entry["prompt"][3]["client_id"], "bridge-test");
        assert_eq!(entry["status"]["status_str"], "success");
        assert_eq!(http.history("never-queued").await.expect("history"), None);
        assert_eq!(http.history("..").await.expect("history"), None);
    }

    #[tokio::test]
    async fn queue_order_front_number_delete_clear_and_targeted_interrupt() {
        let (sim, http) = sim(1.0).await;
        http.post_prompt(&prompt("p1")).await.expect("p1");
        running(&http, "p1").await;
        http.post_prompt(&prompt("p2")).await.expect("p2");
        http.post_prompt(&prompt("p3")).await.expect("p3");
        let mut front = prompt("p4");
        front["front"] = json!(true);
        assert!(http.post_prompt(&front).await.expect("p4")["number"].as_f64().is_some_and(|n| n < 0.0));
        let mut numbered = prompt("p5");
        numbered["number"] = json!(-1000);
        assert_eq!(http.post_prompt(&numbered).await.expect("p5")["number"].as_f64(), Some(-1000.0));

        let queue = http.queue().await.expect("queue");
        assert_eq!(queue.running[0].client_id(), Some("bridge-test"));
        assert_eq!(pending_ids(&queue), ["p5", "p4", "p2", "p3"]);
        http.delete_pending(&["p3".to_string(), "unknown".to_string()]).await.expect("delete");
        assert_eq!(pending_ids(&http.queue().await.expect("queue")), ["p5", "p4", "p2"]);

        // Aimed at a pending prompt: nothing happens to the running one.
        http.interrupt(Some("p2")).await.expect("interrupt p2");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let queue = http.queue().await.expect("queue");
        assert_eq!((queue.position("p1"), queue.position("p2")), (Some(0), Some(3)));

        http.clear_pending().await.expect("clear");
        http.interrupt(Some("p1")).await.expect("interrupt p1");
        assert_eq!(finished(&http, "p1").await["status"]["status_str"], "error");
        assert_eq!(http.queue().await.expect("queue"), QueueSnapshot::default());
        assert_eq!(http.history("p2").await.expect("history"), None);

        let bodies: Vec<Value> =
            sim.requests().into_iter().filter(|r| r.0 == "POST" && r.1 != "/prompt").map(|r| r.2).collect();
        let expected = [json!({"delete": ["p3", "unknown"]}), json!({"prompt_id": "p2"}), json!({"clear": true})];
        assert_eq!(&bodies[..3], &expected);
    }

    #[tokio::test]
    async fn the_jobs_api_is_probed_once_per_connection_and_cancels_by_id() {
        let (old, http, _) = sim_version("0.3.64", 0.0).await;
        assert!(!http.jobs_api().await.expect("probe"), "404 on 0.3.64");
        drop(old);

        let (sim, http, connections) = sim_version("0.4.0", 0.1).await;
        let probes = || sim.requests().iter().filter(|r| r.1 == "/jobs").count();
        assert!(http.jobs_api().await.expect("probe"));
        assert!(http.clone().jobs_api().await.expect("cached"));
        assert_eq!(probes(), 1, "one probe for the connection, shared by clones");
        connections.connected();
        assert!(http.jobs_api().await.expect("probe"));
        assert_eq!(probes(), 2, "probed again on a new connection");

        let id = |n: u8| format!("00000000-0000-4000-8000-0000000000{n:02x}");
        http.post_prompt(&prompt(&id(1))).await.expect("first");
        running(&http, &id(1)).await;
        http.post_prompt(&prompt(&id(2))).await.expect("second");
        assert_eq!(http.job(&id(2)).await.expect("job").map(|j| j.status), Some(JobStatus::Pending));
        assert_eq!(http.job(&id(9)).await.expect("job"), None, "404: unknown");
        assert!(http.cancel_job(&id(2)).await.expect("cancel pending"));
        assert_eq!(http.job(&id(2)).await.expect("job"), None, "gone without a trace");
        assert!(http.cancel_job(&id(1)).await.expect("cancel running"));
        let ended = eventually("the job to end", || async {
            http.job(&id(1)).await.expect("job").filter(|j| !j.status.is_queued())
        })
        .await;
        assert_eq!(ended.outcome, Some(Outcome::Interrupted));
        assert!(!http.cancel_job(&id(1)).await.expect("cancel again"), "already over");
        assert!(!sim.requests().iter().any(|r| r.1 == "/interrupt"), "never the global flag");
    }

    #[tokio::test]
    async fn global_interrupt_stops_whatever_runs() {
        let (sim, http) = sim(1.0).await;
        http.post_prompt(&prompt("g1")).await.expect("queued");
        running(&http, "g1").await;
        http.interrupt(None).await.expect("interrupt");
        let entry = finished(&http, "g1").await;
        let messages = entry["status"]["messages"].as_array().expect("messages");
        assert!(messages.iter().any(|m| m[0] == "execution_interrupted"), "{messages:?}");
        assert!(sim.requests().iter().any(|r| r.1 == "/interrupt" && r.2 == json!({})));
    }

    #[tokio::test]
    async fn rejected_workflows_are_status_400_with_comfyui_json() {
        let (_sim, http) = sim(0.0).await;
        let transcript = std::fs::read_to_string(fixtures().join("d_validation_errors.jsonl")).expect("fixture");
        let bad_inputs = transcript
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["status"] == 400 && l["response"]["node_errors"].as_object().is_some_and(|m| !m.is_empty()))
            .expect("a recorded rejection with node errors");
        let err = http.post_prompt(&json!({"prompt": bad_inputs["request"]["prompt"]})).await.expect_err("rejected");
        let HttpError::Status { endpoint: "POST /prompt", status: 400, json: Some(body), .. } = err else {
            panic!("expected a 400 with JSON, got {err:?}");
        };
        assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
        assert_eq!(body["node_errors"]["1"]["errors"][0]["type"], "value_smaller_than_min");

        let no_class = http.post_prompt(&json!({"prompt": {"7": {"inputs": {}}}})).await.expect_err("rejected");
        assert!(matches!(&no_class, HttpError::Status { status: 400, json: Some(j), .. }
            if j["error"]["type"] == "invalid_prompt" && j["error"]["details"] == "Node ID '#7'"));
        let no_prompt = http.post_prompt(&json!({"client_id": "x"})).await.expect_err("rejected");
        assert!(matches!(&no_prompt, HttpError::Status { status: 400, json: Some(j), .. }
            if j["error"]["type"] == "no_prompt" && j["node_errors"] == json!({})));
        assert_eq!(http.queue().await.expect("queue"), QueueSnapshot::default());
    }

    #[tokio::test]
    async fn upload_answers_name_subfolder_type_and_renames_on_a_clash() {
        let (_sim, http) = sim(0.0).await;
        let upload =
            |data: &'static [u8], overwrite| http.upload_image("my pic ü.png", Bytes::from(data), "in box", overwrite);
        let first = upload(b"one", false).await.expect("upload");
        assert_eq!(first, json!({"name": "my pic ü.png", "subfolder": "in box", "type": "input"}));
        assert_eq!(upload(b"one", false).await.expect("same bytes")["name"], "my pic ü.png");
        assert_eq!(upload(b"two", false).await.expect("clash")["name"], "my pic ü (1).png");
        assert_eq!(upload(b"three", true).await.expect("overwrite")["name"], "my pic ü.png");
    }

    #[tokio::test]
    async fn free_and_system_stats_on_the_simulator() {
        let (sim, http) = sim(0.0).await;
        http.free(true, false).await.expect("free");
        assert!(sim
            .requests()
            .iter()
            .any(|r| r.1 == "/free" && r.2 == json!({"unload_models": true, "free_memory": false})));
        let stats = http.system_stats().await.expect("stats");
        assert!(stats["system"]["comfyui_version"].is_string());
    }

    #[tokio::test]
    async fn requests_carry_prefix_headers_and_user_agent_but_no_origin() {
        let (url, server) = serve_once(answer("200 OK", "application/json", "{}")).await;
        let mut settings = settings(&format!("{url}/comfy/"), 5_000);
        settings
            .comfyui
            .headers
            .insert("Authorization".into(), serde_json::from_value::<Secret>(json!("Bearer t0k")).expect("secret"));
        let http = ComfyHttp::new(&settings.comfyui).expect("client");
        assert_eq!(http.system_stats().await.expect("stats"), json!({}));
        let head = server.await.expect("server").to_ascii_lowercase();
        assert!(head.starts_with("get /comfy/system_stats http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nauthorization: bearer t0k\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nuser-agent: comfy-bridge/{}\r\n", env!("CARGO_PKG_VERSION"))), "{head}");
        assert!(!head.contains("\r\norigin:"), "{head}");
        assert!(!format!("{http:?}").contains("t0k"));
    }

    #[tokio::test]
    async fn unusable_settings_are_refused() {
        let mut with_origin = settings("http://127.0.0.1:8188", 5_000);
        with_origin.comfyui.headers.insert("Origin".into(), Secret::default());
        let mut bad_name = settings("http://127.0.0.1:8188", 5_000);
        bad_name.comfyui.headers.insert("bad name".into(), Secret::default());
        for s in [with_origin, bad_name, settings("http://127.0.0.1:8188", 0), settings("not a url", 5_000)] {
            assert!(matches!(ComfyHttp::new(&s.comfyui), Err(HttpError::InvalidSettings { .. })));
        }
    }

    #[tokio::test]
    async fn error_status_and_non_json_answers() {
        let long = "x".repeat(2_000);
        let (url, _server) = serve_once(answer("500 Internal Server Error", "text/plain", &long)).await;
        let http = ComfyHttp::new(&settings(&url, 5_000).comfyui).expect("client");
        let err = http.queue().await.expect_err("500");
        let excerpt_len = match &err {
            HttpError::Status { endpoint: "GET /queue", status: 500, body, json: None } => body.len(),
            other => panic!("expected a 500 without JSON, got {other:?}"),
        };
        assert_eq!(excerpt_len, MAX_EXCERPT_CHARS);

        let (url, _server) = serve_once(answer("200 OK", "text/html", "<html>proxy login</html>")).await;
        let http = ComfyHttp::new(&settings(&url, 5_000).comfyui).expect("client");
        assert!(matches!(http.system_stats().await, Err(HttpError::BadResponse { endpoint: "GET /system_stats", .. })));
    }

    /// Accepts connections forever; each gets a 200 whose chunked body never ends. Returns the bytes written.
    async fn serve_endless() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = stream.read(&mut head).await;
                    let start =
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if stream.write_all(start.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                    while stream.write_all(chunk.as_bytes()).await.is_ok() {
                        counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        (url, written)
    }

    #[tokio::test]
    async fn an_endless_body_stops_at_the_cap_and_the_client_keeps_working() {
        let (url, written) = serve_endless().await;
        let mut capped = settings(&url, 10_000);
        capped.comfyui.max_body_bytes = 1024 * 1024;
        let http = ComfyHttp::new(&capped.comfyui).expect("client");
        for _ in 0..2 {
            let err = http.queue().await.expect_err("endless");
            assert!(matches!(err, HttpError::TooLarge { endpoint: "GET /queue", limit: 1_048_576 }), "{err:?}");
        }
        // The server got to write at most the cap plus what the socket buffers hold, not an endless stream.
        assert!(written.load(std::sync::atomic::Ordering::Relaxed) < 64 * 1024 * 1024);

        let long = format!("{{\"x\": \"{}\"}}", "y".repeat(2_000));
        let (url, _server) = serve_once(answer("200 OK", "application/json", &long)).await;
        let mut capped = settings(&url, 5_000);
        capped.comfyui.max_body_bytes = 1_000;
        let http = ComfyHttp::new(&capped.comfyui).expect("client");
        let err = http.system_stats().await.expect_err("declared too long");
        assert!(matches!(err, HttpError::TooLarge { endpoint: "GET /system_stats", limit: 1_000 }), "{err:?}");
    }

    #[tokio::test]
    async fn empty_200s_are_not_parsed() {
        let (url, _server) = serve_once(answer("200 OK", "", "")).await;
        let http = ComfyHttp::new(&settings(&url, 5_000).comfyui).expect("client");
        http.interrupt(None).await.expect("empty 200 is success");
    }

    #[tokio::test]
    async fn comfyui_down_is_unavailable_at_once() {
        let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
        let http = ComfyHttp::new(&settings(&format!("http://127.0.0.1:{port}"), 30_000).comfyui).expect("client");
        let started = Instant::now();
        let err = http.post_prompt(&prompt("x")).await.expect_err("nobody listens");
        assert!(matches!(err, HttpError::Unavailable { endpoint: "POST /prompt", .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn silent_comfyui_is_unavailable_after_the_timeout() {
        // Connections complete in the backlog, but nobody ever reads or answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let http = ComfyHttp::new(&settings(&url, 300).comfyui).expect("client");
        let started = Instant::now();
        let err = http.queue().await.expect_err("no answer");
        let elapsed = started.elapsed();
        assert!(matches!(err, HttpError::Unavailable { endpoint: "GET /queue", .. }), "{err:?}");
        assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(1), "{elapsed:?}");
        drop(listener);
    }

    #[test]
    fn urls_keep_the_base_and_its_query() {
        let mut settings = Settings::default();
        settings.comfyui.url = "http://127.0.0.1:1/base?token=t".into();
        let http = ComfyHttp::new(&settings.comfyui).expect("client");
        assert_eq!(http.url(&["history", "a b"]).as_str(), "http://127.0.0.1:1/base/history/a%20b?token=t");
    }
}
