//! `[workers]`, `[[pools]]` (batching, retries, outlier detection, circuit) and `[discovery]` as written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `discover = { dns = "workers.default.svc.cluster.local:50051", every = "5s" }`:
/// resolved at start and every `every`; workers come and go with the records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscover {
    /// `host:port`; each address the host resolves to is a worker on `port`.
    pub dns: String,
    #[serde(default = "default_discover_every")]
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub every: String,
}

fn default_discover_every() -> String {
    "5s".into()
}

/// `[discovery]`: how worker names are resolved.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDiscovery {
    /// DNS servers (`ip:port`) to ask instead of the system's (`/etc/resolv.conf`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// `[workers]`: how local worker processes are run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWorkers {
    /// Python interpreter with `infergate-worker` installed.
    pub python: String,
    /// Where the Unix sockets go; empty means a fresh temp directory.
    pub socket_dir: String,
    /// First restart delay after a worker dies; doubles up to `restart_backoff_max`.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub restart_backoff_min: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub restart_backoff_max: String,
    /// Load failures in a row (a model's `load()` raising) of every worker
    /// of a pool that make the pool `failed`: calls then get 503
    /// `model-failed-to-load` with the error; restarts go on.
    pub max_load_failures: u32,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub stop_grace: String,
    /// Time a worker may take to answer Describe; later answers are waited for
    /// in the background, but are logged as slow.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub connect_timeout: String,
    /// Variables of the gateway's environment its workers also get, beside
    /// the ones Python needs (PATH, HOME, LANG, LC_*, PYTHON*, thread pools,
    /// …); an entry ending in `*` is a prefix. Nothing else is passed on.
    pub inherit_env: Vec<String>,
    /// Largest gRPC message to or from a worker; local workers are started
    /// with the same limit (`--max-message-bytes`), remote ones must be.
    /// Batches are cut to fit; one item over it is refused with 413.
    pub max_message_bytes: u64,
}

impl Default for RawWorkers {
    fn default() -> Self {
        Self {
            python: String::new(),
            socket_dir: String::new(),
            restart_backoff_min: "250ms".into(),
            restart_backoff_max: "10s".into(),
            max_load_failures: 3,
            stop_grace: "10s".into(),
            connect_timeout: "2s".into(),
            inherit_env: Vec::new(),
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[[pools]]`: a set of workers serving the same model(s).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    pub name: String,
    /// Local pool: the `module:Class` the gateway spawns workers for (or,
    /// with `kind = "embedded"`, runs inside its own process).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub class: String,
    /// `local` (worker processes, the default with `class`) or `embedded`
    /// (the class runs in the gateway process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Local pool: how many worker processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// Local pool: model threads per worker (`--threads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Local pool: extra environment for the worker processes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Remote pool: worker addresses, `http://host:port` or `unix:/path`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Remote pool found by DNS: every A/AAAA record of a name is a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discover: Option<RawDiscover>,
    /// Calls one worker is given at once (default 8 × threads); more wait in
    /// the pool's queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_worker: Option<u32>,
    /// Calls that may wait for a worker (default 256); past it, 503 at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
    /// The pool's circuit breaker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit: Option<RawCircuit>,
    /// Admission by recent failure ratio (client-side throttling): off
    /// unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<RawAdaptive>,
    /// Passive outlier detection of the pool's workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<RawOutlier>,
    /// Retries of calls that failed on a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RawRetries>,
    /// Dynamic batching of the pool's embed and infer calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batching: Option<RawBatching>,
    /// Whether a call that possibly started on a worker that then died may
    /// be run again on another: by default yes for embeddings and tensor
    /// inference (pure functions of their input), no for generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// The same input always gives the same answer, so tensor calls may be
    /// answered from the response cache (default true; embeddings always may).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deterministic: Option<bool>,
}

/// `batching = { enabled = true, max_batch_size = 32, max_delay = "auto", target_latency = "500ms",
/// concurrency_per_worker = 2, max_queue = 1024, priority_tiers = ["vip"] }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatching {
    pub enabled: bool,
    /// Items per batch; default: what the worker reports (Describe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<u32>,
    /// How long the oldest queued item waits for the batch to fill ("0s":
    /// never; "auto": learned from the model's cost per batch size).
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub max_delay: String,
    /// With `max_delay = "auto"`: the latency a batched item should stay within.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "crate::config::check::some_text_or_seconds")]
    pub target_latency: Option<String>,
    pub concurrency_per_worker: u32,
    pub max_queue: u32,
    pub priority_tiers: Vec<String>,
}

impl Default for RawBatching {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_size: None,
            max_delay: "auto".into(),
            target_latency: None,
            concurrency_per_worker: 2,
            max_queue: 1024,
            priority_tiers: vec!["vip".into()],
        }
    }
}

/// `retries = { max = 2, ratio = 0.2, floor = 10 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetries {
    pub max: u32,
    pub ratio: f64,
    pub floor: u32,
}

impl Default for RawRetries {
    fn default() -> Self {
        Self { max: 2, ratio: 0.2, floor: 10 }
    }
}

/// `outlier = { consecutive = 5, ratio = 0.5, window = 20, base_ejection = "30s", max_ejected = 0.5 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutlier {
    pub consecutive: u32,
    pub ratio: f64,
    pub window: u32,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub base_ejection: String,
    pub max_ejected: f64,
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self { consecutive: 5, ratio: 0.5, window: 20, base_ejection: "30s".into(), max_ejected: 0.5 }
    }
}

/// `adaptive = { window = "10s", threshold = 0.1, max_shed = 0.9, min_requests = 20 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdaptive {
    /// The recent past the failure ratio is taken over.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub window: String,
    /// Failure ratio past which calls start to be shed.
    pub threshold: f64,
    /// The largest share shed: the rest still reach the pool, so it is seen
    /// to heal.
    pub max_shed: f64,
    /// Calls the window needs before anything is shed.
    pub min_requests: u64,
}

impl Default for RawAdaptive {
    fn default() -> Self {
        Self { window: "10s".into(), threshold: 0.1, max_shed: 0.9, min_requests: 20 }
    }
}

/// `circuit = { failures = 5, open_for = "5s", probes = 3 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCircuit {
    /// Consecutive worker failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before probes are let through.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub open_for: String,
    /// Probes while half-open; all must succeed to close it.
    pub probes: u32,
}

impl Default for RawCircuit {
    fn default() -> Self {
        Self { failures: 5, open_for: "5s".into(), probes: 3 }
    }
}
