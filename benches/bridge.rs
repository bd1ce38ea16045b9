//! CPU per event, throughput, latency and memory of the bridge beside a minimal direct forwarder, measured the
//! way `../shared/bench/run` measures them, in a few minutes.
//!
//! `cargo bench --bench bridge` starts mosquitto and nats-server, a fake ComfyUI (WebSocket firehose plus the
//! few HTTP routes the bridge reads), and then, taking turns for each repetition (bridge, direct, bridge,
//! direct, …), two subjects, each started fresh:
//! * the `comfy-bridge` binary (built by cargo with the bench profile), and
//! * `direct`: this same executable re-run with `BENCH_FORWARDER=1`, the reference forwarder of the shared
//!   bench: one thread, every frame published unchanged to MQTT (QoS 0, v3.1.1) and NATS on a topic built
//!   from the prompt and node found by a byte search.
//!
//! Each subject gets a warm-up, then the throughput workloads: 64 prompts × 938 steps (60,032 progress events)
//! in ComfyUI's order, with 1, 8 and 64 prompts in flight at once (their frames interleaved), each frame its
//! own WebSocket write, 64 KiB previews at 20/s alongside; then 1,000 msg/s for a few seconds for latency.
//! Per workload it records the subject's CPU seconds (utime + stime from `/proc/<pid>/stat`, read when the
//! last event arrived) per 100k frames, the progress events/s each bus delivered, and the delivered share.
//! Ratios to `direct` are taken within each repetition and reported per repetition and as the median.
//!
//! Environment: `BENCH_REPS` (default 3), `BENCH_STEPS` (progress events per prompt, default 938),
//! `BENCH_LATENCY_SECS` (default 3; 0 skips the latency run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

const PROMPTS: u64 = 64;
const CONCURRENCY: [u64; 3] = [1, 8, 64];
const LATENCY_RATE: u64 = 1_000;
const PREVIEW_BYTES: usize = 64 * 1024;
const PREVIEWS_PER_SEC: u64 = 20;
/// A workload is over once no count moved for this long.
const QUIET: Duration = Duration::from_secs(1);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What the fake ComfyUI should send to the connected subject.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    Idle,
    /// `PROMPTS` prompts of `steps` progress events, `concurrency` at once, as fast as possible, previews at
    /// 20/s alongside; `nonce` makes the prompt ids unique.
    Burst {
        steps: u64,
        concurrency: u64,
        nonce: u64,
    },
    /// `rate` progress frames per second for `secs`.
    Paced {
        rate: u64,
        secs: u64,
    },
}

fn prompt_id(nonce: u64, k: u64) -> String {
    let tail = (nonce << 20 ^ k).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    format!("{:08x}-{:04x}-4000-8000-{tail:012x}", nonce & 0xffff_ffff, k & 0xffff)
}

/// The `pos`-th text frame of prompt `pid` (`steps + 5` in all), in ComfyUI's order.
fn frame_at(pid: &str, pos: u64, steps: u64) -> String {
    match pos {
        0 => format!(r#"{{"type":"execution_start","data":{{"prompt_id":"{pid}","timestamp":{}}}}}"#, now_us() / 1000),
        1 => format!(r#"{{"type":"executing","data":{{"node":"3","display_node":"3","prompt_id":"{pid}"}}}}"#),
        p if p <= steps + 1 => progress_frame(pid, p - 2, steps),
        p if p == steps + 2 => format!(
            r#"{{"type":"executed","data":{{"node":"9","display_node":"9","output":{{"images":[{{"filename":"x_0001_.png","subfolder":"","type":"output"}}]}},"prompt_id":"{pid}"}}}}"#
        ),
        p if p == steps + 3 => format!(r#"{{"type":"executing","data":{{"node":null,"prompt_id":"{pid}"}}}}"#),
        _ => {
            format!(r#"{{"type":"execution_success","data":{{"prompt_id":"{pid}","timestamp":{}}}}}"#, now_us() / 1000)
        }
    }
}

fn progress_frame(pid: &str, value: u64, max: u64) -> String {
    format!(
        r#"{{"type":"progress","data":{{"value":{value},"max":{max},"prompt_id":"{pid}","node":"3","sent_us":{}}}}}"#,
        now_us()
    )
}

/// A type-1 preview (no metadata): the bridge attributes it to the executing prompt and node.
fn preview_frame() -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + PREVIEW_BYTES);
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend(std::iter::once(0xFFu8).chain(std::iter::once(0xD8)).chain((0..PREVIEW_BYTES - 2).map(|i| i as u8)));
    frame
}

/// What a burst sent.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    text: u64,
    progress: u64,
    previews: u64,
}

/// The fake ComfyUI: `/ws` gets whatever load is requested through `load_rx`; `GET /queue` and
/// `GET /history…` answer empty, so the bridge's tracker reads succeed as they would against ComfyUI.
async fn fake_comfy(
    listener: TcpListener,
    load_rx: watch::Receiver<Load>,
    done_tx: mpsc::Sender<Sent>,
    clients: Arc<AtomicUsize>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let mut load_rx = load_rx.clone();
        // A clone inherits "unseen" for the last load sent to an earlier connection; start from now.
        load_rx.borrow_and_update();
        let done_tx = done_tx.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 8];
            let is_ws = matches!(stream.peek(&mut head).await, Ok(n) if head[..n].starts_with(b"GET /ws"));
            if !is_ws {
                return answer_http(stream).await;
            }
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
            clients.fetch_add(1, Ordering::SeqCst);
            serve_ws(ws, load_rx, done_tx).await;
            clients.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn serve_ws(
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    mut load_rx: watch::Receiver<Load>,
    done_tx: mpsc::Sender<Sent>,
) {
    let (mut tx, mut rx) = ws.split();
    let mut closed = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let status = r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"bench"}}"#;
    if tx.send(Message::text(status)).await.is_err() {
        return;
    }
    let preview = preview_frame();
    loop {
        tokio::select! {
            changed = load_rx.changed() => if changed.is_err() { return },
            _ = &mut closed => return,
        }
        let load = *load_rx.borrow_and_update();
        let result = match load {
            Load::Idle => Ok(Sent::default()),
            Load::Burst { steps, concurrency, nonce } => send_burst(&mut tx, steps, concurrency, nonce, &preview).await,
            Load::Paced { rate, secs } => send_paced(&mut tx, rate, secs).await,
        };
        match result {
            Ok(sent) => {
                let _ = done_tx.send(sent).await;
            }
            Err(_) => return,
        }
    }
}

/// One minimal HTTP answer, then close: `{}` for history, an empty queue for `/queue`.
async fn answer_http(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = if request.starts_with(b"GET /queue") { r#"{"queue_running":[],"queue_pending":[]}"# } else { "{}" };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Every frame is its own write (as ComfyUI's aiohttp server does), so the subject reads them as they come.
async fn send_burst<S>(tx: &mut S, steps: u64, concurrency: u64, nonce: u64, preview: &[u8]) -> Result<Sent, S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let start = Instant::now();
    let mut sent = Sent::default();
    let per_prompt = steps + 5;
    // In-flight prompts as (prompt number, next position); a finished prompt's slot goes to the next one.
    let mut slots: Vec<(u64, u64)> = (0..concurrency.min(PROMPTS)).map(|k| (k, 0)).collect();
    let mut next_prompt = slots.len() as u64;
    let mut ids: Vec<String> = slots.iter().map(|(k, _)| prompt_id(nonce, *k)).collect();
    let mut i = 0;
    while !slots.is_empty() {
        let slot = i % slots.len();
        let (k, pos) = slots[slot];
        tx.send(Message::text(frame_at(&ids[slot], pos, steps))).await?;
        sent.text += 1;
        sent.progress += u64::from((2..steps + 2).contains(&pos));
        let due = start.elapsed().as_millis() as u64 * PREVIEWS_PER_SEC / 1000;
        if sent.previews < due {
            sent.previews += 1;
            tx.send(Message::binary(preview.to_vec())).await?;
        }
        if pos + 1 < per_prompt {
            slots[slot] = (k, pos + 1);
            i += 1;
        } else if next_prompt < PROMPTS {
            slots[slot] = (next_prompt, 0);
            ids[slot] = prompt_id(nonce, next_prompt);
            next_prompt += 1;
            i += 1;
        } else {
            slots.remove(slot);
            ids.remove(slot);
        }
    }
    Ok(sent)
}

async fn send_paced<S>(tx: &mut S, rate: u64, secs: u64) -> Result<Sent, S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let pid = prompt_id(0xface, 0);
    for i in 0..rate * secs {
        tick.tick().await;
        tx.send(Message::text(progress_frame(&pid, i, rate * secs))).await?;
    }
    Ok(Sent { text: rate * secs, progress: rate * secs, previews: 0 })
}

/// Counts progress messages on both buses and records latencies from `sent_us`.
#[derive(Default)]
struct Tally {
    mqtt: AtomicU64,
    nats: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn record(&self, payload: &[u8], mqtt: bool) {
        let Some(sent) = find_sent_us(payload) else { return };
        if mqtt { &self.mqtt } else { &self.nats }.fetch_add(1, Ordering::Relaxed);
        let latency = now_us().saturating_sub(sent);
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(latency);
        }
    }

    fn counts(&self) -> (u64, u64) {
        (self.mqtt.load(Ordering::Relaxed), self.nats.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        self.mqtt.store(0, Ordering::Relaxed);
        self.nats.store(0, Ordering::Relaxed);
        if let Ok(mut l) = self.latencies_us.lock() {
            l.clear();
        }
    }
}

fn find_sent_us(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload.get(..payload.len().min(1024))?).ok()?;
    let rest = &text[text.find("\"sent_us\":")? + 10..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// utime + stime of a process (all its threads), in seconds.
fn proc_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ (sysconf(_SC_CLK_TCK)) is 100 on every Linux architecture this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

/// One throughput workload's figures for one subject.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    cpu_per_100k: f64,
    mqtt_per_s: f64,
    nats_per_s: f64,
    delivered_pct: f64,
    rss_peak_kib: u64,
}

/// One subject's session: idle RSS, per-workload figures, latency.
#[derive(Debug, Default)]
struct Session {
    rss_idle_kib: u64,
    workloads: Vec<Figures>,
    p50_us: u64,
    p99_us: u64,
}

struct Bench {
    load_tx: watch::Sender<Load>,
    done_rx: mpsc::Receiver<Sent>,
    clients: Arc<AtomicUsize>,
    tally: Arc<Tally>,
    nonce: u64,
}

impl Bench {
    async fn run(&mut self, load: Load) -> Sent {
        let _ = self.load_tx.send(load);
        self.done_rx.recv().await.unwrap_or_default()
    }

    /// Waits until the counts stop moving (or reach `expected` on both buses); returns the subject's CPU
    /// reading at the last change, and when each bus's count last moved.
    async fn drain(&self, pid: u32, expected: u64) -> (f64, [Instant; 2]) {
        let (mut last, mut cpu_at_last) = (self.tally.counts(), proc_cpu_s(pid));
        let mut moved = [Instant::now(); 2];
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let counts = self.tally.counts();
            let cpu = proc_cpu_s(pid);
            if counts != last {
                for (at, changed) in moved.iter_mut().zip([counts.0 != last.0, counts.1 != last.1]) {
                    if changed {
                        *at = Instant::now();
                    }
                }
                (last, cpu_at_last) = (counts, cpu);
            }
            let quiet = moved.iter().all(|at| at.elapsed() > QUIET);
            if (last.0 >= expected && last.1 >= expected) || quiet {
                return (cpu_at_last, moved);
            }
        }
    }

    async fn throughput(&mut self, pid: u32, steps: u64, concurrency: u64) -> Figures {
        self.tally.reset();
        self.nonce += 1;
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5"); // resets VmHWM
        let cpu0 = proc_cpu_s(pid);
        let start = Instant::now();
        let sent = self.run(Load::Burst { steps, concurrency, nonce: self.nonce }).await;
        let (cpu1, [mqtt_at, nats_at]) = self.drain(pid, sent.progress).await;
        let (mqtt, nats) = self.tally.counts();
        let secs = |at: Instant| at.duration_since(start).as_secs_f64().max(1e-3);
        Figures {
            cpu_per_100k: (cpu1 - cpu0) / (sent.text + sent.previews).max(1) as f64 * 1e5,
            mqtt_per_s: mqtt as f64 / secs(mqtt_at),
            nats_per_s: nats as f64 / secs(nats_at),
            delivered_pct: 100.0 * mqtt.min(nats) as f64 / sent.progress.max(1) as f64,
            rss_peak_kib: proc_status_kib(pid, "VmHWM:"),
        }
    }

    async fn session(&mut self, name: &str, mut child: Child, steps: u64, latency_secs: u64) -> Session {
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.clients.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // settle
        let mut session = Session { rss_idle_kib: proc_status_kib(pid, "VmRSS:"), ..Session::default() };
        self.tally.reset();
        self.nonce += 1;
        let warm = self.run(Load::Burst { steps: 200, concurrency: 1, nonce: self.nonce }).await;
        self.drain(pid, warm.progress).await;
        for concurrency in CONCURRENCY {
            let f = self.throughput(pid, steps, concurrency).await;
            eprintln!(
                "  {name} c={concurrency}: {:.3} CPU-s/100k, mqtt {:.0}/s, nats {:.0}/s, delivered {:.1}%",
                f.cpu_per_100k, f.mqtt_per_s, f.nats_per_s, f.delivered_pct
            );
            session.workloads.push(f);
        }
        if latency_secs > 0 {
            self.tally.reset();
            self.run(Load::Paced { rate: LATENCY_RATE, secs: latency_secs }).await;
            self.drain(pid, LATENCY_RATE * latency_secs).await;
            let mut lat = self.tally.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
            lat.sort_unstable();
            let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied();
            (session.p50_us, session.p99_us) = (pct(0.50).unwrap_or(0), pct(0.99).unwrap_or(0));
        }
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        session
    }
}

/// The reference forwarder, as `comfybench direct` in the shared bench: one thread, frames unchanged.
fn forwarder() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let url = std::env::var("BENCH_WS").expect("BENCH_WS");
        let mqtt_port: u16 = std::env::var("BENCH_MQTT_PORT").ok().and_then(|p| p.parse().ok()).expect("port");
        let nats_url = std::env::var("BENCH_NATS").expect("BENCH_NATS");
        let mut opts = rumqttc::MqttOptions::new("bench-forwarder", "127.0.0.1", mqtt_port);
        opts.set_max_packet_size(256 << 20, 256 << 20).set_keep_alive(Duration::from_secs(30));
        let (mqtt, mut eventloop) = rumqttc::AsyncClient::new(opts, 1024);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let nats = async_nats::connect(nats_url).await.expect("nats");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
        let (_, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            let (topic, subject, payload) = match msg {
                Message::Text(t) => {
                    let pid = str_field(t.as_str(), "\"prompt_id\"").unwrap_or("_");
                    let node = str_field(t.as_str(), "\"node\"").unwrap_or("_");
                    (format!("fwd/{pid}/{node}"), format!("fwd.{pid}.{node}"), bytes::Bytes::from(t))
                }
                Message::Binary(b) => ("fwd/preview".to_string(), "fwd.preview".to_string(), b),
                _ => continue,
            };
            let _ = mqtt.publish_bytes(topic, rumqttc::QoS::AtMostOnce, false, payload.clone()).await;
            let _ = nats.publish(subject, payload).await;
        }
    });
}

/// The string value of the first `"key": "..."`, found by a text search (no JSON parse).
fn str_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = text[text.find(key)? + key.len()..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start().strip_prefix('"')?;
    let value = &rest[..rest.find('"')?];
    (!value.is_empty() && !value.contains(['/', '.', ' ', '#', '+', '*', '>'])).then_some(value)
}

fn main() {
    if std::env::var("BENCH_FORWARDER").is_ok() {
        return forwarder();
    }
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --benches` runs benches in test mode: nothing to check here.
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn bench() {
    let reps = env_u64("BENCH_REPS", 3).max(1);
    let steps = env_u64("BENCH_STEPS", 938).max(1);
    let latency_secs = env_u64("BENCH_LATENCY_SECS", 3);
    // Cargo builds the binary with the bench (release) profile and tells us where it is.
    let bridge_bin = env!("CARGO_BIN_EXE_comfy-bridge");
    let broker = common::Mosquitto::start();
    let nats = common::NatsServer::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let comfy_addr: SocketAddr = listener.local_addr().expect("addr");
    let (load_tx, load_rx) = watch::channel(Load::Idle);
    let (done_tx, done_rx) = mpsc::channel(4);
    let clients = Arc::new(AtomicUsize::new(0));
    tokio::spawn(fake_comfy(listener, load_rx, done_tx, clients.clone()));

    let tally = Arc::new(Tally::default());
    let mut mqtt_sub = common::mqtt_subscribe(&broker, "+/+/prompt/+/node/+/progress").await;
    let mut mqtt_fwd = common::mqtt_subscribe(&broker, "fwd/#").await;
    let mut nats_sub = common::nats_subscribe(&nats, "*.*.prompt.*.node.*.progress").await;
    let mut nats_fwd = common::nats_subscribe(&nats, "fwd.>").await;
    {
        let tally = tally.clone();
        tokio::spawn(async move {
            let forever = Duration::from_secs(86_400);
            loop {
                tokio::select! {
                    Some(m) = mqtt_sub.next(forever) => tally.record(&m.payload, true),
                    Some(m) = mqtt_fwd.next(forever) => tally.record(&m.payload, true),
                    Some(m) = nats_sub.next(forever) => tally.record(&m.payload, false),
                    Some(m) = nats_fwd.next(forever) => tally.record(&m.payload, false),
                }
            }
        });
    }

    let mut bench = Bench { load_tx, done_rx, clients, tally, nonce: u64::from(std::process::id()) << 16 };
    let state = tempfile::tempdir().expect("state");
    let mut sessions: Vec<(Session, Session)> = Vec::new();
    for rep in 1..=reps {
        eprintln!("rep {rep}/{reps}: comfy-bridge");
        let bridge = Command::new(bridge_bin)
            .env("COMFY_BRIDGE__COMFYUI__URL", format!("http://{comfy_addr}"))
            .env("COMFY_BRIDGE__MQTT__URL", broker.url())
            .env("COMFY_BRIDGE__NATS__URL", nats.url())
            .env("COMFY_BRIDGE__STATE__DIR", state.path())
            .env("COMFY_BRIDGE__HTTP__LISTEN", "127.0.0.1:0")
            .env("COMFY_BRIDGE__COMMANDS__ENABLED", "false")
            // The product throttles previews to 5/s per node by default; lifted so both forward the same frames.
            .env("COMFY_BRIDGE__PREVIEWS__MAX_PER_SECOND", "1000")
            .env("COMFY_BRIDGE__BRIDGE__LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bridge");
        let bridge = bench.session("comfy-bridge", bridge, steps, latency_secs).await;
        eprintln!("rep {rep}/{reps}: direct");
        let forwarder = Command::new(std::env::current_exe().expect("exe"))
            .env("BENCH_FORWARDER", "1")
            .env("BENCH_WS", format!("ws://{comfy_addr}/ws"))
            .env("BENCH_MQTT_PORT", broker.port.to_string())
            .env("BENCH_NATS", nats.url())
            .stdout(Stdio::null())
            .spawn()
            .expect("forwarder");
        let direct = bench.session("direct", forwarder, steps, latency_secs).await;
        sessions.push((bridge, direct));
    }
    report(&sessions, steps);
}

fn report(sessions: &[(Session, Session)], steps: u64) {
    println!("\n{PROMPTS} prompts x {steps} steps per workload, 64 KiB previews at {PREVIEWS_PER_SEC}/s; c = prompts in flight.");
    println!("CPU = utime+stime per 100k frames; ratios are comfy-bridge / direct within one repetition.\n");
    println!("| rep | c | bridge CPU-s/100k | direct CPU-s/100k | CPU ratio | MQTT ev/s ratio | NATS ev/s ratio | delivered bridge / direct |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut cpu_ratios = vec![Vec::new(); CONCURRENCY.len()];
    let mut mqtt_ratios = vec![Vec::new(); CONCURRENCY.len()];
    let mut nats_ratios = vec![Vec::new(); CONCURRENCY.len()];
    let mut flat = (Vec::new(), Vec::new());
    for (rep, (b, d)) in sessions.iter().enumerate() {
        for (i, c) in CONCURRENCY.iter().enumerate() {
            let (Some(bf), Some(df)) = (b.workloads.get(i), d.workloads.get(i)) else { continue };
            let cpu = bf.cpu_per_100k / df.cpu_per_100k.max(1e-9);
            let mqtt = bf.mqtt_per_s / df.mqtt_per_s.max(1e-9);
            let nats = bf.nats_per_s / df.nats_per_s.max(1e-9);
            println!(
                "| {} | {c} | {:.3} | {:.3} | {cpu:.2} | {mqtt:.2} | {nats:.2} | {:.1}% / {:.1}% |",
                rep + 1,
                bf.cpu_per_100k,
                df.cpu_per_100k,
                bf.delivered_pct,
                df.delivered_pct
            );
            cpu_ratios[i].push(cpu);
            mqtt_ratios[i].push(mqtt);
            nats_ratios[i].push(nats);
        }
        if let (Some(b1), Some(b64), Some(d1), Some(d64)) =
            (b.workloads.first(), b.workloads.last(), d.workloads.first(), d.workloads.last())
        {
            flat.0.push(b64.cpu_per_100k / b1.cpu_per_100k.max(1e-9));
            flat.1.push(d64.cpu_per_100k / d1.cpu_per_100k.max(1e-9));
        }
    }
    println!("\nMedians over {} repetitions (targets: CPU ratio <= 1.3, throughput ratios >= 0.9):\n", sessions.len());
    println!("| c | CPU/event vs direct | MQTT ev/s vs direct | NATS ev/s vs direct |");
    println!("|---|---|---|---|");
    for (i, c) in CONCURRENCY.iter().enumerate() {
        println!(
            "| {c} | {:.2} | {:.2} | {:.2} |",
            median(cpu_ratios[i].clone()),
            median(mqtt_ratios[i].clone()),
            median(nats_ratios[i].clone())
        );
    }
    println!(
        "\nCPU/event at c=64 vs c=1 (flat = 1.00): comfy-bridge {:.2}, direct {:.2}",
        median(flat.0),
        median(flat.1)
    );
    let med = |f: &dyn Fn(&Session) -> f64, bridge: bool| {
        median(sessions.iter().map(|(b, d)| f(if bridge { b } else { d })).collect())
    };
    println!("\n| subject | RSS idle | RSS peak (c=64) | p50 latency | p99 latency (1,000 msg/s) |");
    println!("|---|---|---|---|---|");
    for (name, bridge) in [("comfy-bridge", true), ("direct", false)] {
        println!(
            "| {name} | {:.1} MB | {:.1} MB | {:.2} ms | {:.2} ms |",
            med(&|s| s.rss_idle_kib as f64, bridge) / 1024.0,
            med(&|s| s.workloads.last().map_or(0, |w| w.rss_peak_kib) as f64, bridge) / 1024.0,
            med(&|s| s.p50_us as f64, bridge) / 1000.0,
            med(&|s| s.p99_us as f64, bridge) / 1000.0
        );
    }
}
