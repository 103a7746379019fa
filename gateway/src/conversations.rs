//! Responses of `POST /v1/responses` kept for `previous_response_id` and
//! `GET /v1/responses/{id}`: each with the conversation that led to it, per
//! tenant (another tenant's id is not found), for `responses.ttl`. In memory
//! (bounded by `responses.max_bytes`, oldest out first), or in Redis when
//! `redis.url` is set, where every replica finds them and a restart loses
//! none. A conversation longer than `responses.max_conversation_bytes` is
//! not stored, and one read back from Redis is never larger.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::RedisConfig;
use crate::config::components::ResponsesConfig;

/// One turn of a conversation, as the worker is given it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// A stored response and the conversation up to and including its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The response object as `GET /v1/responses/{id}` answers it.
    pub response: serde_json::Value,
    /// Every turn a continuation starts from (instructions are not carried
    /// over, as OpenAI's are not).
    pub turns: Vec<Turn>,
}

/// The store could not be reached (Redis down or slow).
#[derive(Debug, thiserror::Error)]
#[error("the response store is unavailable: {0}")]
pub struct Unavailable(String);

/// Where stored responses live.
pub struct Conversations {
    config: ResponsesConfig,
    memory: moka::future::Cache<String, Arc<[u8]>>,
    shared: Option<Shared>,
}

struct Shared {
    pool: deadpool_redis::Pool,
    prefix: String,
    timeout: Duration,
}

impl Conversations {
    /// In memory, or in Redis when `redis` is given.
    pub fn new(
        config: ResponsesConfig,
        redis: Option<&RedisConfig>,
    ) -> Result<Self, crate::redis_pool::RedisSetupError> {
        let memory = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &String, v: &Arc<[u8]>| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
            .time_to_live(config.ttl)
            .build();
        let shared = match redis {
            Some(r) => Some(Shared {
                pool: crate::redis_pool::connect(r)?,
                prefix: format!("{}responses:", r.prefix),
                timeout: r.timeout,
            }),
            None => None,
        };
        Ok(Self { config, memory, shared })
    }

    /// A store in memory with the default bounds (tests, tools).
    pub fn in_memory() -> Arc<Self> {
        Arc::new(Self::new(ResponsesConfig::default(), None).unwrap_or_else(|_| unreachable!("no redis, no error")))
    }

    /// The key of `id` for `tenant`: ids are unguessable, and a tenant's
    /// own part of the key keeps another tenant from reading one it learnt.
    fn key(tenant: &str, id: &str) -> String {
        let tenant = Sha256::digest(tenant.as_bytes());
        format!("{}:{id}", hex::encode(&tenant[..12]))
    }

    /// `tenant`'s response `id`, if it is stored.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Stored>, Unavailable> {
        let key = Self::key(tenant, id);
        // Parsed where the bytes lie: the memory cache's are shared, not copied out.
        let parsed = match &self.shared {
            None => self.memory.get(&key).await.map(|b| serde_json::from_slice::<Stored>(&b)),
            Some(shared) => {
                shared.get(&key, self.config.max_conversation_bytes).await?.map(|b| serde_json::from_slice(&b))
            }
        };
        Ok(parsed.and_then(|p| {
            p.inspect_err(|e| tracing::warn!(id, error = %e, "a stored response does not read back; taken as missing"))
                .ok()
        }))
    }

    /// Keep `stored` as `tenant`'s response `id`; `false` when it is too
    /// large to keep.
    pub async fn put(&self, tenant: &str, id: &str, stored: &Stored) -> Result<bool, Unavailable> {
        let bytes = serde_json::to_vec(stored).map_err(|e| Unavailable(e.to_string()))?;
        if bytes.len() > self.config.max_conversation_bytes {
            tracing::warn!(
                id,
                bytes = bytes.len(),
                max = self.config.max_conversation_bytes,
                "conversation too long to store (responses.max_conversation_bytes)"
            );
            return Ok(false);
        }
        let key = Self::key(tenant, id);
        match &self.shared {
            None => self.memory.insert(key, bytes.into()).await,
            Some(shared) => shared.put(&key, &bytes, self.config.ttl).await?,
        }
        Ok(true)
    }

    /// Forget `tenant`'s response `id`; whether it was stored.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, Unavailable> {
        let key = Self::key(tenant, id);
        match &self.shared {
            None => Ok(self.memory.remove(&key).await.is_some()),
            Some(shared) => shared.delete(&key).await,
        }
    }
}

impl Shared {
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, deadpool_redis::redis::RedisError>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unavailable(format!("redis {what}: {e}"))),
            Err(_) => Err(Unavailable(format!("redis {what}: no answer within {:?}", self.timeout))),
        }
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, Unavailable> {
        self.pool.get().await.map_err(|e| Unavailable(format!("redis: {e}")))
    }

    /// The value at `key`, unless it is larger than `max` (then missing: a
    /// value is read only once its size is known).
    async fn get(&self, key: &str, max: usize) -> Result<Option<Vec<u8>>, Unavailable> {
        use deadpool_redis::redis::AsyncCommands;
        let key = format!("{}{key}", self.prefix);
        let mut conn = self.conn().await?;
        let len: usize = self.bounded("STRLEN", conn.strlen(&key)).await?;
        if len == 0 || len > max {
            if len > max {
                tracing::warn!(len, max, "a stored response in Redis is larger than allowed; taken as missing");
            }
            return Ok(None);
        }
        self.bounded("GET", conn.get(&key)).await
    }

    async fn put(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<(), Unavailable> {
        use deadpool_redis::redis::AsyncCommands;
        let key = format!("{}{key}", self.prefix);
        let mut conn = self.conn().await?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let opts =
            deadpool_redis::redis::SetOptions::default().with_expiration(deadpool_redis::redis::SetExpiry::PX(ms));
        self.bounded("SET", conn.set_options(&key, bytes, opts)).await
    }

    async fn delete(&self, key: &str) -> Result<bool, Unavailable> {
        use deadpool_redis::redis::AsyncCommands;
        let key = format!("{}{key}", self.prefix);
        let mut conn = self.conn().await?;
        let removed: u64 = self.bounded("DEL", conn.del(&key)).await?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(text: &str) -> Stored {
        Stored {
            response: serde_json::json!({"id": "resp_1", "output_text": text}),
            turns: vec![Turn { role: "user".into(), content: text.into() }],
        }
    }

    #[tokio::test]
    async fn a_tenant_reads_and_deletes_its_own_responses_only() {
        let store = Conversations::new(ResponsesConfig::default(), None).unwrap();
        assert!(store.put("t1", "resp_1", &stored("hi")).await.unwrap());
        assert_eq!(store.get("t1", "resp_1").await.unwrap(), Some(stored("hi")));
        assert_eq!(store.get("t2", "resp_1").await.unwrap(), None);
        assert!(!store.delete("t2", "resp_1").await.unwrap());
        assert!(store.delete("t1", "resp_1").await.unwrap());
        assert_eq!(store.get("t1", "resp_1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_conversation_over_the_bound_is_not_stored() {
        let config = ResponsesConfig { max_conversation_bytes: 200, ..ResponsesConfig::default() };
        let store = Conversations::new(config, None).unwrap();
        assert!(!store.put("t", "resp_big", &stored(&"x".repeat(300))).await.unwrap());
        assert_eq!(store.get("t", "resp_big").await.unwrap(), None);
    }
}
