//! `[cache]` and `[responses]` as written.

use serde::{Deserialize, Serialize};

/// `[cache]`: the exact response cache (memory; Redis too when `redis.url` is set).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    /// Memory for cached answers, in bytes.
    pub max_bytes: u64,
    /// How long an answer is kept (memory and Redis).
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub ttl: String,
    /// Largest answer stored in or read from Redis, in bytes (a value whose
    /// size says more is a miss, never an allocation).
    pub max_value_bytes: u64,
    pub semantic: RawSemantic,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            ttl: "10m".into(),
            max_value_bytes: 64 * 1024 * 1024,
            semantic: RawSemantic::default(),
        }
    }
}

/// `[cache.semantic]`: chat answers matched by meaning, for the named models.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSemantic {
    /// Models (as clients name them) whose answers are matched by meaning; none by default.
    pub models: Vec<String>,
    /// The embed model that embeds prompts.
    pub embedding_model: String,
    /// Cosine similarity from which a previous answer is returned.
    pub threshold: f32,
    /// Answers kept per (tenant, model).
    pub max_entries: u32,
}

impl Default for RawSemantic {
    fn default() -> Self {
        Self { models: Vec::new(), embedding_model: "minilm".into(), threshold: 0.95, max_entries: 1000 }
    }
}

/// `[responses]`: responses of `POST /v1/responses` kept for
/// `previous_response_id` and `GET /v1/responses/{id}` (memory; Redis
/// instead when `redis.url` is set, shared by every replica).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawResponses {
    /// How long a stored response is kept.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub ttl: String,
    /// Memory for stored responses, in bytes (the oldest go first).
    pub max_bytes: u64,
    /// Largest stored conversation (a response with every turn before it),
    /// in bytes; a longer one is not stored.
    pub max_conversation_bytes: u64,
}

impl Default for RawResponses {
    fn default() -> Self {
        Self { ttl: "24h".into(), max_bytes: 64 * 1024 * 1024, max_conversation_bytes: 1024 * 1024 }
    }
}
