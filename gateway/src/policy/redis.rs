//! Request and token limits shared by every gateway replica through Redis:
//! one Lua script per decision (all scopes admit or none is charged), the
//! Redis server's clock, keys that expire when their limit is full again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_redis::Pool;
use deadpool_redis::redis::{self, Script};
use tokio::time::Instant;

use super::limits::{Gcra, Refusal, Scope};
use crate::config::{RedisConfig, RedisFallback};
use crate::redis_pool::RedisSetupError;

/// Checks every (key, interval µs, capacity, cost) triple; charges all or none.
/// Returns `{1}` when admitted, else `{0, index, retry_after_us (-1: never), remaining}`.
const DECIDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local cap = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local remaining = cap - math.ceil((tat - now) / interval)
  if remaining < 0 then remaining = 0 end
  if cost > cap then return {0, i, -1, remaining} end
  local next_tat = tat + cost * interval
  local ahead = next_tat - now
  local window = cap * interval
  if ahead > window then return {0, i, ahead - window, remaining} end
  new[i] = next_tat
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1000)
end
return {1}
";

/// Moves each key's TAT back by `refund * interval` µs (forward when negative),
/// never before now. ARGV: (interval µs, refund) per key.
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local refund = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  tat = tat - refund * interval
  if tat > now then
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
";

/// After a failure, Redis is not asked again for this long (every request
/// would otherwise wait out the timeout while Redis is down).
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// What a shared decision came to.
pub enum Decision {
    Admitted,
    Refused(Refusal),
}

/// One check for the script: a state key and its cell rate.
pub struct Check {
    pub scope_index: usize,
    pub limit: &'static str,
    pub key: String,
    pub gcra_interval_us: u64,
    pub capacity: u64,
    pub cost: u64,
}

/// The shared limiter.
pub struct RedisLimits {
    pool: Pool,
    decide: Script,
    adjust: Script,
    pub timeout: Duration,
    pub fallback: RedisFallback,
    prefix: String,
    /// Last known state, to log once per transition.
    up: AtomicBool,
    down_until: Mutex<Option<Instant>>,
}

impl RedisLimits {
    pub fn new(config: &RedisConfig) -> Result<Self, RedisSetupError> {
        let pool = crate::redis_pool::connect(config)?;
        Ok(Self {
            pool,
            decide: Script::new(DECIDE),
            adjust: Script::new(ADJUST),
            timeout: config.timeout,
            fallback: config.fallback,
            prefix: config.prefix.clone(),
            up: AtomicBool::new(true),
            down_until: Mutex::new(None),
        })
    }

    /// The state key of a limit in Redis.
    pub fn key(&self, kind: &str, scope_key: &str) -> String {
        format!("{}:{kind}:{scope_key}", self.prefix)
    }

    /// Whether Redis may be asked now (not within the pause after a failure).
    pub fn available(&self) -> bool {
        self.down_until.lock().map(|d| d.is_none_or(|t| Instant::now() >= t)).unwrap_or(true)
    }

    /// Ask Redis, bounded by the timeout. `Err` means: use the fallback.
    pub async fn decide(&self, checks: &[Check], scopes: &[Scope]) -> Result<Decision, String> {
        let keys: Vec<&str> = checks.iter().map(|c| c.key.as_str()).collect();
        let mut invocation = self.decide.prepare_invoke();
        for key in &keys {
            invocation.key(*key);
        }
        for c in checks {
            invocation.arg(c.gcra_interval_us).arg(c.capacity).arg(c.cost);
        }
        let reply: Vec<i64> = self.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        match reply.as_slice() {
            [1] => Ok(Decision::Admitted),
            [0, index, retry_us, remaining] => {
                let check = usize::try_from(*index - 1).ok().and_then(|i| checks.get(i)).ok_or("bad script reply")?;
                let scope = &scopes[check.scope_index];
                Ok(Decision::Refused(Refusal {
                    limit: format!("{}.{}", scope.kind, check.limit),
                    quota: check.capacity,
                    remaining: u64::try_from(*remaining).unwrap_or(0),
                    retry_after: u64::try_from(*retry_us).ok().map(Duration::from_micros),
                }))
            }
            other => Err(format!("unexpected script reply {other:?}")),
        }
    }

    /// Settle token reservations (positive refunds, negative charges).
    pub async fn adjust(&self, keys: &[(String, Gcra)], refund: i64) -> Result<(), String> {
        let mut invocation = self.adjust.prepare_invoke();
        for (key, _) in keys {
            invocation.key(key.as_str());
        }
        for (_, gcra) in keys {
            invocation.arg(interval_us(gcra)).arg(refund);
        }
        let _: i64 = self.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        Ok(())
    }

    async fn run<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.pool.get().await.map_err(|e| e.to_string())?;
            f(conn).await.map_err(|e| e.to_string())
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis answers again: limits are shared across replicas");
                }
            }
            Err(e) => {
                if let Ok(mut d) = self.down_until.lock() {
                    *d = Some(Instant::now() + RETRY_AFTER_FAILURE);
                }
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, fallback = ?self.fallback, "redis unavailable: limits fall back");
                }
            }
        }
        result
    }
}

pub fn interval_us(gcra: &Gcra) -> u64 {
    u64::try_from(gcra.interval.as_micros()).unwrap_or(u64::MAX).max(1)
}
