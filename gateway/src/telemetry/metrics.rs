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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder (once per process) and describe the metrics.
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let _ = HANDLE.set(handle);
            metrics::describe_counter!(AUTH_FAILURES, "Requests refused by authentication, by reason");
            metrics::describe_counter!(LIMIT_REJECTIONS, "Requests refused by a limit, by limit");
            metrics::describe_counter!(LIMITS_FALLBACK, "Limit decisions taken without Redis, by fallback");
            metrics::describe_counter!(QUEUE_REJECTIONS, "Calls refused because the pool queue was full");
        }
        Err(e) => tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off"),
    }
}

/// The current metrics in Prometheus text format, if the recorder is installed.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}
