//! Typed configuration: TOML (or the embedded default) plus `INFERGATE__*`
//! environment overrides, validated once at start into checked values.
//!
//! Loading is two steps: [`raw::RawConfig`] mirrors the file and rejects
//! unknown keys; [`Config::from_raw`] turns it into durations, socket
//! addresses and pool definitions, naming the offending key on failure.

mod check;
pub mod components;
mod overrides;
pub mod policy;
pub mod pools;
pub mod queue;
pub mod raw;
pub mod routes;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use check::{ConfigError, parse_duration};
use check::{duration, invalid, parse_addr, positive_size};
pub use policy::{AuthConfig, LimitSpec, LimitsConfig, RateSpec, RedisConfig, RedisFallback};
pub use pools::{
    DEFAULT_IN_FLIGHT_PER_WORKER, DEFAULT_MAX_QUEUE, PoolConfig, PoolKind, WorkerAddr, local_socket, parse_worker_addr,
};
pub use raw::RawConfig;

/// The embedded default config (`make run`).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Prefix of environment overrides: `INFERGATE__HTTP__LISTEN=0.0.0.0:8080`,
/// `INFERGATE__POOLS__0__WORKERS=4`.
pub const ENV_PREFIX: &str = "INFERGATE__";

/// The checked config the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Request bodies buffered at once, both listeners together.
    pub max_buffered_bytes: usize,
    pub grpc_listen: SocketAddr,
    pub admin: components::AdminConfig,
    pub max_message_bytes: usize,
    pub http_max_in_flight: usize,
    pub grpc_max_in_flight: usize,
    pub http_connections: ConnLimits,
    /// SSE keep-alive comment interval.
    pub sse_keep_alive: Duration,
    pub max_image_pixels: u64,
    pub max_image_bytes: u64,
    pub grpc_connections: ConnLimits,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// With auth off, `Host` names served besides loopback ones.
    pub allowed_hosts: Vec<String>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// `None`: limits live in memory only.
    pub redis: Option<RedisConfig>,
    pub default_deadline: Duration,
    pub shutdown_grace: Duration,
    pub workers: WorkersConfig,
    pub log: LogConfig,
    pub pools: Vec<PoolConfig>,
    pub cache: components::CacheConfig,
    pub responses: components::ResponsesConfig,
    /// `None`: no queue (`queue.redis_url` is empty).
    pub queue: Option<queue::QueueConfig>,
    pub streams: components::StreamsConfig,
    /// Pools marked `deterministic = false` / `true`.
    pub cache_pools: components::PoolRules,
    /// Model names clients use, with their variants and fallbacks.
    pub aliases: Vec<routes::AliasConfig>,
    /// Per-token prices by model name, for the estimated-cost metric.
    pub prices: components::Prices,
    /// DNS servers for discovered pools; empty: the system's resolver.
    pub nameservers: Vec<std::net::SocketAddr>,
    /// Where request spans are exported; `None`: nowhere.
    pub otlp: Option<components::OtlpConfig>,
    /// The raw form, for `check-config`.
    pub raw: RawConfig,
}

/// Bounds on one listener's client connections (see `conn_view` in raw.rs
/// for what each means).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// New connections a second one address may start; 0: unpaced.
    pub connection_rate_per_client: u32,
    /// Peers that speak for many clients: not held to the per-client cap.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes a second; 0: no floor.
    pub min_body_rate: u64,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl ConnLimits {
    fn from_raw(section: &str, raw: &raw::RawConn<'_>, trusted_proxies: &[ipnet::IpNet]) -> Result<Self, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let max_connections = positive_size(&key("max_connections"), raw.max_connections.into())?;
        Ok(Self {
            max_connections,
            max_connections_per_client: positive_size(
                &key("max_connections_per_client"),
                raw.max_connections_per_client.into(),
            )?,
            connection_rate_per_client: raw.connection_rate_per_client,
            trusted_proxies: trusted_proxies.to_vec(),
            handshake_timeout: duration(&key("handshake_timeout"), raw.handshake_timeout)?,
            header_timeout: duration(&key("header_timeout"), raw.header_timeout)?,
            idle_timeout: duration(&key("idle_timeout"), raw.idle_timeout)?,
            body_timeout: duration(&key("body_timeout"), raw.body_timeout)?,
            min_body_rate: raw.min_body_rate,
            max_concurrent_streams: u32::try_from(positive_size(
                &key("max_concurrent_streams"),
                raw.max_concurrent_streams.into(),
            )?)
            .unwrap_or(u32::MAX),
            keepalive_interval: duration(&key("keepalive_interval"), raw.keepalive_interval)?,
            keepalive_timeout: duration(&key("keepalive_timeout"), raw.keepalive_timeout)?,
        })
    }
}

/// How local worker processes run.
#[derive(Debug, Clone)]
pub struct WorkersConfig {
    pub python: PathBuf,
    /// `None`: a fresh temporary directory per gateway process.
    pub socket_dir: Option<PathBuf>,
    pub restart_backoff_min: Duration,
    pub restart_backoff_max: Duration,
    /// Load failures in a row of every worker that make a pool failed.
    pub max_load_failures: u32,
    pub stop_grace: Duration,
    pub connect_timeout: Duration,
    /// Extra variables passed to workers (see `supervisor::passed_to_workers`).
    pub inherit_env: Vec<String>,
    /// Largest message to or from a worker.
    pub max_message_bytes: usize,
}

/// Log output settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    pub filter: String,
}

impl Config {
    /// Load from `path` (or the embedded default) with overrides from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        Self::load_edited(path, env, |_| {})
    }

    /// [`Config::load`], with `edit` applied to the file as read before it
    /// is checked (a reload's model repository changes).
    pub fn load_edited(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        edit: impl FnOnce(&mut RawConfig),
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?,
                p.display().to_string(),
            ),
            None => (DEFAULT_TOML.to_owned(), "embedded default config".to_owned()),
        };
        let mut value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { origin: origin.clone(), message: e.to_string() })?;
        for (name, val) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                overrides::apply(&mut value, key, &val).map_err(|m| invalid(format!("{name} (env)"), m))?;
            }
        }
        let mut raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let key = e.path().to_string();
            invalid(key, e.into_inner().message().to_owned())
        })?;
        edit(&mut raw);
        Self::from_raw_in(raw, path.and_then(Path::parent))
    }

    /// Validate a raw config.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        Self::from_raw_in(raw, None)
    }

    /// Validate a raw config read from a file in `dir`.
    fn from_raw_in(raw: RawConfig, dir: Option<&Path>) -> Result<Self, ConfigError> {
        let http_listen = parse_addr("http.listen", &raw.http.listen)?;
        let grpc_listen = parse_addr("grpc.listen", &raw.grpc.listen)?;
        if http_listen == grpc_listen && http_listen.port() != 0 {
            return Err(invalid("grpc.listen", "must differ from http.listen"));
        }
        let admin = components::AdminConfig {
            listen: match raw.admin.listen.trim() {
                "" => None,
                text => {
                    let addr = parse_addr("admin.listen", text)?;
                    if addr.port() != 0 && (addr == http_listen || addr == grpc_listen) {
                        return Err(invalid("admin.listen", "must differ from http.listen and grpc.listen"));
                    }
                    Some(addr)
                }
            },
            keys: raw.admin.keys.clone(),
            role: (!raw.admin.role.is_empty())
                .then(|| components::AdminRole { claim: raw.admin.role_claim.clone(), role: raw.admin.role.clone() }),
            viewer_keys: raw.admin.viewer_keys.clone(),
            viewer_role: (!raw.admin.viewer_role.is_empty()).then(|| components::AdminRole {
                claim: raw.admin.role_claim.clone(),
                role: raw.admin.viewer_role.clone(),
            }),
            watch_config: raw.admin.watch_config,
        };
        let max_body_bytes = positive_size("http.max_body_bytes", raw.http.max_body_bytes)?;
        let trusted_proxies = policy::trusted_proxies(&raw.http.trusted_proxies)?;
        let max_message_bytes = positive_size("grpc.max_message_bytes", raw.grpc.max_message_bytes)?;
        let w = &raw.workers;
        let workers = WorkersConfig {
            python: default_python(&w.python, dir),
            socket_dir: (!w.socket_dir.is_empty()).then(|| PathBuf::from(&w.socket_dir)),
            restart_backoff_min: duration("workers.restart_backoff_min", &w.restart_backoff_min)?,
            restart_backoff_max: duration("workers.restart_backoff_max", &w.restart_backoff_max)?,
            max_load_failures: match w.max_load_failures {
                0 => return Err(invalid("workers.max_load_failures", "must be above zero")),
                n => n,
            },
            stop_grace: duration("workers.stop_grace", &w.stop_grace)?,
            connect_timeout: duration("workers.connect_timeout", &w.connect_timeout)?,
            inherit_env: w.inherit_env.clone(),
            max_message_bytes: positive_size("workers.max_message_bytes", w.max_message_bytes)?,
        };
        if workers.max_message_bytes < 64 * 1024 {
            return Err(invalid("workers.max_message_bytes", "must be at least 65536"));
        }
        if workers.restart_backoff_max < workers.restart_backoff_min {
            return Err(invalid("workers.restart_backoff_max", "must be at least restart_backoff_min"));
        }
        let json = match raw.log.format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                return Err(invalid("log.format", format!("expected `text` or `json`, got {other:?}")));
            }
        };
        let mut names = HashSet::new();
        let mut pools = Vec::with_capacity(raw.pools.len());
        for (i, pool) in raw.pools.iter().enumerate() {
            let key = |field: &str| format!("pools[{i}].{field}");
            if pool.name.is_empty() || !pool.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(invalid(key("name"), "must be non-empty and use only [A-Za-z0-9-_.]"));
            }
            if !names.insert(pool.name.clone()) {
                return Err(invalid(key("name"), format!("duplicate pool name {:?}", pool.name)));
            }
            let kind = pools::pool_kind(pool, key)?;
            let threads = match &kind {
                PoolKind::Local { threads, .. } | PoolKind::Embedded { threads, .. } => threads.get(),
                PoolKind::Remote { .. } | PoolKind::Discovered { .. } => 1,
            };
            let per_worker =
                pool.max_in_flight_per_worker.unwrap_or(DEFAULT_IN_FLIGHT_PER_WORKER.saturating_mul(threads));
            let max_in_flight_per_worker = positive_size(&key("max_in_flight_per_worker"), per_worker.into())?;
            let max_queue = usize::try_from(pool.max_queue.unwrap_or(DEFAULT_MAX_QUEUE)).unwrap_or(usize::MAX);
            let c = pool.circuit.clone().unwrap_or_default();
            let circuit = components::CircuitConfig {
                failures: u32::try_from(positive_size(&key("circuit.failures"), c.failures.into())?)
                    .unwrap_or(u32::MAX),
                open_for: duration(&key("circuit.open_for"), &c.open_for)?,
                probes: u32::try_from(positive_size(&key("circuit.probes"), c.probes.into())?).unwrap_or(u32::MAX),
            };
            let adaptive = match &pool.adaptive {
                None => None,
                Some(a) => {
                    if !(0.0..1.0).contains(&a.threshold) {
                        return Err(invalid(key("adaptive.threshold"), "must be a failure ratio from 0 up to (not) 1"));
                    }
                    if !(0.0..=1.0).contains(&a.max_shed) || a.max_shed == 0.0 {
                        return Err(invalid(key("adaptive.max_shed"), "must be a share above 0 and at most 1"));
                    }
                    let window = duration(&key("adaptive.window"), &a.window)?;
                    if window < std::time::Duration::from_millis(100) {
                        return Err(invalid(key("adaptive.window"), "must be at least 100ms"));
                    }
                    Some(components::AdaptiveConfig {
                        window,
                        threshold: a.threshold,
                        max_shed: a.max_shed,
                        min_requests: a.min_requests,
                    })
                }
            };
            let o = pool.outlier.clone().unwrap_or_default();
            if !(0.0..=1.0).contains(&o.ratio) || o.ratio == 0.0 {
                return Err(invalid(key("outlier.ratio"), "must be above 0 and at most 1"));
            }
            if !(0.0..=1.0).contains(&o.max_ejected) {
                return Err(invalid(key("outlier.max_ejected"), "must be a share between 0 and 1"));
            }
            if !(1..=64).contains(&o.window) {
                return Err(invalid(key("outlier.window"), "must be 1 to 64 calls"));
            }
            let outlier = components::OutlierConfig {
                consecutive: u32::try_from(positive_size(&key("outlier.consecutive"), o.consecutive.into())?)
                    .unwrap_or(u32::MAX),
                ratio: o.ratio,
                window: o.window,
                base_ejection: duration(&key("outlier.base_ejection"), &o.base_ejection)?,
                max_ejected: o.max_ejected,
            };
            let r = pool.retries.clone().unwrap_or_default();
            if !(0.0..=10.0).contains(&r.ratio) {
                return Err(invalid(key("retries.ratio"), "must be a share of requests between 0 and 10"));
            }
            let retry = components::RetryConfig {
                max: r.max.min(5),
                ratio: r.ratio,
                floor: r.floor,
                idempotent: pool.idempotent,
            };
            let b = pool.batching.clone().unwrap_or_default();
            let batching = components::BatchConfig {
                enabled: b.enabled,
                max_batch_size: match b.max_batch_size {
                    None => None,
                    Some(n) => Some(positive_size(&key("batching.max_batch_size"), n.into())?),
                },
                max_delay: match b.max_delay.trim() {
                    "auto" => None,
                    delay => Some(humantime::parse_duration(delay).map_err(|e| {
                        invalid(
                            key("batching.max_delay"),
                            format!("{:?} is neither \"auto\" nor a duration like 2ms ({e})", b.max_delay),
                        )
                    })?),
                },
                target_latency: match &b.target_latency {
                    None => None,
                    Some(_) if b.max_delay.trim() != "auto" => {
                        return Err(invalid(
                            key("batching.target_latency"),
                            "applies to a learned delay: set max_delay = \"auto\" (the default) or drop target_latency",
                        ));
                    }
                    Some(t) => Some(duration(&key("batching.target_latency"), t)?),
                },
                concurrency_per_worker: positive_size(
                    &key("batching.concurrency_per_worker"),
                    b.concurrency_per_worker.into(),
                )?,
                max_queue: positive_size(&key("batching.max_queue"), b.max_queue.into())?,
                priority_tiers: b.priority_tiers,
            };
            pools.push(PoolConfig {
                name: pool.name.clone(),
                kind,
                max_in_flight_per_worker,
                max_queue,
                circuit,
                adaptive,
                outlier,
                retry,
                batching,
            });
        }
        if pools.is_empty() {
            return Err(invalid("pools", "at least one pool is required"));
        }
        Ok(Self {
            http_listen,
            max_body_bytes,
            max_buffered_bytes: positive_size("http.max_buffered_bytes", raw.http.max_buffered_bytes)?,
            grpc_listen,
            admin,
            max_message_bytes,
            http_max_in_flight: positive_size("http.max_in_flight", raw.http.max_in_flight.into())?,
            sse_keep_alive: duration("http.sse_keep_alive", &raw.http.sse_keep_alive)?,
            max_image_pixels: positive_size("http.max_image_pixels", raw.http.max_image_pixels)? as u64,
            max_image_bytes: positive_size("http.max_image_bytes", raw.http.max_image_bytes)? as u64,
            grpc_max_in_flight: positive_size("grpc.max_in_flight", raw.grpc.max_in_flight.into())?,
            http_connections: ConnLimits::from_raw("http", &raw.http.conn(), &trusted_proxies)?,
            grpc_connections: ConnLimits::from_raw("grpc", &raw.grpc.conn(), &trusted_proxies)?,
            trusted_proxies,
            allowed_hosts: raw.http.allowed_hosts.clone(),
            auth: AuthConfig::from_raw(&raw.auth)?,
            limits: LimitsConfig::from_raw(&raw.limits)?,
            redis: RedisConfig::from_raw(&raw.redis)?,
            cache: components::CacheConfig {
                enabled: raw.cache.enabled,
                max_bytes: raw.cache.max_bytes,
                ttl: duration("cache.ttl", &raw.cache.ttl)?,
                max_value_bytes: positive_size("cache.max_value_bytes", raw.cache.max_value_bytes)?,
                semantic: {
                    let s = &raw.cache.semantic;
                    if !(0.0..=1.0).contains(&s.threshold) {
                        return Err(invalid("cache.semantic.threshold", "must be a cosine similarity between 0 and 1"));
                    }
                    components::SemanticConfig {
                        models: s.models.clone(),
                        embedding_model: s.embedding_model.clone(),
                        threshold: s.threshold,
                        max_entries: positive_size("cache.semantic.max_entries", s.max_entries.into())?,
                    }
                },
            },
            responses: components::ResponsesConfig {
                ttl: duration("responses.ttl", &raw.responses.ttl)?,
                max_bytes: raw.responses.max_bytes,
                max_conversation_bytes: positive_size(
                    "responses.max_conversation_bytes",
                    raw.responses.max_conversation_bytes,
                )?,
            },
            queue: match queue::QueueConfig::from_raw(&raw.queue)? {
                Some(q) if q.max_file_bytes as u64 > raw.http.max_buffered_bytes => {
                    return Err(invalid(
                        "queue.max_file_bytes",
                        "must be at most http.max_buffered_bytes (a file is read whole before it is checked)",
                    ));
                }
                q => q,
            },
            streams: components::StreamsConfig {
                max_open: positive_size("streams.max_open", raw.streams.max_open.into())?,
                max_in_flight: u32::try_from(positive_size("streams.max_in_flight", raw.streams.max_in_flight.into())?)
                    .unwrap_or(u32::MAX),
                frame_timeout: duration("streams.frame_timeout", &raw.streams.frame_timeout)?,
                idle_timeout: duration("streams.idle_timeout", &raw.streams.idle_timeout)?,
                max_duration: duration("streams.max_duration", &raw.streams.max_duration)?,
            },
            cache_pools: components::PoolRules {
                nondeterministic: raw
                    .pools
                    .iter()
                    .filter(|p| p.deterministic == Some(false))
                    .map(|p| p.name.clone())
                    .collect(),
                deterministic: raw
                    .pools
                    .iter()
                    .filter(|p| p.deterministic == Some(true))
                    .map(|p| p.name.clone())
                    .collect(),
            },
            default_deadline: duration("deadlines.default", &raw.deadlines.default)?,
            shutdown_grace: duration("shutdown.grace", &raw.shutdown.grace)?,
            workers,
            log: LogConfig { json, filter: raw.log.level.clone() },
            aliases: routes::check(&raw.aliases, &pools)?,
            nameservers: raw
                .discovery
                .nameservers
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    ns.parse().map_err(|_| {
                        invalid(format!("discovery.nameservers[{i}]"), format!("expected ip:port, got {ns:?}"))
                    })
                })
                .collect::<Result<_, _>>()?,
            otlp: otlp_config(&raw.tracing)?,
            prices: {
                components::check_prices(&raw.prices).map_err(|(key, message)| invalid(key, message))?;
                raw.prices.clone()
            },
            pools,
            raw,
        })
    }

    /// The effective config as TOML (what `check-config` prints).
    pub fn to_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.workers.python = self.workers.python.display().to_string();
        toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn otlp_config(raw: &raw::RawTracing) -> Result<Option<components::OtlpConfig>, ConfigError> {
    if raw.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint: http::Uri = raw
        .otlp_endpoint
        .parse()
        .ok()
        .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| {
            invalid("tracing.otlp_endpoint", format!("expected http://host:port, got {:?}", raw.otlp_endpoint))
        })?;
    if raw.service_name.is_empty() {
        return Err(invalid("tracing.service_name", "must not be empty"));
    }
    Ok(Some(components::OtlpConfig { endpoint, service_name: raw.service_name.clone() }))
}

/// `workers.python`, else the `.venv` beside the config file, else the one
/// of the checkout the binary was built in (`target/<profile>/infergate`
/// below it), else `python3`: never whatever the current directory holds.
fn default_python(configured: &str, config_dir: Option<&Path>) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    let exe = std::env::current_exe().ok();
    let beside_binary = exe.iter().flat_map(|e| e.ancestors().skip(1));
    let venv = |dir: &Path| dir.join(".venv/bin/python");
    config_dir
        .into_iter()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        .chain(beside_binary)
        .map(venv)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

#[cfg(test)]
mod tests;
