//! One access-log line and the request metrics for every REST request.
//!
//! Handlers that know which model and variant answered put a [`Served`] in
//! the response's extensions; the auth middleware puts the caller there.
//! The line never carries a credential: the caller appears as its key id,
//! `user:<sub>` or `anonymous`.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::header;
use tokio::time::Instant;

use crate::policy::Caller;

/// What answered a request, for the access log and the metrics.
#[derive(Debug, Clone)]
pub struct Served {
    pub model: String,
    pub variant: Option<String>,
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

/// Middleware: log and count each request once its response head is ready
/// (a stream's latency is its time to first byte).
pub async fn access_log(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let resp = next.run(req).await;
    let latency = started.elapsed();
    let status = resp.status();
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
    let class = status_class(status);
    tracing::info!(
        target: "access",
        method = %method,
        route = %route,
        model,
        variant,
        status = status.as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        bytes,
        caller = caller.map_or_else(|| "-".to_owned(), |c| c.id()),
        tenant,
        request_id = %request_id,
        "request"
    );
    metrics::counter!(
        crate::telemetry::metrics::REQUESTS,
        "route" => route.clone(),
        "model" => model.to_owned(),
        "variant" => variant.to_owned(),
        "status" => class,
        "tenant" => tenant.to_owned()
    )
    .increment(1);
    metrics::histogram!(crate::telemetry::metrics::REQUEST_DURATION, "route" => route, "status" => class)
        .record(latency.as_secs_f64());
    resp
}
