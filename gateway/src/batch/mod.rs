//! Dynamic batching: many small calls to one model become one batch call to
//! a worker. One batcher per (pool, model) — an actor that owns a plain
//! [`BatchState`] (unit-tested without a runtime) and a budget of batches in
//! flight (workers × `concurrency_per_worker`).
//!
//! A batch goes when a dispatch slot is free and [`policy`] says so: when
//! it is full (`max_batch_size` items, or as many bytes as a worker message
//! may hold), or by the model's cost learned from earlier batches
//! (`max_delay = "auto"`), or when its oldest item has waited a fixed
//! `max_delay`. An item too big for a worker message on its own is refused
//! at once. While every slot is busy items keep queueing, so batches grow
//! with load: the batcher waits for workers, never for a timer, under load.
//! A heavy item (over [`Bound::alone`] bytes: megabytes of tensor) goes in a
//! batch of its own, on slots of its own: batching saves it nothing next to
//! moving its bytes, and small items batched with it, or queued behind it
//! for a slot, would wait for those bytes.
//! Items of priority tiers are taken first; an item whose caller left or
//! whose deadline passed is dropped while the batch forms; the queue is
//! bounded and refuses at once when full.

pub mod policy;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::call::Deadline;
pub use crate::config::components::BatchConfig;
use crate::error::GatewayError;
use crate::slots::Slots;
use crate::telemetry::timing::{self, Timings};
use crate::telemetry::trace::{self, TraceContext};
use policy::{Hold, Policy};

/// How big a batch may grow: items, and bytes of encoded items (what fits
/// in one worker message), with how an item is weighed.
#[derive(Debug, Clone, Copy)]
pub struct Bound<I> {
    pub items: usize,
    pub bytes: usize,
    /// An item heavier than this is sent alone, on slots of its own.
    pub alone: usize,
    pub weigh: fn(&I) -> usize,
}

/// One caller's item, waiting for its result.
pub struct Pending<I, O> {
    pub payload: I,
    /// The item's weight in a worker message.
    pub bytes: usize,
    /// The caller's request id, for the worker's logs.
    pub request_id: String,
    pub reply: oneshot::Sender<Result<O, GatewayError>>,
    pub deadline: Deadline,
    pub priority: bool,
    /// Who sent it (see [`caller_key`]): callers take turns in a batch.
    pub caller: u64,
    pub arrived: Instant,
    /// The caller's timings, which its share of the batch is added to.
    pub timings: Option<Arc<Timings>>,
    /// The caller's span; a batch's worker call is a child of its first caller's.
    pub trace: Option<TraceContext>,
}

/// The queue and the rules for taking a batch from it; no I/O, no clock of
/// its own (callers pass `now`).
///
/// Priority items go first, oldest first. The rest are taken a caller at a
/// time, round robin, each caller's own items oldest first: a caller who
/// queues many (or many large) items delays its own, not everyone's.
pub struct BatchState<I, O> {
    priority: VecDeque<Pending<I, O>>,
    /// Normal items by caller, and the callers with items in turn order.
    callers: HashMap<u64, VecDeque<Pending<I, O>>>,
    turns: VecDeque<u64>,
    len: usize,
    max_batch: usize,
    max_bytes: usize,
    /// Bytes of the items queued.
    bytes: usize,
}

impl<I, O> BatchState<I, O> {
    pub fn new(max_batch: usize, max_bytes: usize) -> Self {
        Self {
            priority: VecDeque::new(),
            callers: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
            max_batch: max_batch.max(1),
            max_bytes,
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, item: Pending<I, O>) {
        self.bytes += item.bytes;
        self.len += 1;
        if item.priority {
            self.priority.push_back(item);
            return;
        }
        let queue = self.callers.entry(item.caller).or_default();
        if queue.is_empty() {
            self.turns.push_back(item.caller);
        }
        queue.push_back(item);
    }

    /// When the oldest item arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.fronts().map(|p| p.arrived).min()
    }

    /// The items at the head of each caller's queue (each its oldest).
    fn fronts(&self) -> impl Iterator<Item = &Pending<I, O>> {
        self.priority.front().into_iter().chain(self.callers.values().filter_map(VecDeque::front))
    }

    /// The queued items' bytes fill a worker message.
    pub fn full_bytes(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    /// The queue as the batching policy sees it (None: empty).
    pub fn view(&self) -> Option<policy::Queue> {
        let oldest = self.oldest()?;
        let earliest_deadline = self.fronts().map(|p| p.deadline.at).min()?;
        Some(policy::Queue { len: self.len, full_bytes: self.full_bytes(), oldest, earliest_deadline })
    }

    /// Drop items whose caller left or whose deadline passed (telling the
    /// latter why); returns how many left the queue.
    pub fn prune(&mut self, now: Instant) -> usize {
        let before = self.len;
        let (bytes, len) = (&mut self.bytes, &mut self.len);
        let mut keep = |p: &mut Pending<I, O>| {
            let keep = !p.reply.is_closed() && p.deadline.at > now;
            if !keep {
                *bytes -= p.bytes;
                *len -= 1;
            }
            keep
        };
        self.priority.retain_mut(&mut keep);
        for queue in self.callers.values_mut() {
            queue.retain_mut(&mut keep);
        }
        self.callers.retain(|_, q| !q.is_empty());
        let callers = &self.callers;
        self.turns.retain(|c| callers.contains_key(c));
        before - self.len
    }

    /// Up to `max_batch` live items and `max_bytes` of them: see [`Self::take_up_to`].
    #[cfg(test)]
    pub fn take(&mut self, now: Instant) -> (Vec<Pending<I, O>>, usize) {
        self.take_up_to(now, self.max_batch)
    }

    /// Up to `cap` live items (`max_batch` at most) and `max_bytes` of them:
    /// priority first, oldest first, then the callers in turn (always at
    /// least one item: no item is over the bytes alone, [`Batcher::submit`]
    /// refuses those). Also says how many were dropped (see [`Self::prune`]).
    pub fn take_up_to(&mut self, now: Instant, cap: usize) -> (Vec<Pending<I, O>>, usize) {
        let dropped = self.prune(now);
        let cap = cap.clamp(1, self.max_batch);
        let mut batch = Vec::with_capacity(cap.min(self.len));
        let mut bytes = 0;
        let fits = |batch: &Vec<Pending<I, O>>, bytes: usize, p: &Pending<I, O>| {
            batch.len() < cap && (batch.is_empty() || bytes + p.bytes <= self.max_bytes)
        };
        while let Some(p) = self.priority.front() {
            if !fits(&batch, bytes, p) {
                break;
            }
            bytes += p.bytes;
            batch.extend(self.priority.pop_front());
        }
        while let Some(&caller) = self.turns.front() {
            let Some(queue) = self.callers.get_mut(&caller) else {
                self.turns.pop_front();
                continue;
            };
            match queue.front() {
                Some(p) if fits(&batch, bytes, p) => {
                    bytes += p.bytes;
                    batch.extend(queue.pop_front());
                    self.turns.pop_front();
                    if queue.is_empty() {
                        self.callers.remove(&caller);
                    } else {
                        self.turns.push_back(caller);
                    }
                }
                // Full: this caller keeps its turn for the next batch.
                Some(_) => break,
                None => {
                    self.callers.remove(&caller);
                    self.turns.pop_front();
                }
            }
        }
        self.bytes -= bytes;
        self.len -= batch.len();
        (batch, dropped)
    }
}

/// A caller's key for taking turns in a batch: its tenant and address.
pub fn caller_key(tenant: &str, client: std::net::IpAddr) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((tenant, client))
}

/// Sends one batch to a worker: per-item results in item order, or an
/// error for the whole batch. `request_id` names the batch's callers.
pub trait Dispatch<I, O>: Send + Sync + 'static {
    fn dispatch(
        &self,
        items: Vec<I>,
        deadline: Deadline,
        request_id: String,
    ) -> impl Future<Output = BatchResult<O>> + Send;
}

/// Longest request-id list sent with a batch (gRPC metadata stays small).
const MAX_REQUEST_IDS: usize = 1024;

/// The callers' request ids, comma-separated, cut short with `+N` past
/// [`MAX_REQUEST_IDS`] characters.
pub fn request_ids<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> String {
    let total = ids.len();
    let mut out = String::new();
    for (n, id) in ids.enumerate() {
        if out.len() + id.len() + 1 > MAX_REQUEST_IDS {
            out.push_str(&format!(",+{}", total - n));
            break;
        }
        if n > 0 {
            out.push(',');
        }
        out.push_str(id);
    }
    out
}

pub type BatchResult<O> = Result<Vec<Result<O, GatewayError>>, GatewayError>;

/// A running batcher: submit items, await their results.
pub struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<Pending<I, O>>,
    queued: Arc<AtomicUsize>,
    /// `queued` as a metric.
    depth: metrics::Gauge,
    /// Batches in flight at once, and batches of one heavy item.
    slots: Arc<Slots>,
    heavy_slots: Arc<Slots>,
    max_queue: usize,
    priority_tiers: Vec<String>,
    pool: String,
    /// The most bytes one item may weigh, and how to weigh it.
    max_bytes: usize,
    weigh: fn(&I) -> usize,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Start the actor. `slots` batches may be in flight at once
    /// (`config.concurrency_per_worker` on each worker).
    pub fn start<D: Dispatch<I, O>>(
        pool: &str,
        model: &str,
        config: &BatchConfig,
        bound: Bound<I>,
        slots: usize,
        dispatch: D,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (landed_tx, landed) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let labels = [("pool", pool.to_owned()), ("model", model.to_owned())];
        let depth = metrics::gauge!(crate::telemetry::metrics::BATCH_QUEUE_DEPTH, &labels);
        let heavy_slots = Arc::new(Slots::new(slots.max(1)));
        let slots = Arc::new(Slots::new(slots.max(1)));
        let hold = match config.max_delay {
            Some(delay) => Hold::Fixed(delay),
            None => Hold::Adaptive { target: config.target_latency },
        };
        use crate::telemetry::metrics as m;
        let actor = Actor {
            state: BatchState::new(bound.items, bound.bytes),
            policy: Policy::new(hold, bound.items),
            rx,
            landed,
            closed: false,
            slots: slots.clone(),
            heavy_slots: heavy_slots.clone(),
            per_worker: config.concurrency_per_worker.max(1),
            alone: bound.alone,
            out: Outlet {
                dispatch: Arc::new(dispatch),
                queued: queued.clone(),
                depth: depth.clone(),
                landed: landed_tx,
                sizes: metrics::histogram!(m::BATCH_SIZE, &labels),
                waits: metrics::histogram!(m::BATCH_QUEUE_WAIT, &labels),
                in_flight: metrics::gauge!(m::BATCHES_IN_FLIGHT, &labels),
                limit: metrics::gauge!(m::BATCH_LIMIT, &labels),
            },
        };
        tokio::spawn(actor.run());
        Self {
            tx,
            queued,
            depth,
            slots,
            heavy_slots,
            max_queue: config.max_queue,
            priority_tiers: config.priority_tiers.clone(),
            pool: pool.to_owned(),
            max_bytes: bound.bytes,
            weigh: bound.weigh,
        }
    }

    /// Items waiting in its queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Allow `slots` batches in flight at once (the pool's membership changed).
    pub fn resize(&self, slots: usize) {
        self.slots.resize(slots.max(1));
        self.heavy_slots.resize(slots.max(1));
    }

    /// Queue one item; the result arrives on the returned receiver. A full
    /// queue refuses at once.
    pub fn submit(
        &self,
        payload: I,
        deadline: Deadline,
        tier: &str,
        caller: u64,
        request_id: &str,
    ) -> Result<oneshot::Receiver<Result<O, GatewayError>>, GatewayError> {
        let bytes = (self.weigh)(&payload);
        if bytes > self.max_bytes {
            return Err(GatewayError::MessageTooLarge {
                detail: format!("the item is {bytes} bytes; a worker message holds {}", self.max_bytes),
            });
        }
        let full = || GatewayError::QueueFull { pool: self.pool.clone(), limit: self.max_queue };
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_queue).then_some(n + 1))
            .map_err(|_| {
                metrics::counter!(crate::telemetry::metrics::QUEUE_REJECTIONS, "pool" => self.pool.clone())
                    .increment(1);
                full()
            })?;
        let (reply, rx) = oneshot::channel();
        let priority = self.priority_tiers.iter().any(|t| t == tier);
        let item = Pending {
            payload,
            bytes,
            request_id: request_id.to_owned(),
            reply,
            deadline,
            priority,
            caller,
            arrived: Instant::now(),
            timings: timing::current(),
            trace: trace::current(),
        };
        self.tx.send(item).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            GatewayError::ShuttingDown
        })?;
        self.depth.increment(1.0);
        Ok(rx)
    }
}

/// Await one submitted item within its deadline.
pub async fn wait<O>(rx: oneshot::Receiver<Result<O, GatewayError>>, deadline: &Deadline) -> Result<O, GatewayError> {
    match tokio::time::timeout_at(deadline.at, rx).await {
        Ok(Ok(result)) => result,
        // The batcher dropped it: its deadline passed while queued.
        Ok(Err(_)) | Err(_) => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
    }
}

struct Actor<I, O, D> {
    state: BatchState<I, O>,
    policy: Policy,
    rx: mpsc::UnboundedReceiver<Pending<I, O>>,
    /// Batches that ended, for the policy to learn from.
    landed: mpsc::UnboundedReceiver<Landed>,
    /// No more items will come: send what is queued, then stop.
    closed: bool,
    slots: Arc<Slots>,
    /// Batches one worker is given at once (slots ÷ this = workers).
    per_worker: usize,
    /// Slots of the batches of one heavy item, and what makes one heavy.
    heavy_slots: Arc<Slots>,
    alone: usize,
    out: Outlet<D>,
}

/// A batch ended: its flight, when, and whether it ran to the end (only
/// then does its time say what a batch costs).
struct Landed {
    flight: u64,
    at: Instant,
    ran: bool,
}

/// Says a batch ended when dropped, however its task ends.
struct Landing {
    flight: Option<u64>,
    ran: bool,
    tx: mpsc::UnboundedSender<Landed>,
}

impl Drop for Landing {
    fn drop(&mut self) {
        if let Some(flight) = self.flight {
            let _ = self.tx.send(Landed { flight, at: Instant::now(), ran: self.ran });
        }
    }
}

/// Where batches leave the queue: the worker call, and the queue's counts.
struct Outlet<D> {
    dispatch: Arc<D>,
    queued: Arc<AtomicUsize>,
    depth: metrics::Gauge,
    landed: mpsc::UnboundedSender<Landed>,
    sizes: metrics::Histogram,
    waits: metrics::Histogram,
    in_flight: metrics::Gauge,
    /// The most items the last batch could take.
    limit: metrics::Gauge,
}

impl<D> Clone for Outlet<D> {
    fn clone(&self) -> Self {
        Self {
            dispatch: self.dispatch.clone(),
            queued: self.queued.clone(),
            depth: self.depth.clone(),
            landed: self.landed.clone(),
            sizes: self.sizes.clone(),
            waits: self.waits.clone(),
            in_flight: self.in_flight.clone(),
            limit: self.limit.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static, D: Dispatch<I, O>> Actor<I, O, D> {
    async fn run(mut self) {
        let mut permit = None;
        loop {
            if self.state.is_empty() {
                if self.closed {
                    return;
                }
                tokio::select! {
                    item = self.rx.recv() => self.arrived(item),
                    Some(landed) = self.landed.recv() => self.land(&landed),
                }
                continue;
            }
            self.take_news();
            // A free slot first; items keep queueing (batches grow with load).
            let Some(held) = permit.take() else {
                tokio::select! {
                    biased;
                    p = self.slots.acquire() => match p {
                        Ok(p) => permit = Some(p),
                        Err(_) => return,
                    },
                    Some(landed) = self.landed.recv() => self.land(&landed),
                    item = self.rx.recv(), if !self.closed => self.arrived(item),
                }
                continue;
            };
            let Some(queue) = self.state.view() else {
                permit = Some(held);
                continue;
            };
            let now = Instant::now();
            let workers = self.slots.size().div_ceil(self.per_worker);
            let plan = self.policy.plan(queue, now, workers);
            if plan.at > now && !self.closed {
                permit = Some(held);
                tokio::select! {
                    item = self.rx.recv() => self.arrived(item),
                    Some(landed) = self.landed.recv() => self.land(&landed),
                    () = tokio::time::sleep_until(plan.at) => {}
                }
                continue;
            }
            let (batch, dropped) = self.state.take_up_to(now, plan.cap);
            self.out.left(batch.len() + dropped);
            if batch.is_empty() {
                permit = Some(held);
                continue;
            }
            self.out.limit.set(plan.cap as f64);
            let flight = self.policy.flights.sent(batch.len(), now, workers);
            self.out.send(batch, held, now, Some(flight));
        }
    }

    /// Take what arrived and what landed without waiting.
    fn take_news(&mut self) {
        while let Ok(landed) = self.landed.try_recv() {
            self.land(&landed);
        }
        loop {
            match self.rx.try_recv() {
                Ok(item) => self.accept(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    fn arrived(&mut self, item: Option<Pending<I, O>>) {
        match item {
            Some(item) => self.accept(item),
            None => self.closed = true,
        }
    }

    fn land(&mut self, landed: &Landed) {
        if let Some((n, took)) = self.policy.flights.landed(landed.flight, landed.at)
            && landed.ran
        {
            self.policy.cost.observe(n, took);
        }
    }

    /// Queue `item`, or send a heavy one alone as soon as a heavy slot is
    /// free (dropped meanwhile if its caller leaves or its deadline passes).
    fn accept(&mut self, mut item: Pending<I, O>) {
        if item.bytes <= self.alone {
            self.policy.arrivals.arrived(item.arrived);
            self.state.push(item);
            return;
        }
        let (slots, out, until) = (self.heavy_slots.clone(), self.out.clone(), item.deadline.at);
        tokio::spawn(async move {
            let permit = tokio::select! {
                permit = slots.acquire() => permit.ok(),
                () = item.reply.closed() => None,
                () = tokio::time::sleep_until(until) => None,
            };
            out.left(1);
            if let Some(permit) = permit {
                out.send(vec![item], permit, Instant::now(), None);
            }
        });
    }
}

impl<D> Outlet<D> {
    /// `n` items left the queue: sent, or dropped.
    fn left(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.depth.decrement(n as f64);
    }

    /// Send `batch` on its slot; `flight` (when the policy follows it) is
    /// reported back when the batch ends.
    fn send<I: Send + 'static, O: Send + 'static>(
        &self,
        batch: Vec<Pending<I, O>>,
        permit: tokio::sync::OwnedSemaphorePermit,
        now: Instant,
        flight: Option<u64>,
    ) where
        D: Dispatch<I, O>,
    {
        self.sizes.record(batch.len() as f64);
        for p in &batch {
            let wait = now - p.arrived;
            self.waits.record(wait.as_secs_f64());
            if let Some(t) = &p.timings {
                t.add_queue(wait);
            }
        }
        let in_flight = self.in_flight.clone();
        in_flight.increment(1.0);
        let mut landing = Landing { flight, ran: false, tx: self.landed.clone() };
        // The batch may run until its latest caller's deadline.
        let latest =
            batch.iter().map(|p| p.deadline).max_by_key(|d| d.at).unwrap_or_else(|| Deadline::after(Duration::ZERO));
        let ids = request_ids(batch.iter().map(|p| p.request_id.as_str()));
        let first_trace = batch.iter().find_map(|p| p.trace);
        let mut callers = Vec::with_capacity(batch.len());
        let (payloads, mut replies): (Vec<I>, Vec<_>) = batch
            .into_iter()
            .map(|p| {
                callers.extend(p.timings);
                (p.payload, p.reply)
            })
            .unzip();
        let dispatch = self.dispatch.clone();
        tokio::spawn(async move {
            let n = replies.len();
            let spent = Arc::new(Timings::default());
            let outcome = {
                // Once every caller of the batch has left (hung up, timed
                // out), dropping the call cancels it on the worker.
                let all_gone = futures::future::join_all(replies.iter_mut().map(oneshot::Sender::closed));
                // Boxed once: held inline, the call (7 KB for an infer
                // batch) was laid out again by each future wrapped around
                // it, and the task came to 44 KB, moved and freed per batch.
                let call = timing::scope(spent.clone(), dispatch.dispatch(payloads, latest, ids));
                let call: Pin<Box<dyn Future<Output = _> + Send>> = match first_trace {
                    Some(t) => Box::pin(trace::scope(t, call)),
                    None => Box::pin(call),
                };
                tokio::select! {
                    outcome = call => Some(outcome),
                    _ = all_gone => None,
                }
            };
            // Each caller waited for the whole batch.
            callers.iter().for_each(|t| t.merge(&spent));
            let Some(outcome) = outcome else {
                tracing::debug!("every caller of a batch left; the worker call is cancelled");
                in_flight.decrement(1.0);
                return;
            };
            match outcome {
                Ok(results) if results.len() == n => {
                    landing.ran = true;
                    drop(landing);
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                Ok(results) => {
                    let e = GatewayError::WorkerFailed {
                        worker: "-".into(),
                        detail: format!("worker returned {} results for {n} items", results.len()),
                    };
                    replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
                }
                Err(e) => replies.into_iter().for_each(|r| drop(r.send(Err(e.clone())))),
            }
            in_flight.decrement(1.0);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests;
