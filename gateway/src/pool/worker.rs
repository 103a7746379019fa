//! One worker endpoint: its pooled HTTP/2 channel, its load, and its health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::WorkerAddr;
use crate::proto::worker_client::WorkerClient;
use crate::proto::{DescribeRequest, ModelInfo};

/// A worker the pool may send calls to.
pub struct Worker {
    /// Stable id for logs, e.g. `minilm-1`.
    pub id: String,
    pub addr: WorkerAddr,
    channel: Channel,
    /// For large requests only (see [`Worker::client_for`]).
    bulk: Channel,
    outstanding: AtomicUsize,
    /// Since when (µs after `epoch`) no call has finished while some were
    /// outstanding: a lower bound on the age of the oldest outstanding call.
    busy_since_us: AtomicU64,
    epoch: Instant,
    serving: AtomicBool,
    /// Taken out of rotation (a reload draining it, or an operator): no
    /// new calls, those outstanding finish.
    draining: AtomicBool,
    /// Told when the last outstanding call of a draining worker ends.
    drained: tokio::sync::Notify,
    /// Its Describe said it reads `Tensor.raw_contents`.
    raw: AtomicBool,
    /// Passive health: ejection after repeated failures.
    pub outlier: super::outlier::Outlier,
    /// Recent answer times, for balancing.
    pub latency: super::latency::Latency,
    pub metrics: WorkerMetrics,
    /// Largest message sent to or taken from the worker.
    max_message: usize,
}

/// Metric handles of a worker, resolved once rather than per call.
pub struct WorkerMetrics {
    in_flight: metrics::Gauge,
    pool_in_flight: metrics::Gauge,
    /// Worker call durations, and the worker's own figures, of its pool.
    pub call_duration: metrics::Histogram,
    pub queue_time: metrics::Histogram,
    pub inference_time: metrics::Histogram,
    batch_splits: metrics::Counter,
}

impl WorkerMetrics {
    fn new(pool: &str, worker: &str) -> Self {
        use crate::telemetry::metrics as m;
        let pool = pool.to_owned();
        // Counted from 0, so the series exist before the first event.
        metrics::counter!(m::EJECTIONS, "pool" => pool.clone(), "worker" => worker.to_owned()).increment(0);
        metrics::counter!(m::BATCH_SPLITS, "pool" => pool.clone()).increment(0);
        Self {
            in_flight: metrics::gauge!(m::WORKER_IN_FLIGHT, "pool" => pool.clone(), "worker" => worker.to_owned()),
            pool_in_flight: metrics::gauge!(m::POOL_IN_FLIGHT, "pool" => pool.clone()),
            call_duration: metrics::histogram!(m::WORKER_CALL_DURATION, "pool" => pool.clone()),
            queue_time: metrics::histogram!(m::WORKER_QUEUE_TIME, "pool" => pool.clone()),
            inference_time: metrics::histogram!(m::WORKER_INFERENCE_TIME, "pool" => pool.clone()),
            batch_splits: metrics::counter!(m::BATCH_SPLITS, "pool" => pool),
        }
    }

    /// Record what a worker reported about one of its calls, here and in
    /// the current request's timings.
    pub fn reported(&self, md: &tonic::metadata::MetadataMap) {
        use crate::telemetry::timing;
        if let Some(r) = timing::Reported::from_metadata(md) {
            self.queue_time.record(r.queue.as_secs_f64());
            self.inference_time.record(r.inference.as_secs_f64());
            timing::with_current(|t| t.add_reported(r));
        }
        match timing::batch_splits(md) {
            0 => {}
            n => self.batch_splits.increment(n),
        }
    }
}

impl Worker {
    /// A worker reached over lazily connected HTTP/2 channels (one for
    /// large requests, one for the rest).
    /// `max_message`: the largest message sent to or taken from it.
    pub fn new(pool: &str, id: String, addr: WorkerAddr, max_message: usize) -> Self {
        Self {
            metrics: WorkerMetrics::new(pool, &id),
            id,
            channel: channel(&addr, None),
            bulk: channel(&addr, Some(crate::bulk::Exec)),
            addr,
            outstanding: AtomicUsize::new(0),
            busy_since_us: AtomicU64::new(0),
            epoch: Instant::now(),
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            raw: AtomicBool::new(false),
            outlier: super::outlier::Outlier::default(),
            latency: super::latency::Latency::default(),
            max_message,
        }
    }

    /// A client for the Worker service on the shared channel.
    pub fn client(&self) -> WorkerClient<Channel> {
        self.client_on(&self.channel)
    }

    /// Runs `call` with a client for a request of `bytes`. Large ones go
    /// on a connection of their own: on one HTTP/2 connection a small call
    /// waits for flow-control window behind every large message queued
    /// before it (h2 grants a connection's window to streams in order), and
    /// its bytes queue behind theirs in the socket (two clients sending 4 MB
    /// tensors held every small call of the worker ~50 ms). That
    /// connection's tasks and the large call itself, which copy its
    /// megabytes, run on the bulk thread ([`crate::bulk`]).
    pub async fn call<F, T>(
        &self,
        bytes: usize,
        call: impl FnOnce(WorkerClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<T, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        if bytes <= BULK_MESSAGE_BYTES {
            return call(self.client_on(&self.channel)).await;
        }
        let call = call(self.client_on(&self.bulk));
        crate::bulk::spawn(call)
            .await
            .unwrap_or_else(|e| Err(tonic::Status::internal(format!("the call's task failed: {e}"))))
    }

    fn client_on(&self, channel: &Channel) -> WorkerClient<Channel> {
        WorkerClient::new(channel.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message)
    }

    /// True while the worker reports SERVING for its model.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// The worker reads numeric tensors in raw form (as its last Describe said).
    pub fn reads_raw(&self) -> bool {
        self.raw.load(Ordering::Relaxed)
    }

    /// Calls sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether it is out of rotation.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Take it out of rotation (`true`) or put it back.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    /// Take it out of rotation and wait until its outstanding calls ended.
    /// A call that began as the flag was set sees it ([`Worker::begin`]'s
    /// caller checks after counting itself) or is seen here.
    pub async fn drain(&self) {
        self.set_draining(true);
        until_zero(&self.outstanding, &self.drained).await;
    }

    /// Count a call as outstanding until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        if self.outstanding.fetch_add(1, Ordering::SeqCst) == 0 {
            self.mark_busy();
        }
        self.outlier.on_pick();
        self.metrics.in_flight.increment(1.0);
        self.metrics.pool_in_flight.increment(1.0);
        InFlight { worker: self.clone(), started: Instant::now() }
    }

    fn mark_busy(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.busy_since_us.store(now, Ordering::Relaxed);
    }

    /// Seconds its oldest outstanding call has run at least at `now` (0 when
    /// idle): a hung worker looks slow before any of its calls ends.
    pub fn busy_for(&self, now: Instant) -> f64 {
        if self.outstanding() == 0 {
            return 0.0;
        }
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        now.saturating_sub(self.busy_since_us.load(Ordering::Relaxed)) as f64 / 1e6
    }

    pub(super) fn set_serving(&self, serving: bool) {
        if self.serving.swap(serving, Ordering::AcqRel) != serving {
            if serving {
                self.outlier.reset_failures();
                self.latency.reset();
                tracing::info!(worker = %self.id, "worker is SERVING");
            } else {
                tracing::warn!(worker = %self.id, "worker is not serving; no traffic until it recovers");
            }
        }
    }

    /// Keep `serving` current until `stop`: ask what the worker serves, then
    /// follow `grpc.health.v1.Health/Watch` for its model; on any break, mark
    /// it not serving and start over with a capped backoff.
    pub async fn watch(
        self: Arc<Self>,
        connect_timeout: Duration,
        on_describe: impl Fn(&Worker, Vec<ModelInfo>) + Send,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(50);
        let mut service_hint = String::new();
        loop {
            let session = async {
                let described = tokio::time::timeout(connect_timeout, self.client().describe(DescribeRequest {}))
                    .await
                    .map_err(|_| "describe timed out".to_owned())?
                    .map_err(|s| format!("describe failed: {}", s.message()))?
                    .into_inner();
                let service = described.models.first().map(|m| m.name.clone()).unwrap_or_default();
                service_hint.clone_from(&service);
                self.raw.store(described.raw_contents, Ordering::Relaxed);
                on_describe(&self, described.models);
                let mut stream = HealthClient::new(self.channel.clone())
                    .watch(HealthCheckRequest { service })
                    .await
                    .map_err(|s| format!("health watch failed: {}", s.message()))?
                    .into_inner();
                while let Some(update) =
                    stream.message().await.map_err(|s| format!("health stream broke: {}", s.message()))?
                {
                    self.set_serving(update.status == ServingStatus::Serving as i32);
                }
                Err::<(), String>("health stream ended".to_owned())
            };
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = session => outcome,
            };
            if let Err(why) = outcome {
                tracing::debug!(worker = %self.id, %why, "health session ended");
            }
            // A stream can end without the worker being unwell (a GOAWAY when
            // a connection is recycled): ask once before taking it out.
            let still_serving = self.check_once(&service_hint, connect_timeout).await;
            if !still_serving {
                self.set_serving(false);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

impl Worker {
    /// One unary health check of `service`: true only for a SERVING answer.
    async fn check_once(&self, service: &str, timeout: Duration) -> bool {
        if service.is_empty() {
            return false;
        }
        let mut client = HealthClient::new(self.channel.clone());
        let check = client.check(HealthCheckRequest { service: service.to_owned() });
        matches!(
            tokio::time::timeout(timeout, check).await,
            Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32
        )
    }
}

/// Wait until `count` is zero; whoever brings it to zero tells `told`
/// (`notify_waiters`). The waiter registers before it looks, so a count
/// that falls to zero between the look and the wait is not missed.
pub(super) async fn until_zero(count: &AtomicUsize, told: &tokio::sync::Notify) {
    loop {
        let notified = told.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if count.load(Ordering::SeqCst) == 0 {
            return;
        }
        notified.await;
    }
}

/// Requests larger than this go on a worker's bulk connection.
const BULK_MESSAGE_BYTES: usize = 256 * 1024;

/// A lazily connected HTTP/2 channel to `addr` that reconnects by itself
/// after the process restarts.
/// A lazily connected channel to `addr`, its tasks spawned on `exec` (by
/// default the current runtime).
fn channel(addr: &WorkerAddr, exec: Option<crate::bulk::Exec>) -> Channel {
    let endpoint = |e: Endpoint| match exec {
        Some(exec) => endpoint(e).executor(exec),
        None => endpoint(e),
    };
    match addr {
        WorkerAddr::Tcp(uri) => endpoint(Endpoint::from(uri.clone())).connect_lazy(),
        WorkerAddr::InProcess(name) => {
            let name = name.clone();
            endpoint(Endpoint::from_static("http://in-process.local")).connect_with_connector_lazy(tower::service_fn(
                move |_: http::Uri| {
                    let name = name.clone();
                    async move { crate::embedded::transport::connect(&name).map(TokioIo::new) }
                },
            ))
        }
        WorkerAddr::Unix(path) => {
            let path = path.clone();
            // The URI is ignored by the connector; tonic needs a valid one.
            endpoint(Endpoint::from_static("http://worker.local")).connect_with_connector_lazy(tower::service_fn(
                move |_: http::Uri| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                },
            ))
        }
    }
}

fn endpoint(e: Endpoint) -> Endpoint {
    e.connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// Marks one call outstanding on a worker while alive.
pub struct InFlight {
    worker: Arc<Worker>,
    started: Instant,
}

impl InFlight {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Time since the call was given to the worker.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.worker.metrics.in_flight.decrement(1.0);
        self.worker.metrics.pool_in_flight.decrement(1.0);
        // Calls still outstanding started before now: restart the bound.
        match self.worker.outstanding.fetch_sub(1, Ordering::SeqCst) {
            1 if self.worker.is_draining() => self.worker.drained.notify_waiters(),
            1 => {}
            _ => self.worker.mark_busy(),
        }
    }
}

impl super::balance::Candidate for Arc<Worker> {
    /// SERVING, in rotation and not ejected (or ejected with a probe due).
    fn ready(&self) -> bool {
        self.is_serving() && !self.is_draining() && self.outlier.eligible()
    }
    /// Outstanding calls, plus a penalty for recent failures.
    fn load(&self) -> usize {
        Worker::outstanding(self).saturating_add(self.outlier.penalty())
    }
    fn latency(&self, now: Instant) -> Option<f64> {
        self.latency.get_at(now)
    }
    fn busy_for(&self, now: Instant) -> f64 {
        Worker::busy_for(self, now)
    }
}
