//! Config as written: serde structs that reject unknown keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole config file. Every section has defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub http: RawHttp,
    pub grpc: RawGrpc,
    pub deadlines: RawDeadlines,
    pub workers: RawWorkers,
    pub log: RawLog,
    pub shutdown: RawShutdown,
    pub auth: RawAuth,
    pub limits: RawLimits,
    pub redis: RawRedis,
    pub cache: RawCache,
    pub pools: Vec<RawPool>,
    pub aliases: Vec<RawAlias>,
    /// Per-token prices by model, for the estimated-cost metric.
    pub prices: super::components::Prices,
    pub discovery: RawDiscovery,
    pub tracing: RawTracing,
}

/// `[tracing]`: export of request spans to an OpenTelemetry collector.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTracing {
    /// The collector's OTLP/gRPC address (`http://host:4317`); empty: no export.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
}

impl Default for RawTracing {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: "infergate".into() }
    }
}

/// `discover = { dns = "workers.default.svc.cluster.local:50051", every = "5s" }`:
/// resolved at start and every `every`; workers come and go with the records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscover {
    /// `host:port`; each address the host resolves to is a worker on `port`.
    pub dns: String,
    #[serde(default = "default_discover_every")]
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

/// `[cache]`: the exact response cache (memory; Redis too when `redis.url` is set).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    /// Memory for cached answers, in bytes.
    pub max_bytes: u64,
    /// How long an answer is kept (memory and Redis).
    pub ttl: String,
    /// Largest answer stored in or read from Redis, in bytes (a value whose
    /// size says more is a miss, never an allocation).
    pub max_value_bytes: u64,
    pub semantic: RawSemantic,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            ttl: "10m".into(),
            max_value_bytes: 64 * 1024 * 1024,
            semantic: RawSemantic::default(),
        }
    }
}

/// `[cache.semantic]`: chat answers matched by meaning, for the named models.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSemantic {
    /// Models (as clients name them) whose answers are matched by meaning; none by default.
    pub models: Vec<String>,
    /// The embed model that embeds prompts.
    pub embedding_model: String,
    /// Cosine similarity from which a previous answer is returned.
    pub threshold: f32,
    /// Answers kept per (tenant, model).
    pub max_entries: u32,
}

impl Default for RawSemantic {
    fn default() -> Self {
        Self { models: Vec::new(), embedding_model: "minilm".into(), threshold: 0.95, max_entries: 1000 }
    }
}

/// `[http]`: the REST edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    pub listen: String,
    pub max_body_bytes: u64,
    /// Request bodies held at once by both listeners together, in bytes; a
    /// request that would go past it is refused at once (503 memory-full).
    pub max_buffered_bytes: u64,
    /// Requests handled at once; more are shed with 503 (health routes exempt).
    pub max_in_flight: u32,
    /// With auth off, the `Host` names served besides loopback ones
    /// (`localhost`, `127.0.0.0/8`, `[::1]`); `["*"]` serves any. Others get
    /// 421, so a web page cannot reach the gateway by rebinding its name.
    pub allowed_hosts: Vec<String>,
    /// Peers (addresses or CIDR ranges) whose `X-Forwarded-For` is believed;
    /// for anyone else the client address is the TCP peer.
    pub trusted_proxies: Vec<String>,
    /// Client connections open at once; one more is accepted and closed.
    pub max_connections: u32,
    /// Connections one client address may hold at once (the TCP peer; a
    /// trusted proxy is not limited, since it speaks for many clients).
    pub max_connections_per_client: u32,
    /// New connections a second one client address may start (bursts of a
    /// tenth of a second's worth, at most 8, at once); faster ones are not refused but
    /// wait their turn before they are read. 0: no pacing.
    pub connection_rate_per_client: u32,
    /// A new connection must send its first request head (HTTP/1.1) or the
    /// HTTP/2 preface and SETTINGS within this, or it is closed.
    pub handshake_timeout: String,
    /// An HTTP/1.1 request head must be complete this long after its first byte.
    pub header_timeout: String,
    /// A connection with no request in flight (HTTP/1.1 keep-alive, or
    /// HTTP/2 with no open stream, pings or not) is closed after this.
    pub idle_timeout: String,
    /// A request body must have arrived this long after its head ...
    pub body_timeout: String,
    /// ... and, after its first 5 s, at no less than this many bytes a
    /// second (0: no rate floor).
    pub min_body_rate: u64,
    /// HTTP/2: streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2: ping a connection this often, and close it when the ping is
    /// not answered within `keepalive_timeout` (finds dead peers).
    pub keepalive_interval: String,
    pub keepalive_timeout: String,
    /// A streaming answer (SSE) sends a comment this often while the model
    /// is silent, so proxies and clients do not time the stream out.
    pub sse_keep_alive: String,
    /// Largest image (width x height, from its header) an infer call may send.
    pub max_image_pixels: u64,
    /// Most bytes decoding one image may take (16-bit RGBA is 8 a pixel).
    pub max_image_bytes: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            max_in_flight: 1024,
            allowed_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            max_connections: 16_384,
            max_connections_per_client: 1024,
            connection_rate_per_client: 500,
            handshake_timeout: "10s".into(),
            header_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            body_timeout: "30s".into(),
            min_body_rate: 1024,
            max_concurrent_streams: 256,
            keepalive_interval: "30s".into(),
            keepalive_timeout: "10s".into(),
            sse_keep_alive: "15s".into(),
            max_image_pixels: 40_000_000,
            max_image_bytes: 128 * 1024 * 1024,
        }
    }
}

/// The connection settings `[http]` and `[grpc]` share, borrowed from either.
pub struct RawConn<'a> {
    pub max_connections: u32,
    pub max_connections_per_client: u32,
    pub connection_rate_per_client: u32,
    pub handshake_timeout: &'a str,
    pub header_timeout: &'a str,
    pub idle_timeout: &'a str,
    pub body_timeout: &'a str,
    pub min_body_rate: u64,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: &'a str,
    pub keepalive_timeout: &'a str,
}

macro_rules! conn_view {
    ($t:ty) => {
        impl $t {
            /// This listener's connection settings.
            pub fn conn(&self) -> RawConn<'_> {
                RawConn {
                    max_connections: self.max_connections,
                    max_connections_per_client: self.max_connections_per_client,
                    connection_rate_per_client: self.connection_rate_per_client,
                    handshake_timeout: &self.handshake_timeout,
                    header_timeout: &self.header_timeout,
                    idle_timeout: &self.idle_timeout,
                    body_timeout: &self.body_timeout,
                    min_body_rate: self.min_body_rate,
                    max_concurrent_streams: self.max_concurrent_streams,
                    keepalive_interval: &self.keepalive_interval,
                    keepalive_timeout: &self.keepalive_timeout,
                }
            }
        }
    };
}
conn_view!(RawHttp);
conn_view!(RawGrpc);

/// `[grpc]`: the gRPC (and grpc-web) edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGrpc {
    pub listen: String,
    pub max_message_bytes: u64,
    /// Calls handled at once; more are shed with UNAVAILABLE.
    pub max_in_flight: u32,
    /// Same meaning as under `[http]`.
    pub max_connections: u32,
    pub max_connections_per_client: u32,
    pub connection_rate_per_client: u32,
    pub handshake_timeout: String,
    pub header_timeout: String,
    pub idle_timeout: String,
    pub body_timeout: String,
    pub min_body_rate: u64,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: String,
    pub keepalive_timeout: String,
}

impl Default for RawGrpc {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            max_message_bytes: 10 * 1024 * 1024,
            max_in_flight: 1024,
            max_connections: 4096,
            max_connections_per_client: 1024,
            connection_rate_per_client: 500,
            handshake_timeout: "10s".into(),
            header_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            body_timeout: "30s".into(),
            min_body_rate: 1024,
            max_concurrent_streams: 256,
            keepalive_interval: "30s".into(),
            keepalive_timeout: "10s".into(),
        }
    }
}

/// `[deadlines]`: how long a request may take end to end.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDeadlines {
    /// Used when the client sends none; a client may only lower it.
    pub default: String,
}

impl Default for RawDeadlines {
    fn default() -> Self {
        Self { default: "30s".into() }
    }
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
    pub restart_backoff_min: String,
    pub restart_backoff_max: String,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    pub stop_grace: String,
    /// Time a worker may take to answer Describe; later answers are waited for
    /// in the background, but are logged as slow.
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
            stop_grace: "10s".into(),
            connect_timeout: "2s".into(),
            inherit_env: Vec::new(),
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `infergate=debug,info`.
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self { format: "text".into(), level: "info".into() }
    }
}

/// `[shutdown]`: how long in-flight requests get to finish.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    pub grace: String,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { grace: "30s".into() }
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

/// `batching = { enabled = true, max_batch_size = 32, max_delay = "2ms", concurrency_per_worker = 2,
/// max_queue = 1024, priority_tiers = ["vip"] }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatching {
    pub enabled: bool,
    /// Items per batch; default: what the worker reports (Describe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<u32>,
    /// How long the oldest queued item waits for the batch to fill ("0s": never).
    pub max_delay: String,
    pub concurrency_per_worker: u32,
    pub max_queue: u32,
    pub priority_tiers: Vec<String>,
}

impl Default for RawBatching {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_size: None,
            max_delay: "2ms".into(),
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
    pub base_ejection: String,
    pub max_ejected: f64,
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self { consecutive: 5, ratio: 0.5, window: 20, base_ejection: "30s".into(), max_ejected: 0.5 }
    }
}

/// `circuit = { failures = 5, open_for = "5s", probes = 3 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCircuit {
    /// Consecutive worker failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before probes are let through.
    pub open_for: String,
    /// Probes while half-open; all must succeed to close it.
    pub probes: u32,
}

impl Default for RawCircuit {
    fn default() -> Self {
        Self { failures: 5, open_for: "5s".into(), probes: 3 }
    }
}

/// `[auth]`: who may call. Off unless `enabled`; when on, everything but
/// `public_routes` needs an API key or a JWT.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub enabled: bool,
    /// Paths served without credentials; a trailing `*` matches a prefix.
    pub public_routes: Vec<String>,
    /// A TOML file of `[[keys]]` (same fields as `[[auth.keys]]`), re-read
    /// when it changes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keys_file: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<RawApiKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<RawJwt>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            enabled: false,
            public_routes: ["/healthz", "/readyz", "/metrics", "/v2/health/*", "/grpc.health.v1.Health/*"]
                .map(String::from)
                .to_vec(),
            keys_file: String::new(),
            keys: Vec::new(),
            jwt: None,
        }
    }
}

/// One API key, stored as the SHA-256 of the key (`infergate keys new`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApiKey {
    /// Names the key in logs and metrics (never the key itself).
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    pub tenant: String,
    /// e.g. `standard`, `vip`; default `standard`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tier: String,
    /// Models this key may call; empty means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// This key's own limits (over `[limits.per_key]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<RawLimit>,
}

/// `[auth.jwt]`: bearer JWTs signed by a configured key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwt {
    /// Required `iss` and `aud` values.
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: String,
    /// A JWKS document on disk (every key must name its `alg`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwks_file: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<RawJwtKey>,
    /// Claims that name the caller's tenant, tier and user.
    pub tenant_claim: String,
    pub tier_claim: String,
    pub user_claim: String,
    /// Tier when the token has no tier claim.
    pub default_tier: String,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            leeway: "30s".into(),
            jwks_file: String::new(),
            keys: Vec::new(),
            tenant_claim: "tenant".into(),
            tier_claim: "tier".into(),
            user_claim: "sub".into(),
            default_tier: "standard".into(),
        }
    }
}

/// A JWT verification key. Secrets never sit in the config itself.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwtKey {
    /// Matched against the token's `kid`; may be empty when it is the only key.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kid: String,
    /// `HS256`, `RS256` or `ES256`; a token must use exactly this.
    pub alg: String,
    /// HS256: the environment variable or file holding the shared secret.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub secret_env: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub secret_file: String,
    /// RS256 / ES256: a PEM public key file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub public_key_file: String,
}

/// Limits of one scope; an absent value is no limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimit {
    /// Requests per second (GCRA) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// ... with this many at once above the rate (default: one second's worth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Model tokens (input + output) per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests of this scope in flight at once (keys and models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// `[limits]`: every applicable scope must admit a request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// All traffic together.
    pub global: RawLimit,
    /// Each tenant, unless `tenants.<name>` says otherwise.
    pub per_tenant: RawLimit,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, RawLimit>,
    /// Each key (or each client address when auth is off), unless the key has its own.
    pub per_key: RawLimit,
    /// Each model. A limit on an alias also counts calls that name one of
    /// its variants' models or pools directly.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, RawLimit>,
    /// Output tokens reserved for a generation that sets no `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            global: RawLimit::default(),
            per_tenant: RawLimit::default(),
            tenants: BTreeMap::new(),
            per_key: RawLimit::default(),
            models: BTreeMap::new(),
            default_max_tokens: 1024,
        }
    }
}

/// `[redis]`: share request and token limits across gateway replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// `redis://host:port/db`; empty keeps limits in memory.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// A decision slower than this counts as Redis being down.
    pub timeout: String,
    /// When Redis is down: `local` (in-memory limits), `allow` or `deny`.
    pub fallback: String,
    pub pool_size: u32,
    /// Prefix of every key the gateway writes.
    pub prefix: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: "20ms".into(),
            fallback: "local".into(),
            pool_size: 16,
            prefix: "infergate".into(),
        }
    }
}

/// `[[aliases]]`: a model name clients use, served by one or more variants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlias {
    pub name: String,
    /// The variant used when no rule applies (default: the first).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stable: String,
    /// Tiers whose callers may pin a variant with `X-Model-Version`;
    /// `["*"]` (the default) is everyone, `[]` no one.
    pub pin_tiers: Vec<String>,
    /// Caller tier -> variant, e.g. `{ vip = "dedicated" }`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<String, String>,
    /// Tried in order when the chosen variant cannot take the call: a
    /// variant of this alias or another alias.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    pub variants: Vec<RawVariant>,
    /// Whether callers may also name the variants' models and pools
    /// directly; `false` serves them only through the alias (its limits,
    /// tier rules and prices then cannot be stepped around).
    pub direct: bool,
}

impl Default for RawAlias {
    fn default() -> Self {
        Self {
            name: String::new(),
            stable: String::new(),
            pin_tiers: vec!["*".into()],
            tiers: BTreeMap::new(),
            fallbacks: Vec::new(),
            variants: Vec::new(),
            direct: true,
        }
    }
}

/// One variant of an alias: a model on a pool.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawVariant {
    pub name: String,
    pub pool: String,
    /// The model name the pool's workers serve (default: the alias name).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Share of the canary split; variants without a weight get none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}
