//! The queue's edge: `Prefer: respond-async` on any model route, the
//! async request's status (`/v1/async/{id}`), the OpenAI Batch API
//! (`/v1/files`, `/v1/batches`, in [`batch`]), and the consumer that runs
//! queued entries through the same routes a client calls ([`consumer`]),
//! so a queued answer is the synchronous one, byte for byte.

pub mod batch;
pub mod consumer;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::EdgeState;
use super::reply::{Params, Reply, request_id};
use crate::error::GatewayError;
use crate::queue::{Job, NewJob, Queue, QueuedCaller};

/// Request headers a queued request keeps: what shapes its answer.
pub const KEPT_HEADERS: &[&str] =
    &["content-type", "x-model-version", "cache-control", "x-request-timeout", "inference-header-content-length"];

/// Response headers a queued answer keeps.
pub const ANSWER_HEADERS: &[&str] = &[
    "content-type",
    "x-request-id",
    "x-infergate-variant",
    "x-cache",
    "x-cache-similarity",
    "inference-header-content-length",
];

/// Header on every answer of `/v1/async/{id}`: the request's state.
pub const STATE_HEADER: &str = "x-async-status";

/// The errors every queue route may answer with, for `/openapi.json`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, reason = "a description for the document, never built")]
pub(in crate::edge) enum QueueErrors {
    /// The caller's error, or 404 `queue-not-configured` when this gateway
    /// has no queue (problem+json).
    #[response(status = "4XX", content_type = "application/problem+json")]
    Client(crate::error::Problem),
    /// The queue's Redis is down (503 queue-unavailable) (problem+json).
    #[response(status = "5XX", content_type = "application/problem+json")]
    Server(crate::error::Problem),
}

/// What every queue route reads from its request's head: the request id
/// its errors are reported under, and who asks.
pub(in crate::edge) struct Asked {
    rid: String,
    caller: Arc<crate::call::Caller>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Asked {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self { rid: request_id(&parts.headers), caller: super::caller_of(&parts.extensions) })
    }
}

/// Whether `Prefer` asks for an asynchronous answer (RFC 7240).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|p| {
        let name = p.split(';').next().unwrap_or_default().trim();
        name.eq_ignore_ascii_case("respond-async")
    })
}

/// The queue, or 404 `queue-not-configured` when this gateway has none.
fn queue(state: &EdgeState) -> Result<&Arc<Queue>, GatewayError> {
    state.queue.as_ref().ok_or(GatewayError::QueueNotConfigured)
}

/// Middleware on the model routes: a request that prefers an async answer
/// is queued (202 and where to find its answer). Without a queue the
/// preference is not applied and the request is answered now, as RFC 7240
/// lets a server do.
pub async fn respond_async(State(state): State<Arc<EdgeState>>, req: Request, next: Next) -> Response {
    if state.queue.is_none() || !prefers_async(req.headers()) {
        return next.run(req).await;
    }
    let rid = request_id(req.headers());
    Reply(submit(&state, req).await, rid).into_response()
}

/// The model a request to `path` names: the path's, else the body's `model`.
fn target(path: &str, headers: &HeaderMap, body: &[u8]) -> Result<String, GatewayError> {
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        let model = rest.split('/').next().unwrap_or_default();
        return Ok(percent_decode(model));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(GatewayError::UnsupportedMediaType {
            got: headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned(),
            accepted: "application/json",
        });
    }
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        stream: Option<bool>,
    }
    let head: Head = serde_json::from_slice(body).map_err(|e| GatewayError::invalid("body", e.to_string()))?;
    if head.stream == Some(true) {
        return Err(GatewayError::invalid("stream", "a queued answer is stored whole: send stream: false"));
    }
    head.model.filter(|m| !m.is_empty()).ok_or_else(|| GatewayError::invalid("model", "is required"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn submit(state: &EdgeState, req: Request) -> Result<Response, GatewayError> {
    let queue = queue(state)?;
    let (parts, body) = req.into_parts();
    let caller = super::caller_of(&parts.extensions);
    // The gate in front read the body whole already, within its bounds.
    let body = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge { limit: state.max_body_bytes })?;
    let path = parts.uri.path().to_owned();
    let target = target(&path, &parts.headers, &body)?;
    let headers = KEPT_HEADERS
        .iter()
        .filter_map(|h| Some(((*h).to_owned(), parts.headers.get(*h)?.to_str().ok()?.to_owned())))
        .collect();
    let idempotency_key = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let job = queue
        .submit_async(NewJob { idempotency_key, caller: QueuedCaller::from(&*caller), target, path, headers, body })
        .await?;
    let mut resp = (StatusCode::ACCEPTED, axum::Json(status_object(&job))).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/async/{}", job.id)) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert("preference-applied", HeaderValue::from_static("respond-async"));
    set_state(h, &job.state);
    Ok(resp)
}

fn set_state(headers: &mut HeaderMap, state: &str) {
    if let Ok(v) = HeaderValue::from_str(state) {
        headers.insert(STATE_HEADER, v);
    }
}

/// An async request as its status reads.
fn status_object(job: &Job) -> serde_json::Value {
    json!({
        "id": job.id,
        "object": "async.request",
        "status": job.state,
        "model": job.target,
        "created_at": job.created_at / 1000,
        "expires_at": job.expires_at / 1000,
    })
}

/// `GET /v1/async/{id}`: 202 and the status while queued or running; once
/// answered, the answer the synchronous call gave (its status, headers and
/// body); 410 once cancelled or expired.
#[utoipa::path(get, path = "/v1/async/{id}", tag = "queue",
    params(("id" = String, Path, description = "The async request's id (from Location)")),
    responses(
        (status = 200, description = "Done or failed: the answer the synchronous call gave (its status, headers and body)"),
        (status = 202, description = "Queued or running: the status (retry after Retry-After)"),
        (status = 410, description = "Cancelled or expired: no answer", body = crate::error::Problem, content_type = "application/problem+json"),
        QueueErrors))]
pub(in crate::edge) async fn get_async(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async {
        let job = queue(&state)?.job(&caller.tenant, &id).await?;
        let job_state = job.state.clone();
        answer_of(job).or_else(|e| {
            // No answer: the problem, still saying the request's state.
            let mut resp = e.into_http(Some(&rid));
            set_state(resp.headers_mut(), &job_state);
            Ok(resp)
        })
    }
    .await;
    Reply(result, rid)
}

fn answer_of(job: Job) -> Result<Response, GatewayError> {
    let mut resp = match (job.state.as_str(), &job.answer) {
        ("done" | "failed", Some(answer)) => {
            let mut resp = Response::new(Body::from(answer.body.clone()));
            *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            // The poll keeps its own request id; the answer's is the job id.
            for (k, v) in answer.headers.iter().filter(|(k, _)| k != "x-request-id") {
                if let (Ok(k), Ok(v)) = (http::HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
                    resp.headers_mut().insert(k, v);
                }
            }
            resp
        }
        ("queued" | "running", _) => {
            let mut resp = (StatusCode::ACCEPTED, axum::Json(status_object(&job))).into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        (state, _) => return Err(GatewayError::AsyncGone { id: job.id, state: state.to_owned() }),
    };
    set_state(resp.headers_mut(), &job.state);
    Ok(resp)
}

/// `DELETE /v1/async/{id}`: cancel a queued or running request (a running
/// one's answer is discarded); 409 once it has one.
#[utoipa::path(delete, path = "/v1/async/{id}", tag = "queue",
    params(("id" = String, Path, description = "The async request's id")),
    responses(
        (status = 200, description = "Cancelled: the status"),
        (status = 409, description = "It has finished already", body = crate::error::Problem, content_type = "application/problem+json"),
        QueueErrors))]
pub(in crate::edge) async fn cancel_async(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async {
        let job = queue(&state)?.cancel_async(&caller.tenant, &id).await?;
        let mut resp = axum::Json(status_object(&job)).into_response();
        set_state(resp.headers_mut(), &job.state);
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_is_read_as_rfc_7240_writes_it() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("prefer", HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(prefers_async(&h("respond-async")));
        assert!(prefers_async(&h("wait=10, Respond-Async")));
        assert!(prefers_async(&h("respond-async; foo=bar")));
        assert!(!prefers_async(&h("return=minimal")));
        assert!(!prefers_async(&HeaderMap::new()));
    }

    #[test]
    fn the_target_is_the_path_model_or_the_body_model() {
        let mut json = HeaderMap::new();
        json.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert_eq!(target("/v2/models/my%20m/infer", &HeaderMap::new(), b"").unwrap(), "my m");
        assert_eq!(target("/v1/embeddings", &json, br#"{"model":"minilm","input":"x"}"#).unwrap(), "minilm");
        let err = target("/v1/chat/completions", &json, br#"{"model":"echo","stream":true}"#).unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        assert!(matches!(
            target("/v1/embeddings", &json, br#"{"input":"x"}"#),
            Err(GatewayError::InvalidRequest { .. })
        ));
        assert!(matches!(
            target("/v1/embeddings", &HeaderMap::new(), b"{}"),
            Err(GatewayError::UnsupportedMediaType { .. })
        ));
    }
}
