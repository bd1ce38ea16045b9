//! Chaos soak: the `comfy-bridge` binary under mixed and hostile load with brokers failing, for `SOAK_SECS`
//! (default 1800), reporting its RSS over time and whether anything was lost.
//!
//! `SOAK_SECS=600 cargo bench --bench soak` starts mosquitto, nats-server and the simulator (replaying recorded
//! sessions four times faster than recorded: progress, previews, lifecycle events), then the bridge binary.
//! - Load: a `queue` request over NATS every second and a `status` request over MQTT v5 every second, so
//!   events, state, results and responses all flow; a raw 5 MB upload every 10 s (big messages).
//! - Hostile load, several messages a second: response topics with wildcards, inside the bridge's own tree
//!   and under `homeassistant/`, NATS reply subjects into the bridge's tree, 22,000-byte levels, unknown
//!   command names, non-UTF-8 NATS subjects over a raw connection, and a NATS subscriber on `>` throughout.
//! - Faults, every minute in turn: mosquitto, nats-server and the WebSocket to ComfyUI go away for two
//!   seconds; every other round the brokers are killed with SIGKILL instead of stopped.
//!
//! Every 30 s it prints the bridge's RSS and the running totals; at the end: every answered prompt's result
//! arrived, every request sent away from a fault was answered, nothing was planted on a victim topic, and the
//! bridge lived to the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Where a spoofed reply would land: nothing may ever arrive here.
const VICTIMS: [&str; 3] =
    ["comfyui/soak/prompt/victim/result", "comfyui/soak/bridge/availability/x", "homeassistant/sensor/victim/config"];

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(soak(Duration::from_secs(secs)));
}

/// Fault windows, as offsets from the start: a request sent within one of them may be lost by a broker.
#[derive(Default)]
struct Faults(Mutex<Vec<(Duration, Duration)>>);

impl Faults {
    fn near(&self, at: Duration) -> bool {
        let margin = Duration::from_secs(5);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(from, to)| at + margin >= *from && at <= *to + margin)
    }
}

/// An MQTT v5 session that resubscribes after every reconnect (the broker is killed under it) and hands every
/// message it receives to the caller.
async fn v5_session(
    port: u16,
    filters: Vec<String>,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Bytes, Option<Bytes>)>) {
    let mut opts = MqttOptions::new(format!("soak-{}", fastrand::u64(..)), "127.0.0.1", port);
    opts.set_max_packet_size(Some(32 * 1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for filter in &filters {
                        let _ = subscriber.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let correlation = p.properties.and_then(|pr| pr.correlation_data);
                    if tx.send((topic, p.payload, correlation)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (client, rx)
}

fn with_reply(topic: &str, correlation: &[u8]) -> PublishProperties {
    PublishProperties {
        response_topic: Some(topic.to_string()),
        correlation_data: Some(Bytes::copy_from_slice(correlation)),
        ..Default::default()
    }
}

/// One NATS message with a non-UTF-8 subject and one with a non-UTF-8 reply, over a raw connection.
async fn raw_nats_garbage(port: u16) {
    let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
    let mut info = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.read(&mut info)).await;
    let mut frames = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n".to_vec();
    frames.extend_from_slice(b"PUB comfyui.soak.request.st\xffatus 2\r\n{}\r\n");
    frames.extend_from_slice(b"PUB comfyui.soak.request.status _INBOX.\xfe\xff 2\r\n{}\r\n");
    let _ = socket.write_all(&frames).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut info)).await;
}

async fn soak(length: Duration) {
    let mut broker = common::Mosquitto::start();
    let mut nats = common::NatsServer::start();
    let sim = common::daemon::simulator(common::daemon::SUCCESS, 4.0).await;
    let mut results = common::mqtt_subscribe_persistent(&broker, "comfyui/soak/prompt/+/result").await;
    let state = tempfile::tempdir().expect("state");
    let templates = tempfile::tempdir().expect("templates");
    let workflow = common::fixtures::workflow_path("a_success__prompt");
    std::fs::copy(workflow, templates.path().join("probe.json")).expect("template");
    let mut bridge = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"))
        .env("COMFY_BRIDGE__BRIDGE__INSTANCE", "soak")
        .env("COMFY_BRIDGE__BRIDGE__LOG", "error")
        .env("COMFY_BRIDGE__COMFYUI__URL", sim.url())
        .env("COMFY_BRIDGE__COMFYUI__RECONNECT_MAX_MS", "1000")
        .env("COMFY_BRIDGE__MQTT__URL", broker.url())
        .env("COMFY_BRIDGE__NATS__URL", nats.url())
        .env("COMFY_BRIDGE__STATE__DIR", state.path())
        .env("COMFY_BRIDGE__COMMANDS__TEMPLATES_DIR", templates.path())
        .env("COMFY_BRIDGE__HTTP__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge");
    let pid = bridge.id();
    sim.wait_for_client(Duration::from_secs(10)).await.expect("bridge connects");
    let started = Instant::now();
    let faults = Arc::new(Faults::default());

    // A NATS subscriber on `>` for the whole run: it must change nothing.
    let everything = Arc::new(AtomicU64::new(0));
    let nats_url = nats.url();
    let wildcard = {
        let everything = everything.clone();
        let url = nats_url.clone();
        tokio::spawn(async move {
            let Ok(client) = async_nats::connect(url.as_str()).await else { return };
            let Ok(mut all) = client.subscribe(">".to_string()).await else { return };
            while all.next().await.is_some() {
                everything.fetch_add(1, Relaxed);
            }
        })
    };

    let queued = {
        let url = nats_url.clone();
        tokio::spawn(async move {
            // When each request was sent, for the ones not answered at the first try and the ones never
            // answered: whether that was near a fault is decided at the end, once every fault is on record
            // (a fault is recorded when it is over, so a request sent during one would look far from it).
            let (mut answered, mut lost, mut retried) = (HashSet::new(), Vec::new(), Vec::new());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut client = None;
            let mut n = 0u64;
            while started.elapsed() < length {
                tick.tick().await;
                if client.is_none() {
                    client = async_nats::connect(url.as_str()).await.ok();
                }
                let Some(c) = &client else { continue };
                let sent = started.elapsed();
                n += 1;
                // As a careful client does: an id, and one retry with the same id when no answer comes (core NATS
                // is at most once; the id makes the retry safe: it queues nothing twice).
                let body = format!(r#"{{"id":"soak-{n}","template":"probe"}}"#);
                let mut reply = None;
                for attempt in 0..2 {
                    let ask = c.request("comfyui.soak.request.queue".to_string(), body.clone().into());
                    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), ask).await {
                        reply = Some(r);
                        break;
                    }
                    if attempt == 0 {
                        retried.push(sent);
                    }
                }
                match reply {
                    Some(reply) => {
                        let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                        if let Some(id) = v["data"]["prompt_id"].as_str() {
                            answered.insert(id.to_string());
                        }
                    }
                    None => lost.push(sent),
                }
            }
            (answered, lost, retried)
        })
    };

    // Status over MQTT v5 every second, answered on our own response topic; and hostile requests beside it.
    let (requests, mut inbox) = {
        let mut filters = vec!["soak/responses".to_string(), "comfyui/soak/response/#".to_string()];
        filters.extend(VICTIMS.iter().map(|v| v.to_string()));
        v5_session(broker.port, filters).await
    };
    let sent: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let (planted, answers) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let listener = {
        let (sent, planted, answers) = (sent.clone(), planted.clone(), answers.clone());
        tokio::spawn(async move {
            while let Some((topic, _, correlation)) = inbox.recv().await {
                if VICTIMS.contains(&topic.as_str()) {
                    planted.fetch_add(1, Relaxed);
                    eprintln!("planted on {topic}");
                } else if let Some(c) = correlation {
                    sent.lock().unwrap_or_else(|e| e.into_inner()).remove(&*String::from_utf8_lossy(&c));
                    answers.fetch_add(1, Relaxed);
                }
            }
        })
    };
    let load = {
        let (requests, sent) = (requests.clone(), sent.clone());
        let (broker_port, nats_port) = (broker.port, nats.port);
        tokio::spawn(async move {
            let nats = async_nats::connect(format!("nats://127.0.0.1:{nats_port}")).await.ok();
            let big = vec![0x89u8; 5 * 1024 * 1024];
            let mut round = 0u64;
            while started.elapsed() < length {
                round += 1;
                let correlation = format!("status-{round}");
                sent.lock().unwrap_or_else(|e| e.into_inner()).insert(correlation.clone(), started.elapsed());
                let properties = with_reply("soak/responses", correlation.as_bytes());
                let _ = requests.try_publish_with_properties(
                    "comfyui/soak/request/status",
                    QoS::AtLeastOnce,
                    false,
                    "{}",
                    properties,
                );
                // Hostile requests: each must be answered or dropped, never wedge a bus or plant a message.
                let hostile = [
                    ("comfyui/soak/request/status".to_string(), "rel/+/x".to_string()),
                    ("comfyui/soak/request/status".to_string(), VICTIMS[0].to_string()),
                    ("comfyui/soak/request/status".to_string(), VICTIMS[1].to_string()),
                    ("comfyui/soak/request/templates".to_string(), VICTIMS[2].to_string()),
                    (format!("comfyui/soak/request/{}", ".".repeat(22_000)), "soak/responses".to_string()),
                    (format!("comfyui/soak/request/unknown{round}"), "soak/responses".to_string()),
                ];
                for (topic, reply) in hostile {
                    let properties = with_reply(&reply, b"hostile");
                    let _ = requests.try_publish_with_properties(topic, QoS::AtLeastOnce, false, "{}", properties);
                }
                if let Some(nats) = &nats {
                    let spoof = "comfyui.soak.prompt.victim.result".to_string();
                    let _ =
                        nats.publish_with_reply("comfyui.soak.request.status".to_string(), spoof, "{}".into()).await;
                    let long = format!("comfyui.soak.request.{}", "%".repeat(1_400));
                    let _ = nats.publish(long, "{}".into()).await;
                }
                if round % 5 == 0 {
                    raw_nats_garbage(nats_port).await;
                }
                if round % 10 == 0 {
                    let upload = common::requester::mqtt311_publish(
                        broker_port,
                        "comfyui/soak/request/upload/big=2Epng",
                        &big,
                        false,
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(5), upload).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // The NATS subscriber for victims, too.
    let mut nats_victims = common::nats_subscribe(&nats, "comfyui.soak.prompt.victim.>").await;

    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    let mut next_fault = Duration::from_secs(60);
    let mut next_sample = Duration::ZERO;
    let mut round = 0;
    println!("| minute | RSS | results so far | status answers | messages seen on `>` |");
    println!("|---|---|---|---|---|");
    while started.elapsed() < length {
        while let Some(m) = results.next(Duration::from_millis(100)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            seen.insert(v["prompt_id"].as_str().unwrap_or_default().to_string());
        }
        if started.elapsed() >= next_sample {
            let rss = rss_kib(pid);
            samples.push(rss);
            println!(
                "| {:.1} | {:.1} MB | {} | {} | {} |",
                started.elapsed().as_secs_f64() / 60.0,
                rss as f64 / 1024.0,
                seen.len(),
                answers.load(Relaxed),
                everything.load(Relaxed)
            );
            next_sample += Duration::from_secs(30);
        }
        if started.elapsed() >= next_fault {
            round += 1;
            let from = started.elapsed();
            let kill = round % 2 == 0;
            if kill {
                broker.kill();
            } else {
                broker.stop();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            broker.resume();
            if kill {
                nats.kill();
            } else {
                nats.stop();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            nats.resume();
            sim.refuse_websockets(true);
            sim.disconnect_all();
            tokio::time::sleep(Duration::from_secs(2)).await;
            sim.refuse_websockets(false);
            faults.0.lock().unwrap_or_else(|e| e.into_inner()).push((from, started.elapsed()));
            next_fault += Duration::from_secs(60);
        }
    }
    let (answered, queue_lost, queue_retried) = queued.await.expect("queue task");
    let away = |sent: &[Duration]| sent.iter().filter(|at| !faults.near(**at)).count();
    let (queue_lost, queue_retried) = (away(&queue_lost), away(&queue_retried).saturating_sub(away(&queue_lost)));
    let _ = load.await;
    // Let the last prompts finish and their results (and responses) arrive.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(60) && !answered.iter().all(|p| seen.contains(p)) {
        if let Some(m) = results.next(Duration::from_millis(500)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            seen.insert(v["prompt_id"].as_str().unwrap_or_default().to_string());
        }
    }
    let missing = answered.iter().filter(|p| !seen.contains(*p)).count();
    let unanswered = sent.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|at| !faults.near(**at)).count();
    let planted_nats = std::iter::from_fn(|| nats_victims.try_next()).count();
    let alive = bridge.try_wait().map(|s| s.is_none()).unwrap_or(false);
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = bridge.wait();
    listener.abort();
    wildcard.abort();
    let first = samples.get(1).or(samples.first()).copied().unwrap_or(0);
    let peak = samples.iter().copied().max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    println!(
        "\nsoak {:.0} min: prompts answered {}, results missing {missing}; queue requests unanswered away from faults \
         {queue_lost} (answered only on the retry with the same id: {queue_retried}); status requests unanswered \
         away from faults {unanswered}; messages planted on victim topics \
         {} (mqtt) + {planted_nats} (nats); bridge alive until the end: {alive}; RSS at 30 s {:.1} MB, peak {:.1} MB, \
         last {:.1} MB",
        length.as_secs_f64() / 60.0,
        answered.len(),
        planted.load(Relaxed),
        first as f64 / 1024.0,
        peak as f64 / 1024.0,
        last as f64 / 1024.0
    );
}
