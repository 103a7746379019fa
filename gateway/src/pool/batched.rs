//! Batched worker calls: how items become one worker request and its
//! answer one result per item, the batchers of each (pool, model), and
//! their dispatch with the pool's retries.

use std::marker::PhantomData;
use std::sync::{Arc, PoisonError, Weak};

use tonic::transport::Channel;

use super::admission::Pool;
use super::attempts::{bounded, request};
use super::circuit::Outcome;
use super::status::{from_item_error, missing_result};
use super::worker::Worker;
use super::{Batchers, Embedded, Pools, retry};
use crate::batch::{self, BatchResult, Batcher, Dispatch};
use crate::call::Deadline;
use crate::error::GatewayError;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{
    self, EmbedBatchRequest, EmbedBatchResponse, InferBatchRequest, InferBatchResponse, InferItem, InferOutputs,
    ItemError, ModelInfo, embed_result, infer_result, item_error,
};

impl Pools {
    /// The batch size for a model of `pool`, when calls to it are batched.
    pub(super) fn batch_size(pool: &Pool, info: &ModelInfo) -> Option<usize> {
        let max = pool.batching.max_batch_size.unwrap_or(info.max_batch_size as usize);
        (pool.batching.enabled && max > 1).then_some(max)
    }

    /// The batcher of (pool, model) for the batched call `R`, started on
    /// first use.
    pub(super) fn batcher<R: BatchRpc>(
        &self,
        pool: &Pool,
        info: &ModelInfo,
    ) -> Option<Arc<Batcher<R::Item, R::Output>>> {
        let max = Self::batch_size(pool, info)?;
        let key = (pool.index, info.name.clone());
        let mut map = R::batchers(self).lock().unwrap_or_else(PoisonError::into_inner);
        let batcher = map.entry(key.clone()).or_insert_with(|| {
            let dispatch = Dispatcher::<R> { pools: self.me.clone(), pool: key.0, model: key.1, rpc: PhantomData };
            let slots = pool.workers().len() * pool.batching.concurrency_per_worker;
            let bound = batch::Bound {
                items: max,
                bytes: batch_bytes(pool.max_message),
                alone: crate::bulk::BYTES,
                weigh: R::weigh,
            };
            Arc::new(Batcher::start(&pool.name, &info.name, &pool.batching, bound, slots, dispatch))
        });
        Some(batcher.clone())
    }
}

/// A field tag and length prefix per item in a batch message, rounded up.
const ITEM_OVERHEAD: usize = 16;

/// The bytes of items a batch may carry in a worker message of `max_message`
/// bytes: the rest is for the envelope, and for an answer a little larger
/// than its request (an echo of the inputs with their output names).
fn batch_bytes(max_message: usize) -> usize {
    max_message - max_message / 64
}

/// Submit `items` to `batcher` and wait for all of them; the first failed
/// item fails the call (the others' answers are dropped).
pub(super) async fn gather<I: Send + 'static, O: Send + 'static>(
    batcher: &Batcher<I, O>,
    items: Vec<I>,
    deadline: &Deadline,
    caller: &crate::call::Caller,
    rid: &str,
) -> Result<Vec<O>, GatewayError> {
    let key = batch::caller_key(&caller.tenant, caller.client);
    let pending = items
        .into_iter()
        .map(|i| batcher.submit(i, *deadline, &caller.tier, key, rid))
        .collect::<Result<Vec<_>, _>>()?;
    futures::future::join_all(pending.into_iter().map(|rx| batch::wait(rx, deadline))).await.into_iter().collect()
}

/// What a batch call says about its worker: a failure when the model failed
/// every item (it answered, but nothing it answered was usable), else what
/// the call itself says.
pub(super) fn batch_outcome<O>(result: &Result<Vec<Result<O, GatewayError>>, GatewayError>) -> Outcome {
    match result {
        Ok(items) if !items.is_empty() && items.iter().all(|i| matches!(i, Err(GatewayError::WorkerFailed { .. }))) => {
            Outcome::Failure
        }
        other => Outcome::of(other),
    }
}

/// A batched worker call: how a batch of items becomes one request and the
/// worker's answer becomes one result per item. Batchers, their dispatch and
/// the unbatched path share everything else.
pub(super) trait BatchRpc: Send + Sync + 'static {
    type Item: Clone + Send + Sync + 'static;
    type Output: Send + 'static;
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// The batchers of this call in `pools`.
    fn batchers(pools: &Pools) -> &Batchers<Self::Item, Self::Output>;

    /// The bytes an item takes in the batch's request message.
    fn weigh(item: &Self::Item) -> usize;

    /// The request for `items`, in the form `worker` reads.
    fn request(model: String, items: Vec<Self::Item>, worker: &Worker) -> Self::Request;

    fn call(
        client: WorkerClient<Channel>,
        req: tonic::Request<Self::Request>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send;

    /// The answer per item, in order: its output, the model's error for it,
    /// or `None` where the worker left the result out.
    fn results(resp: Self::Response) -> Vec<Option<Result<Self::Output, ItemError>>>;
}

/// `Worker.Embed`: texts in, one vector and token count per text.
pub(super) struct EmbedRpc;

impl BatchRpc for EmbedRpc {
    type Item = String;
    type Output = Embedded;
    type Request = EmbedBatchRequest;
    type Response = EmbedBatchResponse;

    fn batchers(pools: &Pools) -> &Batchers<String, Embedded> {
        &pools.embed_batchers
    }

    fn weigh(text: &String) -> usize {
        text.len() + ITEM_OVERHEAD
    }

    fn request(model: String, texts: Vec<String>, _: &Worker) -> EmbedBatchRequest {
        EmbedBatchRequest { model, texts }
    }

    async fn call(
        mut client: WorkerClient<Channel>,
        req: tonic::Request<EmbedBatchRequest>,
    ) -> Result<tonic::Response<EmbedBatchResponse>, tonic::Status> {
        client.embed(req).await
    }

    fn results(resp: EmbedBatchResponse) -> Vec<Option<Result<Embedded, ItemError>>> {
        let result = |r: proto::EmbedResult| match r.result? {
            embed_result::Result::Embedding(e) => Some(Ok((e.values, r.tokens))),
            embed_result::Result::Error(err) => Some(Err(err)),
        };
        resp.results.into_iter().map(result).collect()
    }
}

/// `Worker.Infer`: named tensors in, named tensors out, per item.
pub(super) struct InferRpc;

impl BatchRpc for InferRpc {
    type Item = InferItem;
    type Output = InferOutputs;
    type Request = InferBatchRequest;
    type Response = InferBatchResponse;

    fn batchers(pools: &Pools) -> &Batchers<InferItem, InferOutputs> {
        &pools.infer_batchers
    }

    fn weigh(item: &InferItem) -> usize {
        prost::Message::encoded_len(item) + ITEM_OVERHEAD
    }

    /// Numeric tensors go raw to a worker that reads raw: one copy on each
    /// side instead of a Python object per value in the worker.
    fn request(model: String, mut items: Vec<InferItem>, worker: &Worker) -> InferBatchRequest {
        if worker.reads_raw() {
            items.iter_mut().flat_map(|i| &mut i.inputs).for_each(crate::tensor::into_raw);
        }
        InferBatchRequest { model, items }
    }

    async fn call(
        mut client: WorkerClient<Channel>,
        req: tonic::Request<InferBatchRequest>,
    ) -> Result<tonic::Response<InferBatchResponse>, tonic::Status> {
        client.infer(req).await
    }

    fn results(resp: InferBatchResponse) -> Vec<Option<Result<InferOutputs, ItemError>>> {
        let result = |r: proto::InferResult| match r.result? {
            infer_result::Result::Outputs(mut out) => Some(typed(&mut out).map(|()| out)),
            infer_result::Result::Error(err) => Some(Err(err)),
        };
        resp.results.into_iter().map(result).collect()
    }
}

/// Read a worker's raw output tensors into typed ones; a malformed one fails
/// its item as the model's error.
fn typed(out: &mut InferOutputs) -> Result<(), ItemError> {
    for t in &mut out.tensors {
        crate::tensor::from_raw(t).map_err(|why| ItemError {
            code: item_error::Code::ModelError.into(),
            message: format!("output {:?}: {why}", t.name),
        })?;
    }
    Ok(())
}

/// One attempt of the batched call `R` on `worker`: the call fails as a
/// whole (transport, status, a result missing) or answers per item.
pub(super) fn send_batch<R: BatchRpc>(
    worker: Arc<Worker>,
    model: &str,
    items: Vec<R::Item>,
    deadline: Deadline,
    request_id: &str,
) -> impl Future<Output = BatchResult<R::Output>> + Send + use<R> {
    let count = items.len();
    let model = model.to_owned();
    let request_id = request_id.to_owned();
    let bytes: usize = items.iter().map(R::weigh).sum();
    // Building and reading a large batch's messages (tensors to and from
    // raw form) is bulk work, off the request threads.
    let bulk = bytes > crate::bulk::BYTES;
    let id = worker.id.clone();
    let failed = move |e: tokio::task::JoinError| GatewayError::WorkerFailed {
        worker: id.clone(),
        detail: format!("cannot convert the batch: {e}"),
    };
    async move {
        let msg = if bulk {
            let (m, w) = (model.clone(), worker.clone());
            crate::bulk::run(move || R::request(m, items, &w)).await.map_err(&failed)?
        } else {
            R::request(model.clone(), items, &worker)
        };
        let req = request(msg, &deadline, &request_id);
        let resp = bounded(&deadline, &worker, worker.call(bytes, |client| R::call(client, req))).await?;
        let results =
            if bulk { crate::bulk::run(move || R::results(resp)).await.map_err(&failed)? } else { R::results(resp) };
        if results.len() != count {
            return Err(missing_result(&worker.id));
        }
        Ok(results
            .into_iter()
            .map(|r| match r {
                Some(Ok(out)) => Ok(out),
                Some(Err(err)) => Err(from_item_error(&worker.id, &model, err, &deadline)),
                None => Err(missing_result(&worker.id)),
            })
            .collect())
    }
}

/// Sends the batches of one (pool, model) batcher, with the pool's retries.
struct Dispatcher<R> {
    pools: Weak<Pools>,
    pool: usize,
    model: String,
    rpc: PhantomData<fn() -> R>,
}

impl<R: BatchRpc> Dispatch<R::Item, R::Output> for Dispatcher<R> {
    fn dispatch(
        &self,
        items: Vec<R::Item>,
        deadline: Deadline,
        batch_id: String,
    ) -> impl Future<Output = BatchResult<R::Output>> + Send {
        let (pools, pool, model) = (self.pools.clone(), self.pool, self.model.clone());
        async move {
            let pools = pools.upgrade().ok_or(GatewayError::ShuttingDown)?;
            let send = |worker| send_batch::<R>(worker, &model, items.clone(), deadline, &batch_id);
            let (results, _lease) = pools
                .pool(pool)
                .with_retries_judged(&deadline, &batch_id, retry::Rerun::Pure, send, batch_outcome)
                .await?;
            Ok(results)
        }
    }
}
