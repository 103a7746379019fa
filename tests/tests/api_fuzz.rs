//! The REST edge under generated requests: Schemathesis reads the gateway's
//! own `/openapi.json` and sends valid and invalid requests to every route
//! of `infergate serve` with its default config. No answer may be a 5xx,
//! every answer must match its documented status, content type, headers and
//! schema, and invalid input must be refused. (Schema-valid requests may
//! still be refused for what a schema cannot say: a model name that does not
//! exist, an image the model cannot take.) The default config has no queue,
//! so its queue routes answer 404 `queue-not-configured`; a second run sends
//! the queue's routes to a gateway whose queue is on a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;
use std::time::Duration;

use infergate_e2e::{ECHO_POOL, Gateway, Redis, python};

#[test]
fn generated_requests_get_documented_answers_and_never_a_server_error() {
    let gw = Gateway::start_default(Duration::from_secs(180)).unwrap();
    // One run per model, so that the /v2 routes reach a real model.
    for model in ["echo", "sentiment", "minilm"] {
        fuzz(&gw, model, &[]);
    }
}

#[test]
fn the_queue_routes_under_generated_requests_on_a_real_queue() {
    let redis = Redis::start().unwrap();
    let gw = Gateway::start(&format!("{ECHO_POOL}[queue]\nredis_url = \"{}\"\n", redis.url())).unwrap();
    fuzz(&gw, "echo", &["--include-tag", "queue"]);
}

/// Schemathesis on `gw`'s own document, with `model` as every path's model.
fn fuzz(gw: &Gateway, model: &str, args: &[&str]) {
    let schemathesis = python().with_file_name("schemathesis");
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("infergate-fuzz-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!("[parameters]\n\"path.model\" = \"{model}\"\n\"path.version\" = \"1\"\n");
    std::fs::write(dir.join("schemathesis.toml"), config).unwrap();
    let out = Command::new(&schemathesis)
        .arg("run")
        .arg(gw.url("/openapi.json"))
        .args(["--url", &gw.url("")])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "25", "--seed", "20261121", "--request-timeout", "30", "--no-color"])
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().find(|l| l.trim_start().starts_with(char::is_numeric) && l.contains(" generated"));
    let summary = summary.unwrap_or_default().trim();
    eprintln!("{model} {args:?}: {summary}");
    assert!(out.status.success(), "{model}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(summary.contains("generated"), "no test cases ran:\n{stdout}");
}
