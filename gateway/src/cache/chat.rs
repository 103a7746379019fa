//! Chat answers from the cache.
//!
//! - Exact: a call with `temperature` 0, or to a pool marked
//!   `deterministic = true`, is keyed by tenant, target pool and model,
//!   version and the canonical request (messages and sampling settings).
//! - Semantic (off by default, on per model): the normalised conversation is
//!   embedded with the configured embedding model (through the exact cache,
//!   so a repeated prompt is embedded once) and compared by cosine with the
//!   previous prompts of the same model, target and tenant — never another
//!   tenant's. A previous answer whose prompt is at least `threshold` similar
//!   is returned. Entries are mirrored in Redis (when `redis.url` is set) so
//!   replicas learn each other's answers.
//!
//! Only answers that finished normally are kept; an answer is replayed as a
//! normal stream (or a whole completion).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use deadpool_redis::redis::AsyncCommands;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::time::Instant;

pub use super::chat_store::{ChatHit, Keep};
use super::chat_store::{Entry, SYNC_EVERY, decode_entry, encode_entry, hash, normalise, unit};
use super::stored::Key;
use super::{CacheMode, ResponseCache};
use crate::call::Call;
pub use crate::config::components::SemanticConfig;
use crate::error::GatewayError;
use crate::proto::{FinishReason, GenerateChunk, GenerateRequest};
use crate::route::Target;
use crate::upstream::{ChunkStream, Upstream};

/// The whole answer as the two chunks a stream would have carried.
pub fn replay(answer: &GenerateChunk) -> ChunkStream {
    let body = GenerateChunk {
        text: answer.text.clone(),
        finish_reason: FinishReason::Unspecified as i32,
        usage: answer.usage,
        sources: answer.sources.clone(),
    };
    let last = GenerateChunk {
        text: String::new(),
        finish_reason: answer.finish_reason,
        usage: answer.usage,
        sources: Vec::new(),
    };
    futures::stream::iter([Ok(body), Ok(last)]).boxed()
}

impl ResponseCache {
    /// Look a chat call up. `model` is the name the client asked for;
    /// `target` the variant the route chose. Returns a hit, or where to keep
    /// the answer if one comes back.
    pub async fn chat_lookup(
        &self,
        up: &dyn Upstream,
        call: &Call<GenerateRequest>,
        model: &str,
        target: &Target,
        mode: CacheMode,
    ) -> Result<(Arc<GenerateChunk>, ChatHit), Keep> {
        let mut keep = Keep::default();
        if !self.config.enabled || !(mode.lookup || mode.store) {
            return Err(keep);
        }
        let chat = &self.chat;
        let entry = match &target.pool {
            Some(pool) => up.model_in(pool, &target.model),
            None => up.model(&target.model),
        };
        let Ok(entry) = entry else { return Err(keep) };
        let version = entry.info.map(|i| i.version).unwrap_or_default();
        let tenant = call.caller.tenant.as_bytes();
        let target_id = [entry.pool.as_bytes(), target.model.as_bytes(), version.as_bytes()];
        let params = call.payload.params.clone().unwrap_or_default();
        let greedy = params.has_temperature && params.temperature == 0.0;
        if greedy || chat.deterministic.contains(&entry.pool) {
            let mut canonical = call.payload.clone();
            canonical.user.clear();
            canonical.model.clear();
            let key = hash(&[b"chat", tenant, target_id[0], target_id[1], target_id[2], &canonical.encode_to_vec()]);
            if mode.lookup
                && let Some(answer) = chat.exact.get(&key).await
            {
                count("exact", "hit");
                return Ok((answer, ChatHit::Exact));
            }
            count("exact", "miss");
            if mode.store {
                keep.exact = Some(key);
            }
        }
        let Some(semantic) = chat.semantic.as_ref().filter(|s| s.models.iter().any(|m| m == model)) else {
            return Err(keep);
        };
        let mut prompt = call.with_payload(vec![normalise(&call.payload)]);
        prompt.model.clone_from(&semantic.embedding_model);
        prompt.pool = None;
        let vector = match self.embed(up, prompt, CacheMode::default()).await {
            Ok((out, _)) => unit(out.vectors.into_iter().next().unwrap_or_default()),
            Err(e) => {
                tracing::debug!(error = %e, "semantic cache skipped: the prompt could not be embedded");
                return Err(keep);
            }
        };
        let index = hash(&[b"semantic", model.as_bytes(), tenant, target_id[0], target_id[1], target_id[2]]);
        if mode.lookup {
            self.sync(&index).await;
            if let Some((answer, score)) = self.closest(&index, &vector)
                && score >= semantic.threshold
            {
                count("semantic", "hit");
                return Ok((answer, ChatHit::Semantic(score)));
            }
            count("semantic", "miss");
        }
        if mode.store {
            keep.semantic = Some((index, vector));
        }
        Err(keep)
    }

    /// The closest live entry of an index and its cosine similarity.
    fn closest(&self, index: &Key, vector: &[f32]) -> Option<(Arc<GenerateChunk>, f32)> {
        let map = self.chat.index.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.get(index)?
            .entries
            .iter()
            .filter(|e| now.duration_since(e.at) < self.chat.ttl && e.vector.len() == vector.len())
            .map(|e| (e.answer.clone(), e.vector.iter().zip(vector).map(|(a, b)| a * b).sum::<f32>()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    fn add(&self, index: Key, vector: Vec<f32>, answer: Arc<GenerateChunk>, id: Key) {
        let max = self.chat.semantic.as_ref().map_or(1000, |s| s.max_entries).max(1);
        let mut map = self.chat.index.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let idx = map.entry(index).or_default();
        if !idx.seen.insert(id) {
            return;
        }
        idx.entries.push_back(Entry { vector, answer, at: Instant::now() });
        while idx.entries.len() > max {
            idx.entries.pop_front();
        }
    }

    /// Learn the entries other replicas put in Redis (at most every 2 s).
    async fn sync(&self, index: &Key) {
        let Some(shared) = &self.shared else { return };
        {
            let mut map = self.chat.index.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            let idx = map.entry(*index).or_default();
            if idx.synced.is_some_and(|t| t.elapsed() < SYNC_EVERY) {
                return;
            }
            idx.synced = Some(Instant::now());
        }
        let key = format!("{}:semantic:{}", shared.prefix, hex::encode(index));
        let fetched = tokio::time::timeout(shared.timeout, async {
            let mut conn = shared.pool.get().await.map_err(|e| e.to_string())?;
            conn.lrange::<_, Vec<Vec<u8>>>(key, 0, -1).await.map_err(|e| e.to_string())
        })
        .await;
        let entries = match fetched {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => {
                shared.trouble(&e);
                return;
            }
            Err(_) => {
                shared.trouble("timed out");
                return;
            }
        };
        for bytes in entries {
            match decode_entry(&bytes, shared.max_value) {
                Some((vector, answer)) => self.add(*index, vector, Arc::new(answer), hash(&[&bytes])),
                None => shared.unreadable(bytes.len()),
            }
        }
    }

    /// Keep a fresh answer where `keep` says: in this replica before it
    /// returns, in Redis (the semantic index, for the other replicas) on a
    /// task of its own.
    pub async fn chat_keep(self: &Arc<Self>, keep: Keep, answer: GenerateChunk) {
        let answer = Arc::new(answer);
        if let Some(key) = keep.exact {
            self.chat.exact.insert(key, answer.clone()).await;
        }
        if let Some((index, vector)) = keep.semantic {
            let bytes = encode_entry(&vector, &answer);
            self.add(index, vector, answer, hash(&[&bytes]));
            if self.shared.is_none() {
                return;
            }
            let this = self.clone();
            tokio::spawn(async move { this.share_semantic(index, bytes).await });
        }
    }

    /// Add an entry to a semantic index's Redis list.
    async fn share_semantic(&self, index: Key, bytes: Vec<u8>) {
        {
            if let Some(shared) = &self.shared {
                let key = format!("{}:semantic:{}", shared.prefix, hex::encode(index));
                let max = self.chat.semantic.as_ref().map_or(1000, |s| s.max_entries).max(1);
                let ttl_ms = i64::try_from(self.chat.ttl.as_millis()).unwrap_or(i64::MAX);
                let put = tokio::time::timeout(shared.timeout, async {
                    let mut conn = shared.pool.get().await.map_err(|e| e.to_string())?;
                    deadpool_redis::redis::pipe()
                        .rpush(&key, bytes)
                        .ltrim(&key, -isize::try_from(max).unwrap_or(isize::MAX), -1)
                        .pexpire(&key, ttl_ms)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await;
                match put {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => drop(shared.trouble(&e)),
                    Err(_) => drop(shared.trouble("timed out")),
                }
            }
        }
    }

    /// Wrap a fresh stream so that, if it finishes normally, its whole
    /// answer is kept as `keep` says.
    pub fn recording(self: &Arc<Self>, stream: ChunkStream, keep: Keep) -> ChunkStream {
        if keep.is_empty() || !self.config.enabled {
            return stream;
        }
        Box::pin(Recorder {
            inner: stream,
            cache: self.clone(),
            keep: Some(keep),
            answer: GenerateChunk::default(),
            keeping: None,
        })
    }
}

fn count(cache: &'static str, result: &'static str) {
    metrics::counter!(crate::telemetry::metrics::CACHE_REQUESTS, "cache" => cache, "result" => result).increment(1);
    crate::telemetry::window::cache_lookups(usize::from(result == "hit"), 1);
}

/// Passes a stream through, collecting the answer; keeps it at the finish,
/// before the finishing chunk is passed on: a caller who has its answer and
/// asks again is answered from the cache.
struct Recorder {
    inner: ChunkStream,
    cache: Arc<ResponseCache>,
    keep: Option<Keep>,
    answer: GenerateChunk,
    /// The finishing chunk, held while the answer is kept.
    keeping: Option<(futures::future::BoxFuture<'static, ()>, GenerateChunk)>,
}

impl Stream for Recorder {
    type Item = Result<GenerateChunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some((keeping, _)) = self.keeping.as_mut() {
            std::task::ready!(keeping.as_mut().poll(cx));
            return Poll::Ready(self.keeping.take().map(|(_, chunk)| Ok(chunk)));
        }
        let next = std::task::ready!(self.inner.poll_next_unpin(cx));
        let Some(Ok(chunk)) = next else { return Poll::Ready(next) };
        let answer = &mut self.answer;
        answer.text.push_str(&chunk.text);
        answer.sources.extend(chunk.sources.iter().cloned());
        answer.usage = chunk.usage.or(answer.usage);
        if chunk.finish_reason == FinishReason::Unspecified as i32 {
            return Poll::Ready(Some(Ok(chunk)));
        }
        answer.finish_reason = chunk.finish_reason;
        let answer = std::mem::take(&mut self.answer);
        let Some(keep) = self.keep.take() else { return Poll::Ready(Some(Ok(chunk))) };
        let cache = self.cache.clone();
        self.keeping = Some((Box::pin(async move { cache.chat_keep(keep, answer).await }), chunk));
        self.poll_next(cx)
    }
}
