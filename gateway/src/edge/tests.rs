//! The REST and gRPC edges against an in-process fake upstream: routing,
//! deadlines, request ids, readiness and overload, without Python.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::EdgeState;
use crate::call::Call;
use crate::error::GatewayError;
use crate::proto::{ModelEntry, ModelInfo, ModelKind};
use crate::upstream::{EmbedOutput, PoolStatus, Upstream};

/// Answers embeddings with `[len(text)]`, remembers each call's deadline
/// budget, and can be made to hold calls until released.
#[derive(Default)]
pub(super) struct Fake {
    pub(super) ready: bool,
    pub(super) starting: bool,
    pub(super) budgets: Mutex<Vec<Duration>>,
    pub(super) gate: Option<Arc<Semaphore>>,
}

fn embed_model() -> ModelInfo {
    ModelInfo { name: "m".into(), kind: ModelKind::Embed as i32, embedding_dim: 1, ..Default::default() }
}

#[async_trait::async_trait]
impl Upstream for Fake {
    fn models(&self) -> Vec<ModelEntry> {
        vec![ModelEntry { info: Some(embed_model()), pool: "p".into(), ready: self.ready, ..Default::default() }]
    }
    fn model(&self, name: &str) -> Result<ModelEntry, GatewayError> {
        match name {
            "m" => Ok(self.models().remove(0)),
            _ if self.starting => Err(GatewayError::Starting { model: name.into() }),
            _ => Err(GatewayError::ModelNotFound { model: name.into() }),
        }
    }
    fn status(&self) -> Vec<PoolStatus> {
        vec![PoolStatus { pool: "p".into(), ready_workers: usize::from(self.ready), workers: 1, load_error: None }]
    }
    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        self.model(&call.model)?;
        self.budgets.lock().unwrap().push(call.deadline.budget);
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await;
        }
        let vectors = call.payload.iter().map(|t| vec![t.len() as f32]).collect();
        Ok(EmbedOutput { model: embed_model(), vectors, prompt_tokens: 7 })
    }
}

fn state(fake: Fake, max_in_flight: usize) -> (Arc<EdgeState>, Arc<Fake>) {
    let fake = Arc::new(fake);
    let core = crate::service::Core::new(
        fake.clone(),
        crate::service::Live {
            policy: crate::policy::Policy::unrestricted(),
            routes: Default::default(),
            cache: crate::cache::ResponseCache::disabled(),
            prices: Arc::default(),
            streams: Default::default(),
        },
    );
    let state = Arc::new(EdgeState {
        conversations: crate::conversations::Conversations::in_memory(),
        queue: None,
        core: Arc::new(core),
        default_deadline: Duration::from_secs(30),
        max_body_bytes: 1024,
        max_message_bytes: 1024,
        http_max_in_flight: max_in_flight,
        grpc_max_in_flight: max_in_flight,
        buffered: super::gate::Buffered::new(1 << 30),
        sse_keep_alive: std::time::Duration::from_secs(15),
        image: super::convert::ImageBounds { pixels: 1 << 24, bytes: 1 << 28 },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    (state, fake)
}

fn embed_req(body: Value) -> Request<Body> {
    Request::post("/v1/embeddings")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn embeddings_answer_in_openai_shape_with_request_id() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let mut req = embed_req(json!({"model": "m", "input": ["ab", "abcd"]}));
    req.headers_mut().insert("x-request-id", "mine-1".parse().unwrap());
    let (status, headers, body) = send(&app, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], "mine-1");
    assert_eq!(body["data"][1]["embedding"], json!([4.0]));
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
}

#[tokio::test]
async fn problems_carry_the_request_id_and_a_generated_one_is_returned() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let (status, headers, body) = send(&app, embed_req(json!({"model": "zzz", "input": "x"}))).await;
    assert_eq!(status, 404);
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a uuid: {id}");
    assert_eq!(body["request_id"], id);
    let (status, _, body) = send(&app, embed_req(json!({"model": "m", "input": "x", "dimensions": 3}))).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "dimensions");
}

#[tokio::test]
async fn a_client_may_lower_but_not_raise_the_deadline() {
    let (state, fake) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    for (header, _) in [("250ms", ()), ("1.5", ()), ("3600", ())] {
        let mut req = embed_req(json!({"model": "m", "input": "x"}));
        req.headers_mut().insert("x-request-timeout", header.parse().unwrap());
        assert_eq!(send(&app, req).await.0, 200);
    }
    let budgets = fake.budgets.lock().unwrap().clone();
    assert_eq!(budgets, vec![Duration::from_millis(250), Duration::from_millis(1500), Duration::from_secs(30)]);

    for (header, why) in [("soon", "seconds (2.5) or with a unit"), ("0", "must be above zero")] {
        let mut req = embed_req(json!({"model": "m", "input": "x"}));
        req.headers_mut().insert("x-request-timeout", header.parse().unwrap());
        let (status, _, body) = send(&app, req).await;
        assert_eq!(status, 400);
        assert_eq!(body["field"], "X-Request-Timeout");
        assert!(body["detail"].as_str().unwrap().contains(why), "{body}");
    }
}

#[tokio::test]
async fn readiness_follows_pools_and_draining() {
    let (state, _) = state(Fake { ready: false, ..Default::default() }, 8);
    let app = super::rest::router(state.clone());
    let (status, _, body) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["pools"][0]["ready_workers"], 0);
    assert_eq!(send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await.0, 200);

    let (state, _) = self::state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state.clone());
    assert_eq!(send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await.0, 200);
    state.draining.cancel();
    let (status, _, body) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["draining"], true);
}

#[tokio::test]
async fn unknown_models_while_starting_are_503_with_retry_after() {
    let (state, _) = state(Fake { ready: false, starting: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let (status, headers, body) = send(&app, embed_req(json!({"model": "later", "input": "x"}))).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(body["type"], "urn:infergate:error:starting");
}

#[tokio::test]
async fn method_not_allowed_is_a_problem_on_every_route() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    for path in ["/v1/embeddings", "/readyz"] {
        let (status, headers, body) = send(&app, Request::delete(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(headers["content-type"], "application/problem+json", "{path}");
        assert_eq!(body["status"], 405);
    }
}

#[tokio::test]
async fn a_path_that_is_not_utf8_is_a_problem_on_every_route_with_parameters() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let source = include_str!("rest.rs");
    let routed: Vec<&str> = source.split(".route(\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
    let with_params: Vec<&&str> = routed.iter().filter(|p| p.contains('{')).collect();
    assert!(with_params.len() >= 10, "{with_params:?}");
    for path in with_params {
        // Every parameter is %FF: a byte that is not UTF-8 on its own.
        let path = path.split('/').map(|s| if s.starts_with('{') { "%FF" } else { s }).collect::<Vec<_>>().join("/");
        for method in [http::Method::GET, http::Method::POST, http::Method::DELETE] {
            let req = Request::builder().method(method.clone()).uri(&path).body(Body::empty()).unwrap();
            let (status, headers, body) = send(&app, req).await;
            if status == 405 {
                continue;
            }
            assert_eq!(status, 400, "{method} {path}: {body}");
            assert_eq!(headers["content-type"], "application/problem+json", "{method} {path}");
            // The OpenAI dialect names the parameter in `error.param`, OIP in `field`.
            let param = if path.starts_with("/v2/") { &body["field"] } else { &body["error"]["param"] };
            assert_eq!(param, "path", "{method} {path}: {body}");
        }
    }
}

#[tokio::test]
async fn over_the_in_flight_limit_is_shed_but_health_still_answers() {
    let gate = Arc::new(Semaphore::new(0));
    let (state, _) = state(Fake { ready: true, gate: Some(gate.clone()), ..Default::default() }, 1);
    let app = super::rest::router(state);
    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, embed_req(json!({"model": "m", "input": "x"}))).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, headers, body) = send(&app, embed_req(json!({"model": "m", "input": "y"}))).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(body["type"], "urn:infergate:error:overloaded");
    assert_eq!(send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await.0, 200);
    gate.add_permits(1);
    assert_eq!(held.await.unwrap(), 200);
}

/// `http.max_in_flight` is one bound for the listener: a call held on one
/// route leaves no permit for another route.
#[tokio::test]
async fn the_in_flight_limit_is_shared_by_every_route() {
    let gate = Arc::new(Semaphore::new(0));
    let (state, fake) = state(Fake { ready: true, gate: Some(gate.clone()), ..Default::default() }, 1);
    let app = super::rest::router(state);
    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, embed_req(json!({"model": "m", "input": "x"}))).await.0 }
    });
    // The held call has reached the upstream (it records its budget first).
    while fake.budgets.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    let infer = Request::post("/v2/models/m/infer")
        .header("content-type", "application/json")
        .body(Body::from(json!({"inputs": []}).to_string()))
        .unwrap();
    let (status, _, body) = send(&app, infer).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:infergate:error:overloaded");
    gate.add_permits(1);
    assert_eq!(held.await.unwrap(), 200);
}

#[tokio::test]
async fn v2_errors_carry_the_oip_error_string_beside_the_problem() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let req = Request::post("/v2/models/nope/infer")
        .header("content-type", "application/json")
        .body(Body::from(json!({"inputs": []}).to_string()))
        .unwrap();
    let (status, headers, body) = send(&app, req).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["error"], body["detail"], "{body}");
    assert!(body["error"].as_str().unwrap().contains("nope"));
    // Routes outside /v1 and /v2 keep the plain problem.
    let (status, _, body) = send(&app, Request::get("/nowhere").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 404);
    assert!(body.get("error").is_none(), "{body}");
}

/// Triton's clients send OIP bodies without a type: taken as JSON, except
/// from a web page (which may send an untyped body cross-origin unasked).
#[tokio::test]
async fn an_untyped_infer_body_is_json_unless_a_page_sent_it() {
    let (state, _) = state(Fake { ready: true, ..Default::default() }, 8);
    let app = super::rest::router(state);
    let untyped = |page: Option<(&str, &str)>| {
        let mut req = Request::post("/v2/models/nope/infer");
        if let Some((name, value)) = page {
            req = req.header(name, value);
        }
        req.body(Body::from(json!({"inputs": []}).to_string())).unwrap()
    };
    // Read as JSON and routed: the model is unknown.
    assert_eq!(send(&app, untyped(None)).await.0, 404);
    for page in [("origin", "https://evil.example"), ("sec-fetch-site", "cross-site")] {
        let (status, _, body) = send(&app, untyped(Some(page))).await;
        assert_eq!(status, 415, "{page:?}: {body}");
        assert!(body["detail"].as_str().unwrap().contains("none"), "{body}");
    }
}
