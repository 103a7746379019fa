//! The Worker gRPC service, answered by an embedded model: what a worker
//! process would do, on the gateway's blocking threads, bounded to the
//! pool's `threads` calls at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::python::{CallCtx, Failure, Host};
use crate::proto::worker_server::Worker;
use crate::proto::{
    DescribeRequest, DescribeResponse, EmbedBatchRequest, EmbedBatchResponse, GenerateChunk, GenerateRequest,
    InferBatchRequest, InferBatchResponse,
};

pub struct EmbeddedWorker {
    pub host: Arc<Host>,
    /// Model calls at once (the pool's `threads`).
    pub threads: Arc<Semaphore>,
    pub id: String,
}

fn status(id: &str, failure: Failure) -> Status {
    match failure {
        Failure::Status(code, details) => Status::new(code, details),
        Failure::Raised(text) => {
            tracing::error!(worker = %id, "embedded model call failed:\n{text}");
            let last = text.lines().last().unwrap_or("the embedded model failed").to_owned();
            Status::internal(last)
        }
    }
}

/// Request id, traceparent and remaining seconds from a call's metadata.
fn call_meta(md: &MetadataMap) -> (String, String, Option<f64>) {
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let timeout = md
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::call::parse_grpc_timeout)
        .map(|d| d.as_secs_f64());
    (get("x-request-id"), get("traceparent"), timeout)
}

/// Cancels the Python call when the caller goes away before it finished.
struct CancelOnDrop {
    ctx: Arc<CallCtx>,
    done: Arc<AtomicBool>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            let ctx = self.ctx.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn_blocking(move || ctx.cancel());
            }
        }
    }
}

impl EmbeddedWorker {
    /// Run `method` (`Embed` or `Infer`) on `request`, as a worker would.
    /// A thread slot and a Python call context for one call.
    async fn begin(
        &self,
        request_id: &str,
        traceparent: &str,
        timeout: Option<f64>,
    ) -> Result<(Arc<CallCtx>, OwnedSemaphorePermit), Status> {
        // The deadline is fixed on arrival: waiting for a thread spends it.
        let deadline = timeout.map(|t| std::time::Instant::now() + std::time::Duration::from_secs_f64(t));
        let permit =
            self.threads.clone().acquire_owned().await.map_err(|_| Status::unavailable("embedded worker stopped"))?;
        let host = self.host.clone();
        let (request_id, traceparent) = (request_id.to_owned(), traceparent.to_owned());
        let made = tokio::task::spawn_blocking(move || {
            let remaining = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()).as_secs_f64());
            host.context(&request_id, &traceparent, remaining)
        })
        .await;
        let ctx = made.map_err(|e| Status::internal(e.to_string()))?.map_err(|f| status(&self.id, f))?;
        Ok((Arc::new(ctx), permit))
    }

    /// Run `work` on a blocking thread holding the call's slot; a caller that
    /// leaves first cancels the Python call.
    async fn run<T: Send + 'static>(
        &self,
        ctx: Arc<CallCtx>,
        permit: OwnedSemaphorePermit,
        work: impl FnOnce(&Host, &CallCtx) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, Status> {
        let done = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop { ctx: ctx.clone(), done: done.clone() };
        let host = self.host.clone();
        let run = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let out = work(&host, &ctx);
            done.store(true, Ordering::Release);
            out
        });
        run.await.map_err(|e| Status::internal(e.to_string()))?.map_err(|f| status(&self.id, f))
    }
}

/// The servicer's trailing metadata (its timings) on the response.
fn with_trailers<T>(mut response: Response<T>, trailers: Vec<(String, String)>) -> Response<T> {
    *response.metadata_mut() = metadata(trailers);
    response
}

fn metadata(pairs: Vec<(String, String)>) -> MetadataMap {
    let mut map = MetadataMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
            map.insert(k, v);
        }
    }
    map
}

#[tonic::async_trait]
impl Worker for EmbeddedWorker {
    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let host = self.host.clone();
        let bytes = tokio::task::spawn_blocking(move || host.describe())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|f| status(&self.id, f))?;
        DescribeResponse::decode(bytes.as_slice())
            .map(Response::new)
            .map_err(|e| Status::internal(format!("embedded describe: {e}")))
    }

    /// Tensor items cross as serialized protobuf.
    async fn infer(&self, request: Request<InferBatchRequest>) -> Result<Response<InferBatchResponse>, Status> {
        let (request_id, traceparent, timeout) = call_meta(request.metadata());
        let bytes = request.into_inner().encode_to_vec();
        let (ctx, permit) = self.begin(&request_id, &traceparent, timeout).await?;
        let (reply, trailers) = self.run(ctx, permit, move |host, ctx| host.infer(&bytes, ctx)).await?;
        let reply = InferBatchResponse::decode(reply.as_slice())
            .map_err(|e| Status::internal(format!("embedded reply: {e}")))?;
        Ok(with_trailers(Response::new(reply), trailers))
    }

    /// Texts in and vectors out cross without protobuf: the hot path.
    async fn embed(&self, request: Request<EmbedBatchRequest>) -> Result<Response<EmbedBatchResponse>, Status> {
        let (request_id, traceparent, timeout) = call_meta(request.metadata());
        let EmbedBatchRequest { model, texts } = request.into_inner();
        let (ctx, permit) = self.begin(&request_id, &traceparent, timeout).await?;
        let (results, trailers) = self.run(ctx, permit, move |host, ctx| host.embed(&model, &texts, ctx)).await?;
        Ok(with_trailers(Response::new(EmbedBatchResponse { results }), trailers))
    }

    type GenerateStream = ReceiverStream<Result<GenerateChunk, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let (request_id, traceparent, timeout) = call_meta(request.metadata());
        let bytes = request.into_inner().encode_to_vec();
        let (ctx, permit) = self.begin(&request_id, &traceparent, timeout).await?;
        let (tx, rx) = mpsc::channel(16);
        let (host, id) = (self.host.clone(), self.id.clone());
        // A caller that leaves cancels the generation, even between chunks.
        let watcher = (tx.clone(), ctx.clone());
        tokio::spawn(async move {
            let (tx, ctx) = watcher;
            tx.closed().await;
            let _ = tokio::task::spawn_blocking(move || ctx.cancel()).await;
        });
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let chunks = match host.generate(&bytes, &ctx) {
                Ok(chunks) => chunks,
                Err(f) => {
                    let _ = tx.blocking_send(Err(status(&id, f)));
                    return;
                }
            };
            loop {
                let next = match chunks.next() {
                    Ok(Some(bytes)) => GenerateChunk::decode(bytes.as_slice())
                        .map_err(|e| Status::internal(format!("embedded chunk: {e}"))),
                    Ok(None) => {
                        // The servicer's timings end the stream as a worker
                        // process sends them, in the trailers: tonic writes a
                        // stream's final status, with its metadata, as those.
                        let trailers = metadata(ctx.trailers());
                        let _ = tx.blocking_send(Err(Status::with_metadata(tonic::Code::Ok, "", trailers)));
                        return;
                    }
                    Err(f) => Err(status(&id, f)),
                };
                let failed = next.is_err();
                if tx.blocking_send(next).is_err() {
                    ctx.cancel();
                    chunks.close();
                    return;
                }
                if failed {
                    chunks.close();
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
