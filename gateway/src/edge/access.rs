//! One access-log line and the request metrics for every REST request, the
//! request's trace context, and where its time went.
//!
//! A whole body is logged at once; a stream (SSE, every gRPC response) when
//! it ends, with its full latency, its bytes and how it ended.
//!
//! Handlers that know which model and variant answered put a [`Served`] in
//! the response's extensions; the auth middleware puts the caller there.
//! The line never carries a credential: the caller appears as its key id,
//! `user:<sub>` or `anonymous`.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body::Frame;
use tokio::time::Instant;
use tracing::Instrument;

use crate::policy::Caller;
use crate::telemetry::metrics::Handles;
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

/// Every gRPC method the edge's services define, as `/package.Service/Method`
/// (from their descriptors): a call's route label is one of these or
/// `unmatched`, so made-up method names, refused or not, add no series.
fn grpc_methods() -> &'static std::collections::HashSet<String> {
    static METHODS: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    METHODS.get_or_init(|| {
        use prost::Message;
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = std::collections::HashSet::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                    }
                }
            }
        }
        methods
    })
}

/// The route label of a request that matched no route (or no real gRPC method).
const UNMATCHED: &str = "unmatched";

/// A route pattern as a `&'static str`, for labels without an allocation per
/// request: the router's patterns are few and fixed, so each is kept once.
fn interned(pattern: &str) -> &'static str {
    /// More patterns than any router here has: past it, a pattern is not kept.
    const MAX: usize = 256;
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = seen.iter().find(|known| **known == pattern) {
        return known;
    }
    if seen.len() >= MAX {
        return UNMATCHED;
    }
    let kept: &'static str = Box::leak(pattern.into());
    seen.push(kept);
    kept
}

/// A layer inside the REST router: names the route pattern a request
/// matched in its timings, for [`access_log`], which runs once outside the
/// router rather than around each route.
#[derive(Clone, Copy, Default)]
pub struct NameRoute;

impl<S> tower::Layer<S> for NameRoute {
    type Service = NamedRoute<S>;

    fn layer(&self, inner: S) -> NamedRoute<S> {
        NamedRoute(inner)
    }
}

/// See [`NameRoute`].
#[derive(Clone)]
pub struct NamedRoute<S>(S);

impl<S: tower::Service<Request>> tower::Service<Request> for NamedRoute<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> S::Future {
        if let Some(path) = req.extensions().get::<MatchedPath>() {
            let route = interned(path.as_str());
            timing::with_current(|t| t.name_route(route));
        }
        self.0.call(req)
    }
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

/// Run the request in its trace span and timing scope (every log line
/// inside carries the request and trace id), then log and count it once its
/// response has ended: a whole body at once, a stream (SSE, every gRPC
/// response) when its last frame is sent or the client leaves, so the line
/// has the stream's full latency, its bytes, and a gRPC status sent in
/// trailers. Overhead is measured at the head: after it, a stream's time is
/// the model's.
async fn observe(surface: Surface, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let wall = std::time::SystemTime::now();
    let method = req.method().clone();
    // REST runs this outside its router: the route is named inside it (see
    // `NameRoute`) and read once the response is back.
    let grpc_route = match (surface, req.extensions().get::<MatchedPath>()) {
        // A service's routes match any method name; only real ones are labels.
        (Surface::Grpc, Some(_)) => grpc_methods().get(req.uri().path()).map_or(UNMATCHED, String::as_str),
        (_, _) => UNMATCHED,
    };
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let trace = trace_of(req.headers());
    let timings = Arc::new(Timings::default());
    let span = tracing::info_span!("request", request_id = %request_id, trace_id = %trace.trace_id_hex());
    let run = timing::scope(timings.clone(), trace::scope(trace, next.run(req)));
    let mut resp = run.instrument(span).await;
    let head = started.elapsed();
    if timings.reached_worker() {
        resp.headers_mut().insert(QUEUE_TIME, millis(timings.queue()));
        resp.headers_mut().insert(INFERENCE_TIME, millis(timings.inference()));
    }
    let status = resp.status();
    // Usually sent in the trailers; a trailers-only answer (an error before
    // any message) has it in the headers.
    let grpc_status = match surface {
        Surface::Http => None,
        Surface::Grpc if status.is_success() => grpc_status_of(resp.headers()),
        Surface::Grpc => Some(tonic::Code::Unavailable as i32),
    };
    let route = match surface {
        Surface::Http => timings.route().unwrap_or(UNMATCHED),
        // A method no service has: its name is the caller's, not a route.
        Surface::Grpc if grpc_status == Some(tonic::Code::Unimplemented as i32) => UNMATCHED,
        Surface::Grpc => grpc_route,
    };
    by_route(&HEAD_TIMES, route).record(head.as_secs_f64());
    let overhead = timings.overhead(head);
    by_route(&OVERHEADS, route).record(overhead.as_secs_f64());
    let detail = match surface {
        Surface::Http => resp.extensions().get::<crate::error::Problem>().map(|p| p.detail.clone()),
        Surface::Grpc => grpc_message_of(resp.headers()),
    };
    let record = Record {
        surface,
        method,
        route,
        served: resp.extensions_mut().remove::<Served>(),
        caller: resp.extensions().get::<Arc<Caller>>().cloned(),
        status,
        grpc_status,
        request_id,
        trace,
        wall,
        started,
        timings,
        overhead,
        detail,
    };
    // Known for whole bodies: logged now. Otherwise the body logs as it ends.
    let whole = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .or_else(|| HttpBody::size_hint(resp.body()).exact());
    match whole {
        Some(bytes) if surface == Surface::Http => {
            record.finish(bytes, Ended::Complete);
            resp
        }
        _ => resp.map(|inner| Body::new(Observed { inner, bytes: 0, record: Some(record) })),
    }
}

/// A gRPC status in `headers` (trailers, or a trailers-only response's head).
fn grpc_status_of(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
}

/// A gRPC status message in `headers`, percent-decoded.
fn grpc_message_of(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get("grpc-message")?.to_str().ok()?;
    Some(percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned())
}

/// How a response's body ended.
#[derive(Clone, Copy, Debug)]
enum Ended {
    /// Its last frame was sent.
    Complete,
    /// The client left (or the connection broke) before the end.
    ClientClosed,
    /// The body failed while being sent.
    Failed,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Complete => "complete",
            Ended::ClientClosed => "client-closed",
            Ended::Failed => "error",
        }
    }
}

/// What the access line, the span and the request metrics say about one
/// request, known at its response head; written when the body ends.
struct Record {
    surface: Surface,
    method: http::Method,
    route: &'static str,
    /// What answered, when a model did.
    served: Option<Served>,
    caller: Option<Arc<Caller>>,
    status: http::StatusCode,
    grpc_status: Option<i32>,
    request_id: String,
    trace: TraceContext,
    wall: std::time::SystemTime,
    started: Instant,
    timings: Arc<Timings>,
    /// The gateway's own part of the time to the response head.
    overhead: Duration,
    /// What went wrong, for an error: the problem's detail, the gRPC message.
    detail: Option<String>,
}

/// A caller as the access line names it (see [`Caller::id`]), written only
/// when the line is.
struct CallerId<'a>(Option<&'a Caller>);

impl std::fmt::Display for CallerId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(caller) => f.write_str(&caller.id()),
            None => f.write_str("-"),
        }
    }
}

/// Health probes' routes: their 503 says "not ready yet", and is not kept
/// among the console's recent errors.
const PROBES: [&str; 6] = [
    "/healthz",
    "/readyz",
    "/v2/health/live",
    "/v2/health/ready",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Most label sets whose metric handles are kept (see [`Handles`]).
const MAX_LABEL_SETS: usize = 4096;

static HEAD_TIMES: LazyLock<Handles<metrics::Histogram>> = LazyLock::new(|| Handles::new(MAX_LABEL_SETS));
static OVERHEADS: LazyLock<Handles<metrics::Histogram>> = LazyLock::new(|| Handles::new(MAX_LABEL_SETS));
static REQUEST_COUNTS: LazyLock<Handles<metrics::Counter>> = LazyLock::new(|| Handles::new(MAX_LABEL_SETS));
static DURATIONS: LazyLock<Handles<metrics::Histogram>> = LazyLock::new(|| Handles::new(MAX_LABEL_SETS));

/// The histogram of `handles` (time to first byte, or overhead) for `route`.
fn by_route(handles: &LazyLock<Handles<metrics::Histogram>>, route: &'static str) -> metrics::Histogram {
    use crate::telemetry::metrics::{GATEWAY_OVERHEAD, TIME_TO_FIRST_BYTE};
    let name = if std::ptr::eq(handles, &HEAD_TIMES) { TIME_TO_FIRST_BYTE } else { GATEWAY_OVERHEAD };
    handles.get(&[route], || metrics::histogram!(name, "route" => route))
}

impl Record {
    fn finish(self, bytes: u64, ended: Ended) {
        let latency = self.started.elapsed();
        // What answered, else what the request named (an error's model too);
        // a name the gateway does not know is logged but never a label.
        let named = self.timings.named();
        let (model, model_label) = match (&self.served, named) {
            (Some(s), _) => (&*s.model, &*s.model),
            (None, Some(n)) if n.known => (&*n.model, &*n.model),
            (None, Some(n)) => (&*n.model, "unknown"),
            (None, None) => ("-", "-"),
        };
        let variant = self.served.as_ref().and_then(|s| s.variant.as_deref()).unwrap_or("-");
        let tenant = self.caller.as_ref().map_or("-", |c| &*c.tenant);
        let route = self.route;
        let (class, grpc_status) = match self.surface {
            Surface::Http => (status_class(self.status), None),
            Surface::Grpc => {
                // No status at all: the stream never finished (CANCELLED by the client, or broken).
                let code = self.grpc_status.unwrap_or(match ended {
                    Ended::ClientClosed => tonic::Code::Cancelled as i32,
                    Ended::Complete | Ended::Failed => tonic::Code::Unknown as i32,
                });
                (grpc_class(code), Some(code))
            }
        };
        let trace_id = self.trace.trace_id_hex();
        tracing::info!(
            target: "access",
            method = %self.method,
            route = %route,
            model,
            variant,
            status = self.status.as_u16(),
            grpc_status,
            latency_ms = latency.as_secs_f64() * 1000.0,
            bytes,
            ended = ended.as_str(),
            caller = %CallerId(self.caller.as_deref()),
            tenant,
            request_id = %self.request_id,
            trace_id = %trace_id,
            "request"
        );
        if otlp::enabled() && self.trace.sampled {
            let name = match self.surface {
                Surface::Http => format!("{} {route}", self.method),
                Surface::Grpc => route.trim_start_matches('/').to_owned(),
            };
            let mut attributes: Vec<(&'static str, otlp::Attr)> = vec![
                ("http.request.method", self.method.as_str().into()),
                ("http.route", route.into()),
                ("http.response.status_code", i64::from(self.status.as_u16()).into()),
                ("infergate.model", model.into()),
                ("infergate.variant", variant.into()),
                ("infergate.tenant", tenant.into()),
                ("infergate.request_id", self.request_id.as_str().into()),
            ];
            if let Some(code) = grpc_status {
                attributes.push(("rpc.grpc.status_code", i64::from(code).into()));
            }
            if self.timings.reached_worker() {
                attributes.push(("infergate.queue_ms", (self.timings.queue().as_secs_f64() * 1000.0).into()));
                attributes.push(("infergate.inference_ms", (self.timings.inference().as_secs_f64() * 1000.0).into()));
            }
            otlp::record(otlp::server_span(&self.trace, name, self.wall, latency, class == "5xx", attributes));
        }
        REQUEST_COUNTS
            .get(&[route, model_label, variant, class, tenant], || {
                metrics::counter!(
                    crate::telemetry::metrics::REQUESTS,
                    "route" => route,
                    "model" => model_label.to_owned(),
                    "variant" => variant.to_owned(),
                    "status" => class,
                    "tenant" => tenant.to_owned()
                )
            })
            .increment(1);
        DURATIONS
            .get(&[route, model_label, class], || {
                metrics::histogram!(
                    crate::telemetry::metrics::REQUEST_DURATION,
                    "route" => route,
                    "model" => model_label.to_owned(),
                    "status" => class
                )
            })
            .record(latency.as_secs_f64());
        self.to_window(model_label, class, latency, grpc_status);
    }

    /// Count the request in the console's window, and keep it when it failed.
    fn to_window(&self, model_label: &str, class: &str, latency: Duration, grpc_status: Option<i32>) {
        use crate::telemetry::window::{self, Outcome};
        let outcome = match class {
            "4xx" => Outcome::Refused,
            "5xx" => Outcome::Failed,
            _ => Outcome::Ok,
        };
        // Requests that named no model (probes, metadata, the metrics) are not charted.
        if model_label != "-" {
            window::record(model_label, outcome, latency, self.overhead);
        }
        // A probe's "not ready" is its answer, not an error to show.
        if outcome != Outcome::Ok && !PROBES.contains(&self.route) {
            let status = match (self.surface, class) {
                (Surface::Grpc, "4xx") => 400,
                (Surface::Grpc, _) => 500,
                (Surface::Http, _) => self.status.as_u16(),
            };
            window::error(window::RecentError {
                seq: 0,
                at_ms: 0,
                route: self.route.to_owned(),
                model: self.timings.named().map_or_else(|| model_label.to_owned(), |n| n.model.clone()),
                status,
                grpc_status,
                request_id: self.request_id.clone(),
                detail: self.detail.clone().unwrap_or_default(),
            });
        }
    }
}

/// A response body that counts what it sends, reads a gRPC status from its
/// trailers, and writes the request's [`Record`] when it ends or is dropped.
struct Observed {
    inner: Body,
    bytes: u64,
    record: Option<Record>,
}

impl Observed {
    fn finish(&mut self, ended: Ended) {
        if let Some(record) = self.record.take() {
            record.finish(self.bytes, ended);
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let (Some(trailers), Some(record)) = (frame.trailers_ref(), this.record.as_mut()) {
                    record.grpc_status = grpc_status_of(trailers).or(record.grpc_status);
                    record.detail = grpc_message_of(trailers).or(record.detail.take());
                }
                if this.inner.is_end_stream() {
                    this.finish(Ended::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Ended::Failed),
            Poll::Ready(None) => this.finish(Ended::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Dropped unfinished: the connection went before the body's end.
        let ended = if self.inner.is_end_stream() { Ended::Complete } else { Ended::ClientClosed };
        self.finish(ended);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_route_labels_are_the_methods_the_services_define() {
        let methods = super::grpc_methods();
        for served in [
            "/infergate.v1.Inference/Embed",
            "/infergate.v1.Inference/Generate",
            "/inference.GRPCInferenceService/ModelInfer",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(methods.contains(served), "{served}");
        }
        assert!(!methods.contains("/infergate.v1.Inference/MadeUp"));
    }
}
