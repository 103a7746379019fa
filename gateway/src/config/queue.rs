//! `[queue]`, checked.

use std::time::Duration;

use super::check::{ConfigError, duration, invalid, positive_size};
use super::policy::{RedisConfig, RedisFallback};
use super::raw::RawQueue;

/// The queue's settings (see [`RawQueue`] for each).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub redis_url: String,
    pub prefix: String,
    pub stream: String,
    pub group: String,
    /// This replica's consumer name (made up when not configured).
    pub consumer: String,
    pub timeout: Duration,
    pub pool_size: usize,
    pub claim_after: Duration,
    pub result_ttl: Duration,
    pub file_ttl: Duration,
    pub async_expiry: Duration,
    pub max_file_bytes: usize,
    pub max_batch_requests: usize,
    pub max_queued_per_tenant: u64,
    pub max_share: f64,
    pub max_running: usize,
}

impl QueueConfig {
    /// `None` while `redis_url` is empty (no queue).
    pub fn from_raw(raw: &RawQueue) -> Result<Option<Self>, ConfigError> {
        let config = Self {
            redis_url: raw.redis_url.clone(),
            prefix: raw.prefix.clone(),
            stream: nonempty("queue.stream", &raw.stream)?,
            group: nonempty("queue.group", &raw.group)?,
            consumer: if raw.consumer.is_empty() { made_up_consumer() } else { raw.consumer.clone() },
            timeout: duration("queue.timeout", &raw.timeout)?,
            pool_size: positive_size("queue.pool_size", raw.pool_size.into())?,
            claim_after: duration("queue.claim_after", &raw.claim_after)?,
            result_ttl: duration("queue.result_ttl", &raw.result_ttl)?,
            file_ttl: duration("queue.file_ttl", &raw.file_ttl)?,
            async_expiry: duration("queue.async_expiry", &raw.async_expiry)?,
            max_file_bytes: positive_size("queue.max_file_bytes", raw.max_file_bytes)?,
            max_batch_requests: positive_size("queue.max_batch_requests", raw.max_batch_requests.into())?,
            max_queued_per_tenant: positive_size("queue.max_queued_per_tenant", raw.max_queued_per_tenant)? as u64,
            max_share: raw.max_share,
            max_running: positive_size("queue.max_running", raw.max_running.into())?,
        };
        if !(config.max_share > 0.0 && config.max_share <= 1.0) {
            return Err(invalid("queue.max_share", "must be a share of slots above 0 and at most 1"));
        }
        // Files are read whole into Redis strings, which stop at 512 MiB.
        if config.max_file_bytes > 512 * 1024 * 1024 {
            return Err(invalid("queue.max_file_bytes", "must be at most 512 MiB (a Redis string)"));
        }
        if raw.redis_url.is_empty() {
            return Ok(None);
        }
        if !(raw.redis_url.starts_with("redis://") || raw.redis_url.starts_with("unix://")) {
            return Err(invalid("queue.redis_url", "expected redis://host:port[/db] or unix:///path"));
        }
        Ok(Some(config))
    }

    /// The settings [`crate::redis_pool::connect`] takes.
    pub fn redis(&self) -> RedisConfig {
        RedisConfig {
            url: self.redis_url.clone(),
            timeout: self.timeout,
            fallback: RedisFallback::Deny,
            pool_size: self.pool_size,
            prefix: self.prefix.clone(),
        }
    }
}

fn nonempty(key: &str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(value.to_owned())
}

/// `host-pid-random`: unique per process, and readable in `XINFO CONSUMERS`.
fn made_up_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}-{:08x}", if host.is_empty() { "gateway" } else { host }, std::process::id(), fastrand::u32(..))
}
