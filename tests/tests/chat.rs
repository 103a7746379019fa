//! Chat end to end: the real gateway, real Python workers, and the official
//! `openai` package as the client.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use infergate_e2e::{Gateway, python, root};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

const ECHO_POOL: &str = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n";

/// A streaming chat call whose answer is `words` words of echo (10 ms each).
fn stream_words(gw: &Gateway, words: usize) -> reqwest::blocking::Response {
    let text = (0..words).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let body = json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]});
    let resp = reqwest::blocking::Client::new().post(gw.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp
}

/// Read until `pred` holds for what has arrived (or the stream ends).
fn read_until(resp: &mut reqwest::blocking::Response, seen: &mut String, pred: impl Fn(&str) -> bool) {
    let mut buf = [0u8; 4096];
    while !pred(seen) {
        let n = resp.read(&mut buf).unwrap();
        if n == 0 {
            return;
        }
        seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
}

#[test]
fn the_openai_package_drives_chat_plain_and_streaming_and_embeddings() {
    let pools =
        format!("{ECHO_POOL}[[pools]]\nname = \"minilm\"\nclass = \"infergate_worker.examples.minilm:MiniLM\"\n");
    let gw = Gateway::start(&pools).unwrap();
    let out =
        Command::new(python()).arg(root().join("tests/clients/openai_sdk.py")).arg(gw.url("/v1")).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.trim() == "ok", "openai client failed:\n{stdout}\n{stderr}");
}

#[test]
fn the_first_chunk_arrives_long_before_the_generation_ends() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let started = Instant::now();
    let mut resp = stream_words(&gw, 40);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut seen = String::new();
    read_until(&mut resp, &mut seen, |s| s.contains("\"content\":\"w0\""));
    let first = started.elapsed();
    read_until(&mut resp, &mut seen, |_| false);
    let last = started.elapsed();
    eprintln!("first word after {first:?}, the 40th and [DONE] after {last:?}");
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    assert!(seen.contains("\"content\":\" w39\""), "{seen}");
    // Echo takes 10 ms a word: the first chunk is not held back for the rest.
    assert!(first + Duration::from_millis(250) < last, "first {first:?}, last {last:?}");

    // The access line is written when the stream ends: its whole time and size.
    let line = access_line(&gw, &rid);
    let latency = Duration::from_secs_f64(line["latency_ms"].as_f64().unwrap() / 1000.0);
    assert!(latency + Duration::from_millis(250) > last - first, "logged {latency:?} for a {last:?} stream: {line}");
    assert_eq!((line["bytes"].as_u64(), line["ended"].as_str()), (Some(seen.len() as u64), Some("complete")));
    // So is the duration metric; the time to first byte is the first token's.
    let metrics = reqwest::blocking::get(gw.url("/metrics")).unwrap().text().unwrap();
    let sum = |metric: &str| -> f64 {
        let route = "route=\"/v1/chat/completions\"";
        let line = metrics.lines().find(|l| l.starts_with(&format!("{metric}_sum{{")) && l.contains(route));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {metric}:\n{metrics}"))
    };
    let (whole, head) = (sum("infergate_request_duration_seconds"), sum("infergate_time_to_first_byte_seconds"));
    assert!(head + 0.25 < whole, "first byte {head} s, whole stream {whole} s");
}

/// The access line of request `rid`.
fn access_line(gw: &Gateway, rid: &str) -> serde_json::Value {
    gw.wait_log(0, Duration::from_secs(3), |v| v["target"] == "access" && v["request_id"] == rid)
        .unwrap_or_else(|| panic!("no access line for {rid}:\n{}", gw.log_text()))
        .1
}

#[test]
fn a_grpc_stream_that_fails_midway_ends_with_an_error_status_and_is_logged_with_it() {
    use infergate::proto::inference_client::InferenceClient;
    use infergate::proto::{ChatMessage, GenerateRequest};

    let gw = Gateway::start(ECHO_POOL).unwrap();
    let victim = gw.worker_pid("echo-0").unwrap();
    let text = (0..500).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (chunks, status) = rt.block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let mut req = tonic::Request::new(GenerateRequest {
            model: "echo".into(),
            messages: vec![ChatMessage { role: "user".into(), content: text }],
            ..Default::default()
        });
        req.metadata_mut().insert("x-request-id", "grpc-midway".parse().unwrap());
        let mut stream = client.generate(req).await.unwrap().into_inner();
        let mut chunks = 0;
        loop {
            match stream.message().await {
                Ok(Some(_)) if chunks == 3 => {
                    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
                    chunks += 1;
                }
                Ok(Some(_)) => chunks += 1,
                Ok(None) => return (chunks, None),
                Err(status) => return (chunks, Some(status)),
            }
        }
    });
    let status = status.unwrap_or_else(|| panic!("the stream ended cleanly after {chunks} chunks"));
    eprintln!("{chunks} chunks, then {:?}: {}", status.code(), status.message());
    // The worker went away: UNAVAILABLE, as before the stream's first byte.
    assert!(chunks < 500 && status.code() == tonic::Code::Unavailable);
    let line = access_line(&gw, "grpc-midway");
    assert_eq!(line["grpc_status"].as_i64(), Some(status.code() as i64), "{line}");
    assert!(line["bytes"].as_u64().unwrap() > 0, "{line}");
}

#[test]
fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_event_not_a_finish() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let victim = gw.worker_pid("echo-0").unwrap();
    let mut resp = stream_words(&gw, 500);
    let mut seen = String::new();
    read_until(&mut resp, &mut seen, |s| s.contains("\"content\":\" w3\""));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    read_until(&mut resp, &mut seen, |_| false);
    let tail: String = seen.chars().rev().take(400).collect::<String>().chars().rev().collect();
    assert!(seen.contains("event: error\ndata: {\"error\""), "no error event; stream ended with:\n{tail}");
    assert!(!seen.contains("[DONE]") && !seen.contains("\"finish_reason\":\"stop\""), "{tail}");
    // The gateway restarts the worker and serves again.
    gw.wait_ready(Duration::from_secs(30)).unwrap();
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "back again"}]});
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = reqwest::blocking::Client::new().post(gw.url("/v1/chat/completions")).json(&body).send().unwrap();
        if resp.status() == 200 {
            let v: serde_json::Value = resp.json().unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "back again");
            break;
        }
        assert!(Instant::now() < end, "not serving again: {}", resp.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_rag_model_answers_a_question_about_the_readme_with_a_source_pointing_into_it() {
    let gw = Gateway::start("[[pools]]\nname = \"rag\"\nclass = \"infergate_worker.examples.rag:Rag\"\n").unwrap();
    let client = reqwest::blocking::Client::new();
    let ask = json!({"model": "rag", "messages": [{"role": "user", "content": "How do I run the tests?"}]});
    let resp = client.post(gw.url("/v1/chat/completions")).json(&ask).send().unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    let sources = v["sources"].as_array().unwrap();
    eprintln!("sources {:?}\n{answer}", sources.iter().map(|s| &s["source"]).collect::<Vec<_>>());
    assert!(sources[0]["source"].as_str().unwrap().starts_with("README.md:"), "{sources:?}");
    assert!(answer.starts_with("Extractive answer"), "labelled as extractive: {answer}");
    assert!(answer.contains("`make test`") && answer.contains("[README.md:"), "{answer}");

    // Streaming: the sources ride on the first content chunk, before the text.
    let mut stream = ask.clone();
    stream["stream"] = json!(true);
    let body = client.post(gw.url("/v1/chat/completions")).json(&stream).send().unwrap().text().unwrap();
    let chunks: Vec<serde_json::Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks[1]["sources"][0]["source"].as_str().unwrap().starts_with("README.md:"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

/// The test's OpenAI-compatible server (python-worker/tests/fake_openai.py),
/// killed on drop.
struct FakeUpstream(std::process::Child, u16);

impl FakeUpstream {
    fn start() -> Self {
        use std::io::BufRead;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(python())
            .arg(root().join("python-worker/tests/fake_openai.py"))
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains(&port.to_string()), "fake upstream did not start: {line:?}");
        Self(child, port)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_provider_that_fails_before_its_first_token_falls_back_to_another_provider_pool() {
    let up = FakeUpstream::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let provider = |name: &str, port: u16| {
        format!(
            "[[pools]]\nname = \"{name}\"\nclass = \"infergate_worker.examples.provider:Provider\"\n\
             env = {{ INFERGATE_PROVIDER = \"openai\", OPENAI_BASE_URL = \"http://127.0.0.1:{port}/v1\" }}\n"
        )
    };
    let config = format!(
        "{}{}[[aliases]]\nname = \"chat\"\nfallbacks = [\"second\"]\n\
         [[aliases.variants]]\nname = \"first\"\npool = \"first\"\nmodel = \"provider\"\n\
         [[aliases.variants]]\nname = \"second\"\npool = \"second\"\nmodel = \"provider\"\n",
        provider("first", dead),
        provider("second", up.1)
    );
    let gw = Gateway::start(&config).unwrap();
    let client = reqwest::blocking::Client::new();
    for stream in [false, true] {
        let body = json!({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        let resp = client.post(gw.url("/v1/chat/completions")).json(&body).send().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-infergate-variant"], "second", "answered by the fallback provider");
        let text = resp.text().unwrap();
        if stream {
            assert!(text.contains("\"content\":\"Upstream\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
        } else {
            assert!(text.contains("Upstream answer citing"), "{text}");
        }
    }
    let fell_back = gw.log().iter().filter(|v| v["message"] == "falling back" && v["to"] == "second").count();
    assert!(fell_back >= 2, "each call logged its fallback ({fell_back})");
}

#[test]
fn a_client_that_leaves_a_stream_cancels_the_generation() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let text = (0..500).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let body = json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]});
    let mut resp = reqwest::blocking::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "leaves-early")
        .json(&body)
        .send()
        .unwrap();
    let mut seen = String::new();
    read_until(&mut resp, &mut seen, |s| s.contains("\"content\":\" w3\""));
    drop(resp); // hang up 5 s before the generation would end
    let left = Instant::now();
    let cancelled = gw.wait_log(0, Duration::from_secs(3), |v| {
        v["worker"] == "echo-0"
            && v["request_id"] == "leaves-early"
            && v["message"].as_str().is_some_and(|m| m.contains("cancel"))
    });
    assert!(cancelled.is_some(), "the worker kept generating:\n{}", gw.log_text());
    eprintln!("worker saw the cancellation {:?} after the client left", left.elapsed());
    assert_eq!(access_line(&gw, "leaves-early")["ended"], "client-closed");
}
