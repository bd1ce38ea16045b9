//! The fleet on a real nats-server with JetStream: two simulators, two bridges (the built binary, so one can
//! be SIGKILLed), jobs submitted once to the fleet's stream.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::daemon::{simulator, SUCCESS};
use common::fleet::{fleet_request, fleet_settings, job, submit, wait_for_bridges, FleetBridge, JobWatch};
use common::NatsServer;
use serde_json::json;

const LONG: Duration = Duration::from_secs(20);

/// POST /prompt requests a simulator received.
fn posts(sim: &comfy_sim::Simulator) -> usize {
    sim.requests().iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_run_once_each_on_both_bridges_within_capacity() {
    let nats = NatsServer::start();
    let (sim1, sim2) = (simulator(SUCCESS, 4.0).await, simulator(SUCCESS, 4.0).await);
    let b1 = FleetBridge::start(fleet_settings(&sim1, &nats.url(), "gpu1", "f20"));
    let b2 = FleetBridge::start(fleet_settings(&sim2, &nats.url(), "gpu2", "f20"));
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "f20", 2, || format!("{}\n{}", b1.log(), b2.log())).await;
    let mut watch = JobWatch::start(&nats.url(), "f20").await;
    // The instances' own prompt topics: what each ComfyUI holds (from `queued` to the `result`).
    let mut prompts = common::nats_subscribe(&nats, "comfyui.*.prompt.*.*").await;
    let js = async_nats::jetstream::new(client.clone());
    for n in 0..20 {
        assert!(!submit(&js, "f20", &job(&format!("job-{n}"))).await, "a new id is no duplicate");
    }
    for n in 0..20 {
        let id = format!("job-{n}");
        watch.expect(&format!("the result of {id}"), LONG, |r, v| r && v["id"] == id.as_str()).await;
    }
    watch.settle(Duration::from_millis(1500)).await;

    let mut instances = HashSet::new();
    for n in 0..20 {
        let id = format!("job-{n}");
        let results = watch.results(&id);
        assert_eq!(results.len(), 1, "{id}: one result, got {results:#?}");
        let r = results[0];
        assert_eq!((r["state"].as_str(), r["attempt"].as_u64()), (Some("success"), Some(1)), "{r:#}");
        assert_eq!(r["result"]["status"], "success", "{r:#}");
        assert_eq!(r["result"]["request_id"], id.as_str(), "the instance's result carries the job id");
        instances.insert(r["instance"].as_str().expect("instance").to_string());
        let prompts: HashSet<&str> = watch
            .seen
            .iter()
            .filter(|(_, v)| v["id"] == id.as_str())
            .filter_map(|(_, v)| v["prompt_id"].as_str())
            .collect();
        assert_eq!(prompts.len(), 1, "{id} ran once: {prompts:?}");
    }
    assert_eq!(instances.len(), 2, "both bridges took jobs: {instances:?}");
    assert_eq!(posts(&sim1) + posts(&sim2), 20, "each job was queued on a ComfyUI once");

    // Never more than `capacity` (1) fleet prompts in a bridge's ComfyUI at once.
    let mut active: HashMap<String, HashSet<String>> = HashMap::new();
    let mut ended = 0;
    while ended < 20 {
        let m = prompts.next(Duration::from_secs(5)).await.expect("every prompt's state and result");
        let levels: Vec<&str> = m.subject.split('.').collect();
        let (inst, pid, last) = (levels[1], levels[3], levels[4]);
        let set = active.entry(inst.to_string()).or_default();
        match last {
            "state" => {
                set.insert(pid.to_string());
            }
            "result" => {
                set.remove(pid);
                ended += 1;
            }
            _ => {}
        }
        assert!(set.len() <= 1, "{inst}'s ComfyUI held {set:?} at once");
    }

    // `status` lists both bridges with their capacity.
    let status = fleet_request(&client, "f20", "status", json!({"id": "s1"})).await;
    assert_eq!(status["id"], "s1");
    let mut listed: Vec<&str> =
        status["data"]["bridges"].as_array().expect("bridges").iter().filter_map(|b| b["instance"].as_str()).collect();
    listed.sort_unstable();
    assert_eq!(listed, ["gpu1", "gpu2"], "{status:#}");
    assert!(status["data"]["bridges"].as_array().into_iter().flatten().all(|b| b["capacity"] == 1), "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_bridge_is_killed_completes_on_the_other_as_attempt_two() {
    let nats = NatsServer::start();
    let (sim1, sim2) = (simulator(SUCCESS, 0.3).await, simulator(SUCCESS, 0.3).await);
    let mut bridges = [("gpu1", &sim1), ("gpu2", &sim2)]
        .map(|(inst, sim)| FleetBridge::start(fleet_settings(sim, &nats.url(), inst, "fk")));
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "fk", 2, || bridges.iter().map(FleetBridge::log).collect()).await;
    let mut watch = JobWatch::start(&nats.url(), "fk").await;
    let js = async_nats::jetstream::new(client.clone());
    submit(&js, "fk", &job("victim")).await;
    let running = watch.expect("the job running", LONG, |r, v| !r && v["state"] == "running").await;
    let first = running["instance"].as_str().expect("instance").to_string();
    let victim = bridges.iter_mut().find(|b| b.instance == first).expect("that bridge");
    victim.kill();

    let result = watch.expect("the result", LONG, |r, v| r && v["id"] == "victim").await;
    assert_eq!(result["state"], "success", "{result:#}");
    assert_eq!(result["attempt"], 2, "{result:#}");
    assert_ne!(result["instance"], first.as_str(), "it ran on the other bridge: {result:#}");
    watch.settle(Duration::from_secs(3)).await;
    assert_eq!(watch.results("victim").len(), 1, "one result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_get_one_error_result_and_duplicates_run_once() {
    let nats = NatsServer::start();
    let sim = simulator(SUCCESS, 4.0).await;
    let bridge = FleetBridge::start(fleet_settings(&sim, &nats.url(), "gpu1", "fi"));
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "fi", 1, || bridge.log()).await;
    let mut watch = JobWatch::start(&nats.url(), "fi").await;
    let js = async_nats::jetstream::new(client.clone());

    submit(&js, "fi", &json!({"id": "bad", "template": "no_such_template"})).await;
    let bad = watch.expect("the invalid job's result", LONG, |r, v| r && v["id"] == "bad").await;
    assert_eq!(bad["state"], "error", "{bad:#}");
    assert_eq!(bad["result"]["error"]["code"], "unknown_template", "{bad:#}");

    assert!(!submit(&js, "fi", &job("twice")).await);
    assert!(submit(&js, "fi", &job("twice")).await, "JetStream drops the second by Nats-Msg-Id");
    watch.expect("the result", LONG, |r, v| r && v["id"] == "twice").await;
    // The same id again, past JetStream's duplicate check (no header): the job record says it ran.
    client.publish("comfyui.fleet.fi.queue", job("twice").to_string().into()).await.expect("publish");
    client.flush().await.expect("flush");

    // A core NATS request on the submit subject gets JetStream's publish ack (so `nats req` works).
    let reply = client.request("comfyui.fleet.fi.queue", job("by-request").to_string().into()).await.expect("reply");
    let ack = common::json(&reply.payload);
    assert_eq!(ack["stream"], "COMFY_FLEET_FI", "{ack:#}");
    assert!(ack["seq"].as_u64().is_some(), "{ack:#}");
    watch.expect("the requested job's result", LONG, |r, v| r && v["id"] == "by-request").await;

    // Well past ack_wait (2 s): nothing is redelivered, nothing runs again.
    watch.settle(Duration::from_secs(5)).await;
    assert_eq!(watch.results("bad").len(), 1, "the invalid job is not redelivered");
    assert_eq!(watch.results("twice").len(), 1, "one run");
    assert_eq!(posts(&sim), 2, "only `twice` (once) and `by-request` reached ComfyUI");
    let mut stream = js.get_stream("COMFY_FLEET_FI").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 0, "the work queue is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_ends_a_job_with_an_error_and_cancel_reaches_waiting_and_running_jobs() {
    let nats = NatsServer::start();
    let (sim1, sim2) = (simulator(SUCCESS, 0.3).await, simulator(SUCCESS, 0.3).await);
    let configure = |sim, inst| {
        let mut s = fleet_settings(sim, &nats.url(), inst, "fm");
        s.fleet.max_deliver = 1;
        s
    };
    let mut bridges = [FleetBridge::start(configure(&sim1, "gpu1")), FleetBridge::start(configure(&sim2, "gpu2"))];
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "fm", 2, || bridges.iter().map(FleetBridge::log).collect()).await;
    let mut watch = JobWatch::start(&nats.url(), "fm").await;
    let js = async_nats::jetstream::new(client.clone());

    // Cancel before anyone claims it: the job never runs.
    let cancelled = fleet_request(&client, "fm", "cancel", json!({"id": "c0", "job_id": "early"})).await;
    assert_eq!(cancelled["data"], json!({"job_id": "early", "cancelled": true, "was": "waiting"}), "{cancelled:#}");
    submit(&js, "fm", &job("early")).await;

    submit(&js, "fm", &job("doomed")).await;
    let running =
        watch.expect("doomed running", LONG, |r, v| !r && v["id"] == "doomed" && v["state"] == "running").await;
    let first = running["instance"].as_str().expect("instance").to_string();
    bridges.iter_mut().find(|b| b.instance == first).expect("bridge").kill();
    let doomed = watch.expect("doomed's result", LONG, |r, v| r && v["id"] == "doomed").await;
    assert_eq!(doomed["state"], "error", "{doomed:#}");
    assert_eq!(doomed["result"]["error"]["code"], "max_deliver", "{doomed:#}");
    let message = doomed["result"]["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("fleet.max_deliver = 1"), "it says why: {message}");

    // A running job: cancelled through its bridge, it ends interrupted.
    submit(&js, "fm", &job("stop-me")).await;
    watch.expect("stop-me running", LONG, |r, v| !r && v["id"] == "stop-me" && v["state"] == "running").await;
    let answer = fleet_request(&client, "fm", "cancel", json!({"job_id": "stop-me"})).await;
    assert_eq!(
        (answer["status"].as_str(), answer["data"]["was"].as_str()),
        (Some("ok"), Some("running")),
        "{answer:#}"
    );
    let stopped = watch.expect("stop-me's result", LONG, |r, v| r && v["id"] == "stop-me").await;
    assert_eq!(stopped["state"], "interrupted", "{stopped:#}");

    watch.settle(Duration::from_secs(1)).await;
    assert_eq!(watch.results("early").len(), 1, "the cancelled job's one result, at cancel time");
    assert!(watch.seen.iter().all(|(_, v)| v["id"] != "early" || v["state"] == "cancelled"), "early never ran");
    let unknown = fleet_request(&client, "fm", "nope", json!({})).await;
    assert_eq!(unknown["error"]["code"], "unknown_command", "{unknown:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_resumes_the_job_its_comfyui_still_runs() {
    let nats = NatsServer::start();
    let sim = simulator(SUCCESS, 0.3).await;
    let mut bridge = FleetBridge::start(fleet_settings(&sim, &nats.url(), "gpu1", "fr"));
    let client = common::requester::nats_client(&nats).await;
    wait_for_bridges(&client, "fr", 1, || bridge.log()).await;
    let mut watch = JobWatch::start(&nats.url(), "fr").await;
    let js = async_nats::jetstream::new(client.clone());
    submit(&js, "fr", &job("survivor")).await;
    watch.expect("running", LONG, |r, v| !r && v["state"] == "running").await;
    bridge.restart();
    let result = watch.expect("the result", LONG, |r, v| r && v["id"] == "survivor").await;
    assert_eq!(
        (result["state"].as_str(), result["attempt"].as_u64()),
        (Some("success"), Some(1)),
        "{result:#}\n{}",
        bridge.log()
    );
    watch.settle(Duration::from_secs(4)).await;
    assert_eq!(watch.results("survivor").len(), 1);
    assert_eq!(posts(&sim), 1, "resumed, not run again");
    let mut stream = js.get_stream("COMFY_FLEET_FR").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 0, "the job was acked");
}
