//! The REST and gRPC edges side by side: one table of behaviours, each run
//! against both edges over a fresh gateway state (real policy, routes and
//! response cache; a fake upstream), and what a client sees on each —
//! status, the headers or metadata that report the cache, the variant and
//! limits, usage, the deadline the model was given — must be the same.
//! A behaviour that drifts on one edge fails here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::Digest;
use tower::ServiceExt;

use super::EdgeState;
use crate::call::Call;
use crate::config::{Config, RawConfig};
use crate::error::GatewayError;
use crate::policy::PeerAddr;
use crate::proto::inference_client::InferenceClient;
use crate::proto::oip::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::oip::{InferTensorContents, ModelInferRequest};
use crate::proto::{
    ChatMessage, EmbedRequest, FinishReason, GenerateChunk, GenerateRequest, GenerationParams, InferItem, InferOutputs,
    InferRequest, ModelEntry, ModelInfo, ModelKind, Tensor, Usage,
};
use crate::upstream::{ChunkStream, EmbedOutput, PoolStatus, Upstream};

const KEY: &str = "ig_parity-key-0123456789abcdefghijklmnopqrstuv";

/// Pools `a` and `b` serve embed model `m`, tensor model `t` and chat model
/// `g`; pool `down` serves them too but never takes a call. Records the
/// deadline budget of every call that reached it.
#[derive(Default)]
struct Models {
    budgets: Mutex<Vec<Duration>>,
}

fn info(name: &str) -> ModelInfo {
    let kind = match name {
        "m" => ModelKind::Embed,
        "t" => ModelKind::Infer,
        _ => ModelKind::Generate,
    };
    ModelInfo { name: name.into(), kind: kind as i32, version: "1".into(), embedding_dim: 1, ..Default::default() }
}

impl Models {
    /// Take a call to `call.model` on its pool, or refuse it as `down` does.
    fn take<P>(&self, call: &Call<P>) -> Result<(), GatewayError> {
        self.model_in(call.pool.as_deref().unwrap_or("a"), &call.model)?;
        if call.pool.as_deref() == Some("down") {
            return Err(GatewayError::NoReadyWorker { pool: "down".into() });
        }
        self.budgets.lock().unwrap().push(call.deadline.budget);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Upstream for Models {
    fn models(&self) -> Vec<ModelEntry> {
        let mut all = Vec::new();
        for pool in ["a", "b", "down"] {
            for name in ["g", "m", "t"] {
                all.push(ModelEntry { info: Some(info(name)), pool: pool.into(), ready: true, ..Default::default() });
            }
        }
        all
    }
    fn model_in(&self, pool: &str, name: &str) -> Result<ModelEntry, GatewayError> {
        let found =
            self.models().into_iter().find(|e| e.pool == pool && e.info.as_ref().is_some_and(|i| i.name == name));
        found.ok_or_else(|| GatewayError::ModelNotFound { model: name.to_owned() })
    }
    fn status(&self) -> Vec<PoolStatus> {
        ["a", "b", "down"].map(|p| PoolStatus { pool: p.into(), ready_workers: 1, workers: 1, load_error: None }).into()
    }
    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        self.take(&call)?;
        let vectors = call.payload.iter().map(|t| vec![t.len() as f32]).collect();
        Ok(EmbedOutput { model: info("m"), vectors, prompt_tokens: 2 * call.payload.len() as u32 })
    }
    async fn infer(&self, call: Call<InferItem>) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        self.take(&call)?;
        Ok((info("t"), InferOutputs { tensors: call.payload.inputs, ..Default::default() }))
    }
    async fn generate(&self, call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
        self.take(&call)?;
        let usage = |n| Some(Usage { prompt_tokens: 3, completion_tokens: n });
        let chunks = vec![
            Ok(GenerateChunk { text: "hello".into(), usage: usage(1), ..Default::default() }),
            Ok(GenerateChunk { finish_reason: FinishReason::Stop as i32, usage: usage(1), ..Default::default() }),
        ];
        Ok(futures::stream::iter(chunks).boxed())
    }
}

/// A gateway state over [`Models`], auth on with one key, `extra` config.
fn state(extra: &str) -> (Arc<EdgeState>, Arc<Models>) {
    let text = format!(
        r#"
[auth]
enabled = true
[[auth.keys]]
id = "k1"
sha256 = "{}"
tenant = "acme"
[cache]
enabled = true
[[pools]]
name = "a"
class = "x:Y"
[[pools]]
name = "b"
class = "x:Y"
[[pools]]
name = "down"
class = "x:Y"
{extra}
"#,
        hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
    );
    let raw: RawConfig = toml::from_str(&text).unwrap();
    let config = Config::from_raw(raw).unwrap();
    let models = Arc::new(Models::default());
    let core = crate::service::Core::new(
        models.clone(),
        crate::service::Live {
            policy: crate::policy::Policy::new(&config).unwrap(),
            routes: Arc::new(crate::route::Routes::new(&config.aliases)),
            cache: Arc::new(
                crate::cache::ResponseCache::new(config.cache.clone(), None, config.cache_pools.clone()).unwrap(),
            ),
            prices: Arc::default(),
            streams: Default::default(),
        },
    );
    let state = Arc::new(EdgeState {
        conversations: crate::conversations::Conversations::in_memory(),
        queue: None,
        core: Arc::new(core),
        default_deadline: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
        http_max_in_flight: 64,
        grpc_max_in_flight: 64,
        buffered: super::gate::Buffered::new(1 << 30),
        sse_keep_alive: Duration::from_secs(15),
        image: super::convert::ImageBounds { pixels: 1 << 24, bytes: 1 << 28 },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    (state, models)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Embeddings of these texts.
    Embed(&'static [&'static str]),
    /// A tensor call with one FP32 input.
    Infer,
    /// A chat at temperature 0.
    Chat,
}

/// One request of a behaviour.
#[derive(Debug, Clone, Copy)]
struct Ask {
    kind: Kind,
    model: &'static str,
    /// Sent with the key unless false.
    authorized: bool,
    /// `x-model-version`.
    pin: Option<&'static str>,
    /// The deadline asked for (`x-request-timeout` / `grpc-timeout`).
    timeout: Option<Duration>,
}

fn ask(kind: Kind, model: &'static str) -> Ask {
    Ask { kind, model, authorized: true, pin: None, timeout: None }
}

/// What a client sees of one answer, in terms common to both edges.
#[derive(Debug, PartialEq)]
struct Seen {
    /// The HTTP status, or for gRPC the status its code stands for.
    status: u16,
    /// Reporting headers (REST) or metadata (gRPC) present on the answer.
    report: BTreeMap<&'static str, String>,
    /// Tokens the answer reports (embeddings: prompt; chat: completion).
    tokens: Option<u32>,
}

/// The headers and metadata that report how a call went.
const REPORTED: [&str; 7] = [
    "x-cache",
    "x-cache-similarity",
    "x-infergate-variant",
    "infergate-limit",
    "ratelimit-limit",
    "ratelimit-remaining",
    "retry-after",
];

fn report(get: impl Fn(&str) -> Option<String>) -> BTreeMap<&'static str, String> {
    REPORTED.iter().filter_map(|name| Some((*name, get(name)?))).collect()
}

async fn rest(app: &axum::Router, a: Ask) -> Seen {
    let (path, body) = match a.kind {
        Kind::Embed(texts) => ("/v1/embeddings".to_owned(), json!({"model": a.model, "input": texts})),
        Kind::Infer => (
            format!("/v2/models/{}/infer", a.model),
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]}),
        ),
        Kind::Chat => (
            "/v1/chat/completions".to_owned(),
            json!({"model": a.model, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    };
    let mut req = Request::post(path).header("content-type", "application/json");
    if a.authorized {
        req = req.header("authorization", format!("Bearer {KEY}"));
    }
    if let Some(pin) = a.pin {
        req = req.header("x-model-version", pin);
    }
    if let Some(t) = a.timeout {
        req = req.header("x-request-timeout", format!("{}ms", t.as_millis()));
    }
    let mut req = req.body(Body::from(body.to_string())).unwrap();
    req.extensions_mut().insert(PeerAddr(SocketAddr::from(([127, 0, 0, 1], 4000))));
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body: Value = serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap_or_default();
    let tokens = match a.kind {
        Kind::Embed(_) => body["usage"]["prompt_tokens"].as_u64(),
        Kind::Chat => body["usage"]["completion_tokens"].as_u64(),
        Kind::Infer => None,
    };
    let header = |name: &str| parts.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    Seen { status: parts.status.as_u16(), report: report(header), tokens: tokens.map(|t| t as u32) }
}

/// The HTTP status a gRPC code stands for (as the gateway maps them).
fn http_of(code: tonic::Code) -> u16 {
    match code {
        tonic::Code::Ok => 200,
        tonic::Code::InvalidArgument => 400,
        tonic::Code::Unauthenticated => 401,
        tonic::Code::PermissionDenied => 403,
        tonic::Code::NotFound => 404,
        tonic::Code::ResourceExhausted => 429,
        tonic::Code::Unavailable => 503,
        tonic::Code::DeadlineExceeded => 504,
        other => panic!("no parity mapping for {other:?}"),
    }
}

/// The gRPC clients of one gateway: infergate's own service, and OIP v2's
/// (`inference.GRPCInferenceService`), which takes the infer calls when `oip`.
struct GrpcClients {
    inference: InferenceClient<tonic::transport::Channel>,
    oip: Option<GrpcInferenceServiceClient<tonic::transport::Channel>>,
}

async fn grpc(clients: &mut GrpcClients, a: Ask) -> Seen {
    fn request<T>(a: Ask, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if a.authorized {
            r.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        }
        if let Some(pin) = a.pin {
            r.metadata_mut().insert("x-model-version", pin.parse().unwrap());
        }
        if let Some(t) = a.timeout {
            r.set_timeout(t);
        }
        r
    }
    let model = a.model.to_owned();
    let answer: Result<(tonic::metadata::MetadataMap, Option<u32>), tonic::Status> = match a.kind {
        Kind::Embed(texts) => {
            let msg =
                EmbedRequest { model, inputs: texts.iter().map(|t| (*t).to_owned()).collect(), ..Default::default() };
            clients.inference.embed(request(a, msg)).await.map(|r| {
                let tokens = r.get_ref().usage.map(|u| u.prompt_tokens);
                (r.metadata().clone(), tokens)
            })
        }
        Kind::Infer => {
            let x = Tensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                fp32_contents: vec![1.5, 2.5],
                ..Default::default()
            };
            match &mut clients.oip {
                None => {
                    let msg = InferRequest { model, inputs: vec![x], ..Default::default() };
                    clients.inference.infer(request(a, msg)).await.map(|r| (r.metadata().clone(), None))
                }
                Some(oip) => {
                    use crate::proto::oip::model_infer_request::InferInputTensor;
                    let x = InferInputTensor {
                        name: x.name,
                        datatype: x.datatype,
                        shape: x.shape,
                        contents: Some(InferTensorContents { fp32_contents: x.fp32_contents, ..Default::default() }),
                        ..Default::default()
                    };
                    let msg = ModelInferRequest { model_name: model, inputs: vec![x], ..Default::default() };
                    oip.model_infer(request(a, msg)).await.map(|r| (r.metadata().clone(), None))
                }
            }
        }
        Kind::Chat => {
            let params = GenerationParams { temperature: 0.0, has_temperature: true, ..Default::default() };
            let messages = vec![ChatMessage { role: "user".into(), content: "hi".into() }];
            let msg = GenerateRequest { model, messages, params: Some(params), ..Default::default() };
            match clients.inference.generate(request(a, msg)).await {
                Ok(r) => {
                    let md = r.metadata().clone();
                    let mut stream = r.into_inner();
                    let mut tokens = None;
                    while let Some(chunk) = stream.next().await {
                        tokens = chunk.unwrap().usage.map(|u| u.completion_tokens).or(tokens);
                    }
                    Ok((md, tokens))
                }
                Err(status) => Err(status),
            }
        }
    };
    match answer {
        Ok((md, tokens)) => {
            let get = |name: &str| md.get(name).map(|v| v.to_str().unwrap().to_owned());
            Seen { status: 200, report: report(get), tokens }
        }
        Err(status) => {
            let md = status.metadata();
            let get = |name: &str| md.get(name).map(|v| v.to_str().unwrap().to_owned());
            Seen { status: http_of(status.code()), report: report(get), tokens: None }
        }
    }
}

/// Reporting headers an answer must carry, and their values (`*`: any).
type Report = &'static [(&'static str, &'static str)];

/// A behaviour: config, then requests and what each must show.
struct Behaviour {
    name: &'static str,
    config: &'static str,
    steps: Vec<(Ask, u16, Report)>,
    /// Deadline budgets the models must have been given, in order.
    budgets: Option<Vec<Duration>>,
}

const ALIAS: &str = r#"
[[aliases]]
name = "chat"
fallbacks = ["v2"]
[[aliases.variants]]
name = "v1"
pool = "down"
model = "g"
weight = 100
[[aliases.variants]]
name = "v2"
pool = "b"
model = "g"
weight = 0
[[aliases]]
name = "emb"
[[aliases.variants]]
name = "one"
pool = "a"
model = "m"
weight = 100
[[aliases.variants]]
name = "two"
pool = "b"
model = "m"
weight = 0
"#;

fn behaviours() -> Vec<Behaviour> {
    let (miss, hit, partial) = (&[("x-cache", "miss")][..], &[("x-cache", "hit")][..], &[("x-cache", "partial")][..]);
    vec![
        Behaviour {
            name: "embeddings: a miss, a hit, then a partial hit",
            config: "",
            steps: vec![
                (ask(Kind::Embed(&["a"]), "m"), 200, miss),
                (ask(Kind::Embed(&["a"]), "m"), 200, hit),
                (ask(Kind::Embed(&["a", "bb"]), "m"), 200, partial),
            ],
            budgets: None,
        },
        Behaviour {
            name: "tensors: a miss, then a hit",
            config: "",
            steps: vec![(ask(Kind::Infer, "t"), 200, miss), (ask(Kind::Infer, "t"), 200, hit)],
            budgets: None,
        },
        Behaviour {
            name: "chat at temperature 0: from the model, then from the cache",
            config: "",
            steps: vec![(ask(Kind::Chat, "g"), 200, &[]), (ask(Kind::Chat, "g"), 200, hit)],
            budgets: None,
        },
        Behaviour {
            name: "an alias: its weighted variant, a pinned one, an unknown pin",
            config: ALIAS,
            steps: vec![
                (ask(Kind::Embed(&["a"]), "emb"), 200, &[("x-cache", "miss"), ("x-infergate-variant", "one")]),
                (
                    Ask { pin: Some("two"), ..ask(Kind::Embed(&["a"]), "emb") },
                    200,
                    &[("x-cache", "miss"), ("x-infergate-variant", "two")],
                ),
                (Ask { pin: Some("three"), ..ask(Kind::Embed(&["a"]), "emb") }, 400, &[]),
            ],
            budgets: None,
        },
        Behaviour {
            name: "a variant whose pool cannot take the call falls back",
            config: ALIAS,
            steps: vec![(ask(Kind::Chat, "chat"), 200, &[("x-infergate-variant", "v2")])],
            budgets: None,
        },
        Behaviour {
            name: "errors: an unknown model, a missing key",
            config: "",
            steps: vec![
                (ask(Kind::Infer, "nope"), 404, &[]),
                (ask(Kind::Embed(&["a"]), "nope"), 404, &[]),
                (Ask { authorized: false, ..ask(Kind::Embed(&["a"]), "m") }, 401, &[]),
            ],
            budgets: None,
        },
        Behaviour {
            name: "a key's rate: the second call is refused and says why",
            config: "[limits]\nper_key = { rate = 0.001, burst = 1 }\n",
            steps: vec![
                (ask(Kind::Embed(&["a"]), "m"), 200, miss),
                (
                    ask(Kind::Embed(&["b"]), "m"),
                    429,
                    &[("infergate-limit", "key.rate"), ("ratelimit-limit", "1"), ("retry-after", "*")],
                ),
            ],
            budgets: None,
        },
        Behaviour {
            name: "deadlines: the caller's shorter deadline reaches the model",
            config: "",
            steps: vec![
                (Ask { timeout: Some(Duration::from_millis(250)), ..ask(Kind::Infer, "t") }, 200, miss),
                (Ask { timeout: Some(Duration::from_millis(300)), ..ask(Kind::Chat, "g") }, 200, &[]),
            ],
            budgets: Some(vec![Duration::from_millis(250), Duration::from_millis(300)]),
        },
    ]
}

/// Check one answer against what the behaviour expects of it.
fn check(edge: &str, behaviour: &str, n: usize, seen: &Seen, status: u16, want: &[(&str, &str)]) {
    let at = format!("{behaviour}, step {n}, {edge}: {seen:?}");
    assert_eq!(seen.status, status, "{at}");
    for (name, value) in want {
        let got = seen.report.get(name).unwrap_or_else(|| panic!("{at}: no {name}"));
        assert!(*value == "*" || got == value, "{at}: {name} is {got}, not {value}");
    }
    for name in ["x-cache", "x-infergate-variant"] {
        if !want.iter().any(|(n, _)| *n == name) {
            assert!(!seen.report.contains_key(name), "{at}: unexpected {name}");
        }
    }
}

#[tokio::test]
async fn both_edges_answer_every_behaviour_alike() {
    for b in behaviours() {
        // REST.
        let (rest_state, models) = state(b.config);
        let app = super::rest::router(rest_state);
        let mut on_rest = Vec::new();
        for (n, (a, status, want)) in b.steps.iter().enumerate() {
            let seen = rest(&app, *a).await;
            check("REST", b.name, n, &seen, *status, want);
            on_rest.push(seen);
        }
        let rest_budgets = models.budgets.lock().unwrap().clone();
        // gRPC, served on a socket as clients see it: infergate's service,
        // then OIP v2 over gRPC taking the infer calls.
        for oip in [false, true] {
            let edge = if oip { "OIP gRPC" } else { "gRPC" };
            let (grpc_state, models) = state(b.config);
            let (_, health) = tonic_health::server::health_reporter();
            let app = super::grpc::router(grpc_state, health).unwrap().layer(axum::middleware::from_fn(
                |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                    req.extensions_mut().insert(PeerAddr(SocketAddr::from(([127, 0, 0, 1], 4000))));
                    next.run(req).await
                },
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let mut clients = GrpcClients {
                inference: InferenceClient::new(channel.clone()),
                oip: oip.then(|| GrpcInferenceServiceClient::new(channel)),
            };
            for (n, (a, status, want)) in b.steps.iter().enumerate() {
                let seen = grpc(&mut clients, *a).await;
                check(edge, b.name, n, &seen, *status, want);
                // Beyond what the table names, the edges agree.
                assert_eq!(seen, on_rest[n], "{}, step {n}: {edge} and REST differ", b.name);
            }
            server.abort();
            let grpc_budgets = models.budgets.lock().unwrap().clone();
            assert_eq!(grpc_budgets, rest_budgets, "{}: {edge} gave the models other deadlines", b.name);
        }
        if let Some(budgets) = b.budgets {
            assert_eq!(rest_budgets, budgets, "{}", b.name);
        }
    }
}
