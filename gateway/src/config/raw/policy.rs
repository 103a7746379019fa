//! `[auth]`, `[limits]` and `[redis]` as written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
            public_routes: [
                "/healthz",
                "/readyz",
                "/metrics",
                "/v2/health/*",
                "/grpc.health.v1.Health/*",
                "/inference.GRPCInferenceService/ServerLive",
                "/inference.GRPCInferenceService/ServerReady",
            ]
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
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
    /// Frames per second sent on streams (`InferStream`, `/v1/streams`),
    /// with one second's worth at once; counted by each replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_per_second: Option<f64>,
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
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
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
