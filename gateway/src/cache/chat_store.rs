//! What the chat cache holds: exact answers by request hash, and per
//! (model, tenant, target) an index of answered prompts' vectors for the
//! semantic match; and how an entry is stored in Redis.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::stored::Key;
use crate::config::components::SemanticConfig;
use crate::proto::{GenerateChunk, GenerateRequest};

/// How a chat call was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ChatHit {
    Exact,
    /// With the similarity of the matched prompt.
    Semantic(f32),
}

/// Where a fresh answer is to be kept.
#[derive(Debug, Default)]
pub struct Keep {
    pub(super) exact: Option<Key>,
    pub(super) semantic: Option<(Key, Vec<f32>)>,
}

impl Keep {
    pub(super) fn is_empty(&self) -> bool {
        self.exact.is_none() && self.semantic.is_none()
    }
}

pub(super) struct Entry {
    pub(super) vector: Vec<f32>,
    pub(super) answer: Arc<GenerateChunk>,
    pub(super) at: Instant,
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) entries: VecDeque<Entry>,
    /// Hashes of the entries held, so a sync from Redis adds only new ones.
    pub(super) seen: HashSet<Key>,
    pub(super) synced: Option<Instant>,
}

/// How often an index re-reads its Redis mirror.
pub(super) const SYNC_EVERY: Duration = Duration::from_secs(2);

/// The chat part of the response cache.
pub struct ChatCache {
    pub(super) exact: moka::future::Cache<Key, Arc<GenerateChunk>>,
    /// Pools marked `deterministic = true`: every chat call is exact-cached.
    pub(super) deterministic: Vec<String>,
    pub(super) semantic: Option<SemanticConfig>,
    pub(super) index: RwLock<HashMap<Key, Index>>,
    pub(super) ttl: Duration,
}

impl ChatCache {
    pub fn new(max_bytes: u64, ttl: Duration, deterministic: Vec<String>, semantic: Option<SemanticConfig>) -> Self {
        let exact = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &Key, v: &Arc<GenerateChunk>| u32::try_from(v.encoded_len() + 64).unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .build();
        let semantic = semantic.filter(|s| !s.models.is_empty());
        Self { exact, deterministic, semantic, index: RwLock::default(), ttl }
    }
}

/// The conversation as the semantic cache compares it: roles and contents,
/// lower-cased, whitespace collapsed.
pub(super) fn normalise(req: &GenerateRequest) -> String {
    req.messages
        .iter()
        .map(|m| format!("{}: {}", m.role, m.content.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

pub(super) fn hash(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    h.finalize().into()
}

/// Entry bytes for Redis: LZ4 of (dimension, vector, answer).
pub(super) fn encode_entry(vector: &[f32], answer: &GenerateChunk) -> Vec<u8> {
    let mut raw = Vec::with_capacity(4 + vector.len() * 4 + answer.encoded_len());
    raw.extend_from_slice(&u32::try_from(vector.len()).unwrap_or(0).to_le_bytes());
    vector.iter().for_each(|x| raw.extend_from_slice(&x.to_le_bytes()));
    raw.extend(answer.encode_to_vec());
    lz4_flex::compress_prepend_size(&raw)
}

pub(super) fn decode_entry(bytes: &[u8], max: usize) -> Option<(Vec<f32>, GenerateChunk)> {
    let raw = super::stored::decompress(bytes, max)?;
    let (dim, rest) = raw.split_first_chunk::<4>()?;
    let dim = u32::from_le_bytes(*dim) as usize;
    let floats = rest.get(..dim * 4)?;
    let vector = floats.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let answer = GenerateChunk::decode(rest.get(dim * 4..)?).ok()?;
    Some((vector, answer))
}
