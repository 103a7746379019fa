//! The load generator behind `infergate-bench`.
//!
//! Open loop: requests are scheduled at a constant rate whatever the target
//! does, and each latency is measured from its *scheduled* send time, so a
//! stalled target cannot hide its stall by slowing the generator down
//! (coordinated omission). Closed loop: a fixed number of clients, each
//! sending its next request when the previous one is answered.

pub mod bodies;
pub mod report;
pub mod target;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

pub use bodies::{Payload, Texts, Zipf, unique_text};
pub use report::{Latency, Report, markdown};
pub use target::{Outcome, Protocol, Target};

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Constant arrival rate (requests per second).
    Open { rate: f64 },
    /// Fixed number of clients in a send-wait loop.
    Closed { concurrency: usize },
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub label: String,
    pub mode: Mode,
    /// Not measured: connections warm up, caches fill.
    pub warmup: Duration,
    pub duration: Duration,
    /// A request unanswered this long counts as `timeout`.
    pub timeout: Duration,
    /// Open loop: most requests outstanding; later sends are counted as dropped.
    pub max_in_flight: usize,
    pub progress: bool,
}

/// Shared counters of a run, recorded only inside the measured window.
struct Recorder {
    measure_from: Instant,
    measure_until: Instant,
    histogram: Mutex<Histogram<u64>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    sent: AtomicU64,
    dropped: AtomicU64,
    ok_total: AtomicU64,
}

impl Recorder {
    fn new(measure_from: Instant, measure_until: Instant) -> anyhow::Result<Self> {
        Ok(Self {
            measure_from,
            measure_until,
            // 1 µs .. 10 min at 3 significant digits.
            histogram: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            outcomes: Mutex::new(BTreeMap::new()),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            ok_total: AtomicU64::new(0),
        })
    }

    fn measured(&self, at: Instant) -> bool {
        at >= self.measure_from && at < self.measure_until
    }

    fn record(&self, scheduled: Instant, outcome: &Outcome) {
        if *outcome == Outcome::Ok {
            self.ok_total.fetch_add(1, Ordering::Relaxed);
        }
        if !self.measured(scheduled) {
            return;
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        if *outcome == Outcome::Ok {
            let us = u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
            let mut h = self.histogram.lock().unwrap_or_else(PoisonError::into_inner);
            h.saturating_record(us);
        }
        *self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).entry(outcome.key()).or_default() += 1;
    }

    fn report(&self, cfg: &RunConfig) -> Report {
        let h = self.histogram.lock().unwrap_or_else(PoisonError::into_inner);
        let outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let measured_s = cfg.duration.as_secs_f64();
        let ok = outcomes.get("ok").copied().unwrap_or(0);
        let (mode, offered_rps, concurrency) = match cfg.mode {
            Mode::Open { rate } => ("open", Some(rate), None),
            Mode::Closed { concurrency } => ("closed", None, Some(concurrency)),
        };
        Report {
            label: cfg.label.clone(),
            mode: mode.to_owned(),
            offered_rps,
            concurrency,
            achieved_rps: ok as f64 / measured_s,
            measured_s,
            sent: self.sent.load(Ordering::Relaxed),
            outcomes,
            dropped: self.dropped.load(Ordering::Relaxed),
            latency_ms: Latency::from_histogram(&h),
        }
    }
}

fn progress_bar(cfg: &RunConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let total = (cfg.warmup + cfg.duration).as_millis() as u64;
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed}/{duration} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(cfg.label.clone());
    bar
}

/// Run one load test against `target` and report it.
pub async fn run(target: Arc<Target>, payload: Arc<Payload>, cfg: &RunConfig) -> anyhow::Result<Report> {
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + cfg.warmup + cfg.duration;
    let rec = Arc::new(Recorder::new(start + cfg.warmup, end)?);
    let bar = progress_bar(cfg);
    let ticker = {
        let (bar, rec) = (bar.clone(), rec.clone());
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = Instant::now();
                let ok = rec.ok_total.load(Ordering::Relaxed);
                let rps = (ok - last.1) as f64 / (now - last.0).as_secs_f64();
                last = (now, ok);
                bar.set_position(now.saturating_duration_since(start).as_millis() as u64);
                bar.set_message(format!("{rps:.0} ok/s"));
            }
        })
    };
    let job = Arc::new(Job { target, payload, rec: rec.clone(), timeout: cfg.timeout });
    match cfg.mode {
        Mode::Open { rate } => open_loop(job, rate, cfg.max_in_flight, start, end).await,
        Mode::Closed { concurrency } => closed_loop(job, concurrency, start, end).await,
    }
    ticker.abort();
    bar.finish_and_clear();
    Ok(rec.report(cfg))
}

/// What every request task of a run shares.
struct Job {
    target: Arc<Target>,
    payload: Arc<Payload>,
    rec: Arc<Recorder>,
    timeout: Duration,
}

impl Job {
    /// Send request `i` and record it against the time it was due.
    async fn send(&self, i: u64, due: Instant) {
        let outcome = self.target.send(&self.payload, i, self.timeout).await;
        self.rec.record(due, &outcome);
    }
}

async fn open_loop(job: Arc<Job>, rate: f64, max_in_flight: usize, start: Instant, end: Instant) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    for i in 0u64.. {
        let scheduled = start + period.mul_f64(i as f64);
        if scheduled >= end {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            if job.rec.measured(scheduled) {
                job.rec.dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (job, in_flight) = (job.clone(), in_flight.clone());
        tasks.spawn(async move {
            job.send(i, scheduled).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn closed_loop(job: Arc<Job>, concurrency: usize, start: Instant, end: Instant) {
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (job, counter) = (job.clone(), counter.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            loop {
                let sent_at = Instant::now();
                if sent_at >= end {
                    break;
                }
                job.send(counter.fetch_add(1, Ordering::Relaxed), sent_at).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The knee of a step sweep: the highest offered rate whose p99 is within
/// `slo_ms`, that achieved at least 95% of what was offered, with under 1%
/// errors.
pub fn knee(reports: &[Report], slo_ms: f64) -> Option<&Report> {
    reports
        .iter()
        .filter(|r| {
            let offered = r.offered_rps.unwrap_or(0.0);
            r.latency_ms.p99 <= slo_ms && r.achieved_rps >= 0.95 * offered && r.error_rate() < 0.01
        })
        .max_by(|a, b| a.offered_rps.partial_cmp(&b.offered_rps).unwrap_or(std::cmp::Ordering::Equal))
}
