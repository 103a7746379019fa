//! The exact response cache, with singleflight, in front of the pools.
//!
//! Deterministic calls (embeddings; tensor calls to pools not marked
//! `deterministic = false`) are answered from a cache keyed by tenant,
//! pool, model, version and the canonical input. Each text of an embeddings
//! request is its own entry: hits are answered at once and only the misses
//! go to the model (where the batcher packs them together). Identical
//! requests that arrive while the first is computing wait for its answer
//! instead of calling the model again (moka's entry initialisation runs
//! once per key).
//!
//! Memory (moka, bounded by bytes, TTL) always; Redis as a second level
//! shared by every replica when `redis.url` is set (TTL, values compressed
//! with LZ4). Redis trouble is a miss, never a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_redis::redis::AsyncCommands;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::call::Call;
pub use crate::config::components::{CacheConfig, PoolRules};
use crate::error::GatewayError;
use crate::proto::{InferItem, InferOutputs, ModelInfo};
use crate::upstream::{EmbedOutput, Upstream};
use stored::{Key, decompress};

/// What a request lets the cache do (`Cache-Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// `no-cache` turns this off: always ask the model.
    pub lookup: bool,
    /// `no-store` turns this off: keep nothing from this request.
    pub store: bool,
}

impl Default for CacheMode {
    fn default() -> Self {
        Self { lookup: true, store: true }
    }
}

impl CacheMode {
    /// From a `Cache-Control` header or metadata value.
    pub fn from_cache_control(value: Option<&str>) -> Self {
        let mut mode = Self::default();
        for directive in value.unwrap_or_default().split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-cache" => mode.lookup = false,
                "no-store" => mode.store = false,
                _ => {}
            }
        }
        mode
    }
}

/// How a request was answered, for `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Every part from the cache (or from an identical request in flight).
    Hit,
    /// Every part from the model.
    Miss,
    /// Some of each (embeddings with several inputs).
    Partial,
    /// A chat answered from an earlier, similar prompt's answer.
    SemanticHit,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Partial => "partial",
            Self::SemanticHit => "semantic-hit",
        }
    }

    fn of(hits: usize, total: usize) -> Self {
        match hits {
            0 => Self::Miss,
            h if h == total => Self::Hit,
            _ => Self::Partial,
        }
    }
}

/// A cached answer.
#[derive(Debug, Clone)]
enum Value {
    Embedding(Arc<(Vec<f32>, u32)>),
    Outputs(Arc<InferOutputs>),
}

impl Value {
    fn weight(&self) -> u32 {
        let bytes = match self {
            Self::Embedding(e) => e.0.len() * 4 + 64,
            Self::Outputs(o) => o.encoded_len() + 64,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// Tag byte, then LZ4 of the payload.
    fn encode(&self) -> Vec<u8> {
        let (tag, raw) = match self {
            Self::Embedding(e) => {
                let mut raw = Vec::with_capacity(4 + e.0.len() * 4);
                raw.extend_from_slice(&e.1.to_le_bytes());
                e.0.iter().for_each(|x| raw.extend_from_slice(&x.to_le_bytes()));
                (b'e', raw)
            }
            Self::Outputs(o) => (b'o', o.encode_to_vec()),
        };
        let mut out = vec![tag];
        out.extend(lz4_flex::compress_prepend_size(&raw));
        out
    }

    fn decode(bytes: &[u8], max: usize) -> Option<Self> {
        let (tag, rest) = bytes.split_first()?;
        let raw = decompress(rest, max)?;
        match tag {
            b'e' => {
                let (tokens, floats) = raw.split_first_chunk::<4>()?;
                if floats.len() % 4 != 0 {
                    return None;
                }
                let v = floats.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Some(Self::Embedding(Arc::new((v, u32::from_le_bytes(*tokens)))))
            }
            b'o' => InferOutputs::decode(raw.as_slice()).ok().map(|o| Self::Outputs(Arc::new(o))),
            _ => None,
        }
    }
}

/// The second level, shared through Redis.
struct Shared {
    pool: deadpool_redis::Pool,
    prefix: String,
    timeout: Duration,
    warned: AtomicBool,
    /// Largest value inflated or stored.
    max_value: usize,
}

impl Shared {
    fn key(&self, key: &Key) -> String {
        format!("{}:cache:{}", self.prefix, hex::encode(key))
    }

    async fn get(&self, key: &Key) -> Option<Value> {
        let k = self.key(key);
        let got = tokio::time::timeout(self.timeout, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            conn.get::<_, Option<Vec<u8>>>(k).await.map_err(|e| e.to_string())
        })
        .await;
        match got {
            Ok(Ok(None)) => None,
            Ok(Ok(Some(bytes))) => {
                let value = Value::decode(&bytes, self.max_value);
                if value.is_none() {
                    self.unreadable(bytes.len());
                }
                value
            }
            Ok(Err(e)) => self.trouble(&e),
            Err(_) => self.trouble("timed out"),
        }
    }

    async fn put(&self, key: &Key, value: &Value, ttl: Duration) {
        if usize::try_from(value.weight()).unwrap_or(usize::MAX) > self.max_value {
            return;
        }
        let (k, bytes) = (self.key(key), value.encode());
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let put = tokio::time::timeout(self.timeout, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            conn.pset_ex::<_, _, ()>(k, bytes, ms).await.map_err(|e| e.to_string())
        })
        .await;
        match put {
            Ok(Ok(())) => self.warned.store(false, Ordering::Relaxed),
            Ok(Err(e)) => {
                self.trouble(&e);
            }
            Err(_) => {
                self.trouble("timed out");
            }
        }
    }

    /// A value that cannot be read (corrupt, foreign, or inflating past
    /// `cache.max_value_bytes`): a miss, said in the log.
    fn unreadable(&self, bytes: usize) {
        tracing::warn!(
            bytes,
            max_value_bytes = self.max_value,
            "response cache: a value in redis cannot be read; a miss"
        );
    }

    /// Log once per outage; the caller treats it as a miss.
    fn trouble(&self, why: &str) -> Option<Value> {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = why, "response cache: redis unavailable; using memory only until it answers");
        }
        None
    }
}

/// The response cache: exact answers of embed, tensor and chat calls, and
/// chat answers by meaning.
pub struct ResponseCache {
    config: CacheConfig,
    memory: moka::future::Cache<Key, Value>,
    shared: Option<Shared>,
    /// Pools whose tensor calls must never be cached.
    nondeterministic: Vec<String>,
    chat: chat_store::ChatCache,
}

impl ResponseCache {
    pub fn new(
        config: CacheConfig,
        redis: Option<&crate::config::RedisConfig>,
        pools: PoolRules,
    ) -> Result<Self, crate::redis_pool::RedisSetupError> {
        let memory = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_k: &Key, v: &Value| v.weight())
            .time_to_live(config.ttl)
            .build();
        let shared = match redis {
            Some(r) if config.enabled => {
                let pool = crate::redis_pool::connect(r)?;
                Some(Shared {
                    pool,
                    prefix: r.prefix.clone(),
                    timeout: r.timeout,
                    warned: AtomicBool::new(false),
                    max_value: config.max_value_bytes,
                })
            }
            _ => None,
        };
        let chat = chat_store::ChatCache::new(
            config.max_bytes / 4,
            config.ttl,
            pools.deterministic,
            Some(config.semantic.clone()),
        );
        Ok(Self { config, memory, shared, nondeterministic: pools.nondeterministic, chat })
    }

    /// A cache that never answers (tests, and `cache.enabled = false`).
    pub fn disabled() -> Arc<Self> {
        let config = CacheConfig { enabled: false, ..CacheConfig::default() };
        Arc::new(Self::new(config, None, PoolRules::default()).unwrap_or_else(|_| unreachable!("no redis, no error")))
    }

    fn info<P>(up: &dyn Upstream, call: &Call<P>) -> Result<ModelInfo, GatewayError> {
        let entry = match &call.pool {
            Some(pool) => up.model_in(pool, &call.model)?,
            None => up.model(&call.model)?,
        };
        Ok(entry.info.unwrap_or_default())
    }

    fn pool_of<P>(up: &dyn Upstream, call: &Call<P>) -> Option<String> {
        match &call.pool {
            Some(p) => Some(p.to_string()),
            None => up.model(&call.model).ok().map(|e| e.pool),
        }
    }

    /// Key of one input: everything that changes the answer, and the tenant
    /// (answers are never shared across tenants).
    /// `input` feeds the input itself to the hash.
    fn key<P>(kind: &str, call: &Call<P>, pool: &str, info: &ModelInfo, input: impl FnOnce(&mut Sha256)) -> Key {
        let mut h = Sha256::new();
        for part in [kind.as_bytes(), call.caller.tenant.as_bytes(), pool.as_bytes(), info.name.as_bytes()] {
            h.update(part);
            h.update([0]);
        }
        h.update(info.version.as_bytes());
        h.update([0]);
        input(&mut h);
        h.finalize().into()
    }

    /// One input through the cache: memory, then Redis, then `compute`
    /// (once for all identical inputs in flight). Returns the value and
    /// whether it came without computing.
    async fn one<F>(&self, key: Key, mode: CacheMode, compute: F) -> Result<(Value, bool), GatewayError>
    where
        F: Future<Output = Result<Value, GatewayError>>,
    {
        if mode.lookup
            && let Some(v) = self.memory.get(&key).await
        {
            return Ok((v, true));
        }
        let from_redis = AtomicBool::new(false);
        let fetch = async {
            if mode.lookup
                && let Some(shared) = &self.shared
                && let Some(v) = shared.get(&key).await
            {
                from_redis.store(true, Ordering::Relaxed);
                return Ok(v);
            }
            let v = compute.await?;
            if mode.store
                && let Some(shared) = &self.shared
            {
                shared.put(&key, &v, self.config.ttl).await;
            }
            Ok(v)
        };
        if !(mode.lookup && mode.store) {
            let v = fetch.await?;
            if mode.store {
                self.memory.insert(key, v.clone()).await;
            }
            return Ok((v, from_redis.into_inner()));
        }
        let entry =
            self.memory.entry(key).or_try_insert_with(fetch).await.map_err(|e: Arc<GatewayError>| (*e).clone())?;
        let fresh = entry.is_fresh();
        if !fresh {
            metrics::counter!(crate::telemetry::metrics::COALESCED).increment(1);
        }
        Ok((entry.into_value(), !fresh || from_redis.into_inner()))
    }

    fn count(result: &'static str, n: usize) {
        metrics::counter!(crate::telemetry::metrics::CACHE_REQUESTS, "cache" => "exact", "result" => result)
            .increment(n as u64);
        crate::telemetry::window::cache_lookups(if result == "hit" { n } else { 0 }, n);
    }

    /// Embeddings through the cache, one entry per text.
    pub async fn embed(
        &self,
        up: &dyn Upstream,
        call: Call<Vec<String>>,
        mode: CacheMode,
    ) -> Result<(EmbedOutput, Option<CacheStatus>), GatewayError> {
        if !self.config.enabled || !(mode.lookup || mode.store) {
            return up.embed(call).await.map(|out| (out, None));
        }
        let info = Self::info(up, &call)?;
        let pool = Self::pool_of(up, &call).unwrap_or_default();
        let texts = call.payload.clone();
        let answers = futures::future::join_all(texts.iter().map(|text| {
            let key = Self::key("embed", &call, &pool, &info, |h| h.update(text.as_bytes()));
            let single = call.with_payload(vec![text.clone()]);
            self.one(key, mode, async move {
                let out = up.embed(single).await?;
                let vector = out.vectors.into_iter().next().ok_or_else(|| GatewayError::WorkerFailed {
                    worker: "-".into(),
                    detail: "no vector for the text".into(),
                })?;
                Ok(Value::Embedding(Arc::new((vector, out.prompt_tokens))))
            })
        }))
        .await;
        let mut vectors = Vec::with_capacity(texts.len());
        let (mut tokens, mut hits) = (0u32, 0usize);
        for answer in answers {
            let (value, hit) = answer?;
            let Value::Embedding(e) = value else {
                return Err(GatewayError::WorkerFailed { worker: "-".into(), detail: "cache kind mismatch".into() });
            };
            vectors.push(e.0.clone());
            tokens = tokens.saturating_add(e.1);
            hits += usize::from(hit);
        }
        Self::count("hit", hits);
        Self::count("miss", texts.len() - hits);
        let status = CacheStatus::of(hits, texts.len());
        Ok((EmbedOutput { model: info, vectors, prompt_tokens: tokens }, Some(status)))
    }

    /// A tensor call through the cache, unless its pool is not deterministic.
    pub async fn infer(
        &self,
        up: &dyn Upstream,
        call: Call<InferItem>,
        mode: CacheMode,
    ) -> Result<((ModelInfo, InferOutputs), Option<CacheStatus>), GatewayError> {
        let pool = Self::pool_of(up, &call).unwrap_or_default();
        if !self.config.enabled || !(mode.lookup || mode.store) || self.nondeterministic.contains(&pool) {
            return up.infer(call).await.map(|out| (out, None));
        }
        let info = Self::info(up, &call)?;
        let key = Self::key("infer", &call, &pool, &info, |h| canonical(&call.payload, h));
        let (value, hit) = self
            .one(key, mode, async move {
                let (_, outputs) = up.infer(call).await?;
                Ok(Value::Outputs(Arc::new(outputs)))
            })
            .await?;
        Self::count(if hit { "hit" } else { "miss" }, 1);
        let Value::Outputs(outputs) = value else {
            return Err(GatewayError::WorkerFailed { worker: "-".into(), detail: "cache kind mismatch".into() });
        };
        let status = if hit { CacheStatus::Hit } else { CacheStatus::Miss };
        Ok(((info, (*outputs).clone()), Some(status)))
    }
}

/// Feed `h` what identifies a tensor item's answer: inputs, requested
/// outputs and parameters in a fixed order (the caller's `id` is not part
/// of it). Tensor values are hashed as they lie, a slice at a time, never
/// copied into one buffer (a tensor may be most of a 10 MB body).
fn canonical(item: &InferItem, h: &mut Sha256) {
    for t in &item.inputs {
        tensor_digest(t, h);
    }
    h.update([0xff]);
    for o in &item.outputs {
        h.update(o.as_bytes());
        h.update([0]);
    }
    h.update([0xff]);
    let mut params: Vec<_> = item.parameters.iter().collect();
    params.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in params {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.encode_length_delimited_to_vec());
    }
}

/// One tensor into `h`: every field length-prefixed, numbers little-endian.
fn tensor_digest(t: &crate::proto::Tensor, h: &mut Sha256) {
    fn with_len(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    /// Numbers through a stack buffer, 4 KiB at a time.
    fn numbers<T: Copy, const N: usize>(h: &mut Sha256, values: &[T], le: fn(T) -> [u8; N]) {
        h.update((values.len() as u64).to_le_bytes());
        let mut buf = [0u8; 4096];
        for chunk in values.chunks(4096 / N) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * N..(i + 1) * N].copy_from_slice(&le(*v));
            }
            h.update(&buf[..chunk.len() * N]);
        }
    }
    with_len(h, t.name.as_bytes());
    with_len(h, t.datatype.as_bytes());
    numbers(h, &t.shape, i64::to_le_bytes);
    numbers(h, &t.bool_contents, |b| [u8::from(b)]);
    numbers(h, &t.int64_contents, i64::to_le_bytes);
    numbers(h, &t.uint64_contents, u64::to_le_bytes);
    numbers(h, &t.fp32_contents, f32::to_le_bytes);
    numbers(h, &t.fp64_contents, f64::to_le_bytes);
    h.update((t.bytes_contents.len() as u64).to_le_bytes());
    for b in &t.bytes_contents {
        with_len(h, b);
    }
}

pub mod chat;
mod chat_store;
mod stored;
#[cfg(test)]
mod tests;
