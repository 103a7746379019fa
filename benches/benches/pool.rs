//! Pool selection: power-of-two-choices over workers' readiness, load and
//! latency.
//!
//! Run: `cargo bench -p infergate-benches --bench pool`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use infergate::pool::balance::{Candidate, p2c};
use infergate::pool::latency::Latency;

/// Same shape as a pool worker: atomics read on every pick.
struct W {
    serving: AtomicBool,
    outstanding: AtomicUsize,
    latency: Latency,
}

impl Candidate for W {
    fn ready(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
    fn load(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
    fn latency(&self, now: tokio::time::Instant) -> Option<f64> {
        self.latency.get_at(now)
    }
    fn busy_for(&self, _: tokio::time::Instant) -> f64 {
        0.0
    }
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("p2c_select");
    for n in [2usize, 8, 64] {
        // Every fourth worker is down, loads and latencies vary.
        let workers: Vec<W> = (0..n)
            .map(|i| {
                let latency = Latency::default();
                latency.observe(std::time::Duration::from_micros(500 + 100 * i as u64));
                W { serving: AtomicBool::new(i % 4 != 3 || n == 2), outstanding: AtomicUsize::new(i % 5), latency }
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &workers, |b, workers| {
            b.iter(|| black_box(p2c(black_box(workers), |k| fastrand::usize(..k))).map(|w| w.load()));
        });
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
