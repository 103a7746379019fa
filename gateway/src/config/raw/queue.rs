//! `[queue]` as written.

use serde::{Deserialize, Serialize};

/// `[queue]`: queued inference on Redis Streams — `Prefer: respond-async`
/// requests and the OpenAI Batch API — shared by every replica that names
/// the same Redis; off while `redis_url` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQueue {
    /// `redis://host:port[/db]`; empty: no queue.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub redis_url: String,
    /// Prefix of every key the queue writes.
    pub prefix: String,
    /// Name of the streams (one per model named): `<prefix><stream>:<model>`.
    pub stream: String,
    /// Consumer group every replica reads in.
    pub group: String,
    /// This replica's consumer name; empty: host, pid and a random part.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub consumer: String,
    /// A Redis command slower than this counts as Redis being down.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub timeout: String,
    pub pool_size: u32,
    /// An entry pending this long on a consumer that stopped is taken over.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub claim_after: String,
    /// How long results, statuses and batches are kept.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub result_ttl: String,
    /// How long an uploaded file is kept.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub file_ttl: String,
    /// How long an async request may wait in the queue before it expires.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub async_expiry: String,
    /// Largest uploaded file, in bytes.
    pub max_file_bytes: u64,
    /// Most requests (lines) in one batch file.
    pub max_batch_requests: u32,
    /// Most entries one tenant may have waiting; a submit past it is a 429.
    pub max_queued_per_tenant: u64,
    /// Share of a pool's slots queued work may hold while interactive calls
    /// use the pool too (all of them while it has none).
    pub max_share: f64,
    /// Most queued requests one replica runs at once.
    pub max_running: u32,
}

impl Default for RawQueue {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            prefix: "infergate:queue:".into(),
            stream: "stream".into(),
            group: "infergate".into(),
            consumer: String::new(),
            timeout: "2s".into(),
            pool_size: 16,
            claim_after: "60s".into(),
            result_ttl: "24h".into(),
            file_ttl: "168h".into(),
            async_expiry: "1h".into(),
            max_file_bytes: 100 * 1024 * 1024,
            max_batch_requests: 50_000,
            max_queued_per_tenant: 100_000,
            max_share: 0.5,
            max_running: 256,
        }
    }
}
