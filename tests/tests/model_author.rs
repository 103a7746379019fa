//! A model author's first hour: a package of their own (tests/author/,
//! outside python-worker/) served through the README's config shape, the
//! start-up checks that must tell the truth about it, and a model that
//! cannot load.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use infergate_e2e::{Gateway, gateway_bin, python, rand_u64, root};
use serde_json::{Value, json};

/// The user's package directory: what their pool's `env` puts on PYTHONPATH.
fn author_dir() -> PathBuf {
    root().join("tests/author")
}

/// A pool of the user's class, as the README writes one.
fn pool(name: &str, class: &str) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\nclass = \"{class}\"\nenv = {{ PYTHONPATH = \"{}\" }}\n",
        author_dir().display()
    )
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("infergate-author-{:x}", rand_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `infergate check-config` on `config`, run from `cwd`: exit code, stdout, stderr.
fn check_config(cwd: &Path, config: &str, args: &[&str]) -> (i32, String, String) {
    let path = cwd.join("infergate.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(gateway_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .args(args)
        .current_dir(cwd)
        .env_remove("INFERGATE_CONFIG")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn python_setting() -> String {
    format!("[workers]\npython = \"{}\"\n", python().display())
}

#[test]
fn a_users_package_is_served_with_the_pools_env_from_another_directory() {
    let elsewhere = Scratch::new();
    let gw = Gateway::start_in(&elsewhere.0, &pool("textclf", "textclf.model:Sentiment")).unwrap();
    gw.wait_ready(Duration::from_secs(60)).unwrap();
    let body = json!({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
        "data": ["what a lovely, wonderful meal", "awful, rude and terrible"]}]});
    let resp =
        reqwest::blocking::Client::new().post(gw.url("/v2/models/sentiment-tfidf/infer")).json(&body).send().unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().unwrap();
    let p = &answer["outputs"][0]["data"];
    assert!(p[0].as_f64().unwrap() > 0.5 && p[1].as_f64().unwrap() < 0.5, "{answer}");
    // A default start does not warn about the open-files limit: default
    // connection caps are fitted to it (CI's hard limit is below their sum).
    let warned = gw.log().into_iter().find(|v| v["message"].as_str().is_some_and(|m| m.contains("open-files")));
    assert!(warned.is_none_or(|v| v["level"] != "WARN"), "{}", gw.log_text());
}

#[test]
fn check_config_imports_each_class_and_says_what_is_wrong_with_it() {
    let dir = Scratch::new();
    let good = format!("{}{}", python_setting(), pool("textclf", "textclf.model:Sentiment"));
    let (code, out, err) = check_config(&dir.0, &good, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("textclf.model:Sentiment"), "{out}");

    let typo = format!("{}{}", python_setting(), pool("textclf", "textclf.model:Sentimnet"));
    let (code, _, err) = check_config(&dir.0, &typo, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("textclf: cannot import textclf.model:Sentimnet"), "{err}");
    assert_eq!(check_config(&dir.0, &typo, &["--no-import"]).0, 0, "--no-import imports nothing");

    let data = format!("{}{}", python_setting(), pool("textclf", "textclf.model:TRAIN"));
    let (code, _, err) = check_config(&dir.0, &data, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("textclf: textclf.model:TRAIN is a list object, not a subclass of infergate_worker.Model"),
        "{err}"
    );

    // The start refuses what check-config refuses, with the same words.
    let (code, _, err) = check_config(&dir.0, &typo, &[]);
    let started =
        Command::new(gateway_bin()).args(["serve", "--config"]).arg(dir.0.join("infergate.toml")).output().unwrap();
    assert_eq!(code, 2);
    assert!(!started.status.success());
    assert!(
        String::from_utf8_lossy(&started.stderr).contains("textclf: cannot import textclf.model:Sentimnet"),
        "{err}"
    );
}

#[test]
fn without_workers_python_the_checkouts_venv_is_used_and_a_python_without_the_sdk_is_named() {
    // From a directory with no .venv, the interpreter is the one of the
    // checkout the binary was built in, never whatever the directory holds.
    let dir = Scratch::new();
    let (code, out, err) = check_config(&dir.0, &pool("textclf", "textclf.model:Sentiment"), &[]);
    assert_eq!(code, 0, "{err}");
    let venv = root().canonicalize().unwrap().join(".venv/bin/python");
    assert!(out.contains(&format!("python = \"{}\"", venv.display())), "{out}");

    // An interpreter without infergate_worker: a venv of its own.
    let bare = dir.0.join("bare");
    let made = Command::new(python()).args(["-m", "venv", "--without-pip"]).arg(&bare).status().unwrap();
    assert!(made.success());
    let bare_python = bare.join("bin/python");
    let config =
        format!("[workers]\npython = \"{}\"\n{}", bare_python.display(), pool("textclf", "textclf.model:Sentiment"));
    let (code, _, err) = check_config(&dir.0, &config, &[]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("the worker Python {} has no infergate_worker", bare_python.display())), "{err}");
    assert!(err.contains("set workers.python"), "{err}");
}

#[test]
fn a_model_whose_load_raises_fails_its_pool_with_the_reason_and_one_error_record_each_time() {
    let dir = Scratch::new();
    let config = format!(
        "[workers]\nrestart_backoff_min = \"50ms\"\nrestart_backoff_max = \"200ms\"\nmax_load_failures = 3\n{}{}",
        pool("missing", "textclf.model:MissingWeights"),
        infergate_e2e::ECHO_POOL
    );
    let gw = Gateway::start_in(&dir.0, &config).unwrap();
    let client = reqwest::blocking::Client::new();
    let end = Instant::now() + Duration::from_secs(60);
    let readiness = loop {
        let r: Value = client.get(gw.url("/readyz")).send().unwrap().json().unwrap();
        let pool = r["pools"].as_array().unwrap().iter().find(|p| p["pool"] == "missing").cloned().unwrap();
        if pool.get("load_error").is_some() {
            break r;
        }
        assert!(Instant::now() < end, "the pool never failed:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(readiness["ready"], false);
    let missing = readiness["pools"].as_array().unwrap().iter().find(|p| p["pool"] == "missing").unwrap();
    let why = missing["load_error"].as_str().unwrap();
    assert!(
        why.starts_with("sentiment-missing failed to load: FileNotFoundError: [Errno 2] No such file or directory"),
        "{why}"
    );

    // A call is told why at once, not "starting".
    let body = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]});
    let resp = client.post(gw.url("/v2/models/sentiment-missing/infer")).json(&body).send().unwrap();
    assert_eq!(resp.status(), 503);
    let problem: Value = resp.json().unwrap();
    assert_eq!(problem["type"], "urn:infergate:error:model-failed-to-load");
    assert!(problem["detail"].as_str().unwrap().contains("FileNotFoundError"), "{problem}");
    let models: Value = client.get(gw.url("/v1/models")).send().unwrap().json().unwrap();
    let listed = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "sentiment-missing").cloned();
    assert!(
        listed.is_some_and(|m| m["load_error"].as_str().is_some_and(|e| e.contains("FileNotFoundError"))),
        "{models}"
    );

    // The other pool serves on.
    let echo = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    assert_eq!(client.post(gw.url("/v2/models/echo/infer")).json(&echo).send().unwrap().status(), 200);

    // Each failure is one ERROR record carrying the traceback; no line of a
    // traceback is a record of its own.
    let log = gw.log();
    let failures: Vec<&Value> = log
        .iter()
        .filter(|r| r["message"].as_str().is_some_and(|m| m.starts_with("sentiment-missing failed to load")))
        .collect();
    assert!(failures.len() >= 3, "{}", gw.log_text());
    for r in &failures {
        assert_eq!(r["level"], "ERROR", "{r}");
        let tb = r["traceback"].as_str().unwrap_or_default();
        assert!(tb.starts_with("Traceback (most recent call last):") && tb.contains("FileNotFoundError"), "{r}");
    }
    let stray = log
        .iter()
        .filter(|r| r["message"].as_str().is_some_and(|m| m.starts_with("Traceback") || m.starts_with("  File ")));
    assert_eq!(stray.count(), 0, "{}", gw.log_text());
}

#[test]
fn two_bad_items_among_thirty_callers_fail_only_their_own_callers() {
    let elsewhere = Scratch::new();
    // One batch for all 30 (the model takes 32): they start together and the
    // batch waits up to a second for them, so both bad items share it with
    // good ones and the batch must be split.
    let config = format!(
        "{}batching = {{ max_delay = \"1s\", max_batch_size = 32 }}\n",
        pool("textclf", "textclf.model:Sentiment")
    );
    let gw = Gateway::start_in(&elsewhere.0, &config).unwrap();
    gw.wait_ready(Duration::from_secs(60)).unwrap();
    let url = gw.url("/v2/models/sentiment-tfidf/infer");
    let bad = [7, 19];
    let statuses: Vec<(usize, u16, Value)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..30)
            .map(|i| {
                let url = &url;
                s.spawn(move || {
                    let text = if bad.contains(&i) { "   " } else { "a lovely day" };
                    let body = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]});
                    let resp = reqwest::blocking::Client::new().post(url).json(&body).send().unwrap();
                    (i, resp.status().as_u16(), resp.json::<Value>().unwrap())
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (i, status, body) in &statuses {
        if bad.contains(i) {
            assert_eq!(*status, 400, "caller {i}: {body}");
            assert_eq!(body["type"], "urn:infergate:error:model-rejected-input", "{body}");
            assert!(body["detail"].as_str().unwrap().contains("text must not be empty"), "{body}");
        } else {
            assert_eq!(*status, 200, "caller {i} was blamed for another's item: {body}");
        }
    }
    // The batches were split, and it shows.
    let metrics = reqwest::blocking::get(gw.url("/metrics")).unwrap().text().unwrap();
    let splits: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("infergate_batch_splits_total{") && l.contains("pool=\"textclf\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let batched = gw.log().iter().any(|v| {
        v["worker"] == "textclf-0" && v["message"].as_str().is_some_and(|m| m.contains("running its items one by one"))
    });
    assert!(splits >= 1.0 && batched, "no batch was split ({splits}):\n{}", gw.log_text());
}

/// The value of the series of `name` whose labels include every one of `labels`.
fn series(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn failed_requests_carry_the_model_they_named_in_metrics_and_the_access_line() {
    let config = format!(
        "[workers]\nrestart_backoff_min = \"50ms\"\nrestart_backoff_max = \"200ms\"\n{}{}",
        pool("missing", "textclf.model:MissingWeights"),
        infergate_e2e::ECHO_POOL
    );
    let dir = Scratch::new();
    let gw = Gateway::start_in(&dir.0, &config).unwrap();
    let c = reqwest::blocking::Client::new();
    let end = Instant::now() + Duration::from_secs(60);
    while c.get(gw.url("/v1/models")).send().unwrap().json::<Value>().unwrap()["data"]
        .as_array()
        .is_none_or(|m| !m.iter().any(|m| m["id"] == "echo" && m["ready"] == true) || m.len() < 2)
    {
        assert!(Instant::now() < end, "not ready:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let tensor = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let send = |path: &str, body: &Value, rid: &str, timeout: Option<&str>| {
        let mut req = c.post(gw.url(path)).header("x-request-id", rid).json(body);
        if let Some(t) = timeout {
            req = req.header("x-request-timeout", t);
        }
        req.send().unwrap().status().as_u16()
    };
    // 400: a bad input; 502: the model failed it; 504: its deadline passed;
    // 503: its pool cannot load; 404: a name no one serves.
    let bad = json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]});
    assert_eq!(send("/v2/models/echo/infer", &bad, "m-400", None), 400);
    let mut failing = tensor.clone();
    failing["parameters"] = json!({"fail": true});
    assert_eq!(send("/v2/models/echo/infer", &failing, "m-502", None), 502);
    let mut slow = tensor.clone();
    slow["parameters"] = json!({"delay_ms": 2000});
    assert_eq!(send("/v2/models/echo/infer", &slow, "m-504", Some("200ms")), 504);
    let text = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]});
    let end = Instant::now() + Duration::from_secs(60);
    while send("/v2/models/sentiment-missing/infer", &text, "m-503", None) != 503 {
        assert!(Instant::now() < end, "the pool never failed:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(send("/v2/models/no-such-model-7f3a/infer", &tensor, "m-404", None), 404);
    // A name built to bloat logs and label sets: 8 KB, in a body.
    let long = "m".repeat(8192);
    let embed = json!({"model": long, "input": "x"});
    assert_eq!(send("/v1/embeddings", &embed, "m-long", None), 404);
    // 415: refused before it is planned, but the path named the model.
    let typed =
        |ct: &str| c.post(gw.url("/v2/models/echo/infer")).header("x-request-id", "m-415").header("content-type", ct);
    assert_eq!(typed("text/plain").body(tensor.to_string()).send().unwrap().status(), 415);

    let access = |rid: &str| {
        gw.wait_log(0, Duration::from_secs(5), |v| v["target"] == "access" && v["request_id"] == rid)
            .unwrap_or_else(|| panic!("no access line for {rid}:\n{}", gw.log_text()))
            .1
    };
    for (rid, model) in [
        ("m-400", "echo"),
        ("m-502", "echo"),
        ("m-504", "echo"),
        ("m-503", "sentiment-missing"),
        ("m-404", "no-such-model-7f3a"),
        ("m-415", "echo"),
    ] {
        assert_eq!(access(rid)["model"], model, "{rid}");
    }
    // The access line keeps the first 128 bytes of it; the metrics say `unknown`.
    assert_eq!(access("m-long")["model"], "m".repeat(128));
    let scrape = c.get(gw.url("/metrics")).send().unwrap().text().unwrap();
    assert!(!scrape.contains("mmmmmmmm"), "{scrape}");
    let requests = "infergate_requests_total";
    for (model, status) in [("echo", "4xx"), ("echo", "5xx"), ("sentiment-missing", "5xx"), ("unknown", "4xx")] {
        assert!(
            series(&scrape, requests, &[("model", model), ("status", status)]) >= 1.0,
            "{model} {status}\n{scrape}"
        );
    }
    // A made-up name is never a label; durations are by model too.
    assert!(!scrape.contains("no-such-model-7f3a"), "{scrape}");
    let durations = "infergate_request_duration_seconds_count";
    assert!(series(&scrape, durations, &[("model", "echo"), ("status", "5xx")]) >= 2.0, "{scrape}");
    let errors = "infergate_pool_errors_total";
    assert!(series(&scrape, errors, &[("pool", "echo"), ("model", "echo"), ("code", "worker-failed")]) >= 1.0);
    assert!(series(&scrape, errors, &[("pool", "echo"), ("code", "deadline-exceeded")]) >= 1.0, "{scrape}");
}

#[test]
fn a_models_declared_inputs_are_enforced_at_the_edge_over_rest_and_grpc() {
    use infergate::proto::inference_client::InferenceClient;
    use infergate::proto::{InferRequest, Tensor};

    let elsewhere = Scratch::new();
    let gw = Gateway::start_in(&elsewhere.0, &pool("textclf", "textclf.model:Sentiment")).unwrap();
    gw.wait_ready(Duration::from_secs(60)).unwrap();
    let url = gw.url("/v2/models/sentiment-tfidf/infer");
    let c = reqwest::blocking::Client::new();
    let refused = |inputs: Value| {
        let resp = c.post(&url).header("x-request-id", "contract").json(&json!({ "inputs": inputs })).send().unwrap();
        assert_eq!(resp.status(), 400);
        resp.json::<Value>().unwrap()
    };
    let p = refused(json!([{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]));
    let detail = |p: &Value| p["detail"].as_str().unwrap().to_owned();
    assert!(detail(&p).ends_with("model \"sentiment-tfidf\" has no input \"txt\"; it takes text"), "{p}");
    assert_eq!(p["field"], "inputs[0]", "{p}");
    let p = refused(json!([{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]));
    assert!(detail(&p).ends_with("input \"text\" is FP32; model \"sentiment-tfidf\" takes BYTES"), "{p}");
    let p = refused(json!([{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}]));
    assert!(detail(&p).contains("input \"text\" has shape [1, 1]; model"), "{p}");
    // None of them reached the worker.
    let reached = gw.log().iter().any(|v| v["worker"] == "textclf-0" && v["request_id"] == "contract");
    assert!(!reached, "{}", gw.log_text());

    // gRPC alike: INVALID_ARGUMENT with the same words.
    let status = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let wrong = Tensor {
            name: "text".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        let request = InferRequest { model: "sentiment-tfidf".into(), inputs: vec![wrong], ..Default::default() };
        client.infer(request).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("input \"text\" is FP32; model \"sentiment-tfidf\" takes BYTES"), "{status:?}");
}

#[test]
fn tritonclient_reads_the_models_config_and_calls_it_as_the_config_says() {
    let elsewhere = Scratch::new();
    let config = format!(
        "{}workers = 2\nbatching = {{ max_delay = \"5ms\", max_batch_size = 8, max_queue = 200 }}\n",
        pool("textclf", "textclf.model:Sentiment")
    );
    let gw = Gateway::start_in(&elsewhere.0, &config).unwrap();
    gw.wait_ready(Duration::from_secs(60)).unwrap();
    let authority = gw.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let out = Command::new(python())
        .arg(root().join("tests/clients/triton_config.py"))
        .args([authority.as_str(), "sentiment-tfidf"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tritonclient failed:\n{stderr}\n{}", gw.log_text());
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The model declares text [-1] → positive [-1]: the free leading
    // dimension is Triton's batch dimension.
    assert_eq!(config["max_batch_size"], 32, "{config}");
    assert_eq!(
        config["input"],
        json!([{"name": "text", "data_type": "TYPE_STRING", "format": "FORMAT_NONE",
        "dims": [], "is_shape_tensor": false, "allow_ragged_batch": false, "optional": false}])
    );
    assert_eq!(config["output"][0]["data_type"], "TYPE_FP32", "{config}");
    // The pool's batching settings and workers.
    assert_eq!(config["dynamic_batching"]["preferred_batch_size"], json!([8]), "{config}");
    assert_eq!(config["dynamic_batching"]["max_queue_delay_microseconds"], 5000, "{config}");
    assert_eq!(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"], 200, "{config}");
    assert_eq!(config["instance_group"], json!([{"name": "textclf", "kind": "KIND_MODEL", "count": 2}]));

    // An unknown model is a 404 problem, as for the metadata route.
    let resp = reqwest::blocking::get(gw.url("/v2/models/nope/config")).unwrap();
    assert_eq!(resp.status(), 404);
}
