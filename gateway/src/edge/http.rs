//! The REST edge (axum): OpenAI-compatible `/v1`, Open Inference Protocol
//! `/v2`, health and readiness. Every error is `application/problem+json`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::EdgeState;
use super::chat::{ChatRequest, Completion};
use super::convert::{self, BodyKind};
use super::json::{self, BinaryOutputs, EmbeddingsRequest, InferRequestJson};
use super::reply::{Params, Reply, request_id};
use super::responses::{Making, ResponseRequest};
use crate::cache::CacheMode;
use crate::call::{Deadline, parse_request_timeout};
use crate::error::{GatewayError, Problem};
use crate::proto::InferItem;
use crate::service::{Answer, Ask, Served};

/// Header a client uses to lower the deadline: seconds (`2.5`) or `500ms`.
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";

/// The core's view of a request from its head: who asks, its deadline
/// (counted from now), pin and cache mode. The model is the caller's to
/// fill in (from the path or the body).
pub(super) fn ask(state: &EdgeState, parts: &http::request::Parts) -> Result<Ask, GatewayError> {
    Ok(Ask {
        model: String::new(),
        request_id: request_id(&parts.headers),
        deadline: deadline(state, &parts.headers)?,
        caller: super::caller_of(&parts.extensions),
        pin: super::version_pin(&parts.headers)?.map(str::to_owned),
        cache: cache_mode(&parts.headers),
        // Set by the queue's consumer on the requests it runs; a client
        // cannot set an extension.
        class: parts.extensions.get::<crate::call::Class>().copied().unwrap_or_default(),
    })
}

fn deadline(state: &EdgeState, headers: &HeaderMap) -> Result<Deadline, GatewayError> {
    let requested = match headers.get(REQUEST_TIMEOUT_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "is not text".to_owned())
                .and_then(parse_request_timeout)
                .map_err(|m| GatewayError::invalid("X-Request-Timeout", m))?,
        ),
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

/// Parse a JSON body; errors name the field that failed. Parsed plainly
/// first: tracking the path costs an allocation per key, so it is done only
/// to name the field of a body that failed.
pub(crate) fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, GatewayError> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
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
    let result = async {
        let mut ask = ask(&state, &parts)?;
        let body: EmbeddingsRequest = read_json(&state, &parts.headers, body).await?;
        let texts = body.texts()?;
        let format = body.format()?;
        ask.model.clone_from(&body.model);
        let Answer { value: out, served } = state.core.embed(ask, texts, body.dimensions).await?;
        let mut resp =
            axum::Json(json::embeddings_response(&body.model, out.vectors, out.prompt_tokens, format)).into_response();
        report(&mut resp, &served);
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
    let result = async {
        let mut ask = ask(&state, &parts)?;
        let body: ChatRequest = read_json(&state, &parts.headers, body).await?;
        let generate = body.to_generate()?;
        ask.model.clone_from(&body.model);
        let Answer { value: mut chunks, served } = state.core.generate(ask, generate).await?;
        let completion = Completion::new(&rid, &body.model);
        let mut resp = if body.stream {
            // A failure before any output is still answered with its status.
            let first = super::sse::first(&mut chunks, state.sse_keep_alive).await?;
            let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
            let mut resp = completion.sse(first, chunks, include_usage, state.sse_keep_alive).into_response();
            super::sse::unbuffered(&mut resp);
            resp
        } else {
            axum::Json(completion.collect(chunks).await?).into_response()
        };
        report(&mut resp, &served);
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// The OpenAI Responses API over a generate model; with `stream: true` the
/// answer is `text/event-stream` of typed events (`response.created` ...
/// `response.completed`), or `response.failed` if the model fails
/// mid-stream. Stored (unless `store: false`) for `previous_response_id`
/// and `GET /v1/responses/{id}`, per tenant.
#[utoipa::path(post, path = "/v1/responses", tag = "openai",
    request_body = super::responses::ResponseRequest,
    responses(
        (status = 200, content(
            (super::responses::ResponseObject = "application/json"),
            ("text/event-stream"))),
        (status = "4XX", description = "The caller's error (problem+json); an unknown previous_response_id is a 404", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway or a worker failed (problem+json)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn create_response(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let (parts, body) = req.into_parts();
    let rid = request_id(&parts.headers);
    let result = async {
        let mut ask = ask(&state, &parts)?;
        let body: ResponseRequest = read_json(&state, &parts.headers, body).await?;
        ask.model.clone_from(&body.model);
        let tenant = ask.caller.tenant.clone();
        let (making, generate) = Making::new(body, &state.conversations, tenant).await?;
        let Answer { value: mut chunks, served } = state.core.generate(ask, generate).await?;
        let mut resp = if making.streams() {
            // A failure before any output is still answered with its status.
            let first = super::sse::first(&mut chunks, state.sse_keep_alive).await?;
            let mut resp = making.sse(first, chunks, state.conversations.clone(), state.sse_keep_alive).into_response();
            super::sse::unbuffered(&mut resp);
            resp
        } else {
            axum::Json(making.collect(chunks, &state.conversations).await?).into_response()
        };
        report(&mut resp, &served);
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// A stored response of the caller's tenant.
#[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "The response's id (`resp_...`)")),
    responses((status = 200, body = super::responses::ResponseObject),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn get_response(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    req: Request,
) -> Reply {
    let rid = request_id(req.headers());
    let caller = super::caller_of(req.extensions());
    let result = async {
        let stored = state.conversations.get(&caller.tenant, &id).await.map_err(super::responses::unavailable)?;
        let stored = stored.ok_or(GatewayError::ResponseNotFound { id })?;
        Ok(axum::Json(stored.response).into_response())
    }
    .await;
    Reply(result, rid)
}

/// Forget a stored response of the caller's tenant.
#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "The response's id (`resp_...`)")),
    responses((status = 200, body = super::responses::ResponseDeleted),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn delete_response(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    req: Request,
) -> Reply {
    let rid = request_id(req.headers());
    let caller = super::caller_of(req.extensions());
    let result = async {
        if !state.conversations.delete(&caller.tenant, &id).await.map_err(super::responses::unavailable)? {
            return Err(GatewayError::ResponseNotFound { id });
        }
        let deleted = super::responses::ResponseDeleted { id, object: "response.deleted".into(), deleted: true };
        Ok(axum::Json(deleted).into_response())
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
pub(super) async fn infer(State(state): State<Arc<EdgeState>>, Params(model): Params<String>, req: Request) -> Reply {
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
    Params((model, version)): Params<(String, String)>,
    req: Request,
) -> Reply {
    infer_at(state, model, Some(version), req).await
}

/// OIP infer, at a version named in the path (a pin) or as routed.
async fn infer_at(state: Arc<EdgeState>, model: String, version: Option<String>, req: Request) -> Reply {
    let (parts, body) = req.into_parts();
    let rid = request_id(&parts.headers);
    let result = async {
        let mut ask = ask(&state, &parts)?;
        if let Some(v) = &version {
            ask.pin = state.core.version_entry(&model, v)?.1;
        }
        ask.model.clone_from(&model);
        // OIP's binary extension: a JSON header of this many bytes, then tensors' bytes.
        let header_length = parts.headers.get(json::HEADER_LENGTH).cloned();
        let kind = BodyKind::of_infer(&parts.headers).ok_or_else(|| {
            state.core.name(&model);
            GatewayError::UnsupportedMediaType {
                got: parts.headers.get(header::CONTENT_TYPE).map_or("none", |v| v.to_str().unwrap_or("?")).to_owned(),
                accepted: "application/json, image/jpeg, image/png, application/x-protobuf or application/octet-stream",
            }
        })?;
        // The model is in the path: refuse over-limit callers before the
        // body is read or parsed.
        let admitted = state.core.admit_infer(ask).await?;
        let bytes = read_body(&state, &parts.headers, body).await?;
        let body_len = bytes.len();
        // The body is dropped once transcoded: the worker call holds only the item.
        let (item, binary) = match kind {
            BodyKind::Json => {
                let transcode = move || oip_item(&bytes, header_length.as_ref());
                // A large tensor's text takes milliseconds to parse: on a
                // bulk thread, so small calls are not held behind it.
                if body_len > OFFLOAD_BYTES {
                    crate::bulk::run(transcode)
                        .await
                        .map_err(|e| GatewayError::invalid("body", format!("cannot transcode the body: {e}")))??
                } else {
                    transcode()?
                }
            }
            BodyKind::Protobuf => {
                let item = convert::protobuf_item(&bytes, &model)?;
                drop(bytes);
                (item, BinaryOutputs::None)
            }
            BodyKind::Raw => {
                let item = InferItem {
                    inputs: vec![convert::raw_tensor(bytes, &admitted.entry.info.clone().unwrap_or_default())],
                    ..Default::default()
                };
                (item, BinaryOutputs::None)
            }
            BodyKind::Image => {
                let info = admitted.entry.info.clone().unwrap_or_default();
                let (name, h, w) = convert::image_input(&info)?;
                let (name, max) = (name.to_owned(), state.image);
                // Decoding is CPU work: on a bulk thread.
                let tensor = crate::bulk::run(move || convert::image_tensor(&bytes, &name, h, w, max))
                    .await
                    .map_err(|e| GatewayError::invalid("body", format!("image decoding failed: {e}")))??;
                (InferItem { inputs: vec![tensor], ..Default::default() }, BinaryOutputs::None)
            }
        };
        let id = item.id.clone();
        let Answer { value: (info, out), served } = state.core.infer(admitted, item).await?;
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
            let values: usize = out.tensors.iter().map(crate::tensor::size).sum();
            let render = move || {
                let (answer, binary) = json::infer_response_parts(&info, id, out, &binary)?;
                oip_response(answer, binary)
            };
            if values > OFFLOAD_BYTES / 8 {
                crate::bulk::run(render).await.map_err(|e| GatewayError::WorkerFailed {
                    worker: "-".into(),
                    detail: format!("cannot write the answer: {e}"),
                })??
            } else {
                render()?
            }
        };
        report(&mut resp, &served);
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

/// An OIP request's item, from a JSON body or, when `header_length` is
/// given, a binary-extension body; and which outputs it wants binary.
fn oip_item(
    bytes: &[u8],
    header_length: Option<&http::HeaderValue>,
) -> Result<(InferItem, BinaryOutputs), GatewayError> {
    let (head, binary) = match header_length {
        Some(length) => json::split_binary(bytes, length)?,
        None => (bytes, &[][..]),
    };
    let req = parse_json::<InferRequestJson>(head)?;
    let outputs = req.outputs.iter().flatten().map(|o| (o.name.as_str(), o.parameters.as_ref()));
    let wanted = BinaryOutputs::of(req.parameters.as_ref(), outputs);
    Ok((json::infer_item_from_parts(&req, binary)?, wanted))
}

/// An OIP answer: JSON (see `InferResponseJson::to_bytes`), or its JSON
/// header followed by the binary outputs' bytes, the header's length in
/// `Inference-Header-Content-Length`.
fn oip_response(answer: json::InferResponseJson, binary: Vec<Vec<u8>>) -> Result<Response, GatewayError> {
    let bytes = answer.to_bytes().map_err(|e| GatewayError::WorkerFailed {
        worker: "-".into(),
        detail: format!("cannot write the answer: {e}"),
    })?;
    drop(answer);
    if binary.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response());
    }
    let header_length = bytes.len();
    let length = header_length + binary.iter().map(Vec::len).sum::<usize>();
    // The outputs' bytes go out as they are, after the header: not copied
    // into one buffer first.
    let chunks = std::iter::once(bytes).chain(binary).map(|c| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(c)));
    let headers = [
        (header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream")),
        (header::CONTENT_LENGTH, http::HeaderValue::from(length)),
        (http::HeaderName::from_static(json::HEADER_LENGTH), http::HeaderValue::from(header_length)),
    ];
    Ok((headers, Body::from_stream(futures::stream::iter(chunks))).into_response())
}

/// Report what answered: the variant (`x-infergate-variant`), the cache
/// (`x-cache`, `x-cache-similarity`), and for the access log the model.
fn report(resp: &mut Response, served: &Served) {
    super::tag(resp.headers_mut(), served);
    resp.extensions_mut().insert(super::access::Served::of(&served.target));
}

/// What `Cache-Control` lets the response cache do.
fn cache_mode(headers: &HeaderMap) -> CacheMode {
    CacheMode::from_cache_control(headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()))
}

/// Answer in protobuf when asked to (`Accept`), or when the request was
/// protobuf and JSON was not asked for.
fn wants_protobuf(headers: &HeaderMap, kind: BodyKind) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    accept.contains("application/x-protobuf") || (kind == BodyKind::Protobuf && !accept.contains("json"))
}
