//! One access-log line and the request metrics for every REST request, the
//! request's trace context, and where its time went.
//!
//! Handlers that know which model and variant answered put a [`Served`] in
//! the response's extensions; the auth middleware puts the caller there.
//! The line never carries a credential: the caller appears as its key id,
//! `user:<sub>` or `anonymous`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use tokio::time::Instant;
use tracing::Instrument;

use crate::policy::Caller;
use crate::telemetry::otlp;
use crate::telemetry::timing::{self, Timings};
use crate::telemetry::trace::{self, TraceContext};

/// Milliseconds the request waited before a model ran (gateway and worker queues).
pub const QUEUE_TIME: HeaderName = HeaderName::from_static("x-infergate-queue-time");
/// Milliseconds the model ran for the request, as its worker reported.
pub const INFERENCE_TIME: HeaderName = HeaderName::from_static("x-infergate-inference-time");

/// What answered a request, for the access log and the metrics.
#[derive(Debug, Clone)]
pub struct Served {
    pub model: String,
    pub variant: Option<String>,
}

impl Served {
    pub fn of(target: &crate::route::Target) -> Self {
        Self { model: target.model.to_string(), variant: target.variant.as_deref().map(str::to_owned) }
    }
}

fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Middleware, outermost: a caller's `X-Request-Id` is kept only when it is
/// [valid](trace::valid_request_id); otherwise one is generated for it.
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let keep = req.headers().get("x-request-id").is_none_or(|v| v.to_str().is_ok_and(trace::valid_request_id));
    if !keep {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// The request's span: a child of the caller's `traceparent`, if valid.
pub fn trace_of(headers: &HeaderMap) -> TraceContext {
    TraceContext::child_of(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// Milliseconds, as a header value.
fn millis(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0)).unwrap_or(HeaderValue::from_static("0"))
}

/// Which edge a request came through: how its route and status read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Surface {
    Http,
    Grpc,
}

/// Middleware for the REST edge: see [`observe`].
pub async fn access_log(req: Request, next: Next) -> Response {
    observe(Surface::Http, req, next).await
}

/// Middleware for the gRPC edge: a caller's `x-request-id` metadata is kept
/// when valid, else one is generated (handlers read it from the request);
/// then as [`observe`].
pub async fn grpc_access_log(mut req: Request, next: Next) -> Response {
    let keep = req.headers().get("x-request-id").is_some_and(|v| v.to_str().is_ok_and(trace::valid_request_id));
    if !keep && let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        req.headers_mut().insert("x-request-id", v);
    }
    observe(Surface::Grpc, req, next).await
}

/// The status class of a gRPC status code, by the HTTP status a gateway
/// would give the same outcome (CANCELLED is the caller's doing).
fn grpc_class(code: i32) -> &'static str {
    match tonic::Code::from(code) {
        tonic::Code::Ok => "2xx",
        tonic::Code::Cancelled
        | tonic::Code::InvalidArgument
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists
        | tonic::Code::PermissionDenied
        | tonic::Code::ResourceExhausted
        | tonic::Code::FailedPrecondition
        | tonic::Code::OutOfRange
        | tonic::Code::Unauthenticated => "4xx",
        _ => "5xx",
    }
}

/// Log and count each request once its response head is ready (a stream's
/// latency is its time to first byte; a gRPC status sent in trailers after
/// a normal head reads as OK). The request runs in its trace span and
/// timing scope; every log line inside it carries the request and trace id.
async fn observe(surface: Surface, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let wall = std::time::SystemTime::now();
    let method = req.method().clone();
    let route = match (surface, req.extensions().get::<MatchedPath>()) {
        (Surface::Grpc, Some(_)) => req.uri().path().to_owned(),
        (Surface::Http, Some(p)) => p.as_str().to_owned(),
        (_, None) => "unmatched".to_owned(),
    };
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let trace = trace_of(req.headers());
    let trace_id = trace.trace_id_hex();
    let timings = Arc::new(Timings::default());
    let span = tracing::info_span!("request", request_id = %request_id, trace_id = %trace_id);
    let run = timing::scope(timings.clone(), trace::scope(trace, next.run(req)));
    let mut resp = run.instrument(span).await;
    let latency = started.elapsed();
    if timings.reached_worker() {
        resp.headers_mut().insert(QUEUE_TIME, millis(timings.queue()));
        resp.headers_mut().insert(INFERENCE_TIME, millis(timings.inference()));
    }
    let status = resp.status();
    let (class, grpc_status, route) = match surface {
        Surface::Http => (status_class(status), None, route),
        Surface::Grpc => {
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok());
            let code = if status.is_success() { code.unwrap_or(0) } else { tonic::Code::Unavailable as i32 };
            // A method no service has: its name is the caller's, not a route.
            let route = if code == tonic::Code::Unimplemented as i32 { "unmatched".to_owned() } else { route };
            (grpc_class(code), Some(code), route)
        }
    };
    let served = resp.extensions().get::<Served>();
    let caller = resp.extensions().get::<Arc<Caller>>();
    let model = served.map_or("-", |s| s.model.as_str());
    let variant = served.and_then(|s| s.variant.as_deref()).unwrap_or("-");
    let tenant = caller.map_or("-", |c| &*c.tenant);
    // Known for whole bodies; a stream's size is not known at its head.
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .or_else(|| axum::body::HttpBody::size_hint(resp.body()).exact());
    tracing::info!(
        target: "access",
        method = %method,
        route = %route,
        model,
        variant,
        status = status.as_u16(),
        grpc_status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        bytes,
        caller = caller.map_or_else(|| "-".to_owned(), |c| c.id()),
        tenant,
        request_id = %request_id,
        trace_id = %trace_id,
        "request"
    );
    if otlp::enabled() && trace.sampled {
        let name = match surface {
            Surface::Http => format!("{method} {route}"),
            Surface::Grpc => route.trim_start_matches('/').to_owned(),
        };
        let mut attributes: Vec<(&'static str, otlp::Attr)> = vec![
            ("http.request.method", method.as_str().into()),
            ("http.route", route.as_str().into()),
            ("http.response.status_code", i64::from(status.as_u16()).into()),
            ("infergate.model", model.into()),
            ("infergate.variant", variant.into()),
            ("infergate.tenant", tenant.into()),
            ("infergate.request_id", request_id.as_str().into()),
        ];
        if let Some(code) = grpc_status {
            attributes.push(("rpc.grpc.status_code", i64::from(code).into()));
        }
        if timings.reached_worker() {
            attributes.push(("infergate.queue_ms", (timings.queue().as_secs_f64() * 1000.0).into()));
            attributes.push(("infergate.inference_ms", (timings.inference().as_secs_f64() * 1000.0).into()));
        }
        otlp::record(otlp::server_span(&trace, name, wall, latency, class == "5xx", attributes));
    }
    metrics::counter!(
        crate::telemetry::metrics::REQUESTS,
        "route" => route.clone(),
        "model" => model.to_owned(),
        "variant" => variant.to_owned(),
        "status" => class,
        "tenant" => tenant.to_owned()
    )
    .increment(1);
    metrics::histogram!(crate::telemetry::metrics::REQUEST_DURATION, "route" => route.clone(), "status" => class)
        .record(latency.as_secs_f64());
    metrics::histogram!(crate::telemetry::metrics::GATEWAY_OVERHEAD, "route" => route)
        .record(timings.overhead(latency).as_secs_f64());
    resp
}
