//! The fleet on a 3-node nats-server cluster with `fleet.replicas = 3`: a server killed mid-run and
//! restarted costs no job and runs none twice.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::daemon::{simulator, SUCCESS};
use common::fleet::{fleet_settings, job, submit, wait_for_bridges, FleetBridge, JobWatch};
use common::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_dying_mid_run_costs_no_job_and_runs_none_twice() {
    let mut cluster = NatsCluster::start();
    let (sim1, sim2) = (simulator(SUCCESS, 2.0).await, simulator(SUCCESS, 2.0).await);
    let settings = |sim, inst| {
        let mut s = fleet_settings(sim, &cluster.urls(), inst, "fc");
        s.fleet.replicas = 3;
        // Longer than a failover takes on a loaded 2-core machine (the bucket answered "no stream" for up to
        // 6 s in CI): an outage longer than `ack_wait_ms` lets a job start twice, README's known limit.
        s.fleet.ack_wait_ms = 10_000;
        s
    };
    let bridges = [FleetBridge::start(settings(&sim1, "gpu1")), FleetBridge::start(settings(&sim2, "gpu2"))];
    // The test's own clients stay on the node that is never killed.
    let survivor = format!("nats://127.0.0.1:{}", cluster.ports[2]);
    let client = async_nats::connect(&survivor).await.expect("connect");
    let logs = || bridges.iter().map(FleetBridge::log).collect::<String>();
    let _on_failure = common::fleet::LogsOnPanic(&bridges);
    wait_for_bridges(&client, "fc", 2, logs).await;
    let mut watch = JobWatch::start(&survivor, "fc").await;
    let js = async_nats::jetstream::new(client.clone());
    let ids: Vec<String> = (0..12).map(|n| format!("c-{n}")).collect();
    for id in &ids {
        submit(&js, "fc", &job(id)).await;
    }
    watch.expect("a first result", Duration::from_secs(20), |r, _| r).await;
    cluster.kill(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(0);
    // Every job ends `success` in the jobs bucket (JetStream, R3). Its `.result` is a core NATS message: one
    // published while the bridge's server is the one being killed can be lost with that connection, so it
    // is seen at most once, and the record is what says the job was not lost.
    let mut instances = HashSet::new();
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        let record = loop {
            // The bucket may not answer yet while the cluster elects leaders again.
            let entry = match js.get_key_value("COMFY_FLEET_FC_JOBS").await {
                Ok(jobs) => jobs.get(id).await.ok().flatten(),
                Err(_) => None,
            };
            let record: serde_json::Value = entry.map_or(serde_json::Value::Null, |e| common::json(&e));
            if record["state"] == "success" {
                break record;
            }
            assert!(tokio::time::Instant::now() < deadline, "{id} did not end: {record}\n{}", logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        instances.insert(record["instance"].to_string());
    }
    watch.settle(Duration::from_secs(4)).await;
    for id in &ids {
        let results = watch.results(id);
        assert!(results.len() <= 1, "{id}: one result at most: {results:#?}\n{}", logs());
        assert!(results.iter().all(|r| r["state"] == "success"), "{results:#?}");
    }
    let posts =
        |sim: &comfy_sim::Simulator| sim.requests().iter().filter(|(m, p, _)| m == "POST" && p == "/prompt").count();
    assert_eq!(posts(&sim1) + posts(&sim2), ids.len(), "no job ran twice\n{}", logs());
    assert_eq!(instances.len(), 2, "both bridges worked");
}
