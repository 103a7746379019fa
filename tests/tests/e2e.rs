//! End to end: the real gateway binary, real Python workers, real models.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::{Duration, Instant};

use infergate::proto::inference_client::InferenceClient;
use infergate::proto::{EmbedRequest, EmbedResponse, InferRequest, ListModelsRequest, Tensor};
use infergate_e2e::{ECHO_POOL, Gateway, MINILM_POOL, cosine, reference_embeddings};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;
use serde_json::{Value, json};

/// A one-dimensional FP32 tensor named `x`.
fn fp32(values: &[f32]) -> Tensor {
    Tensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![values.len() as i64],
        fp32_contents: values.to_vec(),
        ..Default::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::blocking::Response {
    http().post(gw.url(path)).json(body).send().unwrap()
}

fn echo_body(delay_ms: u64) -> Value {
    json!({"parameters": {"delay_ms": delay_ms},
           "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]})
}

const TEXTS: [&str; 3] = ["The cat sits on the mat.", "A gateway in Rust, workers in Python.", "hello"];

#[test]
fn minilm_embeddings_over_rest_and_grpc_match_sentence_transformers() {
    let gw = Gateway::start(MINILM_POOL).unwrap();
    let reference = reference_embeddings(&TEXTS).unwrap();

    let resp = post(&gw, "/v1/embeddings", &json!({"model": "minilm", "input": TEXTS}));
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let rest: Vec<Vec<f32>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(rest.len(), 3);

    let grpc: EmbedResponse = rt().block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let req =
            EmbedRequest { model: "minilm".into(), inputs: TEXTS.map(String::from).to_vec(), user: String::new() };
        client.embed(req).await.unwrap().into_inner()
    });
    assert_eq!(grpc.data.len(), 3);
    for i in 0..3 {
        assert_eq!(rest[i].len(), 384);
        assert_eq!(grpc.data[i].values.len(), 384);
        let c = cosine(&rest[i], &reference[i]);
        assert!(c >= 0.999, "REST vector {i} cosine {c}");
        let c = cosine(&grpc.data[i].values, &reference[i]);
        assert!(c >= 0.999, "gRPC vector {i} cosine {c}");
    }
    // A single string input works too, and order is kept across a batch.
    let one: Value = post(&gw, "/v1/embeddings", &json!({"model": "minilm", "input": TEXTS[2]})).json().unwrap();
    let v: Vec<f32> = serde_json::from_value(one["data"][0]["embedding"].clone()).unwrap();
    assert!(cosine(&v, &reference[2]) >= 0.999);
}

/// Frame a message for gRPC (and grpc-web): flag byte, big-endian length, payload.
fn grpc_web_frame(msg: &impl Message) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

#[test]
fn grpc_web_over_http1() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let client = reqwest::blocking::Client::builder().http1_only().build().unwrap();
    let req =
        InferRequest { model: "echo".into(), id: "web-1".into(), inputs: vec![fp32(&[4.0])], ..Default::default() };
    let resp = client
        .post(format!("{}/infergate.v1.Inference/Infer", gw.grpc_url()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(grpc_web_frame(&req))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/grpc-web"));
    let body = resp.bytes().unwrap();
    assert_eq!(body[0], 0, "first frame is data");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let msg = infergate::proto::InferResponse::decode(&body[5..5 + len]).unwrap();
    assert_eq!(msg.id, "web-1");
    assert_eq!(msg.outputs[0].fp32_contents, vec![4.0]);
    let trailers = String::from_utf8_lossy(&body[5 + len + 5..]);
    assert_eq!(body[5 + len], 0x80, "then the trailer frame");
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}

#[test]
fn deadline_shorter_than_the_work_is_504_and_cancels_the_worker() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let started = Instant::now();
    let resp = http()
        .post(gw.url("/v2/models/echo/infer"))
        .header("x-request-timeout", "500ms")
        .header("x-request-id", "deadline-test-1")
        .json(&echo_body(5000))
        .send()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    assert!(took < Duration::from_millis(600), "answered after {took:?}");
    eprintln!("REST 500ms deadline answered 504 after {took:?}");
    let problem: Value = resp.json().unwrap();
    assert_eq!(problem["type"], "urn:infergate:error:deadline-exceeded");
    // The worker saw its call end (the SDK logs it with the request id).
    let seen = gw.wait_log(0, Duration::from_secs(5), |v| {
        v["worker"] == "echo-0"
            && v["request_id"] == "deadline-test-1"
            && v["message"].as_str().is_some_and(|m| m.contains("echo stopped early"))
    });
    assert!(seen.is_some(), "worker never observed the cancellation:\n{}", gw.log_text());

    // Over gRPC: a raw HTTP/2 call, because tonic's client would enforce
    // grpc-timeout itself (as CANCELLED) and hide the gateway's answer.
    let req = InferRequest {
        model: "echo".into(),
        inputs: vec![fp32(&[1.0])],
        parameters: [(
            "delay_ms".to_owned(),
            infergate::proto::ParamValue { value: Some(infergate::proto::param_value::Value::Int64Param(5000)) },
        )]
        .into(),
        ..Default::default()
    };
    let h2 = reqwest::blocking::Client::builder().http2_prior_knowledge().build().unwrap();
    let started = Instant::now();
    let resp = h2
        .post(format!("{}/infergate.v1.Inference/Infer", gw.grpc_url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "400m")
        .body(grpc_web_frame(&req))
        .send()
        .unwrap();
    let took = started.elapsed();
    // An error before any message is a trailers-only response: status in headers.
    assert_eq!(resp.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED; headers {:?}", resp.headers());
    assert!(took < Duration::from_millis(500), "answered after {took:?}");
    eprintln!("gRPC 400ms deadline answered DEADLINE_EXCEEDED after {took:?}");
    // The gateway and worker keep serving afterwards.
    assert_eq!(post(&gw, "/v2/models/echo/infer", &echo_body(0)).status(), 200);
}

#[test]
fn sigkill_of_one_worker_under_load_keeps_serving_and_restarts_it() {
    let gw = Gateway::start(MINILM_POOL).unwrap();
    let victim = gw.worker_pid("minilm-0").unwrap();
    let stop_at = Instant::now() + Duration::from_secs(9);
    let kill_at = Instant::now() + Duration::from_secs(1);
    let results = std::sync::Mutex::new(Vec::<(Instant, u16)>::new());
    let mut killed_at = None;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let client = http();
                while Instant::now() < stop_at {
                    let resp = client
                        .post(gw.url("/v1/embeddings"))
                        .json(&json!({"model": "minilm", "input": ["keep answering", "please"]}))
                        .send()
                        .unwrap();
                    let status = resp.status().as_u16();
                    if status != 200 {
                        assert_eq!(resp.headers()["content-type"], "application/problem+json");
                    }
                    results.lock().unwrap().push((Instant::now(), status));
                }
            });
        }
        std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));
        let log_mark = gw.log().len();
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let t0 = Instant::now();
        killed_at = Some(t0);
        // The gateway's part is timed, not the model's: a new process within
        // 2 s of the kill (death noticed, 250 ms backoff, spawn), and SERVING
        // within 2 s of the model saying it has loaded (however long loading
        // MiniLM takes on a machine this busy).
        let started = gw.wait_log(log_mark, Duration::from_secs(2), |v| {
            v["message"] == "worker started" && v["worker"] == "minilm-0"
        });
        assert!(started.is_some(), "minilm-0 not restarted within 2 s:\n{}", gw.log_text());
        let loaded = gw.wait_log(log_mark, Duration::from_secs(60), |v| {
            v["worker"] == "minilm-0" && v["message"].as_str().is_some_and(|m| m.contains("minilm loaded in"))
        });
        assert!(loaded.is_some(), "the restarted minilm-0 never loaded:\n{}", gw.log_text());
        let loaded_at = Instant::now();
        let restarted = gw.wait_log(log_mark, Duration::from_secs(2), |v| {
            v["message"] == "worker is SERVING" && v["worker"] == "minilm-0"
        });
        assert!(restarted.is_some(), "minilm-0 loaded but not SERVING within 2 s:\n{}", gw.log_text());
        eprintln!(
            "minilm-0 SIGKILLed under load: serving again after {:?} ({:?} after its model loaded)",
            t0.elapsed(),
            loaded_at.elapsed()
        );
        assert_ne!(gw.worker_pid("minilm-0"), Some(victim), "a new process serves minilm-0");
    });
    let killed_at = killed_at.unwrap();
    let results = results.into_inner().unwrap();
    let failures: Vec<_> = results.iter().filter(|(_, s)| *s != 200).collect();
    let after_kill_ok = results.iter().filter(|(t, s)| *t > killed_at && *s == 200).count();
    assert!(failures.iter().all(|(_, s)| *s == 502 || *s == 503), "{failures:?}");
    // Only calls in flight on the killed worker may fail (2 clients).
    assert!(failures.len() <= 2, "{} failures: {failures:?}", failures.len());
    assert!(after_kill_ok > 20, "only {after_kill_ok} successes after the kill");
    eprintln!(
        "SIGKILL under load: {} requests, {} failed, {after_kill_ok} ok after the kill",
        results.len(),
        failures.len()
    );
}

#[test]
fn sigterm_lets_in_flight_requests_complete() {
    let mut gw = Gateway::start(ECHO_POOL).unwrap();
    let answers = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| post(&gw, "/v2/models/echo/infer", &echo_body(1500)).status().as_u16()))
            .collect();
        std::thread::sleep(Duration::from_millis(400));
        kill(Pid::from_raw(gw.pid()), Signal::SIGTERM).unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(answers, vec![200; 4], "{}", gw.log_text());
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(gw.log().iter().any(|v| v["message"] == "infergate stopped"));
}

#[test]
fn bad_rest_input_gets_precise_problems() {
    let gw = Gateway::start(&format!("[http]\nmax_body_bytes = 4096\n{ECHO_POOL}")).unwrap();
    let client = http();
    let problem = |resp: reqwest::blocking::Response, status: u16| -> Value {
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let p: Value = resp.json().unwrap();
        assert_eq!(p["status"], status);
        assert!(p["type"].as_str().unwrap().starts_with("urn:infergate:error:"));
        assert!(p["request_id"].is_string());
        p
    };
    let infer = gw.url("/v2/models/echo/infer");
    let send = |body: &str| {
        client.post(&infer).header("content-type", "application/json").body(body.to_owned()).send().unwrap()
    };

    let p = problem(send("{\"inputs\": [{\"name\": \"x\", \"shape\": [1], \"datatype\": \"FP32\", \"data\": [1]"), 400);
    assert_eq!(p["field"], "body");
    let p = problem(send(r#"{"inputs": [{"name": "x", "shape": "one", "datatype": "FP32", "data": [1]}]}"#), 400);
    assert_eq!(p["field"], "inputs[0].shape");
    let p = problem(send(r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}"#), 400);
    assert_eq!(p["field"], "inputs[0].data");
    let p = problem(post(&gw, "/v1/embeddings", &json!({"input": "x"})), 400);
    assert!(p["detail"].as_str().unwrap().contains("model"), "{p}");
    problem(post(&gw, "/v1/embeddings", &json!({"model": "echo", "input": "x"})), 400);
    problem(post(&gw, "/v2/models/nope/infer", &echo_body(0)), 404);
    problem(post(&gw, "/v1/embeddings", &json!({"model": "nope", "input": "x"})), 404);
    problem(client.get(gw.url("/v3/nothing")).send().unwrap(), 404);
    problem(client.get(gw.url("/v1/embeddings")).send().unwrap(), 405);
    problem(client.post(&infer).header("content-type", "text/plain").body("hi").send().unwrap(), 415);
    // Over the limit with a Content-Length: refused before reading.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(10_000));
    problem(send(&big), 413);
    // Over the limit without a Content-Length (chunked): refused while streaming.
    let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024]))));
    let streamed = rt().block_on(async {
        reqwest::Client::new()
            .post(&infer)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(streamed, 413);
    // A worker failure is a 502 with a message, and the gateway keeps serving.
    let failing = json!({"parameters": {"fail": true},
                         "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]});
    let p = problem(post(&gw, "/v2/models/echo/infer", &failing), 502);
    assert!(p["detail"].as_str().unwrap().contains("asked to fail"), "{p}");
    assert_eq!(post(&gw, "/v2/models/echo/infer", &echo_body(0)).status(), 200);
}

#[test]
fn bad_grpc_input_gets_precise_statuses() {
    let gw = Gateway::start(&format!("[grpc]\nmax_message_bytes = 4096\n{ECHO_POOL}")).unwrap();
    rt().block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let tensor = |n: usize| fp32(&vec![1.0; n]);
        let infer =
            |model: &str, inputs: Vec<Tensor>| InferRequest { model: model.into(), inputs, ..Default::default() };

        let s = client.infer(infer("echo", vec![])).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let s = client.infer(infer("", vec![tensor(1)])).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let s = client.infer(infer("nope", vec![tensor(1)])).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
        assert!(s.message().contains("nope"));
        let s = client
            .embed(EmbedRequest { model: "echo".into(), inputs: vec!["x".into()], user: String::new() })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        // A shape that does not match the data: the worker rejects the item.
        let mut bad = tensor(1);
        bad.shape = vec![3];
        let s = client.infer(infer("echo", vec![bad])).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let s = client.infer(infer("echo", vec![tensor(5000)])).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        // Still serving, and the model list answers.
        let ok = client.infer(infer("echo", vec![tensor(2)])).await.unwrap().into_inner();
        assert_eq!(ok.outputs[0].fp32_contents, vec![1.0, 1.0]);
        let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner();
        assert_eq!(models.models.len(), 1);
        assert!(models.models[0].ready);
    });
}

#[test]
fn grpc_health_and_reflection_are_served() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let gw = Gateway::start(ECHO_POOL).unwrap();
    rt().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(gw.grpc_url()).unwrap().connect().await.unwrap();
        let served = infergate::edge::grpc::SERVICES;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in served.iter().chain(&[""]) {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest { service: (*service).into() })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
        }
        // A service this port does not serve is unknown to health too.
        let worker = tonic_health::pb::HealthCheckRequest { service: "infergate.v1.Worker".into() };
        assert_eq!(health.check(worker).await.unwrap_err().code(), tonic::Code::NotFound);

        let mut reflection = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        // Exactly the served services: not infergate.v1.Worker, whose
        // descriptors are in the same file set but which this port does not serve.
        let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        let mut expected: Vec<_> = served.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(names, expected);
    });
}

/// What grpcurl-like tools do, with grpcio's reflection client: the listed
/// services are exactly the served ones, each resolves to its descriptor,
/// and every method of them answers something other than UNIMPLEMENTED.
#[test]
fn a_reflection_client_can_describe_and_call_every_listed_method() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let authority = gw.grpc_url().trim_start_matches("http://").to_owned();
    let out = std::process::Command::new(infergate_e2e::python())
        .arg(infergate_e2e::root().join("tests/clients/reflection_client.py"))
        .arg(&authority)
        .args(infergate::edge::grpc::SERVICES)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok");
}

#[test]
fn remote_workers_are_reached_by_address_beside_local_ones() {
    // A worker the gateway does not supervise, on TCP.
    let worker = infergate_e2e::RemoteWorker::start("infergate_worker.examples.echo:Echo").unwrap();
    let config = format!(
        "[[pools]]\nname = \"remote-echo\"\naddresses = [\"{}\"]\n\
         [[pools]]\nname = \"minilm\"\nclass = \"infergate_worker.examples.minilm:MiniLM\"\n",
        worker.addr()
    );
    let gw = Gateway::start(&config).unwrap();
    let resp = post(&gw, "/v2/models/echo/infer", &echo_body(0));
    assert_eq!(resp.status(), 200);
    let models: Value = http().get(gw.url("/v1/models")).send().unwrap().json().unwrap();
    let pools: Vec<_> =
        models["data"].as_array().unwrap().iter().map(|m| (m["id"].clone(), m["pool"].clone())).collect();
    assert!(pools.contains(&(json!("echo"), json!("remote-echo"))), "{pools:?}");
    let emb: Value = post(&gw, "/v1/embeddings", &json!({"model": "minilm", "input": "x"})).json().unwrap();
    assert_eq!(emb["data"][0]["embedding"].as_array().unwrap().len(), 384);
}

#[test]
fn the_openai_python_sdk_gets_embeddings() {
    let gw = Gateway::start(MINILM_POOL).unwrap();
    // The SDK asks for base64 by default and decodes it itself.
    let script = "import sys\nfrom openai import OpenAI\n\
                  c = OpenAI(base_url=sys.argv[1], api_key='unused', max_retries=0)\n\
                  r = c.embeddings.create(model='minilm', input=['hello', 'world'])\n\
                  print(len(r.data), len(r.data[0].embedding), r.usage.prompt_tokens)\n\
                  try:\n    c.embeddings.create(model='nope', input='x')\nexcept Exception as e:\n    print(e.status_code)\n";
    let out =
        std::process::Command::new(infergate_e2e::python()).args(["-c", script, &gw.url("/v1")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["2 384 6", "404"]);
}

#[test]
fn every_request_gets_one_access_line_and_is_counted_never_with_a_secret() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let resp = http()
        .post(gw.url("/v2/models/echo/infer"))
        .header("x-request-id", "access-1")
        .header("authorization", "Bearer sk-must-not-appear")
        .json(&echo_body(0))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(http().get(gw.url("/nowhere")).header("x-request-id", "access-2").send().unwrap().status(), 404);
    let line = |rid: &str| {
        gw.wait_log(0, Duration::from_secs(3), |v| v["target"] == "access" && v["request_id"] == rid)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no access line for {rid}:\n{}", gw.log_text()))
    };
    let ok = line("access-1");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["route"], "/v2/models/{model}/infer");
    assert_eq!(ok["model"], "echo");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["caller"], "anonymous");
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0 && ok["bytes"].as_u64().unwrap() > 0, "{ok}");
    let missing = line("access-2");
    assert_eq!((missing["route"].as_str(), missing["status"].as_u64()), (Some("unmatched"), Some(404)));
    assert!(!gw.log_text().contains("sk-must-not-appear"), "a credential reached the log");
    let metrics = http().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    let counted = metrics.lines().any(|l| {
        l.starts_with("infergate_requests_total{")
            && l.contains("route=\"/v2/models/{model}/infer\"")
            && l.contains("model=\"echo\"")
            && l.contains("status=\"2xx\"")
    });
    assert!(counted, "no request counter for the call:\n{metrics}");
    assert!(metrics.contains("infergate_request_duration_seconds_bucket"), "no duration histogram");
}

/// The value of the first sample of `metric` whose labels contain all of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn where_the_time_went_reaches_headers_metrics_and_the_worker_log_with_the_trace() {
    let config = format!("[prices.echo]\ninput_per_million = 2.0\noutput_per_million = 10.0\n{ECHO_POOL}");
    let gw = Gateway::start(&config).unwrap();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // 60 ms of model work: the worker says so, and the gateway passes it on.
    let resp =
        http().post(gw.url("/v2/models/echo/infer")).header("traceparent", parent).json(&echo_body(60)).send().unwrap();
    assert_eq!(resp.status(), 200);
    let ms = |name: &str| -> f64 { resp.headers()[name].to_str().unwrap().parse().unwrap() };
    let (queue, inference) = (ms("x-infergate-queue-time"), ms("x-infergate-inference-time"));
    eprintln!("queue {queue} ms, inference {inference} ms");
    assert!((60.0..1000.0).contains(&inference), "inference {inference} ms for 60 ms of work");
    assert!((0.0..1000.0).contains(&queue), "queue {queue} ms");
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();

    // The worker's own log line about the call carries both ids.
    let cut = http()
        .post(gw.url("/v2/models/echo/infer"))
        .header("traceparent", parent)
        .header("x-request-id", "traced-1")
        .header("x-request-timeout", "100ms")
        .json(&echo_body(1000))
        .send()
        .unwrap();
    assert_eq!(cut.status(), 504);
    let worker_line = gw.wait_log(0, Duration::from_secs(3), |v| {
        v["request_id"] == "traced-1" && v["message"].as_str().is_some_and(|m| m.contains("echo stopped early"))
    });
    let (_, line) = worker_line.unwrap_or_else(|| panic!("no worker line for traced-1:\n{}", gw.log_text()));
    // The Python record's fields are the gateway record's fields.
    assert_eq!(
        line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the worker did not log the caller's trace: {line}"
    );
    assert_eq!(line["model"], "echo", "{line}");
    assert_eq!(line["worker"], "echo-0", "{line}");
    let access = gw
        .wait_log(0, Duration::from_secs(3), |v| v["target"] == "access" && v["request_id"] == rid.as_str())
        .unwrap()
        .1;
    assert_eq!(access["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    // A caller's id that cannot be logged or forwarded safely is replaced.
    let odd = http().get(gw.url("/v2/health/live")).header("x-request-id", "a b,c").send().unwrap();
    let given = odd.headers()["x-request-id"].to_str().unwrap();
    assert!(given != "a b,c" && given.len() == 36, "{given}");

    // gRPC calls get their access line too.
    rt().block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let mut req = tonic::Request::new(InferRequest {
            model: "echo".into(),
            inputs: vec![fp32(&[1.0])],
            ..Default::default()
        });
        req.metadata_mut().insert("x-request-id", "grpc-access-1".parse().unwrap());
        client.infer(req).await.unwrap();
    });
    let grpc_line = gw
        .wait_log(0, Duration::from_secs(3), |v| v["target"] == "access" && v["request_id"] == "grpc-access-1")
        .unwrap_or_else(|| panic!("no gRPC access line:\n{}", gw.log_text()))
        .1;
    assert_eq!(grpc_line["route"], "/infergate.v1.Inference/Infer");
    assert_eq!((grpc_line["grpc_status"].as_i64(), grpc_line["model"].as_str()), (Some(0), Some("echo")));

    // Tokens and their cost, by model and tenant.
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "one two three"}]});
    let answer: Value = post(&gw, "/v1/chat/completions", &chat).json().unwrap();
    let (input, output) =
        (answer["usage"]["prompt_tokens"].as_f64().unwrap(), answer["usage"]["completion_tokens"].as_f64().unwrap());
    assert!(output > 0.0, "{answer}");

    let metrics = http().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    let tokens = |kind: &str| {
        sample(
            &metrics,
            "infergate_tokens_total",
            &["model=\"echo\"", "tenant=\"anonymous\"", &format!("kind=\"{kind}\"")],
        )
    };
    assert_eq!(tokens("output"), Some(output), "{metrics}");
    assert_eq!(tokens("input").unwrap_or(0.0), input);
    let cost = sample(&metrics, "infergate_estimated_cost_usd", &["model=\"echo\""]).unwrap();
    assert!((cost - (input * 2.0 + output * 10.0) / 1e6).abs() < 1e-12, "cost {cost}");
    // Where the time went, per pool and per route.
    let inference_sum = sample(&metrics, "infergate_worker_inference_seconds_sum", &["pool=\"echo\""]).unwrap();
    assert!(inference_sum >= 0.06, "{inference_sum}");
    for (metric, labels) in [
        ("infergate_gateway_overhead_seconds_count", &["route=\"/v2/models/{model}/infer\""][..]),
        ("infergate_gateway_overhead_seconds_count", &["route=\"/infergate.v1.Inference/Infer\""][..]),
        ("infergate_worker_call_duration_seconds_count", &["pool=\"echo\""][..]),
        ("infergate_worker_queue_seconds_count", &["pool=\"echo\""][..]),
        ("infergate_pool_in_flight", &["pool=\"echo\""][..]),
        ("infergate_worker_in_flight", &["worker=\"echo-0\""][..]),
        ("infergate_batch_queue_depth", &["model=\"echo\""][..]),
    ] {
        assert!(sample(&metrics, metric, labels).is_some(), "no {metric} {labels:?}:\n{metrics}");
    }
    assert_eq!(sample(&metrics, "infergate_pool_in_flight", &["pool=\"echo\""]), Some(0.0), "all calls answered");
}
