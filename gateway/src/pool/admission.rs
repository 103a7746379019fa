//! A pool's admission: its slots (calls at once), the bounded queue for
//! the rest, the worker each call is given, and what a finished call says
//! about that worker and the pool.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::OwnedSemaphorePermit;

use super::circuit::{Circuit, Outcome};
use super::worker::{InFlight, Worker};
use super::{balance, outlier, retry};
use crate::batch::BatchConfig;
use crate::call::Deadline;
use crate::error::GatewayError;

pub(super) struct Pool {
    /// Its place in [`super::Pools`], for the model table and batchers.
    pub(super) index: usize,
    pub(super) name: String,
    /// The current members; replaced whole when discovery changes them.
    pub(super) workers: RwLock<Arc<Vec<Arc<Worker>>>>,
    /// Calls one worker is given at once.
    pub(super) per_worker: usize,
    pub(super) circuit: Circuit,
    pub(super) adaptive: super::adaptive::Adaptive,
    pub(super) outlier: outlier::OutlierConfig,
    /// Found by DNS: (host, port, re-resolve period).
    pub(super) discover: Option<(String, u16, std::time::Duration)>,
    /// Workers ejected now, at most `outlier.cap(workers)`.
    pub(super) ejected: AtomicUsize,
    pub(super) retry: retry::RetryConfig,
    pub(super) budget: retry::Budget,
    /// Calls handed to workers at once: workers × per-worker bound.
    pub(super) slots: crate::slots::Slots,
    /// Calls waiting for a slot, at most `max_queue`.
    pub(super) queued: AtomicUsize,
    /// `queued` as a metric.
    pub(super) depth: metrics::Gauge,
    pub(super) max_queue: usize,
    pub(super) batching: BatchConfig,
    /// Largest message to or from a worker (`workers.max_message_bytes`).
    pub(super) max_message: usize,
    /// Removed by a reload: calls that had not entered it are refused.
    retired: AtomicBool,
    /// Calls that entered it and have not ended (see [`Pool::enter`]).
    active: AtomicUsize,
    /// Told when `active` falls to zero on a retired pool.
    idle: tokio::sync::Notify,
    /// Room for queued work beside interactive calls.
    pub(super) background: super::background::Background,
}

/// A call's presence in a pool, from routing to its end; while any is
/// held, a removed pool's workers are not stopped.
pub(super) struct Active {
    pool: Arc<Pool>,
    class: crate::call::Class,
    entered: tokio::time::Instant,
}

impl std::ops::Deref for Active {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.pool
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.pool.background.leave(self.class, self.entered.elapsed());
        if self.pool.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.pool.retired.load(Ordering::SeqCst) {
            self.pool.idle.notify_waiters();
        }
    }
}

/// A worker call that may be dropped before it ends (its callers all left:
/// a batch whose callers' deadlines passed is cancelled rather than
/// awaited). Dropped at or past the deadline, the worker did not answer in
/// time: that counts against it as a timeout would, or a hung worker that
/// only ever sees such calls would never be ejected. Dropped earlier, the
/// callers hung up: nothing to say about the worker.
pub(super) struct Abandoned<'a> {
    pub(super) pool: &'a Pool,
    pub(super) worker: &'a Worker,
    pub(super) deadline: &'a Deadline,
    pub(super) started: tokio::time::Instant,
    pub(super) armed: bool,
}

impl Abandoned<'_> {
    pub(super) fn disarm(mut self) {
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
pub(super) fn missed_deadline(worker: &Worker, took: std::time::Duration) -> Outcome {
    if worker.latency.abnormally_slow(took) { Outcome::Failure } else { Outcome::Neutral }
}

/// A call's hold on a pool: its slot and the worker chosen for it.
pub(super) struct Lease {
    pub(super) in_flight: InFlight,
    pub(super) _slot: OwnedSemaphorePermit,
}

impl Lease {
    pub(super) fn worker(&self) -> &Arc<Worker> {
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
    /// Pool `config` at `index` of the pools, with `workers`.
    pub(super) fn new(
        index: usize,
        config: &crate::config::PoolConfig,
        max_message: usize,
        workers: Arc<Vec<Arc<Worker>>>,
    ) -> Self {
        let name = config.name.clone();
        // Counted from 0, so the series exist before the first event.
        for metric in [crate::telemetry::metrics::RETRIES, crate::telemetry::metrics::QUEUE_REJECTIONS] {
            metrics::counter!(metric, "pool" => name.clone()).increment(0);
        }
        Self {
            index,
            slots: crate::slots::Slots::new(workers.len().saturating_mul(config.max_in_flight_per_worker)),
            workers: RwLock::new(workers),
            per_worker: config.max_in_flight_per_worker,
            discover: match &config.kind {
                crate::config::PoolKind::Discovered { host, port, every } => Some((host.clone(), *port, *every)),
                _ => None,
            },
            circuit: Circuit::new(&name, config.circuit),
            adaptive: super::adaptive::Adaptive::new(&name, config.adaptive),
            outlier: config.outlier,
            ejected: AtomicUsize::new(0),
            retry: config.retry,
            budget: retry::Budget::default(),
            queued: AtomicUsize::new(0),
            depth: metrics::gauge!(crate::telemetry::metrics::QUEUE_DEPTH, "pool" => name.clone()),
            max_queue: config.max_queue,
            batching: config.batching.clone(),
            max_message,
            retired: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            background: super::background::Background::new(),
            name,
        }
    }

    /// Count a routed call in the pool until the guard drops; `None` once
    /// the pool is retired. (The call's increment and the retirement's flag
    /// are both sequentially consistent: either the call sees the flag, or
    /// the retirement sees the call and waits for it.)
    pub(super) fn enter(self: &Arc<Self>, class: crate::call::Class) -> Option<Active> {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.background.enter(class);
        let guard = Active { pool: self.clone(), class, entered: tokio::time::Instant::now() };
        (!self.retired.load(Ordering::SeqCst)).then_some(guard)
    }

    /// How many queued calls the pool may hold at once now, those it holds
    /// included (see [`super::background`]).
    pub(super) fn room(&self, max_share: f64) -> usize {
        let load = super::background::Load {
            slots: self.slots.size(),
            active: self.active(),
            waiting: self.queued.load(Ordering::Relaxed),
        };
        self.background.allowance(&load, max_share)
    }

    /// Refuse new calls from now on.
    pub(super) fn mark_retired(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Wait until the calls that entered (before it was retired) have ended.
    pub(super) async fn until_idle(&self) {
        super::worker::until_zero(&self.active, &self.idle).await;
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Calls in the pool now (routed, not yet ended).
    pub(super) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The members now (a snapshot).
    pub(super) fn workers(&self) -> Arc<Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(super) fn count_ejection(&self, worker: &Worker) {
        metrics::counter!(crate::telemetry::metrics::EJECTIONS, "pool" => self.name.clone(), "worker" => worker.id.clone())
            .increment(1);
    }

    /// What a call that ended after `took` says about the pool (circuit)
    /// and its worker (latency and outlier detection).
    pub(super) fn record(&self, worker: &Worker, outcome: Outcome, took: std::time::Duration) {
        self.circuit.record(outcome);
        self.adaptive.record(outcome);
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

    pub(super) fn pick(&self) -> Result<InFlight, GatewayError> {
        let workers = self.workers();
        // A worker drained between the pick and the count is given back.
        for _ in 0..3 {
            let Some(worker) = balance::p2c(&workers, |n| fastrand::usize(..n)) else { break };
            let in_flight = worker.begin();
            if !worker.is_draining() {
                return Ok(in_flight);
            }
        }
        Err(GatewayError::NoReadyWorker { pool: self.name.clone() })
    }

    /// A slot (waiting in the bounded queue if all are taken, never past the
    /// deadline) and a ready worker. A full queue is refused at once, and a
    /// call whose deadline passes while queued never reaches a worker.
    pub(super) async fn lease(&self, deadline: &Deadline) -> Result<Lease, GatewayError> {
        self.adaptive.admit()?;
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
