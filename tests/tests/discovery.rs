//! Workers found by DNS: several worker processes on loopback addresses
//! behind a name served by a DNS server the test controls; records added and
//! removed while the gateway runs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use infergate_e2e::{Dns, Gateway, RemoteWorker};
use serde_json::json;

const ECHO: &str = "infergate_worker.examples.echo:Echo";
const NAME: &str = "workers.infergate.test";

/// Calls sent per worker id in log lines after `mark`.
fn calls_by_worker(gw: &Gateway, mark: usize) -> HashMap<String, usize> {
    let mut calls = HashMap::new();
    for v in gw.log().iter().skip(mark).filter(|v| v["message"] == "call sent") {
        *calls.entry(v["worker"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    calls
}

fn send(gw: &Gateway, client: &reqwest::blocking::Client, n: usize) {
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    for _ in 0..n {
        let resp = client.post(gw.url("/v2/models/echo/infer")).json(&body).send().unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().unwrap_or_default());
    }
}

/// Keep sending until `done` holds for the log after `mark`, at most `within`.
fn send_until(gw: &Gateway, mark: usize, within: Duration, done: impl Fn(&HashMap<String, usize>) -> bool) -> bool {
    let client = reqwest::blocking::Client::new();
    let end = Instant::now() + within;
    while Instant::now() < end {
        send(gw, &client, 10);
        if done(&calls_by_worker(gw, mark)) {
            return true;
        }
    }
    false
}

#[test]
fn workers_behind_a_dns_name_join_and_leave_without_a_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let _workers: Vec<RemoteWorker> = hosts.iter().map(|h| RemoteWorker::start_on(ECHO, h, port).unwrap()).collect();
    let id = |host: &str| format!("echo-{host}:{port}");
    let dns = Dns::start().unwrap();
    dns.set(NAME, &hosts[..2]).unwrap();
    let config = format!(
        "[discovery]\nnameservers = [\"{}\"]\n\
         [[pools]]\nname = \"echo\"\ndiscover = {{ dns = \"{NAME}:{port}\", every = \"200ms\" }}\n\
         [cache]\nenabled = false\n",
        dns.addr()
    );
    let gw = Gateway::start_logging(&config, "info,infergate::pool=debug").unwrap();

    // Both records are workers, and both take calls.
    let mark = gw.log().len();
    let both = send_until(&gw, mark, Duration::from_secs(10), |c| {
        c.get(&id(hosts[0])).is_some_and(|n| *n > 5) && c.get(&id(hosts[1])).is_some_and(|n| *n > 5)
    });
    assert!(both, "calls by worker: {:?}\n{}", calls_by_worker(&gw, mark), gw.log_text());
    assert!(!calls_by_worker(&gw, mark).contains_key(&id(hosts[2])), "a worker not in DNS got calls");

    // A record added: a new worker, found and used without a restart.
    let mark = gw.log().len();
    let added = Instant::now();
    dns.set(NAME, &hosts).unwrap();
    let joined = send_until(&gw, mark, Duration::from_secs(10), |c| c.get(&id(hosts[2])).is_some_and(|n| *n > 5));
    assert!(joined, "{} got no calls after joining DNS:\n{}", id(hosts[2]), gw.log_text());
    eprintln!("a worker added to DNS took calls after {:?}", added.elapsed());

    // A record removed: that worker gets no new calls once the gateway saw it go.
    dns.set(NAME, &hosts[1..]).unwrap();
    let left = gw.wait_log(mark, Duration::from_secs(5), |v| v["message"] == "worker left DNS; no new calls");
    let (at, line) = left.unwrap_or_else(|| panic!("the removal was not noticed:\n{}", gw.log_text()));
    assert_eq!(line["worker"], id(hosts[0]));
    let after = gw.log().len().max(at + 1);
    send(&gw, &reqwest::blocking::Client::new(), 60);
    let calls = calls_by_worker(&gw, after);
    assert!(!calls.contains_key(&id(hosts[0])), "a worker gone from DNS still got calls: {calls:?}");
    assert!(calls.values().sum::<usize>() >= 60, "{calls:?}");
    let status: serde_json::Value = reqwest::blocking::get(gw.url("/readyz")).unwrap().json().unwrap_or_default();
    eprintln!("readyz after the changes: {status}");
}
