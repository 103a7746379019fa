//! A short run of the load generator against in-process targets on
//! loopback: HTTP/1.1 and HTTP/2 (axum) and gRPC (the gateway's own gRPC
//! edge over a fake upstream). Checks the generator, not the targets.

#![allow(clippy::unwrap_used, reason = "test helpers: a failure is a failed test")]

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use infergate::call::Call;
use infergate::edge::EdgeState;
use infergate::error::GatewayError;
use infergate::proto::{ModelEntry, ModelInfo, ModelKind};
use infergate::upstream::{EmbedOutput, PoolStatus, Upstream};
use infergate_benches::load::{self, Mode, Payload, Protocol, RunConfig, Target, Texts};

/// Serves embedding model `m`.
struct Fake;

#[async_trait::async_trait]
impl Upstream for Fake {
    fn models(&self) -> Vec<ModelEntry> {
        let info =
            ModelInfo { name: "m".into(), kind: ModelKind::Embed as i32, embedding_dim: 8, ..Default::default() };
        vec![ModelEntry { info: Some(info), pool: "p".into(), ready: true, ..Default::default() }]
    }
    fn status(&self) -> Vec<PoolStatus> {
        Vec::new()
    }
    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        let model = ModelInfo { name: call.model, ..Default::default() };
        Ok(EmbedOutput { model, vectors: call.payload.iter().map(|_| vec![0.5; 8]).collect(), prompt_tokens: 1 })
    }
}

async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn cfg(label: &str, mode: Mode) -> RunConfig {
    RunConfig {
        label: label.into(),
        mode,
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        max_in_flight: 1000,
        progress: false,
    }
}

fn embed_payload() -> Arc<Payload> {
    Arc::new(Payload::Embed { model: "m".into(), inputs: 2, texts: Texts::Unique })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_holds_the_offered_rate_over_http1_and_http2() {
    let app = axum::Router::new()
        .route("/ok", post(|| async { "{}" }))
        .route("/busy", post(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "{}") }));
    let addr = serve(app).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let target = Arc::new(Target::new(protocol, &format!("http://{addr}/ok")).unwrap());
        let r = load::run(target, embed_payload(), &cfg("ok", Mode::Open { rate: 200.0 })).await.unwrap();
        assert!((180.0..=220.0).contains(&r.achieved_rps), "{protocol:?}: {r:?}");
        assert_eq!(r.outcomes.keys().collect::<Vec<_>>(), ["ok"], "{r:?}");
        assert!(r.latency_ms.p50 > 0.0 && r.latency_ms.p50 <= r.latency_ms.p99, "{r:?}");
    }
    let target = Arc::new(Target::new(Protocol::Http1, &format!("http://{addr}/busy")).unwrap());
    let r = load::run(target, embed_payload(), &cfg("busy", Mode::Open { rate: 100.0 })).await.unwrap();
    assert_eq!(r.achieved_rps, 0.0);
    assert!(r.outcomes["503"] >= 90, "{r:?}");
    assert!(r.error_rate() > 0.99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_over_grpc_counts_what_it_sends() {
    let core = infergate::service::Core::new(
        Arc::new(Fake),
        infergate::service::Live {
            policy: infergate::policy::Policy::unrestricted(),
            routes: Default::default(),
            cache: infergate::cache::ResponseCache::disabled(),
            prices: Arc::default(),
            streams: Default::default(),
        },
    );
    let state = Arc::new(EdgeState {
        conversations: infergate::conversations::Conversations::in_memory(),
        queue: None,
        core: Arc::new(core),
        default_deadline: Duration::from_secs(5),
        max_body_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
        http_max_in_flight: 64,
        grpc_max_in_flight: 64,
        buffered: infergate::edge::gate::Buffered::new(1 << 30),
        sse_keep_alive: std::time::Duration::from_secs(15),
        image: infergate::edge::convert::ImageBounds { pixels: 1 << 24, bytes: 1 << 28 },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let (_, health) = tonic_health_server();
    let addr = serve(infergate::edge::grpc::router(state, health).unwrap()).await;
    let target = Arc::new(Target::new(Protocol::Grpc, &format!("http://{addr}")).unwrap());
    let r = load::run(target, embed_payload(), &cfg("grpc", Mode::Closed { concurrency: 4 })).await.unwrap();
    assert!(r.sent > 100, "{r:?}");
    assert_eq!(r.outcomes.get("ok").copied(), Some(r.sent), "{r:?}");
    assert_eq!(r.concurrency, Some(4));
}

fn tonic_health_server() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}
