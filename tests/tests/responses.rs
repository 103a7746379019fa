//! The OpenAI Responses API end to end: the real gateway with auth on, real
//! Python workers, and the official `openai` package as the client.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use infergate_e2e::{Gateway, python, root};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

/// API keys of two tenants.
const KEY: &str = "ig_e2e-responses-tenant-one-aaaaaaaaaaaaaaaaaaaaaa";
const OTHER_KEY: &str = "ig_e2e-responses-tenant-two-bbbbbbbbbbbbbbbbbbbbbb";

fn config(pools: &str) -> String {
    use sha2::Digest;
    let digest = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    format!(
        "[auth]\nenabled = true\n\
         [[auth.keys]]\nid = \"one\"\nsha256 = \"{}\"\ntenant = \"t1\"\n\
         [[auth.keys]]\nid = \"two\"\nsha256 = \"{}\"\ntenant = \"t2\"\n{pools}",
        digest(KEY),
        digest(OTHER_KEY)
    )
}

const ECHO_POOL: &str = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n";

#[test]
fn the_openai_package_drives_responses_plain_streamed_stored_and_per_tenant() {
    let pools = format!("{ECHO_POOL}[[pools]]\nname = \"rag\"\nclass = \"infergate_worker.examples.rag:Rag\"\n");
    let gw = Gateway::start(&config(&pools)).unwrap();
    gw.wait_ready(Duration::from_secs(180)).unwrap();
    let out = Command::new(python())
        .arg(root().join("tests/clients/openai_responses.py"))
        .args([&gw.url("/v1"), KEY, OTHER_KEY])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "openai client failed:\n{stdout}\n{stderr}\n{}",
        gw.log_text()
    );
}

#[test]
fn a_worker_killed_mid_stream_ends_the_response_with_response_failed_not_a_completion() {
    let gw = Gateway::start(&config(ECHO_POOL)).unwrap();
    let victim = gw.worker_pid("echo-0").unwrap();
    let text = (0..500).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let mut resp = reqwest::blocking::Client::new()
        .post(gw.url("/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "echo", "input": text, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut killed = false;
    loop {
        let n = resp.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        if !killed && seen.contains("\"delta\":\" w3\"") {
            kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
            killed = true;
        }
    }
    let tail: String = seen.chars().rev().take(600).collect::<String>().chars().rev().collect();
    assert!(killed, "the stream ended before the fourth word:\n{tail}");
    assert!(seen.contains("event: response.failed\ndata: {"), "no response.failed; the stream ended with:\n{tail}");
    assert!(tail.contains("\"status\":\"failed\""), "{tail}");
    assert!(!seen.contains("response.completed") && !seen.contains("response.output_text.done"), "{tail}");
}

/// With `redis.url` set, stored responses live in Redis: a response made on
/// one replica is read and continued on another, still per tenant.
#[test]
fn replicas_sharing_redis_share_stored_responses() {
    let redis = infergate_e2e::Redis::start().unwrap();
    let shared = format!("[redis]\nurl = \"{}\"\n{ECHO_POOL}", redis.url());
    let a = Gateway::start(&config(&shared)).unwrap();
    let b = Gateway::start_beside(&a, &config(&shared)).unwrap();
    let client = reqwest::blocking::Client::new();
    let post = |gw: &Gateway, key: &str, body: serde_json::Value| {
        let resp = client.post(gw.url("/v1/responses")).bearer_auth(key).json(&body).send().unwrap();
        (resp.status().as_u16(), resp.json::<serde_json::Value>().unwrap())
    };
    let (status, first) = post(&a, KEY, json!({"model": "echo", "input": "made on a"}));
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().unwrap();
    let got = client.get(b.url(&format!("/v1/responses/{id}"))).bearer_auth(KEY).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<serde_json::Value>().unwrap()["output"], first["output"]);
    let (status, then) = post(&b, KEY, json!({"model": "echo", "input": "continued on b", "previous_response_id": id}));
    assert_eq!((status, then["output"][0]["content"][0]["text"].as_str()), (200, Some("continued on b")), "{then}");
    assert!(then["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64(), "{then}");
    let (status, refused) = post(&b, OTHER_KEY, json!({"model": "echo", "input": "x", "previous_response_id": id}));
    assert_eq!(status, 404, "{refused}");
}
