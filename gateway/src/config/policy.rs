//! Checked forms of `[auth]`, `[limits]`, `[redis]` and `http.trusted_proxies`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use super::check::{ConfigError, duration, invalid};
use super::raw::{RawApiKey, RawAuth, RawJwt, RawLimit, RawLimits, RawRedis};

/// Who may call.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub enabled: bool,
    pub public_routes: Vec<RoutePattern>,
    pub keys: Vec<ApiKeyConfig>,
    pub keys_file: Option<PathBuf>,
    pub jwt: Option<JwtConfig>,
}

/// A path, or a path prefix when written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutePattern {
    Exact(String),
    Prefix(String),
}

impl RoutePattern {
    pub fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(s.to_owned()),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// One API key: its digest, who it stands for, and what it may do.
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub id: String,
    pub sha256: [u8; 32],
    pub tenant: String,
    pub tier: String,
    /// `None`: every model.
    pub models: Option<HashSet<String>>,
    /// The key's own limits, replacing `[limits.per_key]` for it.
    pub limits: Option<LimitSpec>,
}

/// Default tier of a key or token that names none.
pub const DEFAULT_TIER: &str = "standard";

impl ApiKeyConfig {
    /// Check one `[[keys]]` entry; `at` names it in errors (`auth.keys[2]`).
    pub fn from_raw(at: &str, raw: &RawApiKey) -> Result<Self, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if raw.id.is_empty() {
            return Err(invalid(key("id"), "is required"));
        }
        if raw.tenant.is_empty() {
            return Err(invalid(key("tenant"), "is required"));
        }
        let digest = hex::decode(raw.sha256.trim())
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(|| invalid(key("sha256"), "expected 64 hex digits (the SHA-256 of the key)"))?;
        Ok(Self {
            id: raw.id.clone(),
            sha256: digest,
            tenant: raw.tenant.clone(),
            tier: if raw.tier.is_empty() { DEFAULT_TIER.to_owned() } else { raw.tier.clone() },
            models: (!raw.models.is_empty()).then(|| raw.models.iter().cloned().collect()),
            limits: raw.limits.as_ref().map(|l| LimitSpec::from_raw(&key("limits"), l)).transpose()?,
        })
    }
}

/// Check a list of keys: each valid, ids and digests unique.
pub fn check_keys(at: &str, raw: &[RawApiKey]) -> Result<Vec<ApiKeyConfig>, ConfigError> {
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut keys = Vec::with_capacity(raw.len());
    for (i, k) in raw.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let key = ApiKeyConfig::from_raw(&at, k)?;
        if !ids.insert(key.id.clone()) {
            return Err(invalid(format!("{at}.id"), format!("duplicate key id {:?}", key.id)));
        }
        if !digests.insert(key.sha256) {
            return Err(invalid(format!("{at}.sha256"), "the same key is listed twice"));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// JWT verification settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
    pub keys: Vec<JwtKeyConfig>,
    pub jwks_file: Option<PathBuf>,
    pub tenant_claim: String,
    pub tier_claim: String,
    pub user_claim: String,
    pub default_tier: String,
}

/// Where one JWT key comes from.
#[derive(Debug, Clone)]
pub struct JwtKeyConfig {
    pub kid: Option<String>,
    pub alg: jsonwebtoken::Algorithm,
    pub material: KeyMaterial,
}

/// Key material; read when the gateway starts, never printed.
#[derive(Debug, Clone)]
pub enum KeyMaterial {
    SecretEnv(String),
    SecretFile(PathBuf),
    PublicKeyFile(PathBuf),
}

/// The algorithms infergate accepts: one symmetric, two asymmetric.
pub fn parse_alg(s: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm as A;
    match s {
        "HS256" => Some(A::HS256),
        "RS256" => Some(A::RS256),
        "ES256" => Some(A::ES256),
        _ => None,
    }
}

/// A `kid` that can be looked up safely: short, no path or control characters.
pub fn valid_kid(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= 128 && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl JwtConfig {
    fn from_raw(raw: &RawJwt) -> Result<Self, ConfigError> {
        if raw.issuer.is_empty() {
            return Err(invalid("auth.jwt.issuer", "is required: tokens are checked against it"));
        }
        if raw.audience.is_empty() {
            return Err(invalid("auth.jwt.audience", "is required: tokens are checked against it"));
        }
        let leeway = humantime::parse_duration(&raw.leeway)
            .map_err(|e| invalid("auth.jwt.leeway", format!("{:?} is not a duration ({e})", raw.leeway)))?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (i, k) in raw.keys.iter().enumerate() {
            let at = |f: &str| format!("auth.jwt.keys[{i}].{f}");
            let alg = parse_alg(&k.alg).ok_or_else(|| invalid(at("alg"), "must be HS256, RS256 or ES256"))?;
            if !k.kid.is_empty() && !valid_kid(&k.kid) {
                return Err(invalid(at("kid"), "use letters, digits, '-', '_' and '.' (at most 128)"));
            }
            let material = match (alg, k.secret_env.as_str(), k.secret_file.as_str(), k.public_key_file.as_str()) {
                (jsonwebtoken::Algorithm::HS256, env, "", "") if !env.is_empty() => {
                    KeyMaterial::SecretEnv(env.to_owned())
                }
                (jsonwebtoken::Algorithm::HS256, "", file, "") if !file.is_empty() => {
                    KeyMaterial::SecretFile(file.into())
                }
                (jsonwebtoken::Algorithm::HS256, ..) => {
                    return Err(invalid(at("secret_env"), "HS256 needs exactly one of secret_env or secret_file"));
                }
                (_, "", "", file) if !file.is_empty() => KeyMaterial::PublicKeyFile(file.into()),
                _ => {
                    return Err(invalid(at("public_key_file"), "RS256 and ES256 need public_key_file (and no secret)"));
                }
            };
            keys.push(JwtKeyConfig { kid: (!k.kid.is_empty()).then(|| k.kid.clone()), alg, material });
        }
        let jwks_file = (!raw.jwks_file.is_empty()).then(|| PathBuf::from(&raw.jwks_file));
        if keys.is_empty() && jwks_file.is_none() {
            return Err(invalid("auth.jwt.keys", "give at least one key or a jwks_file"));
        }
        if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
            return Err(invalid("auth.jwt.keys", "with several keys, each needs a kid"));
        }
        Ok(Self {
            issuer: raw.issuer.clone(),
            audience: raw.audience.clone(),
            leeway,
            keys,
            jwks_file,
            tenant_claim: raw.tenant_claim.clone(),
            tier_claim: raw.tier_claim.clone(),
            user_claim: raw.user_claim.clone(),
            default_tier: raw.default_tier.clone(),
        })
    }
}

impl AuthConfig {
    pub fn from_raw(raw: &RawAuth) -> Result<Self, ConfigError> {
        let keys = check_keys("auth.keys", &raw.keys)?;
        let jwt = raw.jwt.as_ref().map(JwtConfig::from_raw).transpose()?;
        let keys_file = (!raw.keys_file.is_empty()).then(|| PathBuf::from(&raw.keys_file));
        if raw.enabled && keys.is_empty() && keys_file.is_none() && jwt.is_none() {
            return Err(invalid("auth", "enabled with no keys, keys_file or jwt: nobody could call"));
        }
        Ok(Self {
            enabled: raw.enabled,
            public_routes: raw.public_routes.iter().map(|r| RoutePattern::parse(r)).collect(),
            keys,
            keys_file,
            jwt,
        })
    }
}

/// The limits of one scope, checked. Every field is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LimitSpec {
    pub rate: Option<RateSpec>,
    pub tokens_per_minute: Option<u64>,
    pub max_in_flight: Option<usize>,
    /// Frames a second on streams, one second's worth at once.
    pub frames_per_second: Option<RateSpec>,
}

/// A request rate: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RateSpec {
    pub per_second: f64,
    pub burst: u32,
}

impl RateSpec {
    /// Time between two requests at the sustained rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

impl LimitSpec {
    pub fn from_raw(at: &str, raw: &RawLimit) -> Result<Self, ConfigError> {
        let rate = match raw.rate {
            None if raw.burst.is_some() => return Err(invalid(format!("{at}.burst"), "needs a rate")),
            None => None,
            Some(r) if !(r.is_finite() && r > 0.0 && r <= 1e9) => {
                return Err(invalid(format!("{at}.rate"), "must be a positive number of requests per second"));
            }
            Some(r) => {
                // Default burst: one second's worth, at least one request.
                let burst = raw.burst.unwrap_or_else(|| r.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
                if burst == 0 {
                    return Err(invalid(format!("{at}.burst"), "must be at least 1"));
                }
                Some(RateSpec { per_second: r, burst })
            }
        };
        if raw.tokens_per_minute == Some(0) {
            return Err(invalid(format!("{at}.tokens_per_minute"), "must be positive (leave it out for no limit)"));
        }
        if raw.max_in_flight == Some(0) {
            return Err(invalid(format!("{at}.max_in_flight"), "must be positive (leave it out for no limit)"));
        }
        let frames_per_second = match raw.frames_per_second {
            None => None,
            Some(r) if !(r.is_finite() && r > 0.0 && r <= 1e9) => {
                return Err(invalid(
                    format!("{at}.frames_per_second"),
                    "must be a positive number of frames per second",
                ));
            }
            Some(r) => Some(RateSpec { per_second: r, burst: r.ceil().clamp(1.0, f64::from(u32::MAX)) as u32 }),
        };
        Ok(Self {
            rate,
            tokens_per_minute: raw.tokens_per_minute,
            max_in_flight: raw.max_in_flight.map(|n| n as usize),
            frames_per_second,
        })
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none()
            && self.tokens_per_minute.is_none()
            && self.max_in_flight.is_none()
            && self.frames_per_second.is_none()
    }
}

/// `[limits]`, checked.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    pub global: LimitSpec,
    pub per_tenant: LimitSpec,
    pub tenants: BTreeMap<String, LimitSpec>,
    pub per_key: LimitSpec,
    pub models: BTreeMap<String, LimitSpec>,
    /// Output tokens reserved for a generation without `max_tokens`.
    pub default_max_tokens: u64,
}

impl LimitsConfig {
    pub fn from_raw(raw: &RawLimits) -> Result<Self, ConfigError> {
        let map = |section: &str, m: &BTreeMap<String, RawLimit>| -> Result<BTreeMap<String, LimitSpec>, ConfigError> {
            m.iter().map(|(k, v)| Ok((k.clone(), LimitSpec::from_raw(&format!("limits.{section}.{k}"), v)?))).collect()
        };
        let global = LimitSpec::from_raw("limits.global", &raw.global)?;
        if global.max_in_flight.is_some() {
            return Err(invalid(
                "limits.global.max_in_flight",
                "use http.max_in_flight / grpc.max_in_flight for the gateway-wide bound",
            ));
        }
        let per_tenant = LimitSpec::from_raw("limits.per_tenant", &raw.per_tenant)?;
        let tenants = map("tenants", &raw.tenants)?;
        if per_tenant.max_in_flight.is_some() || tenants.values().any(|t| t.max_in_flight.is_some()) {
            return Err(invalid("limits.per_tenant.max_in_flight", "in-flight limits apply to keys and models only"));
        }
        Ok(Self {
            global,
            per_tenant,
            tenants,
            per_key: LimitSpec::from_raw("limits.per_key", &raw.per_key)?,
            models: map("models", &raw.models)?,
            default_max_tokens: raw.default_max_tokens,
        })
    }
}

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFallback {
    /// Decide with the in-memory limiters (each replica on its own).
    Local,
    /// Admit everything.
    Allow,
    /// Refuse everything with 503.
    Deny,
}

/// `[redis]`, checked; `None` in [`super::Config`] when no url is set.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub timeout: Duration,
    pub fallback: RedisFallback,
    pub pool_size: usize,
    pub prefix: String,
}

impl RedisConfig {
    pub fn from_raw(raw: &RawRedis) -> Result<Option<Self>, ConfigError> {
        let timeout = duration("redis.timeout", &raw.timeout)?;
        let fallback = match raw.fallback.as_str() {
            "local" => RedisFallback::Local,
            "allow" => RedisFallback::Allow,
            "deny" => RedisFallback::Deny,
            _ => return Err(invalid("redis.fallback", "must be local, allow or deny")),
        };
        if raw.url.is_empty() {
            return Ok(None);
        }
        if !(raw.url.starts_with("redis://") || raw.url.starts_with("unix://")) {
            return Err(invalid("redis.url", "expected redis://host:port[/db] or unix:///path"));
        }
        if raw.pool_size == 0 {
            return Err(invalid("redis.pool_size", "must be positive"));
        }
        Ok(Some(Self {
            url: raw.url.clone(),
            timeout,
            fallback,
            pool_size: raw.pool_size as usize,
            prefix: raw.prefix.clone(),
        }))
    }
}

/// `http.trusted_proxies`: addresses and CIDR ranges.
pub fn trusted_proxies(raw: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| invalid(format!("http.trusted_proxies[{i}]"), format!("{s:?} is not an address or CIDR")))
        })
        .collect()
}
