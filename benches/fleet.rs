//! Fleet simulation: N simulated ComfyUI servers behind N bridges of one fleet, all in this process, on one
//! real nats-server with JetStream; a burst of jobs of random length submitted once.
//!
//! `cargo bench --bench fleet` runs N = 8, 32, 64 (`BENCH_FLEET_SIZES=8,16`), each with `fleet.capacity` 1
//! and 2 (`BENCH_FLEET_CAPACITIES`), `BENCH_FLEET_JOBS_PER_SERVER` jobs per server (default 4). A job queues
//! the example template with `KSampler.steps` drawn from 1..=20 (seeded), which the simulator plays as a
//! session of 0.1 s per node and 0.05 s per step: 0.75 s to 1.7 s. For each run it reports:
//! * jobs/s dispatched: jobs / (last start − first submit);
//! * submit → start p50 / p99 (start: the job record's `running`);
//! * idle-GPU fraction: the share of server time, from the first submit until the last job started (while the
//!   stream still held jobs), in which a server ran no job;
//! * the same figures for an ideal scheduler on the same trace: every job starts on the first server that is
//!   free, with no dispatch cost, and runs as long as it ran here.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let list = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var).unwrap_or_else(|_| default.into()).split(',').filter_map(|n| n.trim().parse().ok()).collect()
    };
    let sizes = list("BENCH_FLEET_SIZES", "8,32,64");
    let capacities = list("BENCH_FLEET_CAPACITIES", "1,2");
    let per_server = list("BENCH_FLEET_JOBS_PER_SERVER", "4").first().copied().unwrap_or(4);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "{:>4} {:>4} {:>5} | {:>7} {:>9} {:>9} {:>7} | {:>7} {:>9} {:>9} {:>7}",
        "N", "cap", "jobs", "jobs/s", "p50 ms", "p99 ms", "idle %", "ideal/s", "p50 ms", "p99 ms", "idle %"
    );
    for &n in &sizes {
        for &capacity in &capacities {
            let row = runtime.block_on(run(n, capacity, n * per_server));
            println!("{row}");
        }
    }
}

/// What one job did, in seconds since the first submit.
#[derive(Debug, Clone, Copy, Default)]
struct Timeline {
    submit: f64,
    start: Option<f64>,
    end: Option<f64>,
    server: usize,
}

/// Figures for one schedule.
struct Figures {
    jobs_per_sec: f64,
    p50: f64,
    p99: f64,
    idle: f64,
}

async fn run(n: usize, capacity: usize, jobs: usize) -> String {
    let nats = common::NatsServer::start();
    let fleet = "bench";
    let mut sims = Vec::new();
    let mut daemons = Vec::new();
    for i in 0..n {
        let sim = common::daemon::simulator(common::daemon::SUCCESS, 1.0).await;
        let (mut s, state) = common::daemon::settings(&sim, None, Some(&nats));
        s.bridge.instance = format!("gpu{i}");
        s.bridge.log = "warn".into();
        s.http.listen = None;
        s.commands.templates_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates").into();
        s.fleet.enabled = true;
        s.fleet.name = fleet.into();
        s.fleet.capacity = capacity;
        s.fleet.ack_wait_ms = 30_000;
        daemons.push(common::daemon::Daemon::start(s, state));
        sims.push(sim);
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    common::fleet::wait_for_bridges(&client, fleet, n, String::new).await;
    let mut records = client.subscribe(format!("comfyui.fleet.{fleet}.job.*.state")).await.expect("subscribe");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());

    let mut rng = fastrand::Rng::with_seed(12 + n as u64);
    let mut timelines = vec![Timeline::default(); jobs];
    let t0 = Instant::now();
    let mut acks = Vec::new();
    for (j, timeline) in timelines.iter_mut().enumerate() {
        let id = format!("b{j}");
        let body = json!({"id": id, "template": "txt2img", "set": {"KSampler.steps": rng.u64(1..=20)}});
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        timeline.submit = t0.elapsed().as_secs_f64();
        let subject = format!("comfyui.fleet.{fleet}.queue");
        acks.push(js.publish_with_headers(subject, headers, body.to_string().into()).await.expect("publish"));
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    let servers: HashMap<String, usize> = (0..n).map(|i| (format!("gpu{i}"), i)).collect();
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(60 + jobs as u64);
    while done < jobs && Instant::now() < deadline {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), records.next()).await else { break };
        let at = t0.elapsed().as_secs_f64();
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let Some(j) = v["id"].as_str().and_then(|id| id.strip_prefix('b')).and_then(|j| j.parse::<usize>().ok()) else {
            continue;
        };
        let Some(t) = timelines.get_mut(j) else { continue };
        match v["state"].as_str() {
            Some("running") if t.start.is_none() => {
                t.start = Some(at);
                t.server = v["instance"].as_str().and_then(|i| servers.get(i)).copied().unwrap_or(0);
            }
            Some("success" | "error" | "interrupted" | "cancelled") if t.end.is_none() => {
                t.end = Some(at);
                done += 1;
            }
            _ => {}
        }
    }
    let measured = figures(&timelines, n);
    let ideal = figures(&ideal(&timelines, n), n);
    for d in daemons {
        d.stop().await;
    }
    drop(sims);
    let missing = if done < jobs { format!("  ({} of {jobs} jobs never ended)", jobs - done) } else { String::new() };
    format!(
        "{n:>4} {capacity:>4} {jobs:>5} | {:>7.1} {:>9.0} {:>9.0} {:>7.2} | {:>7.1} {:>9.0} {:>9.0} {:>7.2}{missing}",
        measured.jobs_per_sec,
        measured.p50 * 1e3,
        measured.p99 * 1e3,
        measured.idle * 100.0,
        ideal.jobs_per_sec,
        ideal.p50 * 1e3,
        ideal.p99 * 1e3,
        ideal.idle * 100.0,
    )
}

/// The ideal schedule of the same jobs: in submit order, each on the server that is free first, at once.
fn ideal(measured: &[Timeline], n: usize) -> Vec<Timeline> {
    let mut free = vec![0.0f64; n];
    measured
        .iter()
        .map(|t| {
            let run = match (t.start, t.end) {
                (Some(s), Some(e)) => e - s,
                _ => 0.0,
            };
            let (server, at) = free.iter().copied().enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
            let start = at.max(t.submit);
            free[server] = start + run;
            Timeline { submit: t.submit, start: Some(start), end: Some(start + run), server }
        })
        .collect()
}

fn figures(timelines: &[Timeline], n: usize) -> Figures {
    let started: Vec<&Timeline> = timelines.iter().filter(|t| t.start.is_some()).collect();
    let mut waits: Vec<f64> = started.iter().filter_map(|t| Some(t.start? - t.submit)).collect();
    waits.sort_by(f64::total_cmp);
    let pick = |q: f64| waits.get(((waits.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    let first = timelines.iter().map(|t| t.submit).fold(f64::INFINITY, f64::min);
    let last_start = started.iter().filter_map(|t| t.start).fold(0.0, f64::max);
    let window = (last_start - first).max(1e-9);
    // Busy time of each server within [first, last_start].
    let busy: f64 = started
        .iter()
        .filter_map(|t| {
            let (s, e) = (t.start?, t.end.unwrap_or(last_start));
            Some((e.min(last_start) - s.max(first)).max(0.0))
        })
        .sum();
    Figures {
        jobs_per_sec: started.len() as f64 / window,
        p50: pick(0.5),
        p99: pick(0.99),
        idle: (1.0 - busy / (window * n as f64)).max(0.0),
    }
}
