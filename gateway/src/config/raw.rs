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
    pub pools: Vec<RawPool>,
}

/// `[http]`: the REST edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    pub listen: String,
    pub max_body_bytes: u64,
    /// Requests handled at once; more are shed with 503 (health routes exempt).
    pub max_in_flight: u32,
    /// Client connections open at once; one more is accepted and closed.
    pub max_connections: u32,
    /// An HTTP/1.1 connection waiting this long for a request head is closed
    /// (idle keep-alive and slow headers alike).
    pub idle_timeout: String,
    /// HTTP/2: ping a connection this often, and close it when the ping is
    /// not answered within `keepalive_timeout` (finds dead peers).
    pub keepalive_interval: String,
    pub keepalive_timeout: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            max_in_flight: 1024,
            max_connections: 16_384,
            idle_timeout: "60s".into(),
            keepalive_interval: "30s".into(),
            keepalive_timeout: "10s".into(),
        }
    }
}

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
    pub idle_timeout: String,
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
            idle_timeout: "60s".into(),
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
    /// Local pool: the `module:Class` the gateway spawns workers for.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub class: String,
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
}
