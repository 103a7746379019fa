//! The one way the gateway connects to Redis: the shared limiter and the
//! response cache each hold a pool of connections to `redis.url`, sized by
//! `redis.pool_size`, every wait bounded by `redis.timeout`.

use std::time::Duration;

use deadpool_redis::{Pool, PoolConfig, Runtime};

use crate::config::RedisConfig;

/// `redis.url` could not make a pool (not a Redis URL).
#[derive(Debug, thiserror::Error)]
#[error("redis.url: {0}")]
pub struct RedisSetupError(#[from] deadpool_redis::CreatePoolError);

/// A lazily connecting pool for `config`.
pub fn connect(config: &RedisConfig) -> Result<Pool, RedisSetupError> {
    let mut cfg = deadpool_redis::Config::from_url(config.url.clone());
    let mut pool = PoolConfig::new(config.pool_size);
    pool.timeouts.wait = Some(config.timeout);
    pool.timeouts.create = Some(config.timeout.max(Duration::from_millis(200)));
    pool.timeouts.recycle = Some(config.timeout);
    cfg.pool = Some(pool);
    Ok(cfg.create_pool(Some(Runtime::Tokio1))?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{RedisConfig, RedisFallback};

    fn config(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            timeout: Duration::from_millis(50),
            fallback: RedisFallback::Local,
            pool_size: 2,
            prefix: "t:".into(),
        }
    }

    #[test]
    fn a_url_that_is_not_redis_stops_the_start_naming_the_key() {
        let Err(err) = super::connect(&config("http://127.0.0.1:6379")) else { panic!("not a redis url, yet a pool") };
        assert!(err.to_string().starts_with("redis.url: "), "{err}");
        assert!(super::connect(&config("redis://127.0.0.1:1/0")).is_ok(), "connecting is lazy");
    }
}
