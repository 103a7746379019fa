//! The embedded pool kind: the same Python model classes inside the gateway
//! process (pyo3), beside worker processes, compared with them.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::{Duration, Instant};

use infergate_e2e::{Gateway, cosine};
use serde_json::{Value, json};

const MINILM: &str = "infergate_worker.examples.minilm:MiniLM";
const ECHO: &str = "infergate_worker.examples.echo:Echo";

/// MiniLM and echo, each embedded and as a worker process; aliases name
/// each pool's copy.
fn config() -> String {
    let mut c = String::from("[cache]\nenabled = false\n");
    for (pool, class, kind) in [
        ("minilm-emb", MINILM, "embedded"),
        ("minilm-proc", MINILM, "local"),
        ("echo-emb", ECHO, "embedded"),
        ("echo-proc", ECHO, "local"),
    ] {
        c += &format!("[[pools]]\nname = \"{pool}\"\nclass = \"{class}\"\nkind = \"{kind}\"\nthreads = 2\n");
    }
    for (alias, pool, model) in [
        ("minilm-embedded", "minilm-emb", "minilm"),
        ("minilm-process", "minilm-proc", "minilm"),
        ("echo-embedded", "echo-emb", "echo"),
        ("echo-process", "echo-proc", "echo"),
    ] {
        c += &format!(
            "[[aliases]]\nname = \"{alias}\"\n[[aliases.variants]]\nname = \"v\"\npool = \"{pool}\"\nmodel = \"{model}\"\n"
        );
    }
    c
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn echo(delay_ms: u64, fail: bool) -> Value {
    json!({"parameters": {"delay_ms": delay_ms, "fail": fail},
           "inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.5, 2.5, 3.5]}]})
}

const TEXTS: [&str; 4] =
    ["The cat sits on the mat.", "A gateway in Rust, models in Python.", "hello", "embedded or not, the same vector"];

#[test]
fn embedded_models_answer_as_worker_processes_do_and_fail_only_their_items() {
    let gw = Gateway::start(&config()).unwrap();
    let c = client();
    let embed = |model: &str| -> Vec<Vec<f32>> {
        let resp: Value = c
            .post(gw.url("/v1/embeddings"))
            .json(&json!({"model": model, "input": TEXTS}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        resp["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{resp}"))
            .iter()
            .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
            .collect()
    };
    let (embedded, process) = (embed("minilm-embedded"), embed("minilm-process"));
    assert_eq!(embedded.len(), TEXTS.len());
    for (i, (e, p)) in embedded.iter().zip(&process).enumerate() {
        assert_eq!(e.len(), 384);
        let cos = cosine(e, p);
        assert!(cos >= 0.9999, "text {i}: embedded vs process cosine {cos}");
    }

    // Tensors: the same answer; the embedded pool says which variant answered.
    let infer =
        |model: &str, body: &Value| c.post(gw.url(&format!("/v2/models/{model}/infer"))).json(body).send().unwrap();
    let e = infer("echo-embedded", &echo(0, false));
    assert_eq!(e.status(), 200);
    let e: Value = e.json().unwrap();
    let p: Value = infer("echo-process", &echo(0, false)).json().unwrap();
    assert_eq!(e["outputs"], p["outputs"]);

    // A model exception fails only its item: concurrent calls are batched
    // together, one of them asks the model to fail.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..8)
            .map(|n| {
                let infer = &infer;
                s.spawn(move || infer("echo-embedded", &echo(20, n == 3)).status().as_u16())
            })
            .collect();
        calls.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 7, "{statuses:?}");
    // A model that raises: its items fail, the traceback is in the gateway's
    // log, not in the answer.
    let mut raising = echo(0, false);
    raising["parameters"]["raise"] = json!(true);
    let failed = infer("echo-embedded", &raising);
    assert_eq!(failed.status(), 502);
    let failed: Value = failed.json().unwrap();
    assert!(!failed.to_string().contains("Traceback"), "{failed}");
    assert!(failed["detail"].as_str().unwrap().contains("echo was asked to raise"), "{failed}");
    let traceback = gw.wait_log(0, Duration::from_secs(3), |v| {
        v["target"] == "worker"
            && v["traceback"].as_str().is_some_and(|t| t.contains("Traceback") && t.contains("echo was asked to raise"))
    });
    assert!(traceback.is_some(), "no traceback in the gateway log:\n{}", gw.log_text());

    // Streaming generation through the same channel; the model's timings
    // come back at its end, as from a worker process.
    let inference_calls = || {
        let metrics = c.get(gw.url("/metrics")).send().unwrap().text().unwrap();
        metrics
            .lines()
            .find(|l| l.starts_with("infergate_worker_inference_seconds_count{") && l.contains("pool=\"echo-emb\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = inference_calls();
    let chat =
        json!({"model": "echo-embedded", "stream": true, "messages": [{"role": "user", "content": "one two three"}]});
    let sse = c.post(gw.url("/v1/chat/completions")).json(&chat).send().unwrap().text().unwrap();
    let words: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(words.trim(), "one two three", "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"));
    let reported = Instant::now();
    while inference_calls() == before {
        assert!(reported.elapsed() < Duration::from_secs(3), "the embedded stream reported no timings");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn deadlines_and_cancellation_reach_embedded_model_code() {
    let gw = Gateway::start(&config()).unwrap();
    let c = client();
    let started = Instant::now();
    let resp = c
        .post(gw.url("/v2/models/echo-embedded/infer"))
        .header("x-request-timeout", "100ms")
        .header("x-request-id", "emb-deadline")
        .json(&echo(2000, false))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    let stopped = |rid: &'static str, why: &'static str| {
        gw.wait_log(0, Duration::from_secs(3), move |v| {
            v["target"] == "worker"
                && v["request_id"] == rid
                && v["message"].as_str().is_some_and(|m| m.contains(&format!("echo stopped early ({why})")))
        })
    };
    assert!(stopped("emb-deadline", "deadline").is_some(), "the model did not see its deadline:\n{}", gw.log_text());

    // A client that hangs up cancels the model's work.
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let gone = impatient
        .post(gw.url("/v2/models/echo-embedded/infer"))
        .header("x-request-id", "emb-gone")
        .json(&echo(3000, false))
        .send();
    assert!(gone.is_err(), "the client was meant to time out");
    assert!(stopped("emb-gone", "cancelled").is_some(), "the model did not see the cancellation:\n{}", gw.log_text());
    // And the embedded pool still serves.
    let ok = c.post(gw.url("/v2/models/echo-embedded/infer")).json(&echo(0, false)).send().unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn a_class_that_cannot_be_imported_stops_the_start_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("infergate-emb-{}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        "[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"nope\"\nclass = \"no_such_module:Model\"\nkind = \"embedded\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(infergate_e2e::gateway_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("INFERGATE__WORKERS__PYTHON", infergate_e2e::python())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a class that does not exist:\n{stderr}");
    assert!(stderr.contains("cannot import the embedded model class"), "{stderr}");
    assert!(stderr.contains("No module named 'no_such_module'"), "{stderr}");
}
