//! Optional export of one span per request to an OpenTelemetry collector
//! over OTLP/gRPC, when `[tracing] otlp_endpoint` is set (off by default).
//!
//! The span is the request's own: the trace id and span id the logs carry
//! and the worker receives in `traceparent`, a child of the caller's span
//! when it sent one. Spans queue in a bounded channel and go out in batches
//! from one task; a full queue or a failed export drops spans and counts
//! them (`infergate_spans_dropped_total`), never slowing a request.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::metrics::SPANS_DROPPED;
use super::trace::TraceContext;
pub use crate::config::components::OtlpConfig;

/// Spans waiting for export at most.
const QUEUE: usize = 8192;
/// Spans per export call at most.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static QUEUED: OnceLock<mpsc::Sender<Span>> = OnceLock::new();

/// Start the exporter task (inside the runtime). Once per process.
pub fn start(config: &OtlpConfig) {
    let (tx, rx) = mpsc::channel(QUEUE);
    if QUEUED.set(tx).is_err() {
        return;
    }
    let channel = Endpoint::from(config.endpoint.clone()).connect_timeout(Duration::from_secs(2)).connect_lazy();
    tokio::spawn(export(rx, channel, resource(&config.service_name)));
    tracing::info!(endpoint = %config.endpoint, "exporting request spans over OTLP");
}

/// True when spans are exported.
pub fn enabled() -> bool {
    QUEUED.get().is_some()
}

/// Queue a span for export; dropped (and counted) when the queue is full.
pub fn record(span: Span) {
    if let Some(tx) = QUEUED.get()
        && tx.try_send(span).is_err()
    {
        metrics::counter!(SPANS_DROPPED).increment(1);
    }
}

fn resource(service_name: &str) -> Resource {
    Resource {
        attributes: vec![
            attr("service.name", service_name),
            attr("telemetry.sdk.name", "infergate"),
            attr("service.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Default::default()
    }
}

async fn export(mut rx: mpsc::Receiver<Span>, channel: Channel, resource: Resource) {
    let mut client = TraceServiceClient::new(channel);
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        let mut spans = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while spans.len() < BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(span) => spans.push(span),
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        let n = spans.len();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "infergate".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let mut call = tonic::Request::new(request);
        call.set_timeout(EXPORT_TIMEOUT);
        match tokio::time::timeout(EXPORT_TIMEOUT, client.export(call)).await {
            Ok(Ok(_)) => failures = 0,
            outcome => {
                metrics::counter!(SPANS_DROPPED).increment(n as u64);
                failures += 1;
                // The first failure of a run, then one in a hundred.
                if failures % 100 == 1 {
                    let why = match outcome {
                        Ok(Err(status)) => status.message().to_owned(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(spans = n, %why, "OTLP export failed; spans dropped");
                }
            }
        }
    }
}

fn attr(key: &str, value: impl Into<Attr>) -> KeyValue {
    let value = match value.into() {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(i) => any_value::Value::IntValue(i),
        Attr::Float(f) => any_value::Value::DoubleValue(f),
    };
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// An attribute value.
pub enum Attr {
    Str(String),
    Int(i64),
    Float(f64),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<i64> for Attr {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl From<f64> for Attr {
    fn from(f: f64) -> Self {
        Self::Float(f)
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

/// The SERVER span of one request that started at `start` and took `took`.
pub fn server_span(
    trace: &TraceContext,
    name: String,
    start: SystemTime,
    took: Duration,
    server_error: bool,
    attributes: Vec<(&'static str, Attr)>,
) -> Span {
    Span {
        trace_id: trace.trace_id.to_be_bytes().to_vec(),
        span_id: trace.span_id.to_be_bytes().to_vec(),
        parent_span_id: trace.parent_span_id.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        flags: 0x100 | u32::from(trace.sampled),
        name,
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(start + took),
        attributes: attributes.into_iter().map(|(k, v)| attr(k, v)).collect(),
        status: Some(Status {
            code: if server_error { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_span_carries_the_ids_the_logs_and_workers_see() {
        let trace = TraceContext::child_of(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = server_span(
            &trace,
            "POST /v1/embeddings".into(),
            start,
            Duration::from_millis(12),
            false,
            vec![("http.response.status_code", 200i64.into())],
        );
        assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(hex(&span.span_id), format!("{:016x}", trace.span_id));
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 12_000_000);
        assert_eq!(span.kind, span::SpanKind::Server as i32);
        assert_eq!(span.status.unwrap().code, status::StatusCode::Unset as i32);
        let root = TraceContext::child_of(None);
        let span = server_span(&root, "x".into(), start, Duration::ZERO, true, vec![]);
        assert!(span.parent_span_id.is_empty(), "a new trace's root has no parent");
        assert_eq!(span.status.unwrap().code, status::StatusCode::Error as i32);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
