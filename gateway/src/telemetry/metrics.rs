//! Metric names, in one place, and the Prometheus exposition on `/metrics`.
//!
//! Counters are recorded through the `metrics` facade; the Prometheus
//! recorder is installed once by `infergate serve`. Without it (tests,
//! benches) recording is a no-op and `/metrics` answers 503.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests refused by authentication, by `reason` (`missing`, `unknown_key`, `invalid_token`, …).
pub const AUTH_FAILURES: &str = "infergate_auth_failures_total";
/// Requests refused by a limit, by `limit` (`key.rate`, `model.max_in_flight`, …).
pub const LIMIT_REJECTIONS: &str = "infergate_limit_rejections_total";
/// Limit decisions taken without Redis because it was down or slow, by `fallback`.
pub const LIMITS_FALLBACK: &str = "infergate_limits_fallback_total";
/// Calls refused because a pool's queue was full, by `pool`.
pub const QUEUE_REJECTIONS: &str = "infergate_queue_rejections_total";
/// Requests answered, by `route` (the matched route pattern), `model`,
/// `variant`, `status` class (`2xx`, `4xx`, `5xx`) and caller `tenant`.
pub const REQUESTS: &str = "infergate_requests_total";
/// Seconds from request to response headers, by `route` and `status` class.
pub const REQUEST_DURATION: &str = "infergate_request_duration_seconds";
/// Calls tried again on a worker, by `pool`.
pub const RETRIES: &str = "infergate_retries_total";
/// Workers taken out of balancing by outlier detection, by `pool` and `worker`.
pub const EJECTIONS: &str = "infergate_ejections_total";
/// A pool's circuit: 0 closed, 1 half-open, 2 open; by `pool`.
pub const CIRCUIT_STATE: &str = "infergate_circuit_state";
/// Local worker processes restarted after they exited, by `worker`.
pub const WORKER_RESTARTS: &str = "infergate_worker_restarts_total";
/// Items per batch sent to a worker, by `pool` and `model`.
pub const BATCH_SIZE: &str = "infergate_batch_size";
/// Seconds an item waited in its batcher before its batch went, by `pool` and `model`.
pub const BATCH_QUEUE_WAIT: &str = "infergate_batch_queue_wait_seconds";
/// Batches sent and not yet answered, by `pool` and `model`.
pub const BATCHES_IN_FLIGHT: &str = "infergate_batches_in_flight";
/// Cache lookups by `cache` (`exact`) and `result` (`hit`, `miss`); an
/// embeddings request counts once per text.
pub const CACHE_REQUESTS: &str = "infergate_cache_requests_total";
/// Requests answered by an identical request already in flight (singleflight).
pub const COALESCED: &str = "infergate_coalesced_requests_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder (once per process) and describe the metrics.
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    let buckets = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    let waits = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
    let durations = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()), &buckets)
        .and_then(|b| {
            b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(BATCH_QUEUE_WAIT.into()), &waits)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION.into()), &durations)
        });
    let builder = match builder {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot configure metric buckets; /metrics is off");
            return;
        }
    };
    match builder.install_recorder() {
        Ok(handle) => {
            let _ = HANDLE.set(handle);
            metrics::describe_counter!(AUTH_FAILURES, "Requests refused by authentication, by reason");
            metrics::describe_counter!(
                REQUESTS,
                "Requests answered, by route, model, variant, status class and tenant"
            );
            metrics::describe_histogram!(REQUEST_DURATION, metrics::Unit::Seconds, "Request to response headers");
            metrics::describe_counter!(LIMIT_REJECTIONS, "Requests refused by a limit, by limit");
            metrics::describe_counter!(LIMITS_FALLBACK, "Limit decisions taken without Redis, by fallback");
            metrics::describe_counter!(QUEUE_REJECTIONS, "Calls refused because the pool queue was full");
            metrics::describe_histogram!(BATCH_SIZE, "Items per batch sent to a worker");
            metrics::describe_histogram!(
                BATCH_QUEUE_WAIT,
                metrics::Unit::Seconds,
                "Wait in the batcher before the batch went"
            );
            metrics::describe_gauge!(BATCHES_IN_FLIGHT, "Batches sent to workers and not yet answered");
            metrics::describe_counter!(CACHE_REQUESTS, "Cache lookups by cache and result");
            metrics::describe_counter!(COALESCED, "Requests answered by an identical request in flight");
        }
        Err(e) => tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off"),
    }
}

/// The current metrics in Prometheus text format, if the recorder is installed.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}
