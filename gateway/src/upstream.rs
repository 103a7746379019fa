//! The worker side as the request core sees it: the models known, the
//! pools' readiness, and the three kinds of call. It knows nothing of how
//! calls reach workers; the pools implement it.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

use crate::call::Call;
use crate::error::GatewayError;
use crate::proto::{GenerateChunk, GenerateRequest, InferItem, InferOutputs, ModelEntry, ModelInfo};

/// A stream of generated chunks; ends after the chunk with a finish reason
/// or with an error.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, GatewayError>> + Send>>;

/// Embeddings for a list of texts, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    pub model: ModelInfo,
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

/// Readiness of one pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub pool: String,
    pub ready_workers: usize,
    pub workers: usize,
    /// Why the pool cannot serve: its workers failed to load their model
    /// `workers.max_load_failures` times in a row (the last error's first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
}

/// How a pool batches a model's calls (what `/v2/models/{m}/config` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Items (requests) in one worker call at most.
    pub max_batch_size: usize,
    /// How long the oldest item waits for its batch to fill (`None`: learned).
    pub max_delay: Option<Duration>,
    /// Items waiting at most.
    pub max_queue: usize,
}

/// What the request core needs from the worker side. The real
/// implementation is the pools' (`pool::Pools`); tests use in-process fakes.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// Every model known, sorted by name.
    fn models(&self) -> Vec<ModelEntry>;
    /// Look up one model; `Starting` while pools have not described themselves.
    fn model(&self, name: &str) -> Result<ModelEntry, GatewayError> {
        let named = |e: &ModelEntry| e.info.as_ref().is_some_and(|i| i.name == name);
        self.models().into_iter().find(named).ok_or_else(|| GatewayError::ModelNotFound { model: name.to_owned() })
    }
    /// Look up a model as served by one pool (a route variant's target).
    fn model_in(&self, pool: &str, name: &str) -> Result<ModelEntry, GatewayError> {
        let entry = self.model(name)?;
        if entry.pool == pool { Ok(entry) } else { Err(GatewayError::ModelNotFound { model: name.to_owned() }) }
    }
    /// Readiness of every pool.
    fn status(&self) -> Vec<PoolStatus>;
    /// How many queued calls (`Class::Queued`) pool `pool` may hold at once
    /// now, those it holds included: at most `max_share` of its slots while
    /// interactive calls come; `None` for a pool it does not have.
    fn room(&self, pool: &str, max_share: f64) -> Option<usize> {
        let _ = (pool, max_share);
        None
    }
    /// How `pool` batches calls to the model `info` describes; `None` when
    /// they are sent one by one.
    fn batching(&self, _pool: &str, _info: &ModelInfo) -> Option<Batching> {
        None
    }
    // An upstream without a kind of call answers it as unsupported.
    /// Embed texts with an EMBED model.
    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        Err(GatewayError::UnsupportedOperation { model: call.model, operation: "embeddings" })
    }
    /// Run one tensor item through an INFER model.
    async fn infer(&self, call: Call<InferItem>) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        Err(GatewayError::UnsupportedOperation { model: call.model, operation: "tensor inference" })
    }
    /// Stream a generation from a streaming model.
    async fn generate(&self, call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
        Err(GatewayError::UnsupportedOperation { model: call.model, operation: "generation" })
    }
}
