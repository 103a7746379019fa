//! The pools as the request core's [`Upstream`]: route a call to its pool,
//! then batch it or send it with retries.

use std::sync::{Arc, PoisonError};

use futures::StreamExt;

use super::admission::{Active, Pool};
use super::attempts::{bounded, request, within};
use super::batched::{EmbedRpc, InferRpc, gather, send_batch};
use super::status::missing_result;
use super::worker::Worker;
use super::{Pools, retry};
use crate::call::Call;
use crate::error::GatewayError;
use crate::proto::{self, GenerateRequest, InferItem, InferOutputs, ModelEntry, ModelInfo, ModelKind};
use crate::upstream::{Batching, ChunkStream, EmbedOutput, PoolStatus, Upstream};

#[async_trait::async_trait]
impl Upstream for Pools {
    fn models(&self) -> Vec<ModelEntry> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let pools = self.all();
        let mut entries: Vec<ModelEntry> =
            table.models().map(|(p, info)| self.entry(&pools[p], info.clone())).collect();
        // A model whose workers never loaded it was never described: it is
        // listed by the name its class declares, with why.
        for pool in pools.iter().filter(|p| !p.is_retired()) {
            let Some(error) = self.loads.failed(&pool.name) else { continue };
            for model in self.loads.models(&pool.name) {
                if !entries.iter().any(|e| e.info.as_ref().is_some_and(|i| i.name == model)) {
                    let info = ModelInfo { name: model, ..Default::default() };
                    entries.push(ModelEntry {
                        info: Some(info),
                        pool: pool.name.clone(),
                        ready: false,
                        load_error: error.clone(),
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.info.as_ref().map(|i| &i.name).cmp(&b.info.as_ref().map(|i| &i.name)));
        entries
    }

    fn model(&self, name: &str) -> Result<ModelEntry, GatewayError> {
        let (pool, info) = self.route(name)?;
        Ok(self.entry(&pool, info))
    }

    fn model_in(&self, pool: &str, name: &str) -> Result<ModelEntry, GatewayError> {
        let (pool, info) = self.route_in(pool, name)?;
        Ok(self.entry(&pool, info))
    }

    fn status(&self) -> Vec<PoolStatus> {
        self.all()
            .iter()
            .filter(|p| !p.is_retired())
            .map(|p| {
                let workers = p.workers();
                PoolStatus {
                    pool: p.name.clone(),
                    ready_workers: workers.iter().filter(|w| w.is_serving()).count(),
                    workers: workers.len(),
                    load_error: self.loads.failed(&p.name),
                }
            })
            .collect()
    }

    fn room(&self, pool: &str, max_share: f64) -> Option<usize> {
        let pools = self.all();
        let pool = pools.iter().find(|p| p.name == pool && !p.is_retired())?;
        Some(pool.room(max_share))
    }

    fn batching(&self, pool: &str, info: &ModelInfo) -> Option<Batching> {
        let pools = self.all();
        let pool = pools.iter().find(|p| p.name == pool && !p.is_retired())?;
        Some(Batching {
            max_batch_size: Self::batch_size(pool, info)?,
            max_delay: pool.batching.max_delay,
            max_queue: pool.batching.max_queue,
        })
    }

    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        let (pool, info) = self.route_call(&call)?;
        let model = info.name.clone();
        counted(&pool, &model, self.embed_in(&pool, info, call).await)
    }

    async fn infer(&self, call: Call<InferItem>) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        let (pool, info) = self.route_call(&call)?;
        let model = info.name.clone();
        counted(&pool, &model, self.infer_in(&pool, info, call).await)
    }

    async fn generate(&self, call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
        let (pool, info) = self.route_call(&call)?;
        let model = info.name.clone();
        let stream = counted(&pool, &model, self.generate_in(&pool, info, call).await)?;
        // A stream that fails after it opened is the pool's failure too;
        // the call is in the pool until its stream ends.
        Ok(stream
            .inspect(move |chunk| {
                if let Err(e) = chunk {
                    pool_error(&pool.name, &model, e);
                }
            })
            .boxed())
    }
}

/// Count a failed pool call by pool, model and what failed.
fn counted<T>(pool: &Pool, model: &str, result: Result<T, GatewayError>) -> Result<T, GatewayError> {
    if let Err(e) = &result {
        pool_error(&pool.name, model, e);
    }
    result
}

fn pool_error(pool: &str, model: &str, e: &GatewayError) {
    metrics::counter!(
        crate::telemetry::metrics::POOL_ERRORS,
        "pool" => pool.to_owned(),
        "model" => model.to_owned(),
        "code" => e.slug()
    )
    .increment(1);
}

impl Pools {
    async fn embed_in(
        &self,
        pool: &Pool,
        info: ModelInfo,
        call: Call<Vec<String>>,
    ) -> Result<EmbedOutput, GatewayError> {
        require(&info, info.kind == ModelKind::Embed as i32, "embeddings")?;
        if let Some(batcher) = self.batcher::<EmbedRpc>(pool, &info) {
            // Each text is an item of whatever batch it lands in.
            let deadline = call.deadline;
            let results = gather(&batcher, call.payload, &deadline, &call.caller, &call.request_id).await?;
            return Ok(embeddings(info, results));
        }
        let deadline = call.deadline;
        let (results, _lease) = pool
            .with_retries(&deadline, &call.request_id, retry::Rerun::Pure, |worker| {
                // A model error fails the call and counts against the worker.
                let sent = send_batch::<EmbedRpc>(worker, &info.name, call.payload.clone(), deadline, &call.request_id);
                async move { sent.await?.into_iter().collect::<Result<Vec<_>, _>>() }
            })
            .await?;
        Ok(embeddings(info, results))
    }

    async fn infer_in(
        &self,
        pool: &Pool,
        info: ModelInfo,
        call: Call<InferItem>,
    ) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        require(&info, info.kind == ModelKind::Infer as i32, "tensor inference")?;
        if let Some(batcher) = self.batcher::<InferRpc>(pool, &info) {
            let deadline = call.deadline;
            let mut out = gather(&batcher, vec![call.payload], &deadline, &call.caller, &call.request_id).await?;
            let out = out.pop().ok_or_else(|| missing_result("-"))?;
            return Ok((info, out));
        }
        let deadline = call.deadline;
        let (mut out, _lease) = pool
            .with_retries(&deadline, &call.request_id, retry::Rerun::Pure, |worker| {
                let sent =
                    send_batch::<InferRpc>(worker, &info.name, vec![call.payload.clone()], deadline, &call.request_id);
                async move { sent.await?.into_iter().collect::<Result<Vec<_>, _>>() }
            })
            .await?;
        let out = out.pop().ok_or_else(|| missing_result("-"))?;
        Ok((info, out))
    }

    async fn generate_in(
        &self,
        pool: &Pool,
        info: ModelInfo,
        call: Call<GenerateRequest>,
    ) -> Result<ChunkStream, GatewayError> {
        require(&info, info.streaming, "generation")?;
        let deadline = call.deadline;
        // A route variant may serve the model under another name.
        let mut payload = call.payload;
        payload.model.clone_from(&call.model);
        // Only opening the stream is retried: nothing has reached the client
        // yet. Its outcome (time to headers) is what the worker is judged by.
        let (stream, guard) = pool
            .with_retries(&deadline, &call.request_id, retry::Rerun::Generation, |worker| {
                let req = request(payload.clone(), &deadline, &call.request_id);
                async move { bounded(&deadline, &worker, worker.client().generate(req)).await }
            })
            .await?;
        let worker = guard.worker().clone();
        // The guard lives as long as the stream: the worker stays busy until
        // the last chunk, and a dropped stream cancels the worker's call.
        let chunks = futures::stream::unfold(Some((stream, guard)), move |state| {
            let worker = worker.clone();
            async move {
                let (mut stream, guard) = state?;
                let next = within(&deadline, &worker, stream.message()).await;
                match next {
                    Ok(Some(chunk)) => {
                        let done = chunk.finish_reason != proto::FinishReason::Unspecified as i32;
                        if done {
                            // The worker's timings come in its trailers, after the last chunk.
                            tokio::spawn(async move {
                                if let Ok(Ok(Some(md))) = tokio::time::timeout_at(deadline.at, stream.trailers()).await
                                {
                                    worker.metrics.reported(&md);
                                }
                                drop(guard);
                            });
                            return Some((Ok(chunk), None));
                        }
                        Some((Ok(chunk), Some((stream, guard))))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            }
        });
        Ok(chunks.boxed())
    }
}

fn require(info: &ModelInfo, ok: bool, operation: &'static str) -> Result<(), GatewayError> {
    if ok { Ok(()) } else { Err(GatewayError::UnsupportedOperation { model: info.name.clone(), operation }) }
}

/// The vectors of a call's texts, in order, and their tokens in all.
fn embeddings(model: ModelInfo, results: Vec<super::Embedded>) -> EmbedOutput {
    let prompt_tokens = results.iter().fold(0u32, |sum, (_, tokens)| sum.saturating_add(*tokens));
    EmbedOutput { model, vectors: results.into_iter().map(|(vector, _)| vector).collect(), prompt_tokens }
}

impl Pools {
    /// What a worker of pool `pool` described.
    pub(super) fn register(&self, pool: usize, worker: &Worker, models: Vec<ModelInfo>) {
        self.table.write().unwrap_or_else(PoisonError::into_inner).register(pool, &worker.id, models);
    }

    /// The pool and model for a call: the named pool when the call carries
    /// one (a route variant), else the pool that first claimed the model.
    /// The call is in the pool until the returned guard drops.
    fn route_call<P>(&self, call: &Call<P>) -> Result<(Active, ModelInfo), GatewayError> {
        let (pool, info) = match &call.pool {
            Some(pool) => self.route_in(pool, &call.model)?,
            None => self.route(&call.model)?,
        };
        // Removed by a reload between the lookup and now.
        let active = pool.enter(call.class).ok_or_else(|| GatewayError::ModelNotFound { model: call.model.clone() })?;
        Ok((active, info))
    }

    fn route_in(&self, pool: &str, name: &str) -> Result<(Arc<Pool>, ModelInfo), GatewayError> {
        let routed = self.table.read().unwrap_or_else(PoisonError::into_inner).route_in(pool, name);
        self.unless_failed(name, routed)
    }

    pub(super) fn route(&self, name: &str) -> Result<(Arc<Pool>, ModelInfo), GatewayError> {
        let routed = self.table.read().unwrap_or_else(PoisonError::into_inner).route(name);
        self.unless_failed(name, routed)
    }

    fn entry(&self, pool: &Pool, info: ModelInfo) -> ModelEntry {
        let ready = pool.workers().iter().any(|w| w.is_serving());
        let load_error = self.loads.failed(&pool.name).unwrap_or_default();
        ModelEntry { info: Some(info), pool: pool.name.clone(), ready, load_error }
    }

    /// Whether every pool that has not described its models is failed.
    fn only_failed_undescribed(&self) -> bool {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let pools = self.all();
        table.undescribed().all(|p| pools[p].is_retired() || self.loads.failed(&pools[p].name).is_some())
    }

    /// A routed call's pool, unless its workers cannot load the model; a
    /// model no pool has described yet may be one a failed pool declares.
    fn unless_failed(
        &self,
        name: &str,
        routed: Result<(usize, ModelInfo), GatewayError>,
    ) -> Result<(Arc<Pool>, ModelInfo), GatewayError> {
        let failed = |pool: &str, error: String| GatewayError::ModelFailedToLoad {
            model: name.to_owned(),
            pool: pool.to_owned(),
            error,
        };
        match routed {
            Ok((p, info)) => {
                let pool = self.pool(p);
                match self.loads.failed(&pool.name) {
                    Some(error) => Err(failed(&pool.name, error)),
                    None => Ok((pool, info)),
                }
            }
            Err(e @ (GatewayError::Starting { .. } | GatewayError::ModelNotFound { .. })) => {
                match self.loads.failed_for_model(name) {
                    Some((pool, error)) => Err(failed(&pool, error)),
                    // A failed pool declared its names: it is not one that
                    // may yet serve this one.
                    None if matches!(e, GatewayError::Starting { .. }) && self.only_failed_undescribed() => {
                        Err(GatewayError::ModelNotFound { model: name.to_owned() })
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}
