//! The last minutes of the gateway's traffic, second by second, for the
//! console: each model's requests, errors, latency and overhead, the
//! caches' hits, and the most recent errors with their request ids.
//!
//! The access layer records every request here once, beside its metrics
//! (the same place, the same labels), so the console needs no Prometheus.
//! Everything is bounded: [`SECONDS`] of history, [`MAX_MODELS`] models,
//! [`MAX_ERRORS`] errors.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// Seconds of history kept.
pub const SECONDS: usize = 300;
/// Models (metric labels) kept; requests for more are not charted.
pub const MAX_MODELS: usize = 64;
/// Recent errors kept.
pub const MAX_ERRORS: usize = 50;
/// Longest error detail kept.
const DETAIL_MAX: usize = 300;

/// Latency histogram: bucket `i` holds times up to `FIRST * GROWTH^i`
/// (10 µs … ~6 min); the last one holds everything longer.
const BUCKETS: usize = 44;
const FIRST: f64 = 10e-6;
const GROWTH: f64 = 1.5;

fn bucket(d: Duration) -> usize {
    let secs = d.as_secs_f64();
    if secs <= FIRST {
        return 0;
    }
    let i = ((secs / FIRST).ln() / GROWTH.ln()).ceil();
    // In range: the float is finite and at least 0 here.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = i as usize;
    i.min(BUCKETS - 1)
}

/// A bucket's representative time in seconds: the geometric middle of its bounds.
fn bucket_secs(i: usize) -> f64 {
    let upper = FIRST * GROWTH.powi(i32::try_from(i).unwrap_or(i32::MAX));
    if i == 0 { upper } else { upper / GROWTH.sqrt() }
}

#[derive(Clone, Copy)]
struct Histogram([u32; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Self([0; BUCKETS])
    }
}

impl Histogram {
    fn add(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The `q` quantile in milliseconds; `None` when empty.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.0.iter().map(|c| u64::from(*c)).sum();
        if total == 0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        let rank = (q * total as f64).ceil().max(1.0);
        let mut seen = 0u64;
        for (i, c) in self.0.iter().enumerate() {
            seen += u64::from(*c);
            #[allow(clippy::cast_precision_loss)]
            if seen as f64 >= rank {
                return Some(bucket_secs(i) * 1e3);
            }
        }
        Some(bucket_secs(BUCKETS - 1) * 1e3)
    }
}

/// One second of one model's requests.
#[derive(Clone, Copy, Default)]
struct Second {
    /// Which second (since the window's start) this slot holds now.
    at: u64,
    requests: u32,
    /// Answered with a 5xx (or the gRPC statuses that map to one).
    errors: u32,
    /// Refused as the caller's error (4xx).
    refused: u32,
    latency: Histogram,
    overhead: Histogram,
}

impl Second {
    fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.refused += other.refused;
        self.latency.add(&other.latency);
        self.overhead.add(&other.overhead);
    }
}

/// The last [`SECONDS`] seconds, one slot each, reused in a ring.
struct Ring<T>(Vec<T>);

impl<T: Default + Clone> Ring<T> {
    fn new() -> Self {
        Self(vec![T::default(); SECONDS])
    }
}

#[allow(clippy::cast_possible_truncation)]
fn slot(at: u64) -> usize {
    (at % SECONDS as u64) as usize
}

impl Ring<Second> {
    /// The slot of second `at`, emptied first if it held an older second.
    fn at(&mut self, at: u64) -> &mut Second {
        let s = &mut self.0[slot(at)];
        if s.at != at {
            *s = Second { at, ..Second::default() };
        }
        s
    }

    /// Second `at`, if the ring still holds it.
    fn get(&self, at: u64) -> Option<&Second> {
        Some(&self.0[slot(at)]).filter(|s| s.at == at)
    }
}

#[derive(Clone, Copy, Default)]
struct CacheSecond {
    at: u64,
    hits: u32,
    lookups: u32,
}

/// An error a client was answered with.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    /// Counts up from 1 over the gateway's life: a viewer tells new ones apart.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub route: String,
    pub model: String,
    /// HTTP status (gRPC calls: the one their status maps to).
    pub status: u16,
    /// The gRPC status code, for gRPC calls.
    pub grpc_status: Option<i32>,
    pub request_id: String,
    pub detail: String,
}

struct State {
    started: Instant,
    models: HashMap<String, Ring<Second>>,
    cache: Vec<CacheSecond>,
    errors: VecDeque<RecentError>,
    seq: u64,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| {
    Mutex::new(State {
        started: Instant::now(),
        models: HashMap::new(),
        cache: vec![CacheSecond::default(); SECONDS],
        errors: VecDeque::with_capacity(MAX_ERRORS),
        seq: 0,
    })
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// Seconds since the window started (second 0 is its first).
    fn now(&self) -> u64 {
        self.started.elapsed().as_secs() + 1
    }
}

/// How a request ended, for [`record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The caller's error (4xx).
    Refused,
    /// The gateway's or a worker's (5xx).
    Failed,
}

/// Count one request to `model` (a metric label: a known model or alias,
/// or `unknown`) that took `latency`, `overhead` of it the gateway's own.
pub fn record(model: &str, outcome: Outcome, latency: Duration, overhead: Duration) {
    let mut state = state();
    let now = state.now();
    if !state.models.contains_key(model) {
        if state.models.len() >= MAX_MODELS {
            return;
        }
        state.models.insert(model.to_owned(), Ring::new());
    }
    let Some(ring) = state.models.get_mut(model) else { return };
    let s = ring.at(now);
    s.requests += 1;
    match outcome {
        Outcome::Ok => {}
        Outcome::Refused => s.refused += 1,
        Outcome::Failed => s.errors += 1,
    }
    s.latency.0[bucket(latency)] += 1;
    s.overhead.0[bucket(overhead)] += 1;
}

/// Count `lookups` cache lookups, `hits` of them hits.
pub fn cache_lookups(hits: usize, lookups: usize) {
    let mut state = state();
    let now = state.now();
    let s = &mut state.cache[slot(now)];
    if s.at != now {
        *s = CacheSecond { at: now, ..CacheSecond::default() };
    }
    s.lookups = s.lookups.saturating_add(u32::try_from(lookups).unwrap_or(u32::MAX));
    s.hits = s.hits.saturating_add(u32::try_from(hits).unwrap_or(u32::MAX));
}

/// Keep an error a client was answered with (the oldest kept goes).
pub fn error(mut e: RecentError) {
    if e.detail.len() > DETAIL_MAX {
        let mut cut = DETAIL_MAX;
        while !e.detail.is_char_boundary(cut) {
            cut -= 1;
        }
        e.detail.truncate(cut);
    }
    let mut state = state();
    state.seq += 1;
    e.seq = state.seq;
    e.at_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| {
        #[allow(clippy::cast_possible_truncation)]
        let ms = d.as_millis() as u64;
        ms
    });
    if state.errors.len() >= MAX_ERRORS {
        state.errors.pop_front();
    }
    state.errors.push_back(e);
}

/// One point of a model's chart: a bin of seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Requests per second.
    pub rate: f64,
    /// 5xx answers per second.
    pub errors: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The gateway's own part of a request's time, median.
    pub overhead_p50_ms: Option<f64>,
}

/// A model's figures over the last [`Snapshot::summary_seconds`] and its chart.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStats {
    pub model: String,
    pub requests: u64,
    pub rate: f64,
    /// Share of requests answered with a 5xx.
    pub error_rate: f64,
    /// Share refused as the caller's error (4xx).
    pub refused_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub overhead_p50_ms: Option<f64>,
    pub overhead_p99_ms: Option<f64>,
    /// Oldest first, [`Snapshot::bin_seconds`] each, the last ending with
    /// the last whole second.
    pub chart: Vec<Point>,
}

/// What the console shows of the traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub summary_seconds: u64,
    pub bin_seconds: u64,
    /// Seconds a chart spans.
    pub chart_seconds: u64,
    pub models: Vec<ModelStats>,
    /// Cache hits per lookup over the summary's seconds; `None` without lookups.
    pub cache_hit_ratio: Option<f64>,
    pub cache_lookups: u64,
    /// Newest first.
    pub errors: Vec<RecentError>,
}

/// Seconds summed for a model's figures.
const SUMMARY_SECONDS: u64 = 60;
/// Seconds per chart point.
const BIN_SECONDS: u64 = 5;

/// The figures now. Only whole seconds count: the current one is still filling.
#[must_use]
pub fn snapshot() -> Snapshot {
    let state = state();
    let last = state.now().saturating_sub(1);
    let sum = |ring: &Ring<Second>, from: u64, to: u64| {
        let mut total = Second::default();
        for at in from..=to {
            if let Some(s) = ring.get(at) {
                total.add(s);
            }
        }
        total
    };
    let per = |n: u32, secs: u64| {
        #[allow(clippy::cast_precision_loss)]
        let r = f64::from(n) / secs as f64;
        r
    };
    let share = |n: u32, of: u32| if of == 0 { 0.0 } else { f64::from(n) / f64::from(of) };
    let bins = SECONDS as u64 / BIN_SECONDS;
    let mut models: Vec<ModelStats> = state
        .models
        .iter()
        .map(|(model, ring)| {
            let total = sum(ring, (last + 1).saturating_sub(SUMMARY_SECONDS).max(1), last);
            let chart = (0..bins)
                .map(|b| {
                    let end = last.saturating_sub((bins - 1 - b) * BIN_SECONDS);
                    let s = sum(ring, (end + 1).saturating_sub(BIN_SECONDS).max(1), end);
                    Point {
                        rate: per(s.requests, BIN_SECONDS),
                        errors: per(s.errors, BIN_SECONDS),
                        p50_ms: s.latency.quantile_ms(0.5),
                        p99_ms: s.latency.quantile_ms(0.99),
                        overhead_p50_ms: s.overhead.quantile_ms(0.5),
                    }
                })
                .collect();
            ModelStats {
                model: model.clone(),
                requests: u64::from(total.requests),
                rate: per(total.requests, SUMMARY_SECONDS),
                error_rate: share(total.errors, total.requests),
                refused_rate: share(total.refused, total.requests),
                p50_ms: total.latency.quantile_ms(0.5),
                p99_ms: total.latency.quantile_ms(0.99),
                overhead_p50_ms: total.overhead.quantile_ms(0.5),
                overhead_p99_ms: total.overhead.quantile_ms(0.99),
                chart,
            }
        })
        .collect();
    models.sort_by(|a, b| a.model.cmp(&b.model));
    let (mut hits, mut lookups) = (0u64, 0u64);
    for at in (last + 1).saturating_sub(SUMMARY_SECONDS).max(1)..=last {
        let s = &state.cache[slot(at)];
        if s.at == at {
            hits += u64::from(s.hits);
            lookups += u64::from(s.lookups);
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let cache_hit_ratio = (lookups > 0).then(|| hits as f64 / lookups as f64);
    Snapshot {
        summary_seconds: SUMMARY_SECONDS,
        bin_seconds: BIN_SECONDS,
        chart_seconds: bins * BIN_SECONDS,
        models,
        cache_hit_ratio,
        cache_lookups: lookups,
        errors: state.errors.iter().rev().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_microseconds_to_minutes_and_quantiles_land_in_the_right_one() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        let mut h = Histogram::default();
        for _ in 0..98 {
            h.0[bucket(Duration::from_millis(2))] += 1;
        }
        h.0[bucket(Duration::from_millis(100))] += 2;
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        // Within a bucket's width (a factor of 1.5) of the true values.
        assert!((2.0 / 1.5..=2.0 * 1.5).contains(&p50), "{p50}");
        assert!((100.0 / 1.5..=100.0 * 1.5).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().quantile_ms(0.5), None);
    }

    #[test]
    fn a_ring_slot_forgets_the_second_it_held_before() {
        let mut ring = Ring::<Second>::new();
        ring.at(7).requests += 3;
        assert_eq!(ring.get(7).map(|s| s.requests), Some(3));
        let again = ring.at(7 + SECONDS as u64);
        assert_eq!(again.requests, 0, "a second {SECONDS} s later reuses the slot empty");
        assert!(ring.get(7).is_none());
    }

    #[test]
    fn errors_are_kept_newest_first_and_bounded() {
        for i in 0..(MAX_ERRORS + 5) {
            error(RecentError {
                seq: 0,
                at_ms: 0,
                route: "/v1/embeddings".into(),
                model: format!("m{i}"),
                status: 503,
                grpc_status: None,
                request_id: format!("r{i}"),
                detail: "x".repeat(1000),
            });
        }
        let errors = snapshot().errors;
        assert_eq!(errors.len(), MAX_ERRORS);
        assert!(errors[0].seq > errors[1].seq);
        assert!(errors.iter().all(|e| e.detail.len() <= DETAIL_MAX));
    }
}
