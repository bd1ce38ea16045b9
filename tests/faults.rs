//! Fault injection: mosquitto, nats-server and the WebSocket to ComfyUI go away and come back, over and over,
//! while prompts are queued and run. Every request is answered, every prompt runs once and its result
//! reaches both buses, and the bridge shuts down cleanly afterwards.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use comfy_sim::Simulator;
use common::daemon::{simulator, Daemon, SUCCESS};
use common::*;
use serde_json::{json, Value};

const PROMPTS: usize = 6;
const DEADLINE: Duration = Duration::from_secs(60);

/// Asks over NATS until answered, resending the same `id` after every failure: the bridge must act once.
async fn queue_until_answered(url: String, id: String) -> Value {
    let body = json!({"id": id, "workflow": workflow("a_success__prompt")}).to_string();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "request {id} never answered");
        let Ok(client) = async_nats::connect(url.as_str()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let ask = client.request("comfyui.local.request.queue".to_string(), body.clone().into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(3), ask).await {
            return serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every `result` captured by a JetStream stream, by prompt id.
async fn nats_results(url: &str) -> BTreeMap<String, Vec<Value>> {
    let client = async_nats::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("RESULTS").await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
            out.entry(v["prompt_id"].as_str().unwrap_or_default().to_string()).or_default().push(v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_and_comfyui_connection_failing_repeatedly_lose_no_result_and_no_request() {
    let mut broker = Mosquitto::start();
    let mut nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "RESULTS".into(),
            subjects: vec!["comfyui.local.prompt.*.result".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("capture stream");
    let sim = simulator(SUCCESS, 1.0).await;
    let mut results = mqtt_subscribe_persistent(&broker, "comfyui/local/prompt/+/result").await;
    let mut lifecycle = mqtt_subscribe_persistent(&broker, "comfyui/local/prompt/+/+").await;
    let fast = |s: &mut comfy_bridge::config::Settings| s.comfyui.reconnect_max_ms = 300;
    let daemon = Daemon::builder(&sim).mqtt(&broker).nats(&nats).with(fast).start().await;

    let requests: Vec<_> =
        (0..PROMPTS).map(|i| tokio::spawn(queue_until_answered(nats.url(), format!("fault-{i}")))).collect();

    // Faults, round after round, while the prompts run (about 1.9 s each, one after another).
    let mut rounds = 0;
    let workload_done = |sim: &Simulator| {
        let st = sim.requests();
        let posted = st.iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").count();
        posted == PROMPTS && sim_idle(sim)
    };
    while rounds < 4 || !workload_done(&sim) {
        assert!(rounds < 30, "the workload never finished");
        broker.stop();
        tokio::time::sleep(Duration::from_millis(700)).await;
        broker.resume();
        nats.stop();
        tokio::time::sleep(Duration::from_millis(700)).await;
        nats.resume();
        sim.refuse_websockets(true);
        sim.disconnect_all();
        tokio::time::sleep(Duration::from_millis(700)).await;
        sim.refuse_websockets(false);
        rounds += 1;
    }

    let mut prompt_ids = BTreeSet::new();
    for request in requests {
        let answer = request.await.expect("request task");
        assert_eq!(answer["status"], "ok", "{answer}");
        prompt_ids.insert(answer["data"]["prompt_id"].as_str().expect("prompt id").to_string());
    }
    assert_eq!(prompt_ids.len(), PROMPTS, "one prompt per request id");
    let posted = sim.requests().iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").count();
    assert_eq!(posted, PROMPTS, "retried requests did not queue twice");

    // MQTT: a persistent subscriber gets every result; a duplicate (QoS 1 redelivery) is identical.
    let mut by_prompt: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    while by_prompt.len() < PROMPTS {
        let msg = results
            .next(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("mqtt results for {:?} of {prompt_ids:?}", by_prompt.keys().collect::<Vec<_>>()));
        let v: Value = serde_json::from_slice(&msg.payload).expect("json");
        by_prompt.entry(v["prompt_id"].as_str().unwrap_or_default().to_string()).or_default().push(v);
    }
    assert_eq!(by_prompt.keys().cloned().collect::<BTreeSet<_>>(), prompt_ids);
    for (pid, copies) in &by_prompt {
        assert!(copies.iter().all(|c| c == &copies[0]), "{pid}: duplicates differ: {copies:?}");
        assert_eq!(copies[0]["status"], "success", "{pid}: {}", copies[0]);
    }

    // Lifecycle events: ComfyUI replays nothing a cut WebSocket missed, so a prompt that ran during a gap has
    // fewer; but none is ever published twice as two events: a redelivered copy carries the same `seq`.
    let mut seqs: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    while let Some(msg) = lifecycle.next(Duration::from_millis(500)).await {
        let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        if let (Some(pid), Some(kind), Some(seq)) = (v["prompt_id"].as_str(), v["type"].as_str(), v["seq"].as_u64()) {
            seqs.entry((pid.to_string(), kind.to_string())).or_default().insert(seq);
        }
    }
    let started = seqs.keys().filter(|(_, kind)| kind == "execution_start").count();
    assert!(started > 0, "some prompts ran while the bridge was connected: {seqs:?}");
    // The once-per-prompt events (`progress_state` comes many times by design).
    for ((pid, kind), seen) in seqs.iter().filter(|((_, k), _)| k != "progress_state") {
        assert_eq!(seen.len(), 1, "{pid} {kind} published as distinct events: {seen:?}");
    }

    // NATS: the capture stream holds every result too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let captured = loop {
        let captured = nats_results(&nats.url()).await;
        if captured.len() >= PROMPTS || tokio::time::Instant::now() > deadline {
            break captured;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(captured.keys().cloned().collect::<BTreeSet<_>>(), prompt_ids, "every result on nats");
    for (pid, copies) in &captured {
        assert!(copies.iter().all(|c| c == &copies[0]), "{pid}: duplicates differ");
    }
    daemon.stop().await;
}

/// Nothing running or pending in the simulator.
fn sim_idle(sim: &Simulator) -> bool {
    sim.queue_remaining() == 0
}
