//! Resilience end to end: real gateway, real Python workers, real faults.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::{Duration, Instant};

use infergate_e2e::{Gateway, RemoteWorker};
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

#[test]
fn a_100_ms_deadline_on_a_1_s_model_is_504_within_150_ms_and_the_worker_stops() {
    let gw = Gateway::start("[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n").unwrap();
    let client = reqwest::blocking::Client::new();
    let body = |delay_ms: u64| {
        json!({"parameters": {"delay_ms": delay_ms},
               "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
    };
    // Warm the connection so the figure is the deadline's, not a first connect's.
    assert_eq!(client.post(gw.url("/v2/models/echo/infer")).json(&body(0)).send().unwrap().status(), 200);
    let mut took = Vec::new();
    for i in 0..3 {
        let rid = format!("deadline-100-{i}");
        let started = Instant::now();
        let resp = client
            .post(gw.url("/v2/models/echo/infer"))
            .header("x-request-timeout", "100ms")
            .header("x-request-id", &rid)
            .json(&body(1000))
            .send()
            .unwrap();
        took.push(started.elapsed());
        assert_eq!(resp.status(), 504);
        let stopped = gw.wait_log(0, Duration::from_secs(3), |v| {
            v["message"].as_str().is_some_and(|m| m.contains("echo stopped early") && m.contains(&rid))
        });
        assert!(stopped.is_some(), "the worker did not report the cancellation of {rid}");
    }
    eprintln!("100 ms deadline against 1 s of work answered after {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_millis(150)), "{took:?}");
}

#[test]
fn a_hung_worker_times_out_at_the_deadline_is_ejected_and_comes_back_after_sigcont() {
    let config = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\nworkers = 2\n\
                  outlier = { consecutive = 2, base_ejection = \"1s\" }\n";
    let gw = Gateway::start_logging(config, "info,infergate::pool=debug").unwrap();
    let hung = gw.worker_pid("echo-1").unwrap();
    let client = reqwest::blocking::Client::new();
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let send = || {
        let started = Instant::now();
        let status = client
            .post(gw.url("/v2/models/echo/infer"))
            .header("x-request-timeout", "200ms")
            .json(&body)
            .send()
            .unwrap()
            .status()
            .as_u16();
        (status, started.elapsed())
    };
    let mark = gw.log().len();
    kill(Pid::from_raw(hung), Signal::SIGSTOP).unwrap();
    // Calls that land on the hung worker end at their deadline; it is ejected.
    let end = Instant::now() + Duration::from_secs(10);
    let mut timeouts = 0;
    while gw.log().iter().skip(mark).all(|v| !(v["message"] == "worker ejected" && v["worker"] == "echo-1")) {
        assert!(Instant::now() < end, "echo-1 not ejected within 10 s");
        let (status, took) = send();
        if status == 504 {
            timeouts += 1;
            assert!(took < Duration::from_millis(300), "a call to the hung worker took {took:?}");
        } else {
            assert_eq!(status, 200);
        }
    }
    eprintln!("echo-1 hung: ejected after {timeouts} timed-out call(s)");
    // Traffic moves on: everything is answered by the other worker.
    for _ in 0..30 {
        assert_eq!(send().0, 200);
    }
    kill(Pid::from_raw(hung), Signal::SIGCONT).unwrap();
    // Probes only happen when calls arrive: keep sending while waiting.
    let end = Instant::now() + Duration::from_secs(10);
    let mut readmitted = false;
    while !readmitted && Instant::now() < end {
        assert_eq!(send().0, 200);
        readmitted = gw
            .log()
            .iter()
            .skip(mark)
            .any(|v| v["message"] == "worker re-admitted after a successful probe" && v["worker"] == "echo-1");
    }
    assert!(readmitted, "echo-1 not re-admitted after SIGCONT");
}

#[test]
fn when_every_worker_fails_retries_stay_within_the_budget_and_clients_get_503_in_time() {
    let workers: Vec<RemoteWorker> = (0..2).map(|_| RemoteWorker::start("faulty:Unavailable").unwrap()).collect();
    let addresses: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.addr())).collect();
    // The circuit is set out of the way so the retry budget alone bounds the attempts.
    let config = format!(
        "[[pools]]\nname = \"broken\"\naddresses = [{}]\nidempotent = true\n\
         retries = {{ max = 2, ratio = 0.2, floor = 10 }}\ncircuit = {{ failures = 100000 }}\n",
        addresses.join(", ")
    );
    let gw = Gateway::start_logging(&config, "info,infergate::pool=debug").unwrap();
    let mark = gw.log().len();
    let client = reqwest::blocking::Client::new();
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let requests = 100;
    for _ in 0..requests {
        let started = Instant::now();
        let resp = client
            .post(gw.url("/v2/models/broken/infer"))
            .header("x-request-timeout", "1s")
            .json(&body)
            .send()
            .unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        assert!(took < Duration::from_secs(1), "answered after {took:?}, past the deadline");
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = gw.log();
    let attempts = log.iter().skip(mark).filter(|v| v["message"] == "call sent").count();
    let retries = log.iter().skip(mark).filter(|v| v["message"] == "retrying").count();
    eprintln!("{requests} requests to a pool where every call fails: {attempts} attempts, {retries} retries");
    assert!(attempts as f64 <= f64::from(requests) * 1.2 + 10.0, "{attempts} attempts for {requests} requests");
    assert!(retries > 0, "retries happened at all");
}
