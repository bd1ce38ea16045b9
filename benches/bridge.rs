//! Throughput, latency and memory of the bridge, beside a minimal direct forwarder, in one run.
//!
//! `cargo bench --bench bridge` starts mosquitto and nats-server, a firehose WebSocket server that speaks
//! ComfyUI's framing, and then, one after the other, two targets connected to it:
//! * the `comfy-bridge` binary (built by cargo with the bench profile), and
//! * a direct forwarder: this same executable re-run with `BENCH_FORWARDER=1`, which forwards every
//!   WebSocket frame to one MQTT topic and one NATS subject with no parsing at all.
//!
//! For each target it measures sustained progress events/s delivered to subscribers on both buses while 64 KiB
//! previews flow at 20/s, p50/p99 end-to-end latency at 1,000 msg/s, and the target's RSS idle and under load.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

const BURST: u64 = 60_000;
const LATENCY_RATE: u64 = 1_000;
const LATENCY_SECS: u64 = 5;
const PREVIEW_BYTES: usize = 64 * 1024;
const PREVIEWS_PER_SEC: u64 = 20;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What the firehose should send to the connected target.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    Idle,
    /// `n` progress frames as fast as possible, previews at 20/s alongside.
    Burst(u64),
    /// `rate` progress frames per second for `secs`.
    Paced(u64, u64),
}

fn progress_frame(i: u64) -> String {
    format!(
        r#"{{"type":"progress","data":{{"value":{i},"max":1000000,"prompt_id":"bench-prompt","node":"3","sent_us":{}}}}}"#,
        now_us()
    )
}

fn preview_frame() -> Vec<u8> {
    let meta = br#"{"node_id":"3","prompt_id":"bench-prompt","display_node_id":"3","parent_node_id":null,"real_node_id":"3","image_type":"image/jpeg"}"#;
    let mut frame = Vec::with_capacity(8 + meta.len() + PREVIEW_BYTES);
    frame.extend_from_slice(&4u32.to_be_bytes());
    frame.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    frame.extend_from_slice(meta);
    frame.extend(std::iter::once(0xFFu8).chain(std::iter::once(0xD8)).chain((0..PREVIEW_BYTES - 2).map(|i| i as u8)));
    frame
}

/// Serves `/ws`; each connection sends whatever load is requested through `load_rx`.
async fn firehose(listener: TcpListener, load_rx: watch::Receiver<Load>, done_tx: mpsc::Sender<()>) {
    while let Ok((stream, _)) = listener.accept().await {
        let mut load_rx = load_rx.clone();
        // A clone inherits "unseen" for the last load sent to an earlier connection; start from now.
        load_rx.borrow_and_update();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
            let (mut tx, mut rx) = ws.split();
            tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            let status = r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"bench"}}"#;
            if tx.send(Message::text(status)).await.is_err() {
                return;
            }
            let preview = preview_frame();
            loop {
                if load_rx.changed().await.is_err() {
                    return;
                }
                let load = *load_rx.borrow_and_update();
                let result = match load {
                    Load::Idle => Ok(()),
                    Load::Burst(n) => send_burst(&mut tx, n, &preview).await,
                    Load::Paced(rate, secs) => send_paced(&mut tx, rate, secs).await,
                };
                if result.is_err() {
                    return;
                }
                let _ = done_tx.send(()).await;
            }
        });
    }
}

async fn send_burst<S>(tx: &mut S, n: u64, preview: &[u8]) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let start = Instant::now();
    let mut previews_sent = 0;
    for i in 0..n {
        tx.feed(Message::text(progress_frame(i))).await?;
        let due = start.elapsed().as_millis() as u64 * PREVIEWS_PER_SEC / 1000;
        if previews_sent < due {
            previews_sent += 1;
            tx.feed(Message::binary(preview.to_vec())).await?;
        }
        if i % 64 == 0 {
            tx.flush().await?;
        }
    }
    tx.flush().await
}

async fn send_paced<S>(tx: &mut S, rate: u64, secs: u64) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..rate * secs {
        tick.tick().await;
        tx.send(Message::text(progress_frame(i))).await?;
    }
    Ok(())
}

/// Counts progress messages on both buses and records latencies from `sent_us`.
#[derive(Default)]
struct Tally {
    mqtt: AtomicU64,
    nats: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u64>>,
    mqtt_latencies_us: std::sync::Mutex<Vec<u64>>,
}

impl Tally {
    fn record(&self, payload: &[u8], mqtt: bool) {
        let Some(sent) = find_sent_us(payload) else { return };
        if mqtt { &self.mqtt } else { &self.nats }.fetch_add(1, Ordering::Relaxed);
        let latency = now_us().saturating_sub(sent);
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(latency);
        }
        if mqtt {
            if let Ok(mut l) = self.mqtt_latencies_us.lock() {
                l.push(latency);
            }
        }
    }
    fn reset(&self) {
        self.mqtt.store(0, Ordering::Relaxed);
        self.nats.store(0, Ordering::Relaxed);
        for l in [&self.latencies_us, &self.mqtt_latencies_us] {
            if let Ok(mut l) = l.lock() {
                l.clear();
            }
        }
    }
}

fn find_sent_us(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = &text[text.find("\"sent_us\":")? + 10..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

struct Figures {
    events_per_sec: f64,
    delivered_pct: f64,
    p50_us: u64,
    p99_us: u64,
    rss_idle_kib: u64,
    rss_load_kib: u64,
}

async fn measure(
    name: &str,
    mut child: Child,
    load_tx: &watch::Sender<Load>,
    done_rx: &mut mpsc::Receiver<()>,
    tally: &Tally,
) -> Figures {
    tokio::time::sleep(Duration::from_secs(2)).await; // connect and settle
    let pid = child.id();
    let rss_idle_kib = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_idle_kib));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tally.reset();
    let start = Instant::now();
    let _ = load_tx.send(Load::Burst(BURST));
    let _ = done_rx.recv().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (tally.mqtt.load(Ordering::Relaxed) < BURST || tally.nats.load(Ordering::Relaxed) < BURST)
        && Instant::now() < deadline
    {
        let before = (tally.mqtt.load(Ordering::Relaxed), tally.nats.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(500)).await;
        if before == (tally.mqtt.load(Ordering::Relaxed), tally.nats.load(Ordering::Relaxed)) {
            break; // nothing more is coming (dropped under pressure)
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let delivered = tally.mqtt.load(Ordering::Relaxed).min(tally.nats.load(Ordering::Relaxed));
    let events_per_sec = delivered as f64 / elapsed;
    let delivered_pct = 100.0 * delivered as f64 / BURST as f64;
    eprintln!(
        "{name}: burst delivered mqtt={} nats={} in {elapsed:.2}s",
        tally.mqtt.load(Ordering::Relaxed),
        tally.nats.load(Ordering::Relaxed)
    );

    tally.reset();
    let _ = load_tx.send(Load::Paced(LATENCY_RATE, LATENCY_SECS));
    let _ = done_rx.recv().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = tally.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let mut mqtt_lat = tally.mqtt_latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
    mqtt_lat.sort_unstable();
    let mqtt_p99 = mqtt_lat.get(mqtt_lat.len() * 99 / 100).copied().unwrap_or(0);
    let slow: Vec<usize> = lat.iter().enumerate().filter(|(_, l)| **l > 5_000).map(|(i, _)| i).take(3).collect();
    eprintln!(
        "{name}: latency p99 all={} us, mqtt only={mqtt_p99} us, samples over 5 ms: {}",
        pct(0.99),
        lat.iter().filter(|l| **l > 5_000).count()
    );
    let _ = slow;
    sampler.abort();
    let _ = child.kill();
    let _ = child.wait();
    Figures {
        events_per_sec,
        delivered_pct,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        rss_idle_kib,
        rss_load_kib: peak.load(Ordering::Relaxed),
    }
}

/// The baseline: forward every frame, unparsed, to one topic and one subject.
async fn forwarder() {
    let url = std::env::var("BENCH_WS").expect("BENCH_WS");
    let mqtt_port: u16 = std::env::var("BENCH_MQTT_PORT").ok().and_then(|p| p.parse().ok()).expect("port");
    let nats_url = std::env::var("BENCH_NATS").expect("BENCH_NATS");
    let mut opts = rumqttc::v5::MqttOptions::new("bench-forwarder", "127.0.0.1", mqtt_port);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    opts.set_max_packet_size(Some(16 * 1024 * 1024)).set_network_options(network);
    let (mqtt, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 1024);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let nats = async_nats::connect(nats_url).await.expect("nats");
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let (_, mut rx) = ws.split();
    while let Some(Ok(msg)) = rx.next().await {
        let (subject, payload) = match msg {
            Message::Text(t) => ("progress", bytes::Bytes::from(t.as_str().to_owned())),
            Message::Binary(b) => ("preview", b),
            _ => continue,
        };
        let _ = mqtt
            .publish(format!("fwd/{subject}"), rumqttc::v5::mqttbytes::QoS::AtMostOnce, false, payload.clone())
            .await;
        let _ = nats.publish(format!("fwd.{subject}"), payload).await;
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if std::env::var("BENCH_FORWARDER").is_ok() {
        runtime.block_on(forwarder());
        return;
    }
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --benches` runs benches in test mode: nothing to check here.
    }
    runtime.block_on(bench());
}

async fn bench() {
    // Cargo builds the binary with the bench (release) profile and tells us where it is.
    let bridge_bin = env!("CARGO_BIN_EXE_comfy-bridge");
    let broker = common::Mosquitto::start();
    let nats = common::NatsServer::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr: SocketAddr = listener.local_addr().expect("addr");
    let (load_tx, load_rx) = watch::channel(Load::Idle);
    let (done_tx, mut done_rx) = mpsc::channel(4);
    tokio::spawn(firehose(listener, load_rx, done_tx));

    let tally = Arc::new(Tally::default());
    let mut mqtt_sub = common::mqtt_subscribe(&broker, "+/+/prompt/+/node/+/progress").await;
    let mut mqtt_fwd = common::mqtt_subscribe(&broker, "fwd/progress").await;
    let mut nats_sub = common::nats_subscribe(&nats, "*.*.prompt.*.node.*.progress").await;
    let mut nats_fwd = common::nats_subscribe(&nats, "fwd.progress").await;
    {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(m) = mqtt_sub.next(Duration::from_secs(3600)) => tally.record(&m.payload, true),
                    Some(m) = mqtt_fwd.next(Duration::from_secs(3600)) => tally.record(&m.payload, true),
                    Some(m) = nats_sub.next(Duration::from_secs(3600)) => tally.record(&m.payload, false),
                    Some(m) = nats_fwd.next(Duration::from_secs(3600)) => tally.record(&m.payload, false),
                }
            }
        });
    }

    let state = tempfile::tempdir().expect("state");
    let bridge = Command::new(bridge_bin)
        .env("COMFY_BRIDGE__COMFYUI__URL", format!("http://{ws_addr}"))
        .env("COMFY_BRIDGE__MQTT__URL", broker.url())
        .env("COMFY_BRIDGE__NATS__URL", nats.url())
        .env("COMFY_BRIDGE__STATE__DIR", state.path())
        .env("COMFY_BRIDGE__PREVIEWS__MAX_PER_SECOND", "1000")
        .env("COMFY_BRIDGE__BRIDGE__LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge");
    let bridge = measure("comfy-bridge", bridge, &load_tx, &mut done_rx, &tally).await;

    let forwarder = Command::new(std::env::current_exe().expect("exe"))
        .env("BENCH_FORWARDER", "1")
        .env("BENCH_WS", format!("ws://{ws_addr}/ws"))
        .env("BENCH_MQTT_PORT", broker.port.to_string())
        .env("BENCH_NATS", nats.url())
        .stdout(Stdio::null())
        .spawn()
        .expect("forwarder");
    let direct = measure("direct forwarder", forwarder, &load_tx, &mut done_rx, &tally).await;

    println!("| target | progress events/s (both buses) | burst delivered | p50 latency | p99 latency | RSS idle | RSS under load |");
    println!("|---|---|---|---|---|---|---|");
    for (name, f) in [("comfy-bridge", &bridge), ("direct forwarder", &direct)] {
        println!(
            "| {name} | {:.0} | {:.1}% | {:.2} ms | {:.2} ms | {:.1} MB | {:.1} MB |",
            f.events_per_sec,
            f.delivered_pct,
            f.p50_us as f64 / 1000.0,
            f.p99_us as f64 / 1000.0,
            f.rss_idle_kib as f64 / 1024.0,
            f.rss_load_kib as f64 / 1024.0
        );
    }
    println!(
        "\nthroughput ratio {:.1}% (target >= 90%), p99 difference {:+.2} ms (target <= 1 ms)",
        100.0 * bridge.events_per_sec / direct.events_per_sec.max(1.0),
        (bridge.p99_us as f64 - direct.p99_us as f64) / 1000.0
    );
}
