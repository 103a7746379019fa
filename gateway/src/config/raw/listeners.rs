//! `[http]`, `[grpc]`, `[admin]`, `[deadlines]`, `[shutdown]`, `[log]` and `[tracing]` as written.

use serde::{Deserialize, Serialize};

/// `[admin]`: the admin API (reload, config, pools, the model repository),
/// on a listener of its own, off the client ports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// `host:port`; empty: no admin listener.
    pub listen: String,
    /// Ids of API keys (`[[auth.keys]]` or `auth.keys_file`) that may use it.
    pub keys: Vec<String>,
    /// A JWT (checked with `[auth.jwt]`) whose `role_claim` holds this role
    /// may use it; empty: no JWT is an admin.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// The claim holding a JWT's roles (a string or an array of strings).
    pub role_claim: String,
    /// Ids of API keys that may see the console's status (read-only: not
    /// its playground, not the admin API).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub viewer_keys: Vec<String>,
    /// A JWT whose `role_claim` holds this role may see the console's status.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub viewer_role: String,
    /// Reload when the config file changes (SIGHUP and `POST /admin/reload` always do).
    pub watch_config: bool,
    /// Pools not started with the gateway that `POST
    /// /v2/repository/models/{name}/load` adds (same fields as `[[pools]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repository: Vec<super::pools::RawPool>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            keys: Vec::new(),
            role: String::new(),
            role_claim: "roles".into(),
            viewer_keys: Vec::new(),
            viewer_role: String::new(),
            watch_config: true,
            repository: Vec::new(),
        }
    }
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub handshake_timeout: String,
    /// An HTTP/1.1 request head must be complete this long after its first byte.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub header_timeout: String,
    /// A connection with no request in flight (HTTP/1.1 keep-alive, or
    /// HTTP/2 with no open stream, pings or not) is closed after this.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub idle_timeout: String,
    /// A request body must have arrived this long after its head ...
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub body_timeout: String,
    /// ... and, after its first 5 s, at no less than this many bytes a
    /// second (0: no rate floor).
    pub min_body_rate: u64,
    /// HTTP/2: streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2: ping a connection this often, and close it when the ping is
    /// not answered within `keepalive_timeout` (finds dead peers).
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub keepalive_interval: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub keepalive_timeout: String,
    /// A streaming answer (SSE) sends a comment this often while the model
    /// is silent, so proxies and clients do not time the stream out.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub handshake_timeout: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub header_timeout: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub idle_timeout: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub body_timeout: String,
    pub min_body_rate: u64,
    pub max_concurrent_streams: u32,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub keepalive_interval: String,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub default: String,
}

impl Default for RawDeadlines {
    fn default() -> Self {
        Self { default: "30s".into() }
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub grace: String,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { grace: "30s".into() }
    }
}
