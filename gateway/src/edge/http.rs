//! The REST edge (axum): OpenAI-compatible `/v1`, Open Inference Protocol
//! `/v2`, health and readiness. Every error is `application/problem+json`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use super::chat::{ChatRequest, Completion, Metered};
use super::convert::{self, BodyKind};
use super::json::{self, EmbeddingsRequest, InferRequestJson};
use super::{EdgeState, meta};
use crate::cache::chat::ChatHit;
use crate::cache::{self, CacheMode, CacheStatus};
use crate::call::{Call, Deadline, parse_request_timeout};
use crate::error::{GatewayError, Problem};
use crate::policy::Admission;
use crate::policy::{Tokens, estimate_tokens};
use crate::proto::InferItem;
use crate::route;
use crate::telemetry::usage::Meter;

/// Header a client uses to lower the deadline: seconds (`2.5`) or `500ms`.
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";

/// The REST router with its layers, outermost first.
pub fn router(state: Arc<EdgeState>) -> Router {
    // Work that reaches workers is bounded; health and metadata stay
    // answerable under overload so probes do not flap.
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .with_state(state.clone());
    // Bodies are read whole before a request takes an in-flight permit.
    let api =
        super::gate::Gate::new(state.http_max_in_flight, state.max_body_bytes, state.buffered.clone(), |e, rid| {
            e.into_http(rid)
        })
        .guard(api);
    Router::new()
        .route("/v1/models", get(meta::list_models))
        .route("/v2", get(meta::server_metadata))
        .route("/v2/health/live", get(meta::live))
        .route("/v2/health/ready", get(meta::ready))
        .route("/v2/models/{model}", get(meta::model_metadata))
        .route("/v2/models/{model}/ready", get(meta::model_ready))
        .route("/v2/models/{model}/versions/{version}", get(meta::version_metadata))
        .route("/v2/models/{model}/versions/{version}/ready", get(meta::version_ready))
        .route("/healthz", get(meta::healthz))
        .route("/metrics", get(meta::metrics))
        .route("/readyz", get(meta::readyz))
        .route("/openapi.json", get(super::openapi::document))
        .with_state(state.clone())
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Who is calling, before any body is read (public routes pass).
        .layer(axum::middleware::from_fn_with_state(state.policy.clone(), crate::policy::identify_http))
        // Errors in the dialect of each surface's clients (auth refusals too).
        .layer(axum::middleware::from_fn(super::dialect::error_dialect))
        // One access-log line and the request metrics, refusals included.
        .layer(axum::middleware::from_fn(super::access::access_log))
        // Echo the request id on every response, errors included.
        .layer(PropagateRequestIdLayer::x_request_id())
        // Give every request an id before anything else sees it.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // A caller's id is taken only when it is safe to log and forward.
        .layer(axum::middleware::from_fn(super::access::sanitize_request_id))
}

pub(super) fn request_id(headers: &HeaderMap) -> String {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// A handler outcome: the answer, or an error rendered with the request id.
pub(super) struct Reply(pub(super) Result<Response, GatewayError>, pub(super) String);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(r) => r,
            Err(e) => {
                if e.http_status().is_server_error() {
                    tracing::warn!(request_id = %self.1, error = %e, "request failed");
                }
                e.into_http(Some(&self.1))
            }
        }
    }
}

fn deadline(state: &EdgeState, headers: &HeaderMap) -> Result<Deadline, GatewayError> {
    let requested = match headers.get(REQUEST_TIMEOUT_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(parse_request_timeout).ok_or_else(|| {
            GatewayError::invalid("X-Request-Timeout", "expected seconds (e.g. 2.5) or a duration (e.g. 500ms)")
        })?),
    };
    Ok(Deadline::from_request(state.default_deadline, requested))
}

/// Read a JSON body: 415 unless labelled JSON (a body without a type is
/// what a web page can send cross-origin without asking), 413 past the
/// limit (checked against Content-Length first, then while streaming, never
/// buffering past it), 400 naming the field that failed to parse.
async fn read_json<T: DeserializeOwned>(state: &EdgeState, headers: &HeaderMap, body: Body) -> Result<T, GatewayError> {
    let ct = headers.get(header::CONTENT_TYPE).map(|ct| ct.to_str().unwrap_or_default());
    if BodyKind::of(ct) != Some(BodyKind::Json) {
        return Err(GatewayError::UnsupportedMediaType {
            got: ct.unwrap_or("none").to_owned(),
            accepted: "application/json",
        });
    }
    let bytes = read_body(state, headers, body).await?;
    parse_json(&bytes)
}

/// Parse a JSON body; errors name the field that failed.
fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // Broken JSON is the body's fault; a well-formed value of the wrong
        // shape is the fault of the field at the path.
        let field = match e.inner().classify() {
            serde_json::error::Category::Data => e.path().to_string(),
            _ => "body".to_owned(),
        };
        let field = if field == "." { "body".to_owned() } else { field };
        GatewayError::invalid(field, e.into_inner().to_string())
    })?;
    de.end().map_err(|e| GatewayError::invalid("body", e.to_string()))?;
    Ok(value)
}

/// Read a body of any type, at most `http.max_body_bytes` (already read
/// whole by the gate in front of the routes).
async fn read_body(state: &EdgeState, headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, GatewayError> {
    super::gate::read_limited(headers, body, state.max_body_bytes, |_| Ok(())).await
}

/// Embeddings (OpenAI-compatible).
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, body = json::EmbeddingsResponse),
        (status = "4XX", description = "The caller's error (problem+json)", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway or a worker failed (problem+json)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn embeddings(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let (parts, body) = req.into_parts();
    let rid = request_id(&parts.headers);
    let caller = super::caller_of(&parts.extensions);
    let tenant = caller.tenant.clone();
    let result = async {
        let deadline = deadline(&state, &parts.headers)?;
        let body: EmbeddingsRequest = read_json(&state, &parts.headers, body).await?;
        let texts = body.texts()?;
        let format = body.format()?;
        let plan = state.routes.plan(&body.model, &caller, super::version_pin(&parts.headers)?)?;
        let entry = route::target_entry(&*state.upstream, &plan.targets[0])?;
        let dim = entry.info.as_ref().map_or(0, |i| i.embedding_dim);
        if let Some(d) = body.dimensions.filter(|d| *d != dim) {
            return Err(GatewayError::invalid(
                "dimensions",
                format!("model {:?} returns {dim} dimensions, not {d}", body.model),
            ));
        }
        let tokens = Tokens::input(texts.iter().map(|t| estimate_tokens(t)).sum());
        let admission = state.policy.admit(&caller, &body.model, tokens).await?;
        let call =
            Call { model: body.model.clone(), payload: texts, deadline, request_id: rid.clone(), caller, pool: None };
        let mode = cache_mode(&parts.headers);
        let ((out, cached), target) = route::run(&plan, call, |c| state.cache.embed(&*state.upstream, c, mode)).await?;
        admission.settle((out.prompt_tokens > 0).then_some(out.prompt_tokens.into()));
        if cached != Some(CacheStatus::Hit) {
            Meter::new(&state.prices, &body.model, &target.model, tenant).record(out.prompt_tokens.into(), 0);
        }
        let mut resp =
            axum::Json(json::embeddings_response(&body.model, out.vectors, out.prompt_tokens, format)).into_response();
        served(&mut resp, &target);
        tag_cache(resp.headers_mut(), cached);
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// Chat completions (OpenAI-compatible); with `stream: true` the answer is
/// `text/event-stream` of `chat.completion.chunk` events ending in
/// `data: [DONE]`, or an `error` event if the model fails mid-stream.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatRequest,
    responses(
        (status = 200, content(
            (super::chat::ChatCompletion = "application/json"),
            (super::chat::ChatCompletionChunk = "text/event-stream"))),
        (status = "4XX", description = "The caller's error (problem+json)", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway or a worker failed (problem+json)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn chat_completions(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let (parts, body) = req.into_parts();
    let rid = request_id(&parts.headers);
    let caller = super::caller_of(&parts.extensions);
    let tenant = caller.tenant.clone();
    let result = async {
        let deadline = deadline(&state, &parts.headers)?;
        let body: ChatRequest = read_json(&state, &parts.headers, body).await?;
        let generate = body.to_generate()?;
        let plan = state.routes.plan(&body.model, &caller, super::version_pin(&parts.headers)?)?;
        let tokens = super::chat::estimate(&generate);
        let admission = state.policy.admit(&caller, &body.model, tokens).await?;
        let call = Call {
            model: body.model.clone(),
            payload: generate,
            deadline,
            request_id: rid.clone(),
            caller,
            pool: None,
        };
        let mode = cache_mode(&parts.headers);
        let first = &plan.targets[0];
        let looked_up = {
            let mut probe = call.clone();
            probe.pool.clone_from(&first.pool);
            probe.model = first.model.to_string();
            state.cache.chat_lookup(&*state.upstream, &probe, &body.model, first, mode).await
        };
        let meter = Meter::new(&state.prices, &body.model, &first.model, tenant);
        let (stream, target, admission, cached) = match looked_up {
            // A cached answer costs the caller no model tokens.
            Ok((answer, hit)) => (cache::chat::replay(&answer), first.clone(), Admission::default(), Some(hit)),
            Err(keep) => {
                // Fallbacks apply until the stream starts, never after.
                let (stream, target) = route::run_stream(&plan, call, |c| state.upstream.generate(c)).await?;
                // Keep the answer only if the variant it was keyed for gave it.
                let same = target.pool == first.pool && target.model == first.model;
                let stream = if same { state.cache.recording(stream, keep) } else { stream };
                (stream, target, admission, None)
            }
        };
        let mut chunks = Metered::new(stream, admission, cached.is_none().then_some(meter));
        let completion = Completion::new(&rid, &body.model);
        let mut resp = if body.stream {
            // Wait briefly for the first chunk, so a failure before any
            // output is still answered with its status; then commit to SSE.
            let first = match tokio::time::timeout(state.sse_keep_alive, chunks.next()).await {
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(chunk))) => Some(chunk),
                Ok(None) | Err(_) => None,
            };
            let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
            let mut resp = completion.sse(first, chunks, include_usage, state.sse_keep_alive).into_response();
            // Proxies must pass events on as they come.
            resp.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
            resp.headers_mut().insert("x-accel-buffering", http::HeaderValue::from_static("no"));
            resp
        } else {
            axum::Json(completion.collect(chunks).await?).into_response()
        };
        served(&mut resp, &target);
        match cached {
            Some(ChatHit::Exact) => tag_cache(resp.headers_mut(), Some(CacheStatus::Hit)),
            Some(ChatHit::Semantic(score)) => {
                let headers = resp.headers_mut();
                headers.insert("x-cache", http::HeaderValue::from_static("semantic-hit"));
                if let Ok(v) = http::HeaderValue::from_str(&format!("{score:.4}")) {
                    headers.insert("x-cache-similarity", v);
                }
            }
            None => {}
        }
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// Open Inference Protocol v2 inference.
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name")),
    request_body(description = "OIP JSON tensors; or a JPEG/PNG image (decoded into the model's [1, 3, H, W] FP32 input); or an infergate.v1.InferRequest protobuf; or raw bytes (one BYTES element)",
        content(
            (InferRequestJson = "application/json"),
            ("image/jpeg"), ("image/png"),
            ("application/x-protobuf"),
            ("application/octet-stream"))),
    responses(
        (status = 200, description = "Output tensors (protobuf infergate.v1.InferResponse when asked with Accept or sent protobuf)", content(
            (json::InferResponseJson = "application/json"),
            ("application/x-protobuf"))),
        (status = "4XX", description = "The caller's error (problem+json)", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway or a worker failed (problem+json)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn infer(State(state): State<Arc<EdgeState>>, Path(model): Path<String>, req: Request) -> Reply {
    infer_at(state, model, None, req).await
}

/// Inference on one version: an alias's variant (a pin), or the version a
/// plain model's workers report.
#[utoipa::path(post, path = "/v2/models/{model}/versions/{version}/infer", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name"),
           ("version" = String, Path, description = "Variant name, or the model's version")),
    request_body(description = "OIP JSON tensors; or a JPEG/PNG image (decoded into the model's [1, 3, H, W] FP32 input); or an infergate.v1.InferRequest protobuf; or raw bytes (one BYTES element)",
        content(
            (InferRequestJson = "application/json"),
            ("image/jpeg"), ("image/png"),
            ("application/x-protobuf"),
            ("application/octet-stream"))),
    responses(
        (status = 200, description = "Output tensors (protobuf infergate.v1.InferResponse when asked with Accept or sent protobuf)", content(
            (json::InferResponseJson = "application/json"),
            ("application/x-protobuf"))),
        (status = "4XX", description = "The caller's error (problem+json)", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway or a worker failed (problem+json)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn infer_version(
    State(state): State<Arc<EdgeState>>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Reply {
    infer_at(state, model, Some(version), req).await
}

/// OIP infer, at a version named in the path (a pin) or as routed.
async fn infer_at(state: Arc<EdgeState>, model: String, version: Option<String>, req: Request) -> Reply {
    let (parts, body) = req.into_parts();
    let rid = request_id(&parts.headers);
    let caller = super::caller_of(&parts.extensions);
    let result = async {
        let deadline = deadline(&state, &parts.headers)?;
        let pin = match &version {
            Some(v) => state.routes.version_entry(&*state.upstream, &model, v)?.1,
            None => super::version_pin(&parts.headers)?.map(str::to_owned),
        };
        let content_type = parts.headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
        let kind = BodyKind::of(content_type).ok_or_else(|| GatewayError::UnsupportedMediaType {
            got: content_type.unwrap_or_default().to_owned(),
            accepted: "application/json, image/jpeg, image/png, application/x-protobuf or application/octet-stream",
        })?;
        // The model is in the path: refuse over-limit callers before the
        // body is read or parsed (tensor calls carry no token estimate).
        let plan = state.routes.plan(&model, &caller, pin.as_deref())?;
        let entry = route::target_entry(&*state.upstream, &plan.targets[0])?;
        let admission = state.policy.admit(&caller, &model, Tokens::NONE).await?;
        let bytes = read_body(&state, &parts.headers, body).await?;
        // The body is dropped once transcoded: the worker call holds only the item.
        let item = match kind {
            // A large tensor's text takes milliseconds to parse: on a bulk
            // thread, so small calls are not held behind it.
            BodyKind::Json if bytes.len() > OFFLOAD_BYTES => {
                crate::bulk::run(move || json::infer_item_from_json(&parse_json::<InferRequestJson>(&bytes)?))
                    .await
                    .map_err(|e| GatewayError::invalid("body", format!("cannot transcode the body: {e}")))??
            }
            BodyKind::Json => {
                let item = json::infer_item_from_json(&parse_json::<InferRequestJson>(&bytes)?)?;
                drop(bytes);
                item
            }
            BodyKind::Protobuf => {
                let item = convert::protobuf_item(&bytes, &model)?;
                drop(bytes);
                item
            }
            BodyKind::Raw => InferItem {
                inputs: vec![convert::raw_tensor(bytes, &entry.info.unwrap_or_default())],
                ..Default::default()
            },
            BodyKind::Image => {
                let info = entry.info.unwrap_or_default();
                let (name, h, w) = convert::image_input(&info)?;
                let (name, max) = (name.to_owned(), state.image);
                // Decoding is CPU work: on a bulk thread.
                let tensor = crate::bulk::run(move || convert::image_tensor(&bytes, &name, h, w, max))
                    .await
                    .map_err(|e| GatewayError::invalid("body", format!("image decoding failed: {e}")))??;
                InferItem { inputs: vec![tensor], ..Default::default() }
            }
        };
        let id = item.id.clone();
        let call = Call { model: model.clone(), payload: item, deadline, request_id: rid.clone(), caller, pool: None };
        let mode = cache_mode(&parts.headers);
        let (((mut info, out), cached), target) =
            route::run(&plan, call, |c| state.cache.infer(&*state.upstream, c, mode)).await?;
        admission.settle(None);
        info.name = model;
        let mut resp = if wants_protobuf(&parts.headers, kind) {
            let msg = crate::proto::InferResponse {
                model: info.name,
                model_version: info.version,
                id,
                outputs: out.tensors,
                parameters: out.parameters,
            };
            ([(header::CONTENT_TYPE, "application/x-protobuf")], prost::Message::encode_to_vec(&msg)).into_response()
        } else {
            let answer = json::infer_response_json(&info, id, out);
            if answer.outputs.iter().map(|t| t.data.len()).sum::<usize>() > OFFLOAD_BYTES / 8 {
                crate::bulk::run(move || oip_json_response(answer)).await.map_err(|e| {
                    GatewayError::WorkerFailed { worker: "-".into(), detail: format!("cannot write the answer: {e}") }
                })??
            } else {
                oip_json_response(answer)?
            }
        };
        served(&mut resp, &target);
        tag_cache(resp.headers_mut(), cached);
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// JSON bodies larger than this are transcoded on a bulk thread (answers of
/// an eighth as many values): from about a millisecond of CPU (a 64 KiB
/// tensor), work that would otherwise hold every small call on the same
/// request thread. Eight clients sending 700 kB tensors held an ordinary
/// client's calls for seconds when they were parsed on the request threads.
const OFFLOAD_BYTES: usize = 64 * 1024;

/// An OIP answer as a JSON response (see `InferResponseJson::to_bytes`).
fn oip_json_response(answer: json::InferResponseJson) -> Result<Response, GatewayError> {
    let bytes = answer.to_bytes().map_err(|e| GatewayError::WorkerFailed {
        worker: "-".into(),
        detail: format!("cannot write the answer: {e}"),
    })?;
    drop(answer);
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// Name the answering variant (header) and what answered (for the access log).
fn served(resp: &mut Response, target: &route::Target) {
    route::tag(resp.headers_mut(), target);
    resp.extensions_mut().insert(super::access::Served::of(target));
}

/// What `Cache-Control` lets the response cache do.
fn cache_mode(headers: &HeaderMap) -> CacheMode {
    CacheMode::from_cache_control(headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()))
}

/// `X-Cache: hit|miss|partial` when the answer went through the cache.
fn tag_cache(headers: &mut HeaderMap, cached: Option<CacheStatus>) {
    if let Some(status) = cached {
        headers.insert("x-cache", http::HeaderValue::from_static(status.as_str()));
    }
}

/// Answer in protobuf when asked to (`Accept`), or when the request was
/// protobuf and JSON was not asked for.
fn wants_protobuf(headers: &HeaderMap, kind: BodyKind) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    accept.contains("application/x-protobuf") || (kind == BodyKind::Protobuf && !accept.contains("json"))
}

async fn not_found(req: Request) -> Reply {
    let rid = request_id(req.headers());
    Reply(Err(GatewayError::RouteNotFound { path: req.uri().path().to_owned() }), rid)
}

async fn method_not_allowed(headers: HeaderMap) -> Reply {
    Reply(Err(GatewayError::MethodNotAllowed), request_id(&headers))
}
