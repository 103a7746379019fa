//! Worker pools: which pool serves a model, which worker takes a call, and
//! the call itself with its deadline. The edge sees only [`Upstream`].

pub mod balance;
pub mod circuit;
pub mod discovery;
pub mod latency;
pub mod outlier;
pub mod retry;

pub mod worker;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::batch::{self, BatchConfig, BatchResult, Batcher, Dispatch};
use crate::call::{Call, Deadline};
use crate::config::{Config, PoolKind, WorkerAddr};
use crate::error::GatewayError;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{
    self, EmbedBatchRequest, EmbedBatchResponse, GenerateChunk, GenerateRequest, InferBatchRequest, InferBatchResponse,
    InferItem, InferOutputs, ItemError, ModelEntry, ModelInfo, ModelKind, embed_result, infer_result, item_error,
};
use crate::telemetry::timing;
use circuit::{Circuit, Outcome};
use worker::{InFlight, Worker};

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
}

/// What the edge needs from the worker side. The real implementation is
/// [`Pools`]; edge tests use an in-process fake.
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

struct Pool {
    name: String,
    /// The current members; replaced whole when discovery changes them.
    workers: RwLock<Arc<Vec<Arc<Worker>>>>,
    /// Calls one worker is given at once.
    per_worker: usize,
    circuit: Circuit,
    outlier: outlier::OutlierConfig,
    /// Found by DNS: (host, port, re-resolve period).
    discover: Option<(String, u16, std::time::Duration)>,
    /// Workers ejected now, at most `outlier.cap(workers)`.
    ejected: AtomicUsize,
    retry: retry::RetryConfig,
    budget: retry::Budget,
    /// Calls handed to workers at once: workers × per-worker bound.
    slots: crate::slots::Slots,
    /// Calls waiting for a slot, at most `max_queue`.
    queued: AtomicUsize,
    /// `queued` as a metric.
    depth: metrics::Gauge,
    max_queue: usize,
    batching: BatchConfig,
    /// Largest message to or from a worker (`workers.max_message_bytes`).
    max_message: usize,
}

/// A worker call that may be dropped before it ends (its callers all left:
/// a batch whose callers' deadlines passed is cancelled rather than
/// awaited). Dropped at or past the deadline, the worker did not answer in
/// time: that counts against it as a timeout would, or a hung worker that
/// only ever sees such calls would never be ejected. Dropped earlier, the
/// callers hung up: nothing to say about the worker.
struct Abandoned<'a> {
    pool: &'a Pool,
    worker: &'a Worker,
    deadline: &'a Deadline,
    started: tokio::time::Instant,
    armed: bool,
}

impl Abandoned<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed && self.deadline.remaining().is_zero() {
            let took = self.started.elapsed();
            self.worker.metrics.call_duration.record(took.as_secs_f64());
            self.pool.record(self.worker, missed_deadline(self.worker, took), took);
        }
    }
}

/// What a call that missed its caller's deadline after `took` on `worker`
/// says about the worker: a failure only if the worker was abnormally slow
/// (see [`latency::Latency::abnormally_slow`]); otherwise the deadline was
/// too short for the model, and a caller's impatience must not eject a
/// worker or open the pool's circuit for everyone else.
fn missed_deadline(worker: &Worker, took: std::time::Duration) -> Outcome {
    if worker.latency.abnormally_slow(took) { Outcome::Failure } else { Outcome::Neutral }
}

/// A call's hold on a pool: its slot and the worker chosen for it.
struct Lease {
    in_flight: InFlight,
    _slot: OwnedSemaphorePermit,
}

impl Lease {
    fn worker(&self) -> &Arc<Worker> {
        self.in_flight.worker()
    }
}

/// Counts a waiter in the queue while it exists.
struct Queued<'a>(&'a AtomicUsize, &'a metrics::Gauge);

impl<'a> Queued<'a> {
    fn new(count: &'a AtomicUsize, depth: &'a metrics::Gauge) -> Self {
        depth.increment(1.0);
        Self(count, depth)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.decrement(1.0);
    }
}

impl Pool {
    /// The members now (a snapshot).
    fn workers(&self) -> Arc<Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn count_ejection(&self, worker: &Worker) {
        metrics::counter!(crate::telemetry::metrics::EJECTIONS, "pool" => self.name.clone(), "worker" => worker.id.clone())
            .increment(1);
    }

    /// What a call that ended after `took` says about the pool (circuit)
    /// and its worker (latency and outlier detection).
    fn record(&self, worker: &Worker, outcome: Outcome, took: std::time::Duration) {
        self.circuit.record(outcome);
        match outcome {
            Outcome::Success => worker.latency.observe(took),
            Outcome::Failure => worker.latency.observe_failure(took),
            Outcome::Neutral => return,
        }
        match worker.outlier.record(outcome == Outcome::Failure, &self.outlier) {
            outlier::Event::None => {}
            outlier::Event::ShouldEject => {
                let cap = self.outlier.cap(self.workers().len());
                let admitted = self
                    .ejected
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
                    .is_ok();
                if admitted {
                    let d = worker.outlier.eject(&self.outlier);
                    tracing::warn!(worker = %worker.id, pool = %self.name, ejected_for = ?d, "worker ejected");
                    self.count_ejection(worker);
                } else {
                    tracing::debug!(worker = %worker.id, pool = %self.name, cap, "worker not ejected: pool at its ejection cap");
                }
            }
            outlier::Event::Readmitted => {
                self.ejected.fetch_sub(1, Ordering::AcqRel);
                tracing::info!(worker = %worker.id, pool = %self.name, "worker re-admitted after a successful probe");
            }
            outlier::Event::EjectedAgain(d) => {
                tracing::warn!(worker = %worker.id, pool = %self.name, ejected_for = ?d, "worker ejected again: probe failed");
                self.count_ejection(worker);
            }
        }
    }

    /// Run `once` on a leased worker; when it fails in a way that may be
    /// retried, try again (the balancer now sees the failure, so usually on
    /// another worker) up to `retry.max` times, after a jittered backoff,
    /// within the deadline and the pool's retry budget. Returns the result
    /// with the lease of the attempt that produced it (a stream holds it).
    async fn with_retries<T, F, Fut>(
        &self,
        deadline: &Deadline,
        request_id: &str,
        rerun: retry::Rerun,
        once: F,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        self.with_retries_judged(deadline, request_id, rerun, once, Outcome::of).await
    }

    /// [`Pool::with_retries`] where `judge` says what an attempt's result
    /// means for the worker and the circuit (a batch whose every item the
    /// model failed is a failure, though the call itself succeeded).
    async fn with_retries_judged<T, F, Fut>(
        &self,
        deadline: &Deadline,
        request_id: &str,
        rerun: retry::Rerun,
        once: F,
        judge: fn(&Result<T, GatewayError>) -> Outcome,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        self.budget.count_request();
        let mut retries = 0;
        loop {
            let queued = std::time::Instant::now();
            let lease = self.lease(deadline).await?;
            timing::with_current(|t| t.add_queue(queued.elapsed()));
            let worker = lease.worker().clone();
            tracing::debug!(request_id, pool = %self.name, worker = %worker.id, "call sent");
            let abandoned =
                Abandoned { pool: self, worker: &worker, deadline, started: tokio::time::Instant::now(), armed: true };
            let result = once(worker.clone()).await;
            abandoned.disarm();
            let took = lease.in_flight.elapsed();
            worker.metrics.call_duration.record(took.as_secs_f64());
            timing::with_current(|t| t.add_worker(took));
            let outcome = match (&result, judge(&result)) {
                (Err(GatewayError::DeadlineExceeded { .. }), Outcome::Failure) => missed_deadline(&worker, took),
                (_, outcome) => outcome,
            };
            self.record(&worker, outcome, took);
            let err = match result {
                Ok(value) => return Ok((value, lease)),
                Err(e) if retries < self.retry.max && self.retry.retryable(&e, rerun) => e,
                Err(e) => return Err(e),
            };
            drop(lease);
            retries += 1;
            let wait = retry::backoff(retries);
            if deadline.remaining() <= wait {
                return Err(err);
            }
            if !self.budget.try_retry(&self.retry) {
                tracing::warn!(request_id, pool = %self.name, worker = %worker.id, error = %err, "not retrying: retry budget spent");
                return Err(err);
            }
            tracing::warn!(request_id, pool = %self.name, worker = %worker.id, retry = retries, error = %err, "retrying");
            metrics::counter!(crate::telemetry::metrics::RETRIES, "pool" => self.name.clone()).increment(1);
            tokio::time::sleep(wait).await;
        }
    }

    fn pick(&self) -> Result<InFlight, GatewayError> {
        balance::p2c(&self.workers(), |n| fastrand::usize(..n))
            .map(Worker::begin)
            .ok_or_else(|| GatewayError::NoReadyWorker { pool: self.name.clone() })
    }

    /// A slot (waiting in the bounded queue if all are taken, never past the
    /// deadline) and a ready worker. A full queue is refused at once, and a
    /// call whose deadline passes while queued never reaches a worker.
    async fn lease(&self, deadline: &Deadline) -> Result<Lease, GatewayError> {
        self.circuit.admit()?;
        let slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max_queue {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::metrics::QUEUE_REJECTIONS, "pool" => self.name.clone())
                        .increment(1);
                    return Err(GatewayError::QueueFull { pool: self.name.clone(), limit: self.max_queue });
                }
                let _queued = Queued::new(&self.queued, &self.depth);
                match tokio::time::timeout_at(deadline.at, self.slots.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    Ok(Err(_closed)) => return Err(GatewayError::NoReadyWorker { pool: self.name.clone() }),
                    Err(_) => return Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
                }
            }
        };
        Ok(Lease { in_flight: self.pick()?, _slot: slot })
    }
}

#[derive(Default)]
struct Routes {
    /// model name -> the pool that claimed it first (for calls that name a
    /// model rather than a route variant).
    first: HashMap<String, usize>,
    /// Per pool: model name -> what its workers said about it. Several pools
    /// may serve the same model name (the variants of a route).
    by_pool: Vec<HashMap<String, ModelInfo>>,
    /// Pools that have described their models at least once.
    described: Vec<bool>,
}

/// How long an unknown model name is answered "starting" (503) rather than
/// "not found" (404) while some pool has not yet described its models.
const STARTUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// All configured pools and the model routes learned from their workers.
pub struct Pools {
    pools: Vec<Pool>,
    routes: RwLock<Routes>,
    created: tokio::time::Instant,
    /// For the batchers' dispatchers (they outlive a call, not the pools).
    me: Weak<Pools>,
    embed_batchers: Batchers<String, Embedded>,
    infer_batchers: Batchers<InferItem, InferOutputs>,
}

/// The batchers of one kind, by (pool index, model), started on first use.
type Batchers<I, O> = Mutex<HashMap<(usize, String), Arc<Batcher<I, O>>>>;

/// One text's vector and token count.
type Embedded = (Vec<f32>, u32);

impl Pools {
    /// Build pools from config. Local pools' workers listen on
    /// `socket_dir/<pool>-<n>.sock` (see [`crate::config::local_socket`]).
    pub fn new(config: &Config, socket_dir: &Path) -> Arc<Self> {
        let mut pools = Vec::with_capacity(config.pools.len());
        for pool in &config.pools {
            let addrs: Vec<WorkerAddr> = match &pool.kind {
                PoolKind::Local { workers, .. } => (0..workers.get())
                    .map(|i| WorkerAddr::Unix(crate::config::local_socket(socket_dir, &pool.name, i)))
                    .collect(),
                PoolKind::Remote { addresses } => addresses.clone(),
                // Found by `discover`, which fills the pool as records arrive.
                PoolKind::Discovered { .. } => Vec::new(),
                PoolKind::Embedded { .. } => vec![WorkerAddr::InProcess(crate::embedded::endpoint(&pool.name))],
            };
            let workers: Vec<_> = addrs
                .into_iter()
                .enumerate()
                .map(|(i, addr)| {
                    Arc::new(Worker::new(
                        &pool.name,
                        format!("{}-{i}", pool.name),
                        addr,
                        config.workers.max_message_bytes,
                    ))
                })
                .collect();
            let slots = crate::slots::Slots::new(workers.len().saturating_mul(pool.max_in_flight_per_worker));
            // Counted from 0, so the series exist before the first event.
            for name in [crate::telemetry::metrics::RETRIES, crate::telemetry::metrics::QUEUE_REJECTIONS] {
                metrics::counter!(name, "pool" => pool.name.clone()).increment(0);
            }
            pools.push(Pool {
                name: pool.name.clone(),
                max_message: config.workers.max_message_bytes,
                workers: RwLock::new(Arc::new(workers)),
                per_worker: pool.max_in_flight_per_worker,
                discover: match &pool.kind {
                    PoolKind::Discovered { host, port, every } => Some((host.clone(), *port, *every)),
                    _ => None,
                },
                circuit: Circuit::new(&pool.name, pool.circuit),
                outlier: pool.outlier,
                ejected: AtomicUsize::new(0),
                retry: pool.retry,
                budget: retry::Budget::default(),
                slots,
                queued: AtomicUsize::new(0),
                depth: metrics::gauge!(crate::telemetry::metrics::QUEUE_DEPTH, "pool" => pool.name.clone()),
                max_queue: pool.max_queue,
                batching: pool.batching.clone(),
            });
        }
        let routes = Routes {
            first: HashMap::new(),
            by_pool: vec![HashMap::new(); pools.len()],
            described: vec![false; pools.len()],
        };
        Arc::new_cyclic(|me| Self {
            pools,
            routes: RwLock::new(routes),
            created: tokio::time::Instant::now(),
            me: me.clone(),
            embed_batchers: Mutex::default(),
            infer_batchers: Mutex::default(),
        })
    }

    /// Start one health watcher per worker, and the DNS discovery of
    /// discovered pools (asking `nameservers`, or the system's resolver);
    /// they end with `stop`.
    pub fn watch(
        self: &Arc<Self>,
        connect_timeout: std::time::Duration,
        nameservers: &[std::net::SocketAddr],
        stop: &CancellationToken,
    ) -> Result<(), String> {
        for (p, pool) in self.pools.iter().enumerate() {
            for worker in pool.workers().iter() {
                self.watch_worker(p, worker, connect_timeout, stop.child_token());
            }
            if let Some(spec) = pool.discover.clone() {
                let resolver = discovery::resolver(nameservers)?;
                tokio::spawn(self.clone().discover(p, spec, resolver, connect_timeout, stop.child_token()));
            }
        }
        Ok(())
    }

    /// Follow `worker`'s health (and what it serves) until `stop`.
    fn watch_worker(
        self: &Arc<Self>,
        p: usize,
        worker: &Arc<Worker>,
        connect_timeout: std::time::Duration,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let on_describe = move |w: &Worker, models: Vec<ModelInfo>| me.register(p, w, models);
        tokio::spawn(worker.clone().watch(connect_timeout, on_describe, stop));
    }

    fn register(&self, pool: usize, worker: &Worker, models: Vec<ModelInfo>) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        routes.described[pool] = true;
        for info in models {
            match routes.first.get(&info.name) {
                Some(owner) if *owner != pool => tracing::debug!(
                    model = %info.name, worker = %worker.id, pool = %self.pools[pool].name,
                    "model also served by pool {:?}; a bare model name goes there, a route variant may name this pool",
                    self.pools[*owner].name
                ),
                Some(_) => {}
                None => {
                    routes.first.insert(info.name.clone(), pool);
                }
            }
            routes.by_pool[pool].insert(info.name.clone(), info);
        }
    }

    /// The batch size for a model of `pool`, when calls to it are batched.
    fn batch_size(pool: &Pool, info: &ModelInfo) -> Option<usize> {
        let max = pool.batching.max_batch_size.unwrap_or(info.max_batch_size as usize);
        (pool.batching.enabled && max > 1).then_some(max)
    }

    fn index_of(&self, pool: &Pool) -> usize {
        self.pools.iter().position(|p| std::ptr::eq(p, pool)).unwrap_or_default()
    }

    /// The batcher of (pool, model) for the batched call `R`, started on
    /// first use.
    fn batcher<R: BatchRpc>(&self, pool: &Pool, info: &ModelInfo) -> Option<Arc<Batcher<R::Item, R::Output>>> {
        let max = Self::batch_size(pool, info)?;
        let key = (self.index_of(pool), info.name.clone());
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

    fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// The pool and model for a call: the named pool when the call carries
    /// one (a route variant), else the pool that first claimed the model.
    fn route_call<P>(&self, call: &Call<P>) -> Result<(&Pool, ModelInfo), GatewayError> {
        match &call.pool {
            Some(pool) => self.route_in(pool, &call.model),
            None => self.route(&call.model),
        }
    }

    fn route_in(&self, pool: &str, name: &str) -> Result<(&Pool, ModelInfo), GatewayError> {
        let p = self.pool_index(pool).ok_or_else(|| GatewayError::ModelNotFound { model: name.to_owned() })?;
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        match routes.by_pool[p].get(name) {
            Some(info) => Ok((&self.pools[p], info.clone())),
            None if routes.described[p] || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    fn route(&self, name: &str) -> Result<(&Pool, ModelInfo), GatewayError> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        let found = routes.first.get(name).and_then(|p| Some((*p, routes.by_pool[*p].get(name)?)));
        match found {
            Some((p, info)) => Ok((&self.pools[p], info.clone())),
            // A pool that never answers (a wrong remote address) must not make
            // every typo a 503 forever.
            None if routes.described.iter().all(|d| *d) || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    fn entry(&self, pool: &Pool, info: ModelInfo) -> ModelEntry {
        let ready = pool.workers().iter().any(|w| w.is_serving());
        ModelEntry { info: Some(info), pool: pool.name.clone(), ready }
    }
}

fn require(info: &ModelInfo, ok: bool, operation: &'static str) -> Result<(), GatewayError> {
    if ok { Ok(()) } else { Err(GatewayError::UnsupportedOperation { model: info.name.clone(), operation }) }
}

/// Attach the deadline, request id and trace context to a worker call.
fn request<T>(msg: T, call_deadline: &Deadline, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(call_deadline.remaining());
    if let Ok(v) = request_id.parse() {
        req.metadata_mut().insert("x-request-id", v);
    }
    if let Some(Ok(v)) = crate::telemetry::trace::current().map(|t| t.to_string().parse()) {
        req.metadata_mut().insert("traceparent", v);
    }
    req
}

/// Await a worker call, bounded by the deadline.
async fn bounded<T>(
    deadline: &Deadline,
    worker: &Worker,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, GatewayError> {
    match tokio::time::timeout_at(deadline.at, fut).await {
        Err(_) => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
        // tonic's client enforces the propagated timeout too (as CANCELLED):
        // any failure once the deadline has passed is the deadline's doing.
        Ok(Err(_)) if deadline.remaining().is_zero() => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
        Ok(Err(status)) => Err(from_status(&worker.id, status, deadline)),
        Ok(Ok(resp)) => {
            worker.metrics.reported(resp.metadata());
            Ok(resp.into_inner())
        }
    }
}

/// Map a worker's gRPC status to the gateway's error.
pub fn from_status(worker: &str, status: tonic::Status, deadline: &Deadline) -> GatewayError {
    use tonic::Code as C;
    let detail = status.message().to_owned();
    let worker = worker.to_owned();

    // Over the message limit, on either side: the call's size is at fault,
    // not the worker (never counted against it, never retried).
    if is_message_size(&detail) {
        return GatewayError::MessageTooLarge { detail };
    }
    if never_started(&status) {
        return GatewayError::WorkerRefused { worker, detail };
    }
    // A status the worker sent has no source; one with a source was made
    // here from a failed connection or stream (a worker killed mid-stream
    // reads as an h2 error with code INTERNAL): the worker went away.
    if std::error::Error::source(&status).is_some() {
        return GatewayError::WorkerUnavailable { worker, detail };
    }
    match status.code() {
        C::DeadlineExceeded => GatewayError::DeadlineExceeded { after: deadline.budget },
        C::InvalidArgument | C::OutOfRange => GatewayError::ModelRejected { detail },
        // CANCELLED from the worker (our deadline had not passed, see
        // `bounded`) means the worker gave the call up: overload, or a drain
        // that ran out of grace. Transient, so 503 and worth a retry.
        C::Unavailable | C::ResourceExhausted | C::Aborted | C::Cancelled => {
            GatewayError::WorkerUnavailable { worker, detail }
        }
        _ => GatewayError::WorkerFailed { worker, detail },
    }
}

/// The words tonic (`encoded`/`decoded message length too large`) and gRPC
/// core (`Received`/`Sent message larger than max`) use for a message over
/// the limit.
fn is_message_size(detail: &str) -> bool {
    detail.contains("message length too large") || detail.contains("message larger than max")
}

/// True when the call provably never started on the worker: the connection
/// or the stream was refused, or the worker's admission was full.
fn never_started(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::ResourceExhausted {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
        {
            return true;
        }
        if e.to_string().contains("refused stream") {
            return true;
        }
        source = e.source();
    }
    false
}

/// Map a per-item error from a worker to the gateway's error.
pub fn from_item_error(worker: &str, model: &str, err: ItemError, deadline: &Deadline) -> GatewayError {
    use item_error::Code;
    match Code::try_from(err.code).unwrap_or(Code::Unspecified) {
        Code::InvalidInput => GatewayError::ModelRejected { detail: err.message },
        Code::DeadlineExceeded => GatewayError::DeadlineExceeded { after: deadline.budget },
        Code::Cancelled => GatewayError::Cancelled,
        Code::Unimplemented => GatewayError::UnsupportedOperation { model: model.to_owned(), operation: "this call" },
        Code::Unspecified | Code::ModelError => {
            GatewayError::WorkerFailed { worker: worker.to_owned(), detail: err.message }
        }
    }
}

fn missing_result(worker: &str) -> GatewayError {
    GatewayError::WorkerFailed { worker: worker.to_owned(), detail: "worker returned fewer results than items".into() }
}

#[async_trait::async_trait]
impl Upstream for Pools {
    fn models(&self) -> Vec<ModelEntry> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        let mut entries: Vec<ModelEntry> = routes
            .first
            .iter()
            .filter_map(|(name, p)| Some(self.entry(&self.pools[*p], routes.by_pool[*p].get(name)?.clone())))
            .collect();
        entries.sort_by(|a, b| a.info.as_ref().map(|i| &i.name).cmp(&b.info.as_ref().map(|i| &i.name)));
        entries
    }

    fn model(&self, name: &str) -> Result<ModelEntry, GatewayError> {
        let (pool, info) = self.route(name)?;
        Ok(self.entry(pool, info))
    }

    fn model_in(&self, pool: &str, name: &str) -> Result<ModelEntry, GatewayError> {
        let (pool, info) = self.route_in(pool, name)?;
        Ok(self.entry(pool, info))
    }

    fn status(&self) -> Vec<PoolStatus> {
        self.pools
            .iter()
            .map(|p| {
                let workers = p.workers();
                PoolStatus {
                    pool: p.name.clone(),
                    ready_workers: workers.iter().filter(|w| w.is_serving()).count(),
                    workers: workers.len(),
                }
            })
            .collect()
    }

    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        let (pool, info) = self.route_call(&call)?;
        require(&info, info.kind == ModelKind::Embed as i32, "embeddings")?;
        if let Some(batcher) = self.batcher::<EmbedRpc>(pool, &info) {
            // Each text is an item of whatever batch it lands in.
            let deadline = call.deadline;
            let results = gather(&batcher, call.payload, &deadline, &call.caller, &call.request_id).await?;
            let mut vectors = Vec::with_capacity(results.len());
            let mut prompt_tokens = 0u32;
            for (vector, tokens) in results {
                vectors.push(vector);
                prompt_tokens = prompt_tokens.saturating_add(tokens);
            }
            return Ok(EmbedOutput { model: info, vectors, prompt_tokens });
        }
        let deadline = call.deadline;
        let (results, _lease) = pool
            .with_retries(&deadline, &call.request_id, retry::Rerun::Pure, |worker| {
                // A model error fails the call and counts against the worker.
                let sent = send_batch::<EmbedRpc>(worker, &info.name, call.payload.clone(), deadline, &call.request_id);
                async move { sent.await?.into_iter().collect::<Result<Vec<_>, _>>() }
            })
            .await?;
        let mut vectors = Vec::with_capacity(results.len());
        let mut prompt_tokens = 0u32;
        for (vector, tokens) in results {
            vectors.push(vector);
            prompt_tokens = prompt_tokens.saturating_add(tokens);
        }
        Ok(EmbedOutput { model: info, vectors, prompt_tokens })
    }

    async fn infer(&self, call: Call<InferItem>) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        let (pool, info) = self.route_call(&call)?;
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

    async fn generate(&self, call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
        let (pool, info) = self.route_call(&call)?;
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
                let next = match tokio::time::timeout_at(deadline.at, stream.message()).await {
                    Err(_) => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
                    Ok(Err(_)) if deadline.remaining().is_zero() => {
                        Err(GatewayError::DeadlineExceeded { after: deadline.budget })
                    }
                    Ok(Err(status)) => Err(from_status(&worker.id, status, &deadline)),
                    Ok(Ok(Some(chunk))) => Ok(Some(chunk)),
                    Ok(Ok(None)) => Ok(None),
                };
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
async fn gather<I: Send + 'static, O: Send + 'static>(
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
fn batch_outcome<O>(result: &Result<Vec<Result<O, GatewayError>>, GatewayError>) -> Outcome {
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
trait BatchRpc: Send + Sync + 'static {
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
struct EmbedRpc;

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
struct InferRpc;

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
fn send_batch<R: BatchRpc>(
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
            let (results, _lease) = pools.pools[pool]
                .with_retries_judged(&deadline, &batch_id, retry::Rerun::Pure, send, batch_outcome)
                .await?;
            Ok(results)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Arc<Pools> {
        let toml = "[[pools]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\n\
                    [[pools]]\nname = \"b\"\naddresses = [\"127.0.0.1:2\"]\n";
        let raw: crate::config::RawConfig = toml::from_str(toml).unwrap();
        let config = Config::from_raw(raw).unwrap();
        Pools::new(&config, Path::new("/nonexistent"))
    }

    fn info(name: &str) -> ModelInfo {
        ModelInfo { name: name.into(), kind: ModelKind::Embed as i32, ..Default::default() }
    }

    #[test]
    fn worker_statuses_map_to_client_facing_errors() {
        let d = Deadline::after(std::time::Duration::from_secs(5));
        let map = |code| from_status("w", tonic::Status::new(code, "x"), &d).http_status().as_u16();
        assert_eq!(map(tonic::Code::Cancelled), 503);
        assert_eq!(map(tonic::Code::ResourceExhausted), 503);
        assert_eq!(map(tonic::Code::Unavailable), 503);
        assert_eq!(map(tonic::Code::DeadlineExceeded), 504);
        assert_eq!(map(tonic::Code::InvalidArgument), 400);
        assert_eq!(map(tonic::Code::Internal), 502);
        assert_eq!(map(tonic::Code::Unknown), 502);
        // The same code made here from a broken connection: the worker went away.
        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed because of a broken pipe");
        let status = tonic::Status::from_error(Box::new(broken));
        assert!(matches!(from_status("w", status, &d), GatewayError::WorkerUnavailable { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_models_are_starting_until_every_pool_described_or_the_window_passed() {
        let p = pools();
        let w = p.pools[0].workers()[0].clone();
        p.register(0, &w, vec![info("m")]);
        assert!(p.model("m").is_ok());
        assert!(matches!(p.route("typo"), Err(GatewayError::Starting { .. })));
        tokio::time::advance(STARTUP_WINDOW + std::time::Duration::from_secs(1)).await;
        assert!(matches!(p.route("typo"), Err(GatewayError::ModelNotFound { .. })));
    }

    #[tokio::test]
    async fn a_model_stays_with_the_pool_that_claimed_it_first() {
        let p = pools();
        let (wa, wb) = (p.pools[0].workers()[0].clone(), p.pools[1].workers()[0].clone());
        p.register(0, &wa, vec![info("m")]);
        p.register(1, &wb, vec![info("m"), info("n")]);
        assert_eq!(p.model("m").unwrap().pool, "a");
        assert_eq!(p.model("n").unwrap().pool, "b");
        assert!(matches!(p.route("zzz"), Err(GatewayError::ModelNotFound { .. })));
        // No worker is SERVING yet: calls are refused at once, not queued.
        let call = Call {
            model: "m".into(),
            payload: vec!["x".into()],
            deadline: Deadline::after(std::time::Duration::from_secs(1)),
            request_id: String::new(),
            caller: Arc::new(crate::call::Caller::anonymous([127, 0, 0, 1].into())),
            pool: None,
        };
        assert!(matches!(p.embed(call).await, Err(GatewayError::NoReadyWorker { .. })));
    }

    #[test]
    fn a_batch_the_model_failed_entirely_counts_against_the_worker() {
        let failed = || Err(GatewayError::WorkerFailed { worker: "w".into(), detail: "raised".into() });
        let rejected = || Err(GatewayError::ModelRejected { detail: "bad input".into() });
        assert_eq!(batch_outcome::<u8>(&Ok(vec![failed(), failed()])), Outcome::Failure);
        assert_eq!(batch_outcome::<u8>(&Ok(vec![failed(), Ok(1)])), Outcome::Success, "one bad item is its caller's");
        assert_eq!(batch_outcome::<u8>(&Ok(vec![rejected()])), Outcome::Success, "bad input is not the worker's fault");
        assert_eq!(
            batch_outcome::<u8>(&Err(GatewayError::WorkerUnavailable { worker: "w".into(), detail: String::new() })),
            Outcome::Failure
        );
    }

    fn one_worker_pool(per_worker: usize, max_queue: usize) -> Pool {
        let worker = Arc::new(Worker::new("q", "q-0".into(), WorkerAddr::Unix("/nonexistent.sock".into()), 1 << 26));
        worker.set_serving(true);
        Pool {
            name: "q".into(),
            workers: RwLock::new(Arc::new(vec![worker])),
            per_worker,
            discover: None,
            circuit: Circuit::new("q", circuit::CircuitConfig::default()),
            outlier: outlier::OutlierConfig::default(),
            ejected: AtomicUsize::new(0),
            retry: retry::RetryConfig::default(),
            budget: retry::Budget::default(),
            slots: crate::slots::Slots::new(per_worker),
            queued: AtomicUsize::new(0),
            depth: metrics::gauge!("test_queue_depth"),
            max_queue,
            batching: BatchConfig::default(),
            max_message: 1 << 26,
        }
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_and_queued_calls_never_outlive_their_deadline() {
        let pool = one_worker_pool(1, 1);
        let long = Deadline::after(std::time::Duration::from_secs(10));
        let held = pool.lease(&long).await.unwrap();
        assert_eq!(pool.workers()[0].outstanding(), 1);

        // The second call waits in the queue ...
        let mut queued = Box::pin(pool.lease(&long));
        assert!(futures::poll!(queued.as_mut()).is_pending());
        assert_eq!(pool.queued.load(Ordering::Relaxed), 1);
        // ... the third finds it full and is refused without waiting.
        let refused = pool.lease(&long).await.err().unwrap();
        assert!(matches!(refused, GatewayError::QueueFull { limit: 1, .. }), "{refused:?}");
        assert_eq!(refused.retry_after(), Some(1));

        // A freed slot goes to the queued call.
        drop(held);
        let next = queued.await.unwrap();
        assert_eq!(pool.queued.load(Ordering::Relaxed), 0);

        // A call whose deadline passes while queued never reaches a worker.
        let started = tokio::time::Instant::now();
        let short = Deadline::after(std::time::Duration::from_millis(50));
        let expired = pool.lease(&short).await.err().unwrap();
        assert!(matches!(expired, GatewayError::DeadlineExceeded { .. }), "{expired:?}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(pool.workers()[0].outstanding(), 1, "only the leased call is on the worker");
        assert_eq!(pool.queued.load(Ordering::Relaxed), 0, "the expired waiter left the queue");
        drop(next);
        assert_eq!(pool.workers()[0].outstanding(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_abandoned_at_its_deadline_counts_against_its_worker_one_abandoned_earlier_does_not() {
        let mut pool = one_worker_pool(8, 8);
        pool.outlier.consecutive = 1;
        let second = Arc::new(Worker::new("q", "q-1".into(), WorkerAddr::Unix("/nonexistent-1.sock".into()), 1 << 26));
        second.set_serving(true);
        let w0 = pool.workers()[0].clone();
        *pool.workers.write().unwrap() = Arc::new(vec![w0, second]);
        let hang = |_| futures::future::pending::<Result<(), GatewayError>>();
        let ms = std::time::Duration::from_millis;
        // Both usually answer in 20 ms.
        for w in pool.workers().iter() {
            w.latency.observe(ms(20));
        }
        // The caller hangs up before the deadline: the worker is not blamed.
        let d = Deadline::after(ms(100));
        let _ = tokio::time::timeout(ms(50), pool.with_retries(&d, "r1", retry::Rerun::Pure, hang)).await;
        assert!(pool.workers().iter().all(|w| !w.outlier.is_ejected()));
        // The caller leaves at its deadline with the worker silent: a timeout.
        let d = Deadline::after(ms(100));
        let _ = tokio::time::timeout(ms(100), pool.with_retries(&d, "r2", retry::Rerun::Pure, hang)).await;
        assert_eq!(pool.workers().iter().filter(|w| w.outlier.is_ejected()).count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_the_models_usual_time_blames_no_one() {
        let mut pool = one_worker_pool(8, 8);
        pool.outlier.consecutive = 1;
        pool.circuit = Circuit::new("q", circuit::CircuitConfig { failures: 1, ..Default::default() });
        let ms = std::time::Duration::from_millis;
        let worker = pool.workers()[0].clone();
        for _ in 0..5 {
            worker.latency.observe(ms(2000));
        }
        for i in 0..20 {
            let d = Deadline::after(ms(300));
            // A 2 s model, bounded by the caller's deadline as a worker call is.
            let slow = |_| async move {
                match tokio::time::timeout_at(d.at, tokio::time::sleep(ms(2000))).await {
                    Err(_) => Err(GatewayError::DeadlineExceeded { after: d.budget }),
                    Ok(()) => Ok(()),
                }
            };
            let sent = pool.with_retries(&d, &format!("r{i}"), retry::Rerun::Pure, slow).await;
            assert!(matches!(sent.err(), Some(GatewayError::DeadlineExceeded { .. })));
        }
        assert!(!worker.outlier.is_ejected(), "impatient callers ejected a healthy worker");
        pool.circuit.admit().expect("impatient callers opened the circuit");
    }

    #[tokio::test]
    async fn a_failing_worker_is_ejected_from_balancing_but_never_more_than_the_cap() {
        let pool = one_worker_pool(8, 8);
        let second = Arc::new(Worker::new("q", "q-1".into(), WorkerAddr::Unix("/nonexistent-1.sock".into()), 1 << 26));
        second.set_serving(true);
        let (w0, w1) = (pool.workers()[0].clone(), second.clone());
        *pool.workers.write().unwrap() = Arc::new(vec![w0.clone(), second]);
        for _ in 0..5 {
            pool.record(&w0, Outcome::Failure, std::time::Duration::ZERO);
        }
        assert!(w0.outlier.is_ejected());
        for _ in 0..50 {
            assert_eq!(pool.pick().unwrap().worker().id, "q-1", "an ejected worker gets no calls");
        }
        // Half of two workers may be out: the second stays in whatever it does.
        for _ in 0..10 {
            pool.record(&w1, Outcome::Failure, std::time::Duration::ZERO);
        }
        assert!(!w1.outlier.is_ejected(), "the pool must not be emptied");
        assert_eq!(pool.pick().unwrap().worker().id, "q-1");
        // Client errors and cancellations say nothing about a worker.
        pool.record(&w1, Outcome::Neutral, std::time::Duration::ZERO);
    }
}
