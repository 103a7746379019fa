//! How much a caller may do: request rate (GCRA, governor), model tokens per
//! minute (a GCRA that can refund), and requests in flight — for all traffic,
//! each tenant, each key and each model. Every applicable scope must admit a
//! request; shared through Redis when configured (see [`super::redis`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::call::{Caller, Principal};
use crate::config::{LimitSpec, LimitsConfig, RateSpec};

type KeyedLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// One window of the token limits: a full minute's tokens may be spent at once.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// A limit that refused a request, with what a client needs to back off.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Which limit: `key.rate`, `tenant.tokens_per_minute`, `model.max_in_flight`, …
    pub limit: String,
    /// The limit's size: burst for rates, tokens per minute, requests in flight.
    pub quota: u64,
    /// What is left now (0 unless a token request was larger than what is left).
    pub remaining: u64,
    /// When trying again can succeed; `None` when it never can (a request
    /// larger than the whole limit) or cannot be known (in-flight limits).
    pub retry_after: Option<Duration>,
}

/// The scopes a request is checked against, most specific first, so that a
/// single abusive key is refused before it spends shared capacity.
#[derive(Debug, Clone)]
pub struct Scope {
    /// `key`, `tenant`, `model`, `global`: names the limit in refusals.
    pub kind: &'static str,
    /// The state key, e.g. `key:team-a-prod`.
    pub key: String,
    pub spec: LimitSpec,
}

/// The scopes that apply to `caller` calling `model`.
/// The scopes that must admit `caller`'s call to `model`. `aliases` are the
/// aliases whose variants `model` names directly: their model limits count
/// the call as if it had named them.
pub fn scopes(config: &LimitsConfig, caller: &Caller, model: &str, aliases: &[Arc<str>]) -> Vec<Scope> {
    let mut out = Vec::new();
    // Keys are only formatted for scopes that limit something.
    let mut push = |kind, spec: LimitSpec, key: &dyn Fn() -> String| {
        if !spec.is_unlimited() {
            out.push(Scope { kind, key: key(), spec });
        }
    };
    push("key", caller.limits.unwrap_or(config.per_key), &|| caller.limit_key());
    let tenant = config.tenants.get(&*caller.tenant).copied().unwrap_or(config.per_tenant);
    push("tenant", tenant, &|| format!("tenant:{}", caller.tenant));
    for name in std::iter::once(model).chain(aliases.iter().map(|a| &**a)) {
        if let Some(spec) = config.models.get(name) {
            push("model", *spec, &|| format!("model:{name}"));
        }
    }
    push("global", config.global, &|| "global".to_owned());
    out
}

/// A generic cell rate: `interval` per unit, `capacity` units at once.
/// `tat` is the theoretical arrival time of the next unit. Local token
/// limits use it directly; the Redis script implements the same arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    pub interval: Duration,
    pub capacity: u64,
}

impl Gcra {
    pub fn tokens_per_minute(tpm: u64) -> Self {
        Self { interval: TOKEN_WINDOW / u32::try_from(tpm.max(1)).unwrap_or(u32::MAX), capacity: tpm }
    }

    /// Take `cost` units at `now` if they fit: the new `tat`, or how long to wait.
    pub fn take(&self, tat: Instant, now: Instant, cost: u64) -> Result<Instant, Option<Duration>> {
        if cost > self.capacity {
            return Err(None);
        }
        let new_tat = tat.max(now) + self.interval.saturating_mul(u32::try_from(cost).unwrap_or(u32::MAX));
        let window = self.interval.saturating_mul(u32::try_from(self.capacity).unwrap_or(u32::MAX));
        let ahead = new_tat.saturating_duration_since(now);
        if ahead > window { Err(Some(ahead - window)) } else { Ok(new_tat) }
    }

    /// Give back `units` (never below `now`), or charge `-units` more.
    pub fn adjust(&self, tat: Instant, now: Instant, refund: i64) -> Instant {
        let delta = self.interval.saturating_mul(u32::try_from(refund.unsigned_abs()).unwrap_or(u32::MAX));
        if refund >= 0 { tat.checked_sub(delta).unwrap_or(now).max(now) } else { tat.max(now) + delta }
    }

    /// Units still available at `now`.
    pub fn remaining(&self, tat: Instant, now: Instant) -> u64 {
        // A unit partly refilled is not yet available.
        let used = tat.saturating_duration_since(now).as_nanos().div_ceil(self.interval.as_nanos().max(1));
        self.capacity.saturating_sub(u64::try_from(used).unwrap_or(u64::MAX))
    }
}

/// Token buckets in memory, by scope key.
#[derive(Default)]
struct TokenState {
    tat: Mutex<HashMap<String, Instant>>,
}

impl TokenState {
    /// Reserve `cost` in every scope, or in none.
    fn reserve(&self, scopes: &[(&Scope, Gcra)], cost: u64) -> Result<(), Refusal> {
        let now = Instant::now();
        let Ok(mut tat) = self.tat.lock() else { return Ok(()) };
        let mut taken = Vec::with_capacity(scopes.len());
        for (scope, gcra) in scopes {
            let current = tat.get(&scope.key).copied().unwrap_or(now);
            match gcra.take(current, now, cost) {
                Ok(new_tat) => taken.push((scope.key.as_str(), new_tat)),
                Err(retry_after) => {
                    return Err(Refusal {
                        limit: format!("{}.tokens_per_minute", scope.kind),
                        quota: gcra.capacity,
                        remaining: gcra.remaining(current, now),
                        retry_after,
                    });
                }
            }
        }
        for (key, new_tat) in taken {
            tat.insert(key.to_owned(), new_tat);
        }
        Ok(())
    }

    fn adjust(&self, scopes: &[(String, Gcra)], refund: i64) {
        let now = Instant::now();
        if let Ok(mut tat) = self.tat.lock() {
            for (key, gcra) in scopes {
                if let Some(t) = tat.get_mut(key) {
                    *t = gcra.adjust(*t, now, refund);
                }
            }
        }
    }

    /// Drop buckets that are full again (their `tat` is in the past).
    fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut tat) = self.tat.lock() {
            tat.retain(|_, t| *t > now);
            tat.shrink_to_fit();
        }
    }
}

/// Rate limiters in memory: one keyed governor limiter per distinct quota,
/// shared by every scope with that quota.
#[derive(Default)]
struct RateState {
    by_quota: RwLock<HashMap<(u64, u32), Arc<KeyedLimiter>>>,
}

impl RateState {
    fn limiter(&self, spec: RateSpec) -> Arc<KeyedLimiter> {
        let id = (spec.per_second.to_bits(), spec.burst);
        if let Some(l) = self.by_quota.read().ok().and_then(|m| m.get(&id).cloned()) {
            return l;
        }
        let quota = Quota::with_period(spec.interval())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN));
        let fresh = Arc::new(RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>());
        match self.by_quota.write() {
            Ok(mut m) => m.entry(id).or_insert(fresh).clone(),
            Err(_) => fresh,
        }
    }

    fn check(&self, scope: &Scope, spec: RateSpec) -> Result<(), Refusal> {
        self.check_key(&scope.key, scope.kind, "rate", spec)
    }

    /// Take one unit of `key`'s rate; a refusal names `kind.what`.
    fn check_key(&self, key: &str, kind: &str, what: &str, spec: RateSpec) -> Result<(), Refusal> {
        let limiter = self.limiter(spec);
        limiter.check_key(&key.to_owned()).map(drop).map_err(|not_until| Refusal {
            limit: format!("{kind}.{what}"),
            quota: u64::from(spec.burst),
            remaining: 0,
            // The limiter's own clock: a fresh quanta clock calibrates (µs).
            retry_after: Some(not_until.wait_time_from(limiter.clock().now())),
        })
    }

    fn sweep(&self) {
        if let Ok(m) = self.by_quota.read() {
            for l in m.values() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}

/// In-flight semaphores by scope key, with the bound each was made for.
#[derive(Default)]
struct InFlight {
    by_key: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

impl InFlight {
    fn acquire(&self, scope: &Scope, max: usize) -> Result<OwnedSemaphorePermit, Refusal> {
        let sem = match self.by_key.lock() {
            Ok(mut m) => {
                let entry = m.entry(scope.key.clone()).or_insert_with(|| (max, Arc::new(Semaphore::new(max))));
                // A reload changed the bound: calls under way keep the old
                // semaphore's permits, new ones count against the new bound.
                if entry.0 != max {
                    *entry = (max, Arc::new(Semaphore::new(max)));
                }
                entry.1.clone()
            }
            Err(_) => Arc::new(Semaphore::new(max)),
        };
        sem.try_acquire_owned().map_err(|_| Refusal {
            limit: format!("{}.max_in_flight", scope.kind),
            quota: max as u64,
            remaining: 0,
            retry_after: None,
        })
    }

    /// Forget semaphores nobody holds a permit of (clients that went away).
    fn sweep(&self) {
        if let Ok(mut m) = self.by_key.lock() {
            m.retain(|_, (_, s)| Arc::strong_count(s) > 1);
            m.shrink_to_fit();
        }
    }
}

/// Whom a per-key limit counts, as [`Caller::limit_key`] names it, held
/// without formatting that name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Holder {
    Key(Arc<str>),
    User(Arc<str>, Arc<str>),
    Addr(IpAddr),
}

impl Holder {
    fn of(caller: &Caller) -> Self {
        match &caller.principal {
            Principal::Key(id) => Self::Key(id.clone()),
            Principal::User(sub) => Self::User(caller.tenant.clone(), sub.clone()),
            Principal::Anonymous => Self::Addr(caller.client),
        }
    }
}

/// The most callers remembered as spent; past it, a refused caller's next
/// requests take the whole path to their refusal, as before.
const MAX_SPENT: usize = 100_000;

/// Callers whose own request rate (`key.rate`) refused them, until that
/// refusal lapses. A rate limit frees capacity only as time passes, whether
/// local or shared through Redis (other replicas can only spend more), so
/// each of their requests before then would be refused too; the edge
/// refuses it as it arrives, before its body is read or parsed.
#[derive(Default)]
pub struct Spent {
    /// Entries held: a gateway where nobody is refused never takes the lock.
    held: AtomicUsize,
    until: RwLock<HashMap<Holder, (Instant, u64)>>,
}

impl Spent {
    /// Remember `refusal` of `caller` if it is their own request rate.
    pub fn remember(&self, caller: &Caller, refusal: &Refusal) {
        let Some(wait) = refusal.retry_after.filter(|_| refusal.limit == "key.rate") else { return };
        let Ok(mut until) = self.until.write() else { return };
        if until.len() < MAX_SPENT {
            until.insert(Holder::of(caller), (Instant::now() + wait, refusal.quota));
            self.held.store(until.len(), Ordering::Relaxed);
        }
    }

    /// Forget every refusal (the limits changed).
    pub fn clear(&self) {
        if let Ok(mut until) = self.until.write() {
            until.clear();
            self.held.store(0, Ordering::Relaxed);
        }
    }

    /// The refusal still standing for `caller`, if any.
    pub fn check(&self, caller: &Caller) -> Result<(), Refusal> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let Ok(until) = self.until.read() else { return Ok(()) };
        match until.get(&Holder::of(caller)) {
            Some(&(at, quota)) if at > now => {
                Err(Refusal { limit: "key.rate".to_owned(), quota, remaining: 0, retry_after: Some(at - now) })
            }
            _ => Ok(()),
        }
    }

    /// Forget refusals that have lapsed.
    fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut until) = self.until.write() {
            until.retain(|_, (at, _)| *at > now);
            until.shrink_to_fit();
            self.held.store(until.len(), Ordering::Relaxed);
        }
    }
}

/// The in-memory limiters: the default, and the fallback when Redis is down.
#[derive(Default)]
pub struct LocalLimits {
    rates: RateState,
    tokens: TokenState,
    in_flight: InFlight,
    /// Callers refused by their own rate, local or Redis-shared.
    pub spent: Spent,
}

impl LocalLimits {
    /// Request rates then tokens, in every scope. (Rates are not refunded
    /// when a later scope refuses: scopes go most specific first, so what is
    /// spent is the refused caller's own allowance.)
    pub fn admit_rates_and_tokens(&self, scopes: &[Scope], tokens: u64) -> Result<(), Refusal> {
        for scope in scopes {
            if let Some(rate) = scope.spec.rate {
                self.rates.check(scope, rate)?;
            }
        }
        let token_scopes: Vec<(&Scope, Gcra)> = scopes
            .iter()
            .filter_map(|s| s.spec.tokens_per_minute.map(|tpm| (s, Gcra::tokens_per_minute(tpm))))
            .collect();
        if tokens > 0 && !token_scopes.is_empty() {
            self.tokens.reserve(&token_scopes, tokens)?;
        }
        Ok(())
    }

    /// Settle a token reservation: positive `refund` gives back, negative charges more.
    pub fn adjust_tokens(&self, scopes: &[(String, Gcra)], refund: i64) {
        self.tokens.adjust(scopes, refund);
    }

    /// One frame in every scope of `frames` (state key, scope kind, rate).
    pub fn admit_frame(&self, frames: &[(String, &'static str, RateSpec)]) -> Result<(), Refusal> {
        for (key, kind, spec) in frames {
            self.rates.check_key(key, kind, "frames_per_second", *spec)?;
        }
        Ok(())
    }

    /// In-flight permits for every scope that bounds them.
    pub fn acquire_in_flight(&self, scopes: &[Scope]) -> Result<Vec<OwnedSemaphorePermit>, Refusal> {
        scopes.iter().filter_map(|s| s.spec.max_in_flight.map(|max| self.in_flight.acquire(s, max))).collect()
    }

    /// Forget idle state; run periodically so per-client state stays bounded.
    pub fn sweep(&self) {
        self.rates.sweep();
        self.tokens.sweep();
        self.in_flight.sweep();
        self.spent.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_capacity_at_once_then_refills_at_the_rate() {
        let g = Gcra { interval: Duration::from_millis(100), capacity: 5 };
        let now = Instant::now();
        let mut tat = now;
        for _ in 0..5 {
            tat = g.take(tat, now, 1).unwrap();
        }
        assert_eq!(g.remaining(tat, now), 0);
        let wait = g.take(tat, now, 1).unwrap_err().unwrap();
        assert_eq!(wait, Duration::from_millis(100));
        // After one interval, one more fits.
        let later = now + Duration::from_millis(100);
        assert!(g.take(tat, later, 1).is_ok());
        assert!(g.take(tat, later, 2).is_err());
    }

    #[test]
    fn gcra_refunds_and_charges_and_never_admits_more_than_capacity() {
        let g = Gcra::tokens_per_minute(600); // 100 ms per token
        let now = Instant::now();
        let tat = g.take(now, now, 500).unwrap();
        assert_eq!(g.remaining(tat, now), 100);
        let tat = g.adjust(tat, now, 300); // used 200 of 500
        assert_eq!(g.remaining(tat, now), 400);
        let tat = g.adjust(tat, now, -50); // used 50 more than reserved
        assert_eq!(g.remaining(tat, now), 350);
        assert_eq!(g.adjust(tat, now, 10_000), now, "a refund never goes below empty");
        assert_eq!(g.take(now, now, 601), Err(None), "larger than the whole limit: never");
    }

    fn scope(kind: &'static str, key: &str, spec: LimitSpec) -> Scope {
        Scope { kind, key: key.into(), spec }
    }

    #[test]
    fn rates_refuse_past_the_burst_and_name_the_limit() {
        let limits = LocalLimits::default();
        let spec = LimitSpec { rate: Some(RateSpec { per_second: 1.0, burst: 3 }), ..LimitSpec::default() };
        let s = [scope("key", "key:a", spec)];
        for _ in 0..3 {
            limits.admit_rates_and_tokens(&s, 0).unwrap();
        }
        let refusal = limits.admit_rates_and_tokens(&s, 0).unwrap_err();
        assert_eq!(refusal.limit, "key.rate");
        assert_eq!(refusal.quota, 3);
        let wait = refusal.retry_after.unwrap();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        // Another key has its own allowance.
        limits.admit_rates_and_tokens(&[scope("key", "key:b", spec)], 0).unwrap();
    }

    #[test]
    fn tokens_are_reserved_in_all_scopes_or_in_none() {
        let limits = LocalLimits::default();
        let small = LimitSpec { tokens_per_minute: Some(100), ..LimitSpec::default() };
        let big = LimitSpec { tokens_per_minute: Some(1000), ..LimitSpec::default() };
        let s = [scope("key", "key:a", big), scope("tenant", "tenant:t", small)];
        limits.admit_rates_and_tokens(&s, 80).unwrap();
        let refusal = limits.admit_rates_and_tokens(&s, 50).unwrap_err();
        assert_eq!(refusal.limit, "tenant.tokens_per_minute");
        assert_eq!(refusal.remaining, 20);
        // The key scope was not charged for the refused request: 920 left there.
        let key_only = [scope("key", "key:a", big)];
        limits.admit_rates_and_tokens(&key_only, 920).unwrap();
        assert!(limits.admit_rates_and_tokens(&key_only, 1).is_err());
    }

    fn key(id: &str) -> Caller {
        Caller { principal: Principal::Key(id.into()), ..Caller::anonymous(IpAddr::from([127, 0, 0, 1])) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_rate_stands_for_its_holder_alone_until_it_lapses() {
        let spent = Spent::default();
        let rate = |limit: &str| Refusal {
            limit: limit.to_owned(),
            quota: 3,
            remaining: 0,
            retry_after: Some(Duration::from_secs(1)),
        };
        spent.remember(&key("a"), &rate("key.rate"));
        // A token refusal depends on the next request's size; a shared
        // scope's on other callers: neither is remembered.
        spent.remember(&key("b"), &rate("key.tokens_per_minute"));
        spent.remember(&key("c"), &rate("tenant.rate"));
        let refusal = spent.check(&key("a")).unwrap_err();
        assert_eq!((refusal.limit.as_str(), refusal.quota), ("key.rate", 3));
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(1)));
        for other in ["b", "c", "d"] {
            assert!(spent.check(&key(other)).is_ok(), "{other}");
        }
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(spent.check(&key("a")).unwrap_err().retry_after, Some(Duration::from_millis(600)));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(spent.check(&key("a")).is_ok(), "lapsed");
        spent.sweep();
        assert_eq!(spent.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn in_flight_permits_bound_and_free_on_drop() {
        let limits = LocalLimits::default();
        let spec = LimitSpec { max_in_flight: Some(2), ..LimitSpec::default() };
        let s = [scope("model", "model:m", spec)];
        let a = limits.acquire_in_flight(&s).unwrap();
        let _b = limits.acquire_in_flight(&s).unwrap();
        assert_eq!(limits.acquire_in_flight(&s).unwrap_err().limit, "model.max_in_flight");
        drop(a);
        assert!(limits.acquire_in_flight(&s).is_ok());
        limits.sweep();
    }
}
