//! Metric names, in one place, and the Prometheus exposition on `/metrics`.
//!
//! Counters are recorded through the `metrics` facade; the Prometheus
//! recorder is installed once by `infergate serve`. Without it (tests,
//! benches) recording is a no-op and `/metrics` answers 503.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
/// Seconds from request to the end of the response (a stream until its last
/// frame), by `route` and `status` class.
pub const REQUEST_DURATION: &str = "infergate_request_duration_seconds";
/// Seconds from request to response headers, by `route`: for a chat stream,
/// its first token (the head waits for it, so a failure before it can fall back).
pub const TIME_TO_FIRST_BYTE: &str = "infergate_time_to_first_byte_seconds";
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
pub const BATCH_SPLITS: &str = "infergate_batch_splits_total";
pub const POOL_ERRORS: &str = "infergate_pool_errors_total";
/// Seconds an item waited in its batcher before its batch went, by `pool` and `model`.
pub const BATCH_QUEUE_WAIT: &str = "infergate_batch_queue_wait_seconds";
/// Batches sent and not yet answered, by `pool` and `model`.
pub const BATCHES_IN_FLIGHT: &str = "infergate_batches_in_flight";
/// The most items the batcher let its last batch take (learned from the
/// model's cost under `target_latency`, or `max_batch_size`), by `pool` and `model`.
pub const BATCH_LIMIT: &str = "infergate_batch_limit";
/// Cache lookups by `cache` (`exact`) and `result` (`hit`, `miss`); an
/// embeddings request counts once per text.
pub const CACHE_REQUESTS: &str = "infergate_cache_requests_total";
/// Requests answered by an identical request already in flight (singleflight).
pub const COALESCED: &str = "infergate_coalesced_requests_total";
/// Seconds of a request spent in the gateway itself: its latency less the
/// time queued and awaiting workers; by `route`.
pub const GATEWAY_OVERHEAD: &str = "infergate_gateway_overhead_seconds";
/// Seconds from sending a call (or a batch) to a worker to its answer, by `pool`.
pub const WORKER_CALL_DURATION: &str = "infergate_worker_call_duration_seconds";
/// Seconds a call waited in the worker for a model thread, as the worker reports it; by `pool`.
pub const WORKER_QUEUE_TIME: &str = "infergate_worker_queue_seconds";
/// Seconds the model ran for a call, as the worker reports it; by `pool`.
pub const WORKER_INFERENCE_TIME: &str = "infergate_worker_inference_seconds";
/// Calls given to a pool's workers and not yet answered, by `pool`.
pub const POOL_IN_FLIGHT: &str = "infergate_pool_in_flight";
/// Calls given to one worker and not yet answered, by `pool` and `worker`.
pub const WORKER_IN_FLIGHT: &str = "infergate_worker_in_flight";
/// Calls waiting for a free worker slot, by `pool`.
pub const QUEUE_DEPTH: &str = "infergate_queue_depth";
/// Items waiting in a batcher, by `pool` and `model`.
pub const BATCH_QUEUE_DEPTH: &str = "infergate_batch_queue_depth";
/// LLM and embedding tokens, by `model`, `tenant` and `kind` (`input`, `output`).
pub const TOKENS: &str = "infergate_tokens_total";
/// Estimated cost in US dollars from the configured per-token prices since
/// start (a running total kept as a gauge), by `model` and `tenant`.
pub const COST: &str = "infergate_estimated_cost_usd";
/// Client connections open, by `listener` (`http`, `grpc`).
pub const CONNECTIONS_OPEN: &str = "infergate_connections_open";
/// Client connections open without a protocol state (hyper's buffers): not
/// yet spoken, or HTTP/1.1 keep-alive idle and parked; by `listener`.
pub const CONNECTIONS_PARKED: &str = "infergate_connections_parked";
/// Log lines dropped because the log writer fell behind.
pub const LOG_LINES_DROPPED: &str = "infergate_log_lines_dropped_total";
/// Request spans not exported over OTLP (queue full, collector unreachable).
pub const SPANS_DROPPED: &str = "infergate_spans_dropped_total";
/// Share of a pool's calls its adaptive admission lets through now.
pub const ADMITTED_SHARE: &str = "infergate_pool_admitted_share";
/// Canary variants rolled back for breaching their SLO, by alias and variant.
pub const CANARY_ROLLBACKS: &str = "infergate_canary_rollbacks_total";
/// Config reloads, by result (`applied`, `unchanged`, `refused`).
pub const CONFIG_RELOADS: &str = "infergate_config_reloads_total";
/// Entries in the queue (waiting or running), by `target` (the model named);
/// read from Redis, so every replica reports the same depth.
pub const QUEUED: &str = "infergate_queued_requests";
/// Age of the oldest entry in the queue, by `target`.
pub const QUEUED_OLDEST: &str = "infergate_queued_oldest_age_seconds";
/// Requests queued (async or batch lines), by `kind`.
pub const QUEUE_SUBMITTED: &str = "infergate_queue_submitted_total";
/// Queued entries settled by this replica, by `outcome` (`done`, `failed`,
/// `expired`, `cancelled`).
pub const QUEUE_ENTRIES: &str = "infergate_queue_entries_total";
/// Entries taken over from a consumer that stopped, by `target`.
pub const QUEUE_RECLAIMS: &str = "infergate_queue_reclaims_total";
/// Answers of queued requests stored in Redis.
pub const QUEUE_RESULTS_STORED: &str = "infergate_queue_results_stored_total";
/// Streams of frames open now, by `edge` (`grpc`, `websocket`).
pub const STREAMS_OPEN: &str = "infergate_streams_open";
/// Frames read from streams, by `model`.
pub const STREAM_FRAMES_RECEIVED: &str = "infergate_stream_frames_received_total";
/// Frames' results sent back, by `model` and `outcome` (`answered`,
/// `failed`, `dropped`).
pub const STREAM_FRAMES: &str = "infergate_stream_frames_total";
/// Frames dropped, by `model` and `reason` (`overflow`, `rate_limited`).
pub const STREAM_FRAMES_DROPPED: &str = "infergate_stream_frames_dropped_total";
/// A sent frame's arrival to its result, by `model`.
pub const STREAM_FRAME_LATENCY: &str = "infergate_stream_frame_latency_seconds";
/// Frames of its stream read and not yet answered when a result goes out
/// (how far a stream's results run behind its frames), by `model`.
pub const STREAM_LAG: &str = "infergate_stream_lag_frames";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Metric handles by their label values, made once and reused: a
/// `counter!`/`histogram!` with owned labels builds its key (an allocation a
/// label) and looks it up in the registry on every call, which on the
/// request path costs more than the update itself. Label values are joined
/// into one key in a per-thread buffer, so a hit allocates nothing. At most
/// `max` label sets are kept (the labels are bounded by the config, this is
/// a backstop); past it, handles are made each time as before. Nothing is
/// kept before the recorder is installed.
pub struct Handles<H> {
    map: std::sync::RwLock<std::collections::HashMap<Box<str>, H>>,
    max: usize,
}

impl<H: Clone> Handles<H> {
    pub fn new(max: usize) -> Self {
        Self { map: std::sync::RwLock::default(), max }
    }

    /// The handle for `labels`, made by `make` the first time.
    pub fn get(&self, labels: &[&str], make: impl FnOnce() -> H) -> H {
        use std::fmt::Write as _;
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with_borrow_mut(|key| {
            key.clear();
            for label in labels {
                // Length-prefixed: no two label lists make the same key.
                let _ = write!(key, "{}:", label.len());
                key.push_str(label);
            }
            let read = self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(handle) = read.get(key.as_str()) {
                return handle.clone();
            }
            drop(read);
            let handle = make();
            if HANDLE.get().is_some() {
                let mut map = self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if map.len() < self.max {
                    map.entry(key.as_str().into()).or_insert_with(|| handle.clone());
                }
            }
            handle
        })
    }
}

/// Histogram buckets, in the unit of each metric.
const BUCKETS: &[(&str, &[f64])] = &[
    (BATCH_SIZE, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    (BATCH_QUEUE_WAIT, WAITS),
    (WORKER_QUEUE_TIME, WAITS),
    (REQUEST_DURATION, DURATIONS),
    (TIME_TO_FIRST_BYTE, DURATIONS),
    (WORKER_CALL_DURATION, DURATIONS),
    (STREAM_FRAME_LATENCY, DURATIONS),
    (STREAM_LAG, &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    (WORKER_INFERENCE_TIME, DURATIONS),
    // The gateway's own share is tens of microseconds on a good day.
    (GATEWAY_OVERHEAD, &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
];
const WAITS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
const DURATIONS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Install the Prometheus recorder (once per process) and describe the metrics.
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in BUCKETS {
        builder = match builder.set_buckets_for_metric(Matcher::Full((*name).into()), buckets) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot configure metric buckets; /metrics is off");
                return;
            }
        };
    }
    match builder.install_recorder() {
        Ok(handle) => {
            let _ = HANDLE.set(handle);
            describe();
            metrics::counter!(COALESCED).increment(0);
        }
        Err(e) => tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off"),
    }
}

fn describe() {
    use metrics::Unit::Seconds;
    use metrics::{describe_counter as counter, describe_gauge as gauge, describe_histogram as histogram};
    counter!(AUTH_FAILURES, "Requests refused by authentication, by reason");
    counter!(REQUESTS, "Requests answered, by route, model, variant, status class and tenant");
    histogram!(REQUEST_DURATION, Seconds, "Request to the end of the response");
    histogram!(TIME_TO_FIRST_BYTE, Seconds, "Request to response headers (a chat stream's first token)");
    histogram!(GATEWAY_OVERHEAD, Seconds, "Request latency less queueing and worker calls");
    counter!(LIMIT_REJECTIONS, "Requests refused by a limit, by limit");
    counter!(LIMITS_FALLBACK, "Limit decisions taken without Redis, by fallback");
    counter!(QUEUE_REJECTIONS, "Calls refused because the pool queue was full");
    gauge!(QUEUE_DEPTH, "Calls waiting for a free worker slot");
    gauge!(POOL_IN_FLIGHT, "Calls given to a pool's workers, not yet answered");
    gauge!(WORKER_IN_FLIGHT, "Calls given to one worker, not yet answered");
    histogram!(WORKER_CALL_DURATION, Seconds, "Worker call from send to answer");
    histogram!(WORKER_QUEUE_TIME, Seconds, "Wait for a model thread in the worker (worker-reported)");
    histogram!(WORKER_INFERENCE_TIME, Seconds, "Model execution per call (worker-reported)");
    counter!(RETRIES, "Calls tried again on a worker");
    counter!(EJECTIONS, "Workers ejected by outlier detection");
    gauge!(CIRCUIT_STATE, "Circuit of a pool: 0 closed, 1 half-open, 2 open");
    counter!(WORKER_RESTARTS, "Local worker processes restarted");
    gauge!(ADMITTED_SHARE, "Share of a pool's calls its adaptive admission lets through (1: none shed)");
    counter!(CANARY_ROLLBACKS, "Canary variants rolled back (weight 0) for breaching their SLO, by alias and variant");
    gauge!(QUEUED, "Entries in the queue (waiting or running), by target; the same from every replica");
    gauge!(QUEUED_OLDEST, "Age of the oldest entry in the queue, by target");
    counter!(QUEUE_SUBMITTED, "Requests queued, by kind: async, batch");
    counter!(QUEUE_ENTRIES, "Queued entries settled by this replica, by outcome: done, failed, expired, cancelled");
    counter!(QUEUE_RECLAIMS, "Queued entries taken over from a consumer that stopped, by target");
    counter!(QUEUE_RESULTS_STORED, "Answers of queued requests stored in Redis");
    gauge!(STREAMS_OPEN, "Streams of frames open, by edge: grpc, websocket");
    counter!(STREAM_FRAMES_RECEIVED, "Frames read from streams, by model");
    counter!(STREAM_FRAMES, "Frames' results sent back on streams, by model and outcome: answered, failed, dropped");
    counter!(STREAM_FRAMES_DROPPED, "Frames dropped, by model and reason: overflow, rate_limited");
    histogram!(STREAM_FRAME_LATENCY, Seconds, "A streamed frame's arrival to its result, by model");
    histogram!(STREAM_LAG, "Frames of a stream read and not yet answered when one of its results goes out");
    counter!(CONFIG_RELOADS, "Config reloads, by result: applied, unchanged, refused (the running config stays)");
    histogram!(BATCH_SIZE, "Items per batch sent to a worker");
    counter!(POOL_ERRORS, "Calls a pool failed, by pool, model and error type (the problem type's slug)");
    counter!(BATCH_SPLITS, "Batches a model failed as a whole, run again item by item by the worker");
    histogram!(BATCH_QUEUE_WAIT, Seconds, "Wait in the batcher before the batch went");
    gauge!(BATCH_QUEUE_DEPTH, "Items waiting in a batcher");
    gauge!(BATCHES_IN_FLIGHT, "Batches sent to workers and not yet answered");
    gauge!(BATCH_LIMIT, "The most items the last batch could take (learned or max_batch_size)");
    counter!(CACHE_REQUESTS, "Cache lookups by cache and result");
    counter!(COALESCED, "Requests answered by an identical request in flight");
    counter!(TOKENS, "Tokens by model, tenant and kind (input, output)");
    gauge!(COST, "Estimated cost in USD since start, from configured per-token prices");
    gauge!(CONNECTIONS_OPEN, "Client connections open, by listener");
    gauge!(CONNECTIONS_PARKED, "Client connections waiting to be readable without protocol buffers");
    counter!(LOG_LINES_DROPPED, "Log lines dropped because the writer fell behind");
    counter!(SPANS_DROPPED, "Request spans not exported over OTLP");
}

/// The current metrics in Prometheus text format, if the recorder is installed.
pub fn render() -> Option<String> {
    let handle = HANDLE.get()?;
    metrics::counter!(LOG_LINES_DROPPED).absolute(super::dropped_log_lines() as u64);
    Some(handle.render())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn handles_are_made_once_per_label_list_and_kept_up_to_the_bound() {
        install();
        let handles = Handles::<u32>::new(2);
        let made = Cell::new(0);
        let get = |labels: &[&str]| {
            handles.get(labels, || {
                made.set(made.get() + 1);
                made.get()
            })
        };
        assert_eq!(get(&["a", "bc"]), 1);
        assert_eq!(get(&["a", "bc"]), 1, "kept");
        // The same characters split differently are another label list.
        assert_eq!(get(&["ab", "c"]), 2);
        assert_eq!(get(&["abc"]), 3, "past the bound of 2: made, not kept");
        assert_eq!(get(&["abc"]), 4, "made again");
        assert_eq!(get(&["ab", "c"]), 2);
        assert_eq!(get(&["a", "bc"]), 1);
    }
}
