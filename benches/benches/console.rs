//! What the console costs the request path: counting one request in the
//! window of the last minutes (the access layer does it for every request),
//! on one thread and with a second thread counting at full speed beside it;
//! and building the snapshot each open status stream sends once a second.
//!
//! Run: `cargo bench -p infergate-benches --bench console`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use infergate::telemetry::window::{self, Outcome};

const LATENCY: Duration = Duration::from_micros(1200);
const OVERHEAD: Duration = Duration::from_micros(40);

fn record(c: &mut Criterion) {
    let mut group = c.benchmark_group("window_record");
    group.bench_function("one_thread", |b| {
        b.iter(|| window::record(black_box("minilm"), Outcome::Ok, LATENCY, OVERHEAD));
    });
    // Another core counting requests for another model all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let beside = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                window::record("echo", Outcome::Ok, LATENCY, OVERHEAD);
            }
        })
    };
    group.bench_function("beside_a_busy_thread", |b| {
        b.iter(|| window::record(black_box("minilm"), Outcome::Ok, LATENCY, OVERHEAD));
    });
    stop.store(true, Ordering::Relaxed);
    let _ = beside.join();
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    // The default config's models and an unknown name, each with traffic.
    for model in ["minilm", "echo", "rag", "sentiment", "tiny_cnn", "unknown"] {
        for i in 0..1000u64 {
            window::record(model, Outcome::Ok, LATENCY + Duration::from_micros(i), OVERHEAD);
        }
    }
    c.bench_function("window_snapshot", |b| b.iter(|| black_box(window::snapshot())));
}

criterion_group!(benches, record, snapshot);
criterion_main!(benches);
