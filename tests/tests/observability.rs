//! Observability end to end: every metric the committed Grafana dashboard
//! queries is in a live scrape, and Debian's real Prometheus, run with the
//! committed scrape config, ingests the gateway's request counters and its
//! overhead histogram.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infergate_e2e::{ECHO_POOL, Gateway, MINILM_POOL};
use serde_json::{Value, json};

const KEY: &str = "ig_e2e-observability-key-aaaaaaaaaaaaaaaaaaaaaa";

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The metric names a dashboard's queries use, as exposed (a histogram's
/// `_bucket`, `_sum` and `_count` all name the histogram).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = root().join("deploy/grafana/dashboards/infergate.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("infergate_") {
                let name: String =
                    expr[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
                names.insert(base.to_owned());
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_in_a_live_scrape() {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
    let redis = infergate_e2e::Redis::start().unwrap();
    let config = format!(
        "[auth]\nenabled = true\n[[auth.keys]]\nid = \"dash\"\nsha256 = \"{digest}\"\ntenant = \"t1\"\n\
         [queue]\nredis_url = \"{}\"\n\
         [limits]\nper_key = {{ rate = 20, frames_per_second = 3 }}\n\
         [prices.echo]\ninput_per_million = 1.0\noutput_per_million = 2.0\n{ECHO_POOL}{MINILM_POOL}\
         [[aliases]]\nname = \"guarded\"\n\
         [[aliases.variants]]\nname = \"v1\"\npool = \"echo\"\nmodel = \"echo\"\nweight = 90\n\
         [[aliases.variants]]\nname = \"v2\"\npool = \"echo\"\nmodel = \"echo\"\nweight = 10\nslo = {{}}\n",
        redis.url()
    );
    let gw = Gateway::start(&config).unwrap();
    let c = client();
    let post = |path: &str, body: &Value| c.post(gw.url(path)).bearer_auth(KEY).json(body).send().unwrap();
    // Embeddings: batched, a cache miss then a hit.
    for _ in 0..2 {
        assert_eq!(post("/v1/embeddings", &json!({"model": "minilm", "input": "dashboards"})).status(), 200);
    }
    // Chat: tokens and cost.
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "count my tokens"}]});
    assert_eq!(post("/v1/chat/completions", &chat).status(), 200);
    // A model error: a pool failure, by model.
    let failing = json!({"parameters": {"fail": true},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    assert_eq!(post("/v2/models/echo/infer", &failing).status(), 502);
    // A queued request, answered: the queue's series.
    let queued = c
        .post(gw.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .header("prefer", "respond-async")
        .json(&json!({"model": "minilm", "input": "later"}))
        .send()
        .unwrap();
    assert_eq!(queued.status(), 202);
    let location = queued.headers()["location"].to_str().unwrap().to_owned();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.get(gw.url(&location)).bearer_auth(KEY).send().unwrap().status() == 202 {
        assert!(std::time::Instant::now() < end, "the queued request was not answered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A stream of frames: three answered, three over the key's frame rate.
    stream_six_frames(&gw);
    // An auth failure and a rate-limit rejection.
    assert_eq!(c.get(gw.url("/v1/models")).send().unwrap().status(), 401);
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let limited = (0..200).any(|_| post("/v2/models/echo/infer", &body).status() == 429);
    assert!(limited, "the per-key rate never refused");

    // The depth gauges are set when the consumer next looks (every second).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !c.get(gw.url("/metrics")).send().unwrap().text().unwrap().contains("infergate_queued_requests{") {
        assert!(std::time::Instant::now() < end, "no queue depth gauge");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let scrape = c.get(gw.url("/metrics")).send().unwrap().text().unwrap();
    let exposed: BTreeSet<&str> =
        scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 20, "the dashboard queries {wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|m| !exposed.contains(m.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics the gateway does not expose: {missing:?}\n{scrape}");
}

/// Send six frames at once on a gRPC stream to echo, with the test's key.
fn stream_six_frames(gw: &Gateway) {
    use infergate::proto::inference_client::InferenceClient;
    use infergate::proto::stream_request::Kind;
    use infergate::proto::{StreamFrame, StreamOpen, StreamRequest, Tensor};

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
        let open = StreamOpen { model: "echo".into(), ..Default::default() };
        let frame = |seq| StreamFrame {
            seq,
            inputs: vec![Tensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1],
                fp32_contents: vec![1.0],
                ..Default::default()
            }],
            ..Default::default()
        };
        let messages = std::iter::once(Kind::Open(open))
            .chain((0..6).map(move |i| Kind::Frame(frame(i))))
            .map(|kind| StreamRequest { kind: Some(kind) });
        let mut req = tonic::Request::new(futures::stream::iter(messages));
        req.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        let mut results = client.infer_stream(req).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(r) = results.message().await.unwrap() {
            assert!(r.outcome.is_some(), "{r:?}");
            n += 1;
        }
        assert_eq!(n, 6);
    });
}

/// Debian's `prometheus`, on a free port, with `config`; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(config: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("infergate-prom-{}-{}", std::process::id(), infergate_e2e::rand_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = std::env::var("INFERGATE_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} (`make test` installs Debian's prometheus): {e}"));
        Self { child, port, dir }
    }

    /// The value of an instant query's single result, if it has one.
    fn query(&self, q: &str) -> Option<f64> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let url = format!("http://127.0.0.1:{}/api/v1/query?query={encoded}", self.port);
        let resp: Value = client().get(url).send().ok()?.json().ok()?;
        resp["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_real_prometheus_ingests_request_counters_and_the_overhead_histogram() {
    let gw = Gateway::start(ECHO_POOL).unwrap();
    let committed = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(committed.contains("\"gateway:8080\""));
    // The committed config, pointed at this gateway instead of the compose service.
    let target = gw.url("").trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&committed.replace("gateway:8080", &target));

    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    for _ in 0..25 {
        let resp = client().post(gw.url("/v2/models/echo/infer")).json(&body).send().unwrap();
        assert_eq!(resp.status(), 200);
    }
    let requests = r#"sum(infergate_requests_total{route="/v2/models/{model}/infer",status="2xx"})"#;
    let overhead = r#"sum(infergate_gateway_overhead_seconds_count{route="/v2/models/{model}/infer"})"#;
    let p99 = "histogram_quantile(0.99, sum by (le) (infergate_gateway_overhead_seconds_bucket))";
    // The committed scrape interval is 5 s; Prometheus takes a moment to start.
    let end = Instant::now() + Duration::from_secs(40);
    let (mut seen_requests, mut seen_overhead) = (None, None);
    while Instant::now() < end {
        seen_requests = prometheus.query(requests);
        seen_overhead = prometheus.query(overhead);
        if seen_requests >= Some(25.0) && seen_overhead >= Some(25.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(prometheus.query(r#"up{job="infergate"}"#), Some(1.0), "the scrape target is not up");
    assert!(seen_requests >= Some(25.0), "requests ingested: {seen_requests:?}");
    assert!(seen_overhead >= Some(25.0), "overhead observations ingested: {seen_overhead:?}");
    let p99 = prometheus.query(p99).unwrap();
    eprintln!("Prometheus ingested {seen_requests:?} requests; gateway overhead p99 {:.3} ms", p99 * 1000.0);
    assert!(p99 > 0.0 && p99 < 0.1, "overhead p99 {p99} s");
}

/// An OpenTelemetry collector as far as OTLP/gRPC goes: it keeps the spans
/// it is sent.
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<Span>>>);

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                kept.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn request_spans_reach_an_otlp_collector_in_the_callers_trace() {
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let collector_addr = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let config = format!("[tracing]\notlp_endpoint = \"http://{collector_addr}\"\n{ECHO_POOL}");
    let gw = Gateway::start(&config).unwrap();
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    let resp = client()
        .post(gw.url("/v2/models/echo/infer"))
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-request-id", "otlp-1")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let end = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let hit =
            spans.lock().unwrap().iter().find(|s| hex_of(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736").cloned();
        match hit {
            Some(span) => break span,
            None if Instant::now() < end => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("no span of the caller's trace reached the collector:\n{}", gw.log_text()),
        }
    };
    assert_eq!(hex_of(&found.parent_span_id), "00f067aa0ba902b7", "the caller's span is the parent");
    assert_eq!(found.name, "POST /v2/models/{model}/infer");
    let attr = |key: &str| found.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone());
    assert!(format!("{:?}", attr("infergate.request_id")).contains("otlp-1"), "{found:?}");
    assert!(format!("{:?}", attr("http.response.status_code")).contains("200"), "{found:?}");
    assert!(found.end_time_unix_nano > found.start_time_unix_nano);
    // The same span id went to the worker as its parent: the log line's
    // trace id matches, and the gateway logged nothing about failed exports.
    assert!(!gw.log_text().contains("OTLP export failed"));
}
