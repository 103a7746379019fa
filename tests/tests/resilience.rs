//! Resilience end to end: real gateway, real Python workers, real faults.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::{Duration, Instant};

use infergate_e2e::Gateway;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

#[test]
fn sigkill_of_one_of_four_idempotent_workers_under_load_loses_no_request() {
    let config = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\nworkers = 4\n\
                  idempotent = true\n";
    let gw = Gateway::start_logging(config, "info,infergate::pool=debug").unwrap();
    let victim = gw.worker_pid("echo-1").unwrap();
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let stop_at = Instant::now() + Duration::from_secs(6);
    let statuses = std::sync::Mutex::new(Vec::<u16>::new());
    let mut mark = 0;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let client = reqwest::blocking::Client::new();
                while Instant::now() < stop_at {
                    let resp = client.post(gw.url("/v2/models/echo/infer")).json(&body).send().unwrap();
                    statuses.lock().unwrap().push(resp.status().as_u16());
                }
            });
        }
        std::thread::sleep(Duration::from_secs(1));
        mark = gw.log().len();
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let t0 = Instant::now();
        let back = gw
            .wait_log(mark, Duration::from_secs(5), |v| v["message"] == "worker is SERVING" && v["worker"] == "echo-1");
        assert!(back.is_some(), "echo-1 not serving again within 5 s");
        eprintln!("echo-1 serving again {:?} after SIGKILL", t0.elapsed());
    });
    let statuses = statuses.into_inner().unwrap();
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    let retries = gw.log().iter().skip(mark).filter(|v| v["message"] == "retrying").count();
    eprintln!("{} requests, {} failed, {retries} retried after the kill", statuses.len(), failed.len());
    assert!(failed.is_empty(), "client-visible errors: {failed:?}");
    // The restarted worker takes calls again.
    let served_after =
        gw.log().iter().skip(mark).filter(|v| v["message"] == "call sent" && v["worker"] == "echo-1").count();
    let restarted_at = gw
        .log()
        .iter()
        .skip(mark)
        .position(|v| v["message"] == "worker is SERVING" && v["worker"] == "echo-1")
        .unwrap();
    let after_restart = gw
        .log()
        .iter()
        .skip(mark + restarted_at)
        .filter(|v| v["message"] == "call sent" && v["worker"] == "echo-1")
        .count();
    assert!(after_restart > 10, "echo-1 got {after_restart} calls after its restart ({served_after} after the kill)");
}
