//! Pool selection: power-of-two-choices over workers' readiness and load.
//!
//! Run: `cargo bench -p infergate-benches --bench pool`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use infergate::pool::balance::{Candidate, p2c};

/// Same shape as a pool worker: atomics read on every pick.
struct W {
    serving: AtomicBool,
    outstanding: AtomicUsize,
}

impl Candidate for W {
    fn ready(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
    fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("p2c_select");
    for n in [2usize, 8, 64] {
        // Every fourth worker is down, loads vary.
        let workers: Vec<W> = (0..n)
            .map(|i| W { serving: AtomicBool::new(i % 4 != 3 || n == 2), outstanding: AtomicUsize::new(i % 5) })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &workers, |b, workers| {
            b.iter(|| black_box(p2c(black_box(workers), |k| fastrand::usize(..k))).map(|w| w.outstanding()));
        });
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
