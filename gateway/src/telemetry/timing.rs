//! Where one request's time went: waiting in a queue, on a worker, and in
//! the model (as the worker reports it). The rest of its latency is the
//! gateway's own overhead. The same per-request scope carries the model the
//! request named, which the core learns and the access line reports.
//!
//! The edge opens a [`scope`] per request; pool code adds to the current
//! one wherever it runs inside that request's task. A batch runs in the
//! batcher's task, so the batcher opens a scope per batch and merges it
//! into each of its callers' timings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tonic::metadata::MetadataMap;

/// Metadata in which a worker reports seconds its call waited for a model thread.
pub const WORKER_QUEUE_KEY: &str = "x-infergate-queue-time";
/// Metadata in which a worker reports seconds its model ran for the call.
pub const WORKER_INFERENCE_KEY: &str = "x-infergate-inference-time";
/// Metadata in which a worker reports how many of the call's batches failed
/// as a whole and were run again item by item.
pub const WORKER_SPLITS_KEY: &str = "x-infergate-batch-splits";

/// The batches of a call a worker split (see [`WORKER_SPLITS_KEY`]).
pub fn batch_splits(md: &MetadataMap) -> u64 {
    md.get(WORKER_SPLITS_KEY).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Time one request (or one batch) spent, in nanoseconds.
#[derive(Debug, Default)]
pub struct Timings {
    /// Waiting for a pool slot or in a batcher's queue.
    queue: AtomicU64,
    /// Awaiting worker calls, from send to answer.
    worker: AtomicU64,
    /// Of `worker`: waiting for a model thread, as the worker reports it.
    worker_queue: AtomicU64,
    /// Of `worker`: running the model, as the worker reports it.
    inference: AtomicU64,
    /// The model the request named (path or body), once the core read it.
    named: std::sync::OnceLock<Named>,
    /// The route pattern that matched the request, once the router chose one.
    route: std::sync::OnceLock<&'static str>,
}

/// The model a request named, for its access line and metric labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// As the client wrote it, cut to [`NAMED_MAX`] bytes.
    pub model: String,
    /// Whether it is a model or alias the gateway knows: only then is it a
    /// metric label (a client's made-up names would add series without bound).
    pub known: bool,
}

/// Longest model name an access line repeats.
pub const NAMED_MAX: usize = 128;

/// What a worker said about one call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    pub queue: Duration,
    pub inference: Duration,
}

impl Reported {
    /// The figures in a worker's response metadata (trailers included);
    /// `None` when it sent none (an older or a third-party worker).
    pub fn from_metadata(md: &MetadataMap) -> Option<Self> {
        let secs = |key| {
            md.get(key)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
        };
        match (secs(WORKER_QUEUE_KEY), secs(WORKER_INFERENCE_KEY)) {
            (None, None) => None,
            (queue, inference) => {
                Some(Self { queue: queue.unwrap_or_default(), inference: inference.unwrap_or_default() })
            }
        }
    }
}

fn add(cell: &AtomicU64, d: Duration) {
    cell.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn get(cell: &AtomicU64) -> Duration {
    Duration::from_nanos(cell.load(Ordering::Relaxed))
}

impl Timings {
    /// The request named `model`; the first name given stays.
    pub fn name_model(&self, model: &str, known: bool) {
        let mut cut = NAMED_MAX.min(model.len());
        while !model.is_char_boundary(cut) {
            cut -= 1;
        }
        let _ = self.named.set(Named { model: model[..cut].to_owned(), known });
    }

    /// The model the request named, if it named one.
    pub fn named(&self) -> Option<&Named> {
        self.named.get()
    }

    /// The request matched `route` (a route pattern, the first one given stays).
    pub fn name_route(&self, route: &'static str) {
        let _ = self.route.set(route);
    }

    /// The route pattern the request matched, if it matched one.
    pub fn route(&self) -> Option<&'static str> {
        self.route.get().copied()
    }

    pub fn add_queue(&self, d: Duration) {
        add(&self.queue, d);
    }

    pub fn add_worker(&self, d: Duration) {
        add(&self.worker, d);
    }

    pub fn add_reported(&self, r: Reported) {
        add(&self.worker_queue, r.queue);
        add(&self.inference, r.inference);
    }

    /// Add everything `other` recorded (a batch's figures to each caller's).
    pub fn merge(&self, other: &Self) {
        add(&self.queue, get(&other.queue));
        add(&self.worker, get(&other.worker));
        add(&self.worker_queue, get(&other.worker_queue));
        add(&self.inference, get(&other.inference));
    }

    /// Waited before a model ran: in the gateway's queues and the worker's.
    pub fn queue(&self) -> Duration {
        get(&self.queue) + get(&self.worker_queue)
    }

    /// Spent awaiting workers.
    pub fn worker(&self) -> Duration {
        get(&self.worker)
    }

    /// Spent in model code, as workers reported it.
    pub fn inference(&self) -> Duration {
        get(&self.inference)
    }

    /// The part of `total` the gateway itself spent: neither queued nor
    /// awaiting a worker.
    pub fn overhead(&self, total: Duration) -> Duration {
        total.saturating_sub(get(&self.queue) + get(&self.worker))
    }

    /// True once any worker call was made for the request.
    pub fn reached_worker(&self) -> bool {
        self.worker.load(Ordering::Relaxed) > 0
    }
}

tokio::task_local! {
    static CURRENT: Arc<Timings>;
}

/// Run `fut` with `timings` as the current request's (a plain function, as
/// [`super::trace::scope`] is, so that `fut` is held once).
pub fn scope<F: Future>(timings: Arc<Timings>, fut: F) -> TaskLocalFuture<Arc<Timings>, F> {
    CURRENT.scope(timings, fut)
}

/// The current request's timings, when inside a [`scope`].
pub fn current() -> Option<Arc<Timings>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Record into the current request's timings, if any.
pub fn with_current(f: impl FnOnce(&Timings)) {
    let _ = CURRENT.try_with(|t| f(t));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn worker_figures_come_from_metadata_in_seconds() {
        let mut md = MetadataMap::new();
        assert_eq!(Reported::from_metadata(&md), None);
        md.insert(WORKER_QUEUE_KEY, "0.002".parse().unwrap());
        md.insert(WORKER_INFERENCE_KEY, "0.0105".parse().unwrap());
        let r = Reported::from_metadata(&md).unwrap();
        assert_eq!((r.queue, r.inference), (ms(2), Duration::from_micros(10_500)));
        md.insert(WORKER_QUEUE_KEY, "-1".parse().unwrap());
        md.insert(WORKER_INFERENCE_KEY, "NaN".parse().unwrap());
        assert_eq!(Reported::from_metadata(&md), None, "nonsense is ignored");
    }

    #[test]
    fn overhead_is_what_neither_queues_nor_workers_took() {
        let t = Timings::default();
        assert!(!t.reached_worker());
        t.add_queue(ms(3));
        t.add_worker(ms(10));
        t.add_reported(Reported { queue: ms(1), inference: ms(8) });
        assert_eq!(t.overhead(ms(15)), ms(2));
        assert_eq!(t.overhead(ms(5)), Duration::ZERO, "never negative");
        assert_eq!(t.queue(), ms(4), "the gateway's queue and the worker's");
        assert_eq!(t.inference(), ms(8));
        let caller = Timings::default();
        caller.add_queue(ms(1));
        caller.merge(&t);
        assert_eq!((caller.queue(), caller.worker(), caller.inference()), (ms(5), ms(10), ms(8)));
        assert!(caller.reached_worker());
    }

    #[tokio::test]
    async fn pool_code_records_into_the_request_it_runs_for() {
        with_current(|t| t.add_worker(ms(1))); // outside a scope: nothing to record into
        assert!(current().is_none());
        let t = Arc::new(Timings::default());
        scope(t.clone(), async { with_current(|t| t.add_worker(ms(7))) }).await;
        assert_eq!(t.worker(), ms(7));
    }
}
