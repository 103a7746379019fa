//! The gateway's one error type, and what it means on the wire: its HTTP
//! status, gRPC code, problem document, retry hint and rate-limit fields.
//! Rendering them as a response is the edge's (`edge/problem.rs`); this
//! module knows neither axum nor tonic.
//!
//! Every variant knows its HTTP status, its gRPC code and a stable
//! machine-readable `type`; the mappings have no wildcard arm, so a new
//! variant cannot ship without deciding them all.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// Why a request failed. Client errors carry enough detail to fix the request.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum GatewayError {
    /// The body or a parameter is malformed; `field` names the offending part.
    #[error("invalid request: {detail}")]
    InvalidRequest { field: Option<String>, detail: String },
    /// The request body is not JSON.
    #[error("unsupported media type {got:?}: send {accepted}")]
    UnsupportedMediaType { got: String, accepted: &'static str },
    /// The request body exceeds the configured limit.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The call does not fit in one worker message (`workers.max_message_bytes`).
    #[error("too large for a worker: {detail}")]
    MessageTooLarge { detail: String },
    /// An image whose header declares more pixels than allowed (refused
    /// before decoding: a decompression bomb costs nothing).
    #[error("the image declares {width}x{height} pixels, more than the {max_pixels} allowed")]
    ImageTooLarge { width: u32, height: u32, max_pixels: u64 },
    /// The request body did not arrive in time (`body_timeout`), or came
    /// slower than `min_body_rate`.
    #[error("request body too slow: {received} bytes in {}", humantime::format_duration(*.after))]
    BodyTimeout { received: u64, after: Duration },
    /// With auth off, only local `Host` names (or `http.allowed_hosts`) are
    /// served, so a web page cannot drive the gateway through a rebound name.
    #[error("host {host:?} is not served here (see http.allowed_hosts)")]
    HostNotAllowed { host: String },
    /// With auth off, a WebSocket opened by a page of another site (its
    /// `Origin` is not a loopback name or in `http.allowed_hosts`): a page
    /// the user visits must not drive a local gateway.
    #[error("origin {origin:?} may not open streams here (see http.allowed_hosts)")]
    OriginNotAllowed { origin: String },
    /// An image whose decoding would take more memory than allowed
    /// (`http.max_image_bytes`); refused by the decoder's own limits.
    #[error("decoding the {width}x{height} image takes more than the {max_bytes} bytes allowed")]
    ImageTooHeavy { width: u32, height: u32, max_bytes: u64 },
    /// No such route.
    #[error("no route for {path}")]
    RouteNotFound { path: String },
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No pool serves the model.
    #[error("model {model:?} not found")]
    ModelNotFound { model: String },
    /// The model exists but not in this version.
    #[error("model {model:?} has no version {version:?}")]
    VersionNotFound { model: String, version: String },
    /// The model exists but does not do this operation.
    #[error("model {model:?} does not support {operation}")]
    UnsupportedOperation { model: String, operation: &'static str },
    /// Pools are still starting and the model may yet appear.
    #[error("model {model:?} is not known yet: workers are starting")]
    Starting { model: String },
    /// The pool's workers failed to load the model, time after time.
    #[error("model {model:?} failed to load in pool {pool:?}: {error}")]
    ModelFailedToLoad { model: String, pool: String, error: String },
    /// The pool has no worker able to take the call right now.
    #[error("no ready worker in pool {pool:?}")]
    NoReadyWorker { pool: String },
    /// The deadline passed before the answer came.
    #[error("deadline of {} exceeded", humantime::format_duration(*.after))]
    DeadlineExceeded { after: Duration },
    /// The worker failed or answered with an error.
    #[error("worker {worker} failed: {detail}")]
    WorkerFailed { worker: String, detail: String },
    /// The worker could not be reached (crashed, restarting, refused).
    #[error("worker {worker} unavailable: {detail}")]
    WorkerUnavailable { worker: String, detail: String },
    /// The worker refused the call before it started (connection or stream
    /// refused, its admission full): always safe to try elsewhere.
    #[error("worker {worker} refused the call: {detail}")]
    WorkerRefused { worker: String, detail: String },
    /// The model rejected the input (per-item INVALID_INPUT).
    #[error("model rejected input: {detail}")]
    ModelRejected { detail: String },
    /// The client went away; no one reads this answer.
    #[error("request cancelled")]
    Cancelled,
    /// More requests in flight than the edge admits; shed at once.
    #[error("gateway overloaded: more than {limit} requests in flight")]
    Overloaded { limit: usize },
    /// Taking this request's body would put the gateway past
    /// `http.max_buffered_bytes`; refused at once rather than risk the heap.
    #[error("gateway memory for request bodies is full ({limit} bytes buffered)")]
    MemoryFull { limit: usize },
    /// As many streams of frames are open as the gateway allows
    /// (`streams.max_open`); one more is refused at once.
    #[error("gateway at its bound of {limit} open streams")]
    TooManyStreams { limit: usize },
    /// A stream sent no frame for `streams.idle_timeout`.
    #[error("stream idle: no frame for {}", humantime::format_duration(*.after))]
    StreamIdle { after: Duration },
    /// The gateway is draining and takes no new work.
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// No valid credentials. One message for every cause, so a client cannot
    /// tell an unknown key from a wrong one.
    #[error("missing or invalid credentials")]
    Unauthenticated,
    /// The caller may not use this model.
    #[error("this caller may not use model {model:?}")]
    ModelForbidden { model: String },
    /// The caller's tier may not pin a version of this model.
    #[error("this caller may not pin a version of model {model:?} (X-Model-Version)")]
    PinForbidden { model: String },
    /// A limit refused the request; `limit` names it (`key.rate`, …).
    #[error("{limit} limit reached ({quota}){}", retry_hint(*.retry_after))]
    RateLimited { limit: String, quota: u64, remaining: u64, retry_after: Option<Duration> },
    /// Shared limits cannot be checked (Redis down, fallback `deny`).
    #[error("rate limits cannot be checked right now")]
    LimitsUnavailable,
    /// The pool's circuit is open after repeated failures; fail fast.
    #[error("pool {pool:?} is failing; its circuit is open")]
    CircuitOpen { pool: String, retry_after: Duration },
    /// The pool's adaptive admission shed the call: its recent failure
    /// ratio is past its threshold (`[[pools]] adaptive`).
    #[error("pool {pool:?} is failing; {shed_percent}% of its calls are shed")]
    Shed { pool: String, shed_percent: u32, retry_after: Duration },
    /// The pool's queue is full; shed at once.
    #[error("pool {pool:?} is at capacity: {limit} requests queued")]
    QueueFull { pool: String, limit: usize },
    /// No stored response of the caller's tenant has this id.
    #[error("response {id:?} not found")]
    ResponseNotFound { id: String },
    /// Stored responses cannot be read or written (Redis down or slow).
    #[error("{detail}")]
    StoreUnavailable { detail: String },
    /// The queue's Redis cannot be reached (down or slow): nothing was
    /// queued or read.
    #[error("the queue is unavailable: {detail}")]
    QueueUnavailable { detail: String },
    /// This gateway has no queue (`queue.redis_url` is not set): the queue
    /// routes are not served here, as on any OpenAI-compatible server
    /// without the Batch API (404, not a server fault).
    #[error("this gateway has no queue: set queue.redis_url to serve async requests and batches")]
    QueueNotConfigured,
    /// The tenant's queued work would pass `queue.max_queued_per_tenant`.
    #[error("{queued} requests of this tenant are queued; {adding} more would pass the limit of {limit}")]
    QueueQuota { queued: u64, adding: u64, limit: u64 },
    /// No file, batch or async request of the caller's tenant has this id.
    #[error("{kind} {id:?} not found")]
    QueuedNotFound { kind: QueuedKind, id: String },
    /// An async request that will never have an answer (cancelled, or
    /// expired in the queue).
    #[error("async request {id:?} was {state}: it has no answer")]
    AsyncGone { id: String, state: String },
    /// The queued object is past the state the request needs (a finished
    /// request cancelled, a cancelled one read).
    #[error("{detail}")]
    QueuedConflict { detail: String },
}

/// What a queue id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuedKind {
    File,
    Batch,
    Async,
}

impl std::fmt::Display for QueuedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::File => "file",
            Self::Batch => "batch",
            Self::Async => "async request",
        })
    }
}

fn retry_hint(after: Option<Duration>) -> String {
    match after {
        Some(d) => format!("; retry in {} ms", d.as_millis().max(1)),
        None => String::new(),
    }
}

/// The gRPC status codes the gateway answers with, by their gRPC names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    Cancelled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

/// The transport-neutral facts about an error, derived in one place.
struct Meta {
    status: StatusCode,
    code: RpcCode,
    slug: &'static str,
    title: &'static str,
}

impl GatewayError {
    /// Shorthand for an invalid-request error naming a field.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidRequest { field: Some(field.into()), detail: detail.into() }
    }

    fn meta(&self) -> Meta {
        use GatewayError as E;
        use RpcCode as C;
        let (status, code, slug, title) = match self {
            E::InvalidRequest { .. } => {
                (StatusCode::BAD_REQUEST, C::InvalidArgument, "invalid-request", "Invalid request")
            }
            E::UnsupportedMediaType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                C::InvalidArgument,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            E::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, C::ResourceExhausted, "payload-too-large", "Payload too large")
            }
            E::MessageTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                C::ResourceExhausted,
                "message-too-large",
                "Too large for a worker message",
            ),
            E::ImageTooLarge { .. } | E::ImageTooHeavy { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, C::ResourceExhausted, "image-too-large", "Image too large")
            }
            E::BodyTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, C::DeadlineExceeded, "request-body-timeout", "Request body too slow")
            }
            E::HostNotAllowed { .. } => {
                (StatusCode::MISDIRECTED_REQUEST, C::PermissionDenied, "host-not-allowed", "Host not allowed")
            }
            E::OriginNotAllowed { .. } => {
                (StatusCode::FORBIDDEN, C::PermissionDenied, "origin-not-allowed", "Origin not allowed")
            }
            E::RouteNotFound { .. } => (StatusCode::NOT_FOUND, C::Unimplemented, "route-not-found", "Route not found"),
            E::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, C::Unimplemented, "method-not-allowed", "Method not allowed")
            }
            E::ModelNotFound { .. } => (StatusCode::NOT_FOUND, C::NotFound, "model-not-found", "Model not found"),
            E::VersionNotFound { .. } => {
                (StatusCode::NOT_FOUND, C::NotFound, "model-version-not-found", "Model version not found")
            }
            E::UnsupportedOperation { .. } => (
                StatusCode::BAD_REQUEST,
                C::InvalidArgument,
                "unsupported-operation",
                "Operation not supported by model",
            ),
            E::Starting { .. } => (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "starting", "Gateway is starting"),
            E::TooManyStreams { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "too-many-streams", "Too many open streams")
            }
            E::StreamIdle { .. } => (StatusCode::REQUEST_TIMEOUT, C::DeadlineExceeded, "stream-idle", "Stream idle"),
            E::NoReadyWorker { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "no-ready-worker", "No ready worker")
            }
            E::ModelFailedToLoad { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "model-failed-to-load", "Model failed to load")
            }
            E::DeadlineExceeded { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, C::DeadlineExceeded, "deadline-exceeded", "Deadline exceeded")
            }
            E::WorkerFailed { .. } => (StatusCode::BAD_GATEWAY, C::Internal, "worker-failed", "Worker failed"),
            E::WorkerUnavailable { .. } | E::WorkerRefused { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "worker-unavailable", "Worker unavailable")
            }
            E::ModelRejected { .. } => {
                (StatusCode::BAD_REQUEST, C::InvalidArgument, "model-rejected-input", "Model rejected input")
            }
            // 499 is nginx's "client closed request": only ever seen in logs.
            E::Cancelled => (client_closed(), C::Cancelled, "cancelled", "Request cancelled"),
            E::Overloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "overloaded", "Gateway overloaded")
            }
            E::MemoryFull { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::ResourceExhausted, "memory-full", "Gateway memory full")
            }
            E::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "shutting-down", "Gateway is shutting down")
            }
            E::Unauthenticated => (StatusCode::UNAUTHORIZED, C::Unauthenticated, "unauthenticated", "Unauthenticated"),
            E::ModelForbidden { .. } => {
                (StatusCode::FORBIDDEN, C::PermissionDenied, "model-not-allowed", "Model not allowed")
            }
            E::PinForbidden { .. } => {
                (StatusCode::FORBIDDEN, C::PermissionDenied, "version-pin-not-allowed", "Version pin not allowed")
            }
            E::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, C::ResourceExhausted, "rate-limited", "Rate limit reached")
            }
            E::LimitsUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "limits-unavailable", "Limits unavailable")
            }
            E::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "queue-full", "Pool at capacity"),
            E::CircuitOpen { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "circuit-open", "Pool circuit open")
            }
            E::Shed { .. } => (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "pool-shedding", "Pool shedding load"),
            E::ResponseNotFound { .. } => {
                (StatusCode::NOT_FOUND, C::NotFound, "response-not-found", "Response not found")
            }
            E::StoreUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "store-unavailable", "Response store unavailable")
            }
            E::QueueUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable, "queue-unavailable", "Queue unavailable")
            }
            E::QueueNotConfigured => {
                (StatusCode::NOT_FOUND, C::NotFound, "queue-not-configured", "No queue configured")
            }
            E::QueueQuota { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, C::ResourceExhausted, "queue-quota", "Queued work quota reached")
            }
            E::QueuedNotFound { kind: QueuedKind::File, .. } => {
                (StatusCode::NOT_FOUND, C::NotFound, "file-not-found", "File not found")
            }
            E::QueuedNotFound { kind: QueuedKind::Batch, .. } => {
                (StatusCode::NOT_FOUND, C::NotFound, "batch-not-found", "Batch not found")
            }
            E::QueuedNotFound { kind: QueuedKind::Async, .. } => {
                (StatusCode::NOT_FOUND, C::NotFound, "async-not-found", "Async request not found")
            }
            E::AsyncGone { .. } => (StatusCode::GONE, C::NotFound, "async-gone", "Async request has no answer"),
            E::QueuedConflict { .. } => (StatusCode::CONFLICT, C::InvalidArgument, "conflict", "Conflict"),
        };
        Meta { status, code, slug, title }
    }

    /// The HTTP status this error answers with.
    pub fn http_status(&self) -> StatusCode {
        self.meta().status
    }

    /// The gRPC code this error answers with.
    pub fn rpc_code(&self) -> RpcCode {
        self.meta().code
    }

    /// The stable problem type, e.g. `urn:infergate:error:model-not-found`.
    pub fn problem_type(&self) -> String {
        format!("urn:infergate:error:{}", self.slug())
    }

    /// The problem type's last part, e.g. `model-not-found` (a metric label).
    pub fn slug(&self) -> &'static str {
        self.meta().slug
    }

    /// Seconds a client should wait before retrying, for transient errors.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Starting { .. }
            | Self::NoReadyWorker { .. }
            | Self::WorkerUnavailable { .. }
            | Self::WorkerRefused { .. }
            | Self::Overloaded { .. }
            | Self::TooManyStreams { .. }
            | Self::MemoryFull { .. }
            | Self::LimitsUnavailable
            | Self::StoreUnavailable { .. }
            | Self::QueueUnavailable { .. }
            | Self::QueueFull { .. } => Some(1),
            // Queued work drains; a minute is a fair first wait.
            Self::QueueQuota { .. } => Some(60),
            Self::RateLimited { retry_after, .. } => retry_after.map(ceil_secs),
            Self::CircuitOpen { retry_after, .. } | Self::Shed { retry_after, .. } => Some(ceil_secs(*retry_after)),
            Self::InvalidRequest { .. }
            | Self::UnsupportedMediaType { .. }
            | Self::PayloadTooLarge { .. }
            | Self::MessageTooLarge { .. }
            | Self::ImageTooLarge { .. }
            | Self::ImageTooHeavy { .. }
            | Self::BodyTimeout { .. }
            | Self::StreamIdle { .. }
            | Self::HostNotAllowed { .. }
            | Self::OriginNotAllowed { .. }
            | Self::RouteNotFound { .. }
            | Self::MethodNotAllowed
            | Self::ModelNotFound { .. }
            | Self::ResponseNotFound { .. }
            | Self::QueueNotConfigured
            | Self::QueuedNotFound { .. }
            | Self::AsyncGone { .. }
            | Self::QueuedConflict { .. }
            // Restarts go on, but a fix is what it waits for.
            | Self::ModelFailedToLoad { .. }
            | Self::VersionNotFound { .. }
            | Self::UnsupportedOperation { .. }
            | Self::DeadlineExceeded { .. }
            | Self::WorkerFailed { .. }
            | Self::ModelRejected { .. }
            | Self::Cancelled
            | Self::ShuttingDown
            | Self::Unauthenticated
            | Self::ModelForbidden { .. }
            | Self::PinForbidden { .. } => None,
        }
    }

    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (and the
    /// name of the limit) for a rate-limit refusal; these go out as HTTP
    /// headers and as gRPC metadata alike.
    pub fn rate_limit_fields(&self) -> Option<[(&'static str, String); 4]> {
        let Self::RateLimited { limit, quota, remaining, retry_after } = self else { return None };
        Some([
            ("ratelimit-limit", quota.to_string()),
            ("ratelimit-remaining", remaining.to_string()),
            ("ratelimit-reset", retry_after.map_or(0, ceil_secs).to_string()),
            ("infergate-limit", limit.clone()),
        ])
    }

    /// The RFC 9457 problem document for this error. A 401 never carries
    /// the request id, so every 401 body is the same bytes.
    pub fn problem(&self, request_id: Option<&str>) -> Problem {
        let request_id = if matches!(self, Self::Unauthenticated) { None } else { request_id };
        let meta = self.meta();
        let field = match self {
            Self::InvalidRequest { field, .. } => field.clone(),
            Self::RateLimited { limit, .. } => Some(limit.clone()),
            _ => None,
        };
        Problem {
            kind: self.problem_type(),
            title: meta.title,
            status: meta.status.as_u16(),
            detail: self.to_string(),
            field,
            request_id: request_id.map(str::to_owned),
        }
    }
}

/// Whole seconds to wait, rounded up, at least 1.
fn ceil_secs(d: Duration) -> u32 {
    u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// An RFC 9457 problem document. Under `/v1` it also carries OpenAI's
/// `error` object, under `/v2` the Open Inference Protocol's `error` string.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable machine-readable error type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short human-readable summary of the type.
    pub title: &'static str,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The offending field, as a JSON path, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The request id, to quote when reporting a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_never_5xx() {
        let client_errors = [
            GatewayError::invalid("input", "empty"),
            GatewayError::UnsupportedMediaType { got: "text/plain".into(), accepted: "application/json" },
            GatewayError::PayloadTooLarge { limit: 10 },
            GatewayError::ModelNotFound { model: "x".into() },
            GatewayError::ResponseNotFound { id: "resp_x".into() },
            GatewayError::RouteNotFound { path: "/x".into() },
            GatewayError::BodyTimeout { received: 1, after: Duration::from_secs(30) },
            GatewayError::HostNotAllowed { host: "evil.example".into() },
            GatewayError::ModelRejected { detail: "bad shape".into() },
        ];
        for err in client_errors {
            assert!(err.http_status().is_client_error(), "{err:?} -> {}", err.http_status());
        }
    }

    #[test]
    fn problem_names_the_field_and_type() {
        let p = GatewayError::invalid("input[2]", "must be a string").problem(Some("r1"));
        assert_eq!(p.status, 400);
        assert_eq!(p.field.as_deref(), Some("input[2]"));
        assert_eq!(p.kind, "urn:infergate:error:invalid-request");
        assert_eq!(p.request_id.as_deref(), Some("r1"));
    }
}
