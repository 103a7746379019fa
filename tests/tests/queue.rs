//! Queued inference end to end: a private redis-server, real gateways and
//! Python workers. Async requests (`Prefer: respond-async`), the OpenAI
//! Batch API driven by the official `openai` package, two replicas sharing
//! the queue while one is killed, interactive latency while a large batch
//! drains, and Redis stopped mid-batch.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use infergate_e2e::{Gateway, MINILM_POOL, Redis, python, root};
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// API keys of two tenants.
const KEY: &str = "ig_e2e-queue-tenant-one-aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const OTHER_KEY: &str = "ig_e2e-queue-tenant-two-bbbbbbbbbbbbbbbbbbbbbbbbbbbb";

const ECHO_POOL: &str = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n";

/// Auth with two tenants' keys, the queue on `redis`, and `rest`.
fn config(redis: &Redis, rest: &str) -> String {
    use sha2::Digest;
    let digest = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    format!(
        "[auth]\nenabled = true\n\
         [[auth.keys]]\nid = \"one\"\nsha256 = \"{}\"\ntenant = \"t1\"\n\
         [[auth.keys]]\nid = \"two\"\nsha256 = \"{}\"\ntenant = \"t2\"\n\
         [queue]\nredis_url = \"{}\"\n{rest}",
        digest(KEY),
        digest(OTHER_KEY),
        redis.url()
    )
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let text = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    text.lines().filter(|l| l.starts_with(line_start)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Wait until the sum of `line_start` series reaches `at_least`.
fn wait_metric(gw: &Gateway, line_start: &str, at_least: f64) {
    let end = Instant::now() + Duration::from_secs(10);
    while metric(gw, line_start) < at_least {
        assert!(Instant::now() < end, "{line_start} stayed below {at_least}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An OIP infer body for echo asking for `delay_ms` of work.
fn echo_infer(delay_ms: u64, value: i64) -> Value {
    json!({
        "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [value]}],
        "parameters": {"delay_ms": delay_ms}
    })
}

/// Poll `GET location` until it is no longer 202; the final response.
fn poll(gw: &Gateway, key: &str, location: &str, within: Duration) -> reqwest::blocking::Response {
    let end = Instant::now() + within;
    loop {
        let resp = client().get(gw.url(location)).bearer_auth(key).send().unwrap();
        if resp.status() != 202 {
            return resp;
        }
        assert!(Instant::now() < end, "{location} still pending after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn submit(gw: &Gateway, key: &str, path: &str, body: &Value) -> (String, Value) {
    let resp =
        client().post(gw.url(path)).bearer_auth(key).header("prefer", "respond-async").json(body).send().unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().unwrap_or_default());
    assert_eq!(resp.headers()["preference-applied"], "respond-async");
    assert_eq!(resp.headers()["retry-after"], "1");
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    (location, resp.json().unwrap())
}

#[test]
fn the_openai_package_runs_batches_that_answer_as_the_synchronous_calls_do_per_tenant() {
    let redis = Redis::start().unwrap();
    let gw = Gateway::start(&config(&redis, &format!("{ECHO_POOL}{MINILM_POOL}"))).unwrap();
    let out = Command::new(python())
        .arg(root().join("tests/clients/openai_batch.py"))
        .args([&gw.url("/v1"), KEY, OTHER_KEY])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.trim() == "ok", "openai client failed:\n{stdout}\n{stderr}");
    assert!(metric(&gw, "infergate_queue_results_stored_total") >= 1020.0);
    assert!(metric(&gw, "infergate_queue_entries_total{outcome=\"done\"}") >= 1020.0);
}

#[test]
fn an_async_request_answers_as_the_synchronous_one_and_can_be_cancelled_or_expire() {
    let redis = Redis::start().unwrap();
    // One queued request at a time, and a short wait in the queue.
    let gw = Gateway::start(&config(
        &redis,
        &format!("max_running = 1\nasync_expiry = \"1500ms\"\n{ECHO_POOL}{MINILM_POOL}"),
    ))
    .unwrap();
    let body = json!({"model": "minilm", "input": ["the queue", "drains bursts"]});

    // The same answer as the synchronous call: status, type and body.
    let (location, status) = submit(&gw, KEY, "/v1/embeddings", &body);
    assert!(location.starts_with("/v1/async/async_"), "{location}");
    assert_eq!(status["status"], "queued");
    let done = poll(&gw, KEY, &location, Duration::from_secs(30));
    assert_eq!(done.status(), 200);
    assert_eq!(done.headers()["x-async-status"], "done");
    assert_eq!(done.headers()["content-type"], "application/json");
    let queued: Value = done.json().unwrap();
    let sync: Value = client()
        .post(gw.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .header("cache-control", "no-cache")
        .json(&body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(queued["data"].as_array().unwrap().len(), 2);
    for (a, b) in queued["data"].as_array().unwrap().iter().zip(sync["data"].as_array().unwrap()) {
        let (a, b) = (a["embedding"].as_array().unwrap(), b["embedding"].as_array().unwrap());
        let worst = a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "vectors differ by {worst}");
    }
    // An error is the synchronous error: status and problem.
    let (location, _) = submit(&gw, KEY, "/v1/embeddings", &json!({"model": "no-such-model", "input": "x"}));
    let failed = poll(&gw, KEY, &location, Duration::from_secs(10));
    assert_eq!(failed.status(), 404);
    assert_eq!(failed.headers()["x-async-status"], "failed");
    assert_eq!(failed.json::<Value>().unwrap()["type"], "urn:infergate:error:model-not-found");
    // The same idempotency key names the same request.
    let once = || {
        let resp = client()
            .post(gw.url("/v2/models/echo/infer"))
            .bearer_auth(KEY)
            .header("prefer", "respond-async")
            .header("idempotency-key", "nightly-1")
            .json(&echo_infer(0, 7))
            .send()
            .unwrap();
        resp.headers()["location"].to_str().unwrap().to_owned()
    };
    assert_eq!(once(), once());

    // Behind a request that takes 2 s, one queued request is cancelled and
    // another expires in the queue.
    let (slow, _) = submit(&gw, KEY, "/v2/models/echo/infer", &echo_infer(2000, 1));
    let (cancelled, _) = submit(&gw, KEY, "/v2/models/echo/infer", &echo_infer(0, 2));
    let (expiring, _) = submit(&gw, KEY, "/v2/models/echo/infer", &echo_infer(0, 3));
    let other = client().delete(gw.url(&cancelled)).bearer_auth(OTHER_KEY).send().unwrap();
    assert_eq!(other.status(), 404, "another tenant cannot cancel it");
    let cancel = client().delete(gw.url(&cancelled)).bearer_auth(KEY).send().unwrap();
    assert_eq!(cancel.status(), 200);
    assert_eq!(cancel.json::<Value>().unwrap()["status"], "cancelled");
    let slow = poll(&gw, KEY, &slow, Duration::from_secs(30));
    assert_eq!(slow.status(), 200);
    assert_eq!(slow.json::<Value>().unwrap()["outputs"][0]["data"], json!([1]));
    let gone = poll(&gw, KEY, &cancelled, Duration::from_secs(10));
    assert_eq!(gone.status(), 410);
    assert_eq!(gone.headers()["x-async-status"], "cancelled");
    let expired = poll(&gw, KEY, &expiring, Duration::from_secs(10));
    assert_eq!(expired.status(), 410);
    assert_eq!(expired.headers()["x-async-status"], "expired");
    let again = client().delete(gw.url(&location)).bearer_auth(KEY).send().unwrap();
    assert_eq!(again.status(), 409, "a finished request cannot be cancelled");

    // Another tenant's ids name nothing; streams are not queued.
    assert_eq!(client().get(gw.url(&location)).bearer_auth(OTHER_KEY).send().unwrap().status(), 404);
    assert_eq!(client().get(gw.url("/v1/async/async_000")).bearer_auth(KEY).send().unwrap().status(), 404);
    let stream = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("prefer", "respond-async")
        .json(&json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .unwrap();
    assert_eq!(stream.status(), 400);
    // The consumer settles the entries it did not run when it comes to them.
    wait_metric(&gw, "infergate_queue_entries_total{outcome=\"expired\"}", 1.0);
    wait_metric(&gw, "infergate_queue_entries_total{outcome=\"cancelled\"}", 1.0);
}

/// Upload `lines` as a batch file (multipart, as the SDK sends it); its id.
fn upload(gw: &Gateway, key: &str, lines: &[Value]) -> Result<String, (u16, Value)> {
    let boundary = "infergate-e2e-boundary";
    let content: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         content-type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let resp = client()
        .post(gw.url("/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let json: Value = resp.json().unwrap();
    if status == 200 { Ok(json["id"].as_str().unwrap().to_owned()) } else { Err((status, json)) }
}

/// `n` chat requests to echo, each about `words` × 10 ms of work.
fn chat_lines(n: usize, words: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let text = (0..words).map(|w| format!("w{i}x{w}")).collect::<Vec<_>>().join(" ");
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "echo", "messages": [{"role": "user", "content": text}]}})
        })
        .collect()
}

fn create_batch(gw: &Gateway, key: &str, file: &str) -> reqwest::blocking::Response {
    client()
        .post(gw.url("/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .unwrap()
}

/// Poll batch `id` until it is final; the batch.
fn until_final(gw: &Gateway, key: &str, id: &str, within: Duration) -> Value {
    let end = Instant::now() + within;
    loop {
        let batch: Value =
            client().get(gw.url(&format!("/v1/batches/{id}"))).bearer_auth(key).send().unwrap().json().unwrap();
        if ["completed", "failed", "expired", "cancelled"].contains(&batch["status"].as_str().unwrap_or_default()) {
            return batch;
        }
        assert!(Instant::now() < end, "batch still {batch} after {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The custom_ids of a batch's output file, each checked answered 200 with
/// the echo of its request; panics on one answered twice.
fn answered_once(gw: &Gateway, key: &str, batch: &Value, lines: &[Value]) {
    let file = batch["output_file_id"].as_str().unwrap();
    let text =
        client().get(gw.url(&format!("/v1/files/{file}/content"))).bearer_auth(key).send().unwrap().text().unwrap();
    let mut seen = std::collections::HashMap::new();
    for row in text.lines() {
        let row: Value = serde_json::from_str(row).unwrap();
        assert_eq!(row["response"]["status_code"], 200, "{row}");
        let id = row["custom_id"].as_str().unwrap().to_owned();
        let said = row["response"]["body"]["choices"][0]["message"]["content"].clone();
        assert!(seen.insert(id.clone(), said).is_none(), "{id} answered twice");
    }
    assert_eq!(seen.len(), lines.len(), "answers for {} of {} requests", seen.len(), lines.len());
    for line in lines {
        let id = line["custom_id"].as_str().unwrap();
        assert_eq!(seen[id], line["body"]["messages"][0]["content"], "{id}");
    }
}

#[test]
fn two_replicas_share_the_queue_and_one_killed_mid_batch_loses_nothing() {
    let redis = Redis::start().unwrap();
    let settings = config(&redis, &format!("claim_after = \"2s\"\n{ECHO_POOL}"));
    let mut first = Gateway::start(&settings).unwrap();
    let second = Gateway::start_beside(&first, &settings).unwrap();
    let lines = chat_lines(600, 10);
    let file = upload(&first, KEY, &lines).unwrap();
    let batch: Value = create_batch(&first, KEY, &file).json().unwrap();
    let id = batch["id"].as_str().unwrap().to_owned();
    // Both consume; then the first dies holding entries it had taken.
    let done = "infergate_queue_entries_total{outcome=\"done\"}";
    wait_metric(&first, done, 20.0);
    wait_metric(&second, done, 20.0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid()), nix::sys::signal::Signal::SIGKILL).unwrap();
    first.wait_exit(Duration::from_secs(10));
    let batch = until_final(&second, KEY, &id, Duration::from_secs(120));
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"], json!({"total": 600, "completed": 600, "failed": 0}));
    answered_once(&second, KEY, &batch, &lines);
    assert!(metric(&second, "infergate_queue_reclaims_total") >= 1.0, "the survivor claimed the dead one's entries");
}

#[test]
fn with_redis_down_submits_are_refused_and_the_batch_resumes_when_it_returns() {
    let dir = std::env::temp_dir().join(format!("infergate-queue-redis-{:x}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = Redis::start_durable(&dir).unwrap();
    let gw =
        Gateway::start(&config(&redis, &format!("claim_after = \"2s\"\ntimeout = \"500ms\"\n{ECHO_POOL}"))).unwrap();
    let lines = chat_lines(300, 10);
    let file = upload(&gw, KEY, &lines).unwrap();
    let batch: Value = create_batch(&gw, KEY, &file).json().unwrap();
    let id = batch["id"].as_str().unwrap().to_owned();
    wait_metric(&gw, "infergate_queue_entries_total{outcome=\"done\"}", 30.0);

    redis.kill();
    for resp in [
        create_batch(&gw, KEY, &file),
        client()
            .post(gw.url("/v2/models/echo/infer"))
            .bearer_auth(KEY)
            .header("prefer", "respond-async")
            .json(&echo_infer(0, 1))
            .send()
            .unwrap(),
        client().get(gw.url(&format!("/v1/batches/{id}"))).bearer_auth(KEY).send().unwrap(),
    ] {
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.json::<Value>().unwrap()["type"], "urn:infergate:error:queue-unavailable");
    }
    assert_eq!(upload(&gw, KEY, &lines[..3]).unwrap_err().0, 503);
    // Interactive calls do not need the queue.
    let sync = client().post(gw.url("/v2/models/echo/infer")).bearer_auth(KEY).json(&echo_infer(0, 5)).send().unwrap();
    assert_eq!(sync.status(), 200);
    std::thread::sleep(Duration::from_secs(2));

    redis.restart_durable(&dir).unwrap();
    let batch = until_final(&gw, KEY, &id, Duration::from_secs(120));
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"], json!({"total": 300, "completed": 300, "failed": 0}));
    answered_once(&gw, KEY, &batch, &lines);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn files_past_their_bound_and_tenants_past_their_quota_are_refused_and_mixed_endpoints_fail() {
    let redis = Redis::start().unwrap();
    let gw =
        Gateway::start(&config(&redis, &format!("max_queued_per_tenant = 50\nmax_file_bytes = 20000\n{ECHO_POOL}")))
            .unwrap();
    // A file past queue.max_file_bytes is refused before it is read whole.
    let (status, problem) = upload(&gw, KEY, &chat_lines(200, 5)).unwrap_err();
    assert_eq!(status, 413, "{problem}");
    let file = upload(&gw, KEY, &chat_lines(60, 1)).unwrap();
    let refused = create_batch(&gw, KEY, &file);
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().unwrap();
    assert_eq!(problem["type"], "urn:infergate:error:queue-quota", "{problem}");
    // Within the quota, and another tenant's own quota, it is taken.
    let small = upload(&gw, KEY, &chat_lines(40, 1)).unwrap();
    assert_eq!(create_batch(&gw, KEY, &small).status(), 200);
    let theirs = upload(&gw, OTHER_KEY, &chat_lines(40, 1)).unwrap();
    assert_eq!(create_batch(&gw, OTHER_KEY, &theirs).status(), 200);
    // A batch whose lines call another endpoint fails validation, its lines
    // named, and queues nothing.
    let mut mixed = chat_lines(3, 1);
    mixed[1] =
        json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "echo", "input": "x"}});
    let mixed = upload(&gw, OTHER_KEY, &mixed).unwrap();
    let failed: Value = create_batch(&gw, OTHER_KEY, &mixed).json().unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["errors"]["data"][0]["line"], 2, "{failed}");
    assert!(failed["failed_at"].is_u64(), "{failed}");
}

/// Latencies of `n` interactive chat calls to echo (about 50 ms of work
/// each) sent at `rate` a second (open loop: each at its time, however
/// long the others take), sorted.
/// Interactive chat calls to echo at `rate` a second, open loop (each sent
/// on time however long the others take), until `stop`; each call's send
/// time and latency.
fn interactive(gw: &Gateway, rate: f64, stop: Arc<AtomicBool>) -> Vec<(Instant, Duration)> {
    let client = client();
    let url = gw.url("/v1/chat/completions");
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0.. {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let body =
            json!({"model": "echo", "messages": [{"role": "user", "content": format!("interactive {i} a b c")}]});
        let (client, url) = (client.clone(), url.clone());
        calls.push(std::thread::spawn(move || {
            let sent = Instant::now();
            let resp =
                client.post(url).bearer_auth(KEY).header("cache-control", "no-cache").json(&body).send().unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().unwrap();
            (sent, sent.elapsed())
        }));
    }
    calls.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The 99th percentile of the latencies of `calls` sent in one of `spans`.
fn p99_within(calls: &[(Instant, Duration)], spans: &[(Instant, Instant)]) -> (usize, Duration, Duration) {
    let mut took: Vec<Duration> = calls
        .iter()
        .filter(|(sent, _)| spans.iter().any(|(from, to)| sent >= from && sent < to))
        .map(|(_, took)| *took)
        .collect();
    took.sort();
    let p99 = took[(took.len() * 99).div_ceil(100) - 1];
    (took.len(), took[took.len() / 2], p99)
}

/// Echo's chat answers word by word, 10 ms a word, sleeping rather than
/// computing, like a model on an accelerator: the pool's capacity is its
/// slots (eight threads, eight calls at once), which is what queued work
/// must leave to interactive calls.
///
/// One stream of interactive calls runs throughout, at a fixed rate, while
/// 10,000-entry batches are started and cancelled in turn: spans with a
/// batch running alternate with spans without, so that what else this
/// machine runs meanwhile weighs on both alike.
#[test]
fn interactive_p99_holds_while_a_10000_entry_batch_uses_the_spare_capacity() {
    const ROUNDS: usize = 3;
    const SPAN: Duration = Duration::from_secs(5);
    let redis = Redis::start().unwrap();
    // Eight calls at once: eight model threads, eight slots.
    let pool = format!("{ECHO_POOL}threads = 8\nmax_in_flight_per_worker = 8\n");
    let gw = Gateway::start(&config(&redis, &pool)).unwrap();
    let file = upload(&gw, KEY, &chat_lines(10_000, 5)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = std::thread::scope(|scope| {
        let driver = scope.spawn(|| interactive(&gw, 20.0, stop.clone()));
        // Warm up.
        std::thread::sleep(Duration::from_secs(2));
        let done = "infergate_queue_entries_total{outcome=\"done\"}";
        let (mut alone, mut beside, mut ran) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..ROUNDS {
            let from = Instant::now();
            std::thread::sleep(SPAN);
            alone.push((from, Instant::now()));
            let batch: Value = create_batch(&gw, KEY, &file).json().unwrap();
            let id = batch["id"].as_str().unwrap();
            // The batch is running once its entries are.
            let before = metric(&gw, done);
            wait_metric(&gw, done, before + 20.0);
            let (from, before) = (Instant::now(), metric(&gw, done));
            std::thread::sleep(SPAN);
            beside.push((from, Instant::now()));
            ran += metric(&gw, done) - before;
            let cancelled: Value = client()
                .post(gw.url(&format!("/v1/batches/{id}/cancel")))
                .bearer_auth(KEY)
                .send()
                .unwrap()
                .json()
                .unwrap();
            assert_eq!(cancelled["status"], "cancelling", "{cancelled}");
            // Cancelled once none of its entries runs any more.
            let batch = until_final(&gw, KEY, id, Duration::from_secs(60));
            assert_eq!(batch["status"], "cancelled", "{batch}");
            assert!(batch["request_counts"]["completed"].as_u64().unwrap() < 10_000);
        }
        stop.store(true, Ordering::Relaxed);
        let calls = driver.join().unwrap();
        (calls, alone, beside, ran)
    });
    let (calls, alone, beside, ran) = calls;
    let (n_alone, p50_alone, p99_alone) = p99_within(&calls, &alone);
    let (n_beside, p50_beside, p99_beside) = p99_within(&calls, &beside);
    eprintln!(
        "interactive p50/p99 alone {p50_alone:?}/{p99_alone:?} ({n_alone} calls), beside the batch \
         {p50_beside:?}/{p99_beside:?} ({n_beside} calls); {ran} queued entries ran meanwhile"
    );
    assert!(n_alone >= 250 && n_beside >= 250, "{n_alone} calls alone, {n_beside} beside");
    assert!(
        p99_beside.as_secs_f64() <= 1.5 * p99_alone.as_secs_f64(),
        "interactive p99 {p99_beside:?} beside the batch, {p99_alone:?} alone"
    );
    assert!(ran >= 300.0, "the batch used the spare capacity: {ran} entries in {:?}", SPAN * ROUNDS as u32);
}

#[test]
fn queued_requests_count_against_the_callers_limits_as_they_run_not_at_submit() {
    let redis = Redis::start().unwrap();
    let limits = "[limits]\nper_key = { rate = 10, burst = 5 }\n";
    let gw = Gateway::start(&config(&redis, &format!("{ECHO_POOL}{limits}"))).unwrap();
    // Forty requests, four times the key's rate a second: taken at submit.
    let lines = chat_lines(40, 1);
    let file = upload(&gw, KEY, &lines).unwrap();
    let created = create_batch(&gw, KEY, &file);
    assert_eq!(created.status(), 200);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    // As they run, the limit refuses some; each waits as long as it says
    // and runs: none fails.
    let batch = until_final(&gw, KEY, &id, Duration::from_secs(60));
    assert_eq!(batch["request_counts"], json!({"total": 40, "completed": 40, "failed": 0}), "{batch}");
    answered_once(&gw, KEY, &batch, &lines);
    assert!(metric(&gw, "infergate_limit_rejections_total{limit=\"key.rate\"}") >= 1.0, "the limit never refused");
}
