//! The policy layer: who calls (auth), from where (client address), and how
//! much they may do (limits) — all decided before a worker is touched.
//!
//! The edge runs [`identify`] as middleware before it reads a body (a 401
//! costs no parsing), then [`Policy::admit`] once it knows the model and the
//! request's size; the returned [`Admission`] holds in-flight permits and a
//! token reservation until the call ends.

pub mod auth;
pub mod limits;
pub mod redis;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use self::auth::{Authenticator, KeyLoadError};
use self::limits::{Gcra, LocalLimits, Refusal, Scope};
use self::redis::{Check, Decision, RedisLimits};
use crate::config::{Config, LimitsConfig, RateSpec, RedisFallback};
use crate::error::GatewayError;
use crate::redis_pool::RedisSetupError;

/// How often the keys file and JWKS file are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How often idle limiter state (clients that went away) is dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

pub use crate::call::{ANONYMOUS_TENANT, Caller, Principal};

/// The TCP peer of a connection, set by the accept loop on every request.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Why the policy layer cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("auth: {0}")]
    Keys(#[from] KeyLoadError),
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
}

/// How far a console user may go (see [`Policy::console`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleAccess {
    /// Auth is off and no console credential is configured: anyone who
    /// reaches the admin listener, as anyone reaches the client listeners.
    Open,
    /// An admin (`key:<id>` or `user:<sub>`): status and playground.
    Admin(String),
    /// A viewer: status only.
    Viewer(String),
}

/// Auth, limits and client addressing, shared by both edges.
pub struct Policy {
    auth: Authenticator,
    limits: LimitsConfig,
    /// Limiter state, kept across reloads (see [`Policy::reloaded`]).
    local: Arc<LocalLimits>,
    redis: Option<Arc<RedisLimits>>,
    trusted_proxies: Vec<ipnet::IpNet>,
    /// With auth off: the `Host` names served (`None`: any, auth is on).
    hosts: Option<AllowedHosts>,
    /// Model names that reach an alias's variants directly, with the
    /// aliases whose model limits therefore count them too.
    covering: HashMap<String, Vec<Arc<str>>>,
}

/// Model tokens a call may use, reserved against token limits at admission
/// and settled with the usage reported after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    /// Estimated from the input.
    pub prompt: u64,
    /// The most the call may produce; `None` for a generation that sets no
    /// `max_tokens`, which reserves `limits.default_max_tokens`.
    pub output: Option<u64>,
}

impl Tokens {
    /// A call that counts no tokens (tensor inference).
    pub const NONE: Self = Self { prompt: 0, output: Some(0) };

    /// A call that produces no tokens (embeddings): its input only.
    pub fn input(prompt: u64) -> Self {
        Self { prompt, output: Some(0) }
    }
}

impl Policy {
    pub fn new(config: &Config) -> Result<Arc<Self>, PolicyError> {
        let redis = config.redis.as_ref().map(RedisLimits::new).transpose()?.map(Arc::new);
        Self::with_state(config, Arc::default(), redis)
    }

    /// The policy of `config`, keeping this one's limiter state: a scope
    /// whose limit is unchanged keeps its counts (a changed rate or
    /// in-flight bound starts afresh; token reservations carry over), and
    /// the Redis limiter is the same one (`[redis]` changes need a restart).
    pub fn reloaded(&self, config: &Config) -> Result<Arc<Self>, PolicyError> {
        // A caller refused under the old limits is judged by the new ones.
        self.local.spent.clear();
        Self::with_state(config, self.local.clone(), self.redis.clone())
    }

    fn with_state(
        config: &Config,
        local: Arc<LocalLimits>,
        redis: Option<Arc<RedisLimits>>,
    ) -> Result<Arc<Self>, PolicyError> {
        let auth = Authenticator::new(config.auth.clone())?;
        if !auth.enabled() {
            tracing::warn!("auth is off: anyone who can reach the listeners may call (set auth.enabled)");
        }
        Ok(Arc::new(Self {
            auth,
            limits: config.limits.clone(),
            local,
            redis,
            trusted_proxies: config.trusted_proxies.clone(),
            hosts: (!config.auth.enabled).then(|| AllowedHosts::new(&config.allowed_hosts)),
            covering: covering(config),
        }))
    }

    /// No auth and no limits: for embedding the edge in tests and benches.
    pub fn unrestricted() -> Arc<Self> {
        Arc::new(Self {
            auth: Authenticator::disabled(),
            limits: LimitsConfig::default(),
            local: Arc::default(),
            redis: None,
            trusted_proxies: Vec::new(),
            hosts: None,
            covering: HashMap::new(),
        })
    }

    /// The tokens to reserve for `demand` in `scopes`: the prompt and the
    /// output cap, so concurrent calls cannot overshoot a token limit by
    /// what they have yet to produce. A cap larger than a scope's whole
    /// minute is held to that minute (the call can still run; the usage
    /// settles it), but a prompt larger than it is refused.
    fn reserve(&self, scopes: &[limits::Scope], demand: Tokens) -> u64 {
        let want = demand.prompt.saturating_add(demand.output.unwrap_or(self.limits.default_max_tokens));
        match scopes.iter().filter_map(|s| s.spec.tokens_per_minute).min() {
            Some(minute) => want.min(minute.max(demand.prompt)),
            None => want,
        }
    }

    /// Reload changed key files and drop idle limiter state of the policy
    /// in force (`current` says which) until `stop`.
    pub fn start_housekeeping(current: impl Fn() -> Arc<Self> + Send + 'static, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut reload = tokio::time::interval(RELOAD_EVERY);
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = reload.tick() => current().auth.reload_changed(),
                    _ = sweep.tick() => current().local.sweep(),
                }
            }
        });
    }

    fn trusted(&self, addr: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&addr))
    }

    /// The client address: the peer, unless the peer is a trusted proxy, in
    /// which case the right-most `X-Forwarded-For` entry that is not itself a
    /// trusted proxy (entries further left are the client's own claims).
    pub fn client_addr(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(addr) => {
                    client = addr;
                    if !self.trusted(addr) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Refuse a request addressed to `host` (a `Host` header or
    /// `:authority`) that is not served: with auth off, only loopback names
    /// and `http.allowed_hosts` are (a web page cannot drive a local
    /// gateway through DNS rebinding).
    pub fn check_host(&self, host: &str) -> Result<(), GatewayError> {
        match &self.hosts {
            Some(hosts) if !hosts.allows(host) => Err(GatewayError::HostNotAllowed { host: host.to_owned() }),
            _ => Ok(()),
        }
    }

    /// Who is behind an admin API request, or why they may not use it
    /// (`not_admin`: a valid credential that is not an admin's).
    pub fn admin(
        &self,
        headers: &http::HeaderMap,
        admin: &crate::config::components::AdminConfig,
    ) -> Result<String, &'static str> {
        self.auth.admin(headers, &admin.keys, admin.role.as_ref()).map_err(auth::AuthFailure::reason)
    }

    /// Who may use the console, and how far: an admin (status and
    /// playground) or a viewer (status only). With auth off and no admin
    /// or viewer credential configured, the console is open
    /// ([`ConsoleAccess::Open`]) as the client listeners are.
    pub fn console(
        &self,
        headers: &http::HeaderMap,
        admin: &crate::config::components::AdminConfig,
    ) -> Result<ConsoleAccess, &'static str> {
        let configured = !admin.keys.is_empty()
            || admin.role.is_some()
            || !admin.viewer_keys.is_empty()
            || admin.viewer_role.is_some();
        if !self.auth.enabled() && !configured {
            return Ok(ConsoleAccess::Open);
        }
        match self.auth.admin(headers, &admin.keys, admin.role.as_ref()) {
            Ok(who) => Ok(ConsoleAccess::Admin(who)),
            // Not an admin's: perhaps a viewer's (a JWT is read only where a
            // role for it is configured, so both are asked before refusing).
            Err(not_admin) => match self.auth.admin(headers, &admin.viewer_keys, admin.viewer_role.as_ref()) {
                Ok(who) => Ok(ConsoleAccess::Viewer(who)),
                Err(auth::AuthFailure::NotAdmin) => Err(auth::AuthFailure::NotAdmin.reason()),
                Err(_) => Err(not_admin.reason()),
            },
        }
    }

    /// The caller of a request to `path`, or why it is refused.
    pub fn identify(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, &'static str> {
        let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let client = self.client_addr(peer, headers);
        if !self.auth.enabled() || self.auth.is_public(path) {
            return Ok(Caller::anonymous(client));
        }
        self.auth.authenticate(headers, client).map_err(auth::AuthFailure::reason)
    }

    /// Refuse `caller` at once while their own request rate is spent (see
    /// [`limits::Spent`]): the edge asks before it reads a body, so a key
    /// that floods past its limit costs a 429 about what a 401 costs.
    pub fn refuse_spent(&self, caller: &Caller) -> Result<(), GatewayError> {
        self.local.spent.check(caller).map_err(refused)
    }

    /// A refusal of `caller`, remembered when it is their own rate.
    fn note_refusal(&self, caller: &Caller, r: Refusal) -> GatewayError {
        self.local.spent.remember(caller, &r);
        refused(r)
    }

    /// Admit `caller` to call `model` with about `tokens` model tokens:
    /// model allowlist, then in-flight, request-rate and token limits in every
    /// scope. Refusals are 403, 429 (with back-off facts) or, when Redis is
    /// down and the fallback is `deny`, 503.
    pub async fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        demand: Tokens,
    ) -> Result<Admission, GatewayError> {
        if caller.models.as_ref().is_some_and(|m| !m.contains(model)) {
            return Err(GatewayError::ModelForbidden { model: model.to_owned() });
        }
        let aliases = self.covering.get(model).map_or(&[][..], Vec::as_slice);
        let scopes = limits::scopes(&self.limits, caller, model, aliases);
        if scopes.is_empty() {
            return Ok(Admission::default());
        }
        let tokens = self.reserve(&scopes, demand);
        let permits = self.local.acquire_in_flight(&scopes).map_err(|r| self.note_refusal(caller, r))?;
        let shared = match &self.redis {
            Some(redis) if redis.available() => {
                let checks = checks(redis, &scopes, tokens);
                if checks.is_empty() {
                    Some(Ok(Decision::Admitted))
                } else {
                    Some(redis.decide(&checks, &scopes).await)
                }
            }
            Some(_) => Some(Err("paused after a failure".to_owned())),
            None => None,
        };
        let on_redis = match shared {
            None => {
                self.local.admit_rates_and_tokens(&scopes, tokens).map_err(|r| self.note_refusal(caller, r))?;
                false
            }
            Some(Ok(Decision::Admitted)) => true,
            Some(Ok(Decision::Refused(r))) => return Err(self.note_refusal(caller, r)),
            Some(Err(_)) => {
                let fallback = self.redis.as_ref().map_or(RedisFallback::Local, |r| r.fallback);
                let name = match fallback {
                    RedisFallback::Local => "local",
                    RedisFallback::Allow => "allow",
                    RedisFallback::Deny => "deny",
                };
                metrics::counter!(crate::telemetry::metrics::LIMITS_FALLBACK, "fallback" => name).increment(1);
                match fallback {
                    RedisFallback::Allow => false,
                    RedisFallback::Deny => return Err(GatewayError::LimitsUnavailable),
                    RedisFallback::Local => {
                        self.local.admit_rates_and_tokens(&scopes, tokens).map_err(|r| self.note_refusal(caller, r))?;
                        false
                    }
                }
            }
        };
        if tokens == 0 {
            return Ok(Admission { _permits: permits, reservation: None });
        }
        let token_scopes: Vec<(String, Gcra)> = scopes
            .iter()
            .filter_map(|s| {
                let gcra = Gcra::tokens_per_minute(s.spec.tokens_per_minute?);
                let key = match (&self.redis, on_redis) {
                    (Some(r), true) => r.key("tpm", &s.key),
                    _ => s.key.clone(),
                };
                Some((key, gcra))
            })
            .collect();
        let reservation = (!token_scopes.is_empty()).then(|| Reservation {
            policy: Arc::clone(self),
            scopes: token_scopes,
            reserved: tokens,
            on_redis,
        });
        Ok(Admission { _permits: permits, reservation })
    }
}

/// The frame rates that apply to one stream: its caller's and model's
/// `frames_per_second` in every scope, counted in this replica's memory.
pub struct FrameLimit {
    policy: Arc<Policy>,
    /// State key, scope kind and rate of every scope that limits frames.
    scopes: Vec<(String, &'static str, RateSpec)>,
}

impl FrameLimit {
    /// Count one frame; refused (429's error) when a scope's rate is spent.
    /// A refused frame does not mark its caller spent: its other calls go on.
    pub fn take(&self) -> Result<(), GatewayError> {
        if self.scopes.is_empty() {
            return Ok(());
        }
        self.policy.local.admit_frame(&self.scopes).map_err(refused)
    }
}

impl Policy {
    /// The frame limits of `caller`'s stream to `model`.
    pub fn frame_limit(self: &Arc<Self>, caller: &Caller, model: &str) -> FrameLimit {
        let aliases = self.covering.get(model).map_or(&[][..], Vec::as_slice);
        let scopes = limits::scopes(&self.limits, caller, model, aliases)
            .into_iter()
            .filter_map(|s| Some((format!("frames:{}", s.key), s.kind, s.spec.frames_per_second?)))
            .collect();
        FrameLimit { policy: Arc::clone(self), scopes }
    }
}

/// The script's checks for `scopes`: a rate check per rated scope, a token
/// check per token-limited scope (when the request has tokens).
fn checks(redis: &RedisLimits, scopes: &[Scope], tokens: u64) -> Vec<Check> {
    let mut out = Vec::new();
    for (i, s) in scopes.iter().enumerate() {
        if let Some(rate) = s.spec.rate {
            out.push(Check {
                scope_index: i,
                limit: "rate",
                key: redis.key("rate", &s.key),
                gcra_interval_us: u64::try_from(rate.interval().as_micros()).unwrap_or(u64::MAX).max(1),
                capacity: u64::from(rate.burst),
                cost: 1,
            });
        }
        if let (Some(tpm), true) = (s.spec.tokens_per_minute, tokens > 0) {
            let gcra = Gcra::tokens_per_minute(tpm);
            out.push(Check {
                scope_index: i,
                limit: "tokens_per_minute",
                key: redis.key("tpm", &s.key),
                gcra_interval_us: redis::interval_us(&gcra),
                capacity: tpm,
                cost: tokens,
            });
        }
    }
    out
}

fn refused(r: Refusal) -> GatewayError {
    metrics::counter!(crate::telemetry::metrics::LIMIT_REJECTIONS, "limit" => r.limit.clone()).increment(1);
    GatewayError::RateLimited { limit: r.limit, quota: r.quota, remaining: r.remaining, retry_after: r.retry_after }
}

/// What an admitted request holds until it ends.
#[derive(Default)]
pub struct Admission {
    _permits: Vec<OwnedSemaphorePermit>,
    reservation: Option<Reservation>,
}

struct Reservation {
    policy: Arc<Policy>,
    scopes: Vec<(String, Gcra)>,
    reserved: u64,
    on_redis: bool,
}

impl Admission {
    /// Settle the token reservation with what the worker reported the call
    /// used; `None` (no usage reported) keeps the estimate. An admission
    /// dropped without settling (the call failed or was cancelled) gives the
    /// whole reservation back. Redis settles off the request path.
    pub fn settle(mut self, used: Option<u64>) {
        if let Some(r) = self.reservation.take()
            && let Some(used) = used
        {
            r.adjust(used);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.adjust(0);
        }
    }
}

impl Reservation {
    fn adjust(self, used: u64) {
        let refund = i64::try_from(self.reserved).unwrap_or(i64::MAX) - i64::try_from(used).unwrap_or(i64::MAX);
        if refund == 0 {
            return;
        }
        if self.on_redis {
            tokio::spawn(async move {
                if let Some(redis) = &self.policy.redis
                    && let Err(e) = redis.adjust(&self.scopes, refund).await
                {
                    tracing::debug!(error = %e, refund, "token reservation not settled in redis");
                }
            });
        } else {
            self.policy.local.adjust_tokens(&self.scopes, refund);
        }
    }
}

/// Estimated model tokens of some text: about four characters a token.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// For each model name that reaches an alias's variants directly (their
/// models and pools), the aliases with a `limits.models` entry covering it.
fn covering(config: &Config) -> HashMap<String, Vec<Arc<str>>> {
    let mut out: HashMap<String, Vec<Arc<str>>> = HashMap::new();
    for alias in config.aliases.iter().filter(|a| config.limits.models.contains_key(&*a.name)) {
        for name in alias.direct_names() {
            let aliases = out.entry(name.to_owned()).or_default();
            if !aliases.contains(&alias.name) {
                aliases.push(alias.name.clone());
            }
        }
    }
    out
}

/// The names a gateway with auth off answers to: loopback ones (a web page
/// that rebinds its own name to 127.0.0.1 still sends its own name), and
/// `http.allowed_hosts` (`"*"`: any).
#[derive(Debug)]
struct AllowedHosts {
    any: bool,
    names: Vec<String>,
}

impl AllowedHosts {
    fn new(allowed: &[String]) -> Self {
        Self { any: allowed.iter().any(|h| h == "*"), names: allowed.iter().map(|h| h.to_ascii_lowercase()).collect() }
    }

    /// `host` is a `Host` header or `:authority`, with or without a port.
    fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            },
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost"
            || name.ends_with(".localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.names.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::AllowedHosts;

    #[test]
    fn with_auth_off_only_loopback_names_and_allowed_hosts_are_served() {
        let hosts = AllowedHosts::new(&["gateway.internal".to_owned()]);
        let served = [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:50051",
            "api.localhost",
            "Gateway.Internal:80",
        ];
        for ok in served {
            assert!(hosts.allows(ok), "{ok}");
        }
        let refused = [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "[2001:db8::1]:80",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ];
        for bad in refused {
            assert!(!hosts.allows(bad), "{bad}");
        }
        assert!(AllowedHosts::new(&["*".to_owned()]).allows("anything.example"));
    }
}
