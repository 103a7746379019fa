//! The settings of each component, as the config file gives them once
//! checked: they live here so that config depends on no other module, and
//! each component reads its own settings from here.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Cache settings (`[cache]`).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Memory for cached answers, in bytes.
    pub max_bytes: u64,
    pub ttl: Duration,
    /// Largest value read from or written to Redis, inflated: a value's
    /// size prefix is checked against it before anything is allocated.
    pub max_value_bytes: usize,
    /// Chat answers matched by meaning (off unless models are named).
    pub semantic: SemanticConfig,
}

/// `[responses]`: where `POST /v1/responses` answers are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesConfig {
    pub ttl: Duration,
    /// Memory for stored responses (when there is no Redis).
    pub max_bytes: u64,
    /// Largest conversation stored, serialised.
    pub max_conversation_bytes: usize,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(24 * 3600), max_bytes: 64 * 1024 * 1024, max_conversation_bytes: 1024 * 1024 }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(600),
            max_value_bytes: 64 * 1024 * 1024,
            semantic: SemanticConfig::default(),
        }
    }
}

/// Which pools' answers may be cached beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolRules {
    /// `deterministic = false`: tensor calls never cached.
    pub nondeterministic: Vec<String>,
    /// `deterministic = true`: chat answers cached whatever the temperature.
    pub deterministic: Vec<String>,
}

/// Semantic cache settings (`[cache.semantic]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticConfig {
    /// Models, as clients name them, whose answers are matched by meaning.
    pub models: Vec<String>,
    /// The model that embeds prompts (an embed model some pool serves).
    pub embedding_model: String,
    /// Cosine similarity from which a previous answer is returned.
    pub threshold: f32,
    /// Answers kept per (tenant, model, target).
    pub max_entries: usize,
}

impl Default for SemanticConfig {
    fn default() -> Self {
        Self { models: Vec::new(), embedding_model: "minilm".into(), threshold: 0.95, max_entries: 1000 }
    }
}

/// Prices of one model, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// Prices by model name as clients use it.
pub type Prices = HashMap<String, Price>;

/// `[tracing]` settings, checked.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC address, e.g. `http://otel-collector:4317`.
    pub endpoint: http::Uri,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

/// Adaptive admission of a pool (client-side throttling, Google SRE
/// book ch. 21): shed with probability `(requests - K·accepts) / (requests
/// + 1)`, `K = 1 / (1 - threshold)`, at most `max_shed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    pub window: Duration,
    pub threshold: f64,
    pub max_shed: f64,
    pub min_requests: u64,
}

/// Breaker settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Consecutive worker failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before probing.
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self { failures: 5, open_for: Duration::from_secs(5), probes: 3 }
    }
}

/// Outlier settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    pub consecutive: u32,
    /// Failure share over the last `window` calls (once `window` calls are seen).
    pub ratio: f64,
    pub window: u32,
    pub base_ejection: Duration,
    /// Largest share of a pool's workers ejected at once.
    pub max_ejected: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self { consecutive: 5, ratio: 0.5, window: 20, base_ejection: Duration::from_secs(30), max_ejected: 0.5 }
    }
}

/// Retry settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts per call.
    pub max: u32,
    /// Retries allowed per request over the last window ...
    pub ratio: f64,
    /// ... plus this many.
    pub floor: u32,
    /// Whether a call may be re-run after it possibly started: `None`
    /// decides by the kind of call ([`Rerun`]).
    pub idempotent: Option<bool>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max: 2, ratio: 0.2, floor: 10, idempotent: None }
    }
}

/// Batching settings of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    pub enabled: bool,
    /// Items per batch; `None`: what the worker's Describe reports.
    pub max_batch_size: Option<usize>,
    /// How long the oldest item may wait for the batch to fill; `None`
    /// ("auto"): learned from the model's cost (see `batch::policy`).
    pub max_delay: Option<Duration>,
    /// With a learned delay: the latency a batched item should stay within
    /// (a batch costs half of it at most); `None`: each item's deadline.
    pub target_latency: Option<Duration>,
    /// Batches one worker is given at once.
    pub concurrency_per_worker: usize,
    /// Items waiting at most; past it, 503 at once.
    pub max_queue: usize,
    /// Callers of these tiers are taken first.
    pub priority_tiers: Vec<String>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_size: None,
            max_delay: None,
            target_latency: None,
            concurrency_per_worker: 2,
            max_queue: 1024,
            priority_tiers: vec!["vip".into()],
        }
    }
}

/// Check configured prices: finite and not negative. The error names the
/// config key and what is wrong with it.
pub fn check_prices(prices: &Prices) -> Result<(), (String, String)> {
    for (model, p) in prices {
        for (what, v) in [("input_per_million", p.input_per_million), ("output_per_million", p.output_per_million)] {
            if !v.is_finite() || v < 0.0 {
                return Err((format!("prices.{model:?}.{what}"), format!("must be a price of 0 or more, got {v}")));
            }
        }
    }
    Ok(())
}

/// `[admin]`: the admin API's listener (the console's too) and who may use it.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None`: no admin listener.
    pub listen: Option<std::net::SocketAddr>,
    /// Ids of API keys (`[[auth.keys]]` or the keys file) that are admins.
    pub keys: Vec<String>,
    /// A JWT role that makes its bearer an admin.
    pub role: Option<AdminRole>,
    /// Ids of API keys that may see the console's status, read-only.
    pub viewer_keys: Vec<String>,
    /// A JWT role that may see the console's status, read-only.
    pub viewer_role: Option<AdminRole>,
    /// Reload when the config file changes (besides SIGHUP and the API).
    pub watch_config: bool,
}

/// The JWT claim and value that make an admin (or a console viewer).
#[derive(Debug, Clone)]
pub struct AdminRole {
    pub claim: String,
    pub role: String,
}

/// `[streams]`: streams of frames, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamsConfig {
    pub max_open: usize,
    pub max_in_flight: u32,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            max_open: 256,
            max_in_flight: 64,
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_duration: Duration::from_secs(3600),
        }
    }
}
