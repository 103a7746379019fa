use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::admission::Pool;
use super::batched::batch_outcome;
use super::circuit::{self, Circuit, Outcome};
use super::status::from_status;
use super::table::STARTUP_WINDOW;
use super::worker::Worker;
use super::{Pools, outlier, retry};
use crate::batch::BatchConfig;
use crate::call::{Call, Deadline};
use crate::config::{Config, WorkerAddr};
use crate::error::GatewayError;
use crate::proto::{ModelInfo, ModelKind};
use crate::upstream::Upstream;

fn pools() -> Arc<Pools> {
    let toml = "[[pools]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\n\
                [[pools]]\nname = \"b\"\naddresses = [\"127.0.0.1:2\"]\n";
    let raw: crate::config::RawConfig = toml::from_str(toml).unwrap();
    let config = Config::from_raw(raw).unwrap();
    Pools::new(&config, Path::new("/nonexistent"), Arc::new(crate::load_state::LoadState::new(3)))
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
    let w = p.pool(0).workers()[0].clone();
    p.register(0, &w, vec![info("m")]);
    assert!(p.model("m").is_ok());
    assert!(matches!(p.route("typo"), Err(GatewayError::Starting { .. })));
    tokio::time::advance(STARTUP_WINDOW + std::time::Duration::from_secs(1)).await;
    assert!(matches!(p.route("typo"), Err(GatewayError::ModelNotFound { .. })));
}

#[tokio::test]
async fn a_model_stays_with_the_pool_that_claimed_it_first() {
    let p = pools();
    let (wa, wb) = (p.pool(0).workers()[0].clone(), p.pool(1).workers()[0].clone());
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
        class: Default::default(),
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
    let config = crate::config::PoolConfig {
        name: "q".into(),
        kind: crate::config::PoolKind::Remote { addresses: Vec::new() },
        max_in_flight_per_worker: per_worker,
        max_queue,
        circuit: circuit::CircuitConfig::default(),
        adaptive: None,
        outlier: outlier::OutlierConfig::default(),
        retry: retry::RetryConfig::default(),
        batching: BatchConfig::default(),
    };
    Pool::new(0, &config, 1 << 26, Arc::new(vec![worker]))
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

#[tokio::test]
async fn a_retired_pool_refuses_new_calls_and_waits_for_those_under_way() {
    let pool = Arc::new(one_worker_pool(4, 4));
    let under_way = pool.enter(crate::call::Class::Interactive).unwrap();
    pool.mark_retired();
    let mut retired = Box::pin(pool.until_idle());
    assert!(futures::poll!(retired.as_mut()).is_pending(), "a call is still in the pool");
    assert!(pool.enter(crate::call::Class::Interactive).is_none(), "no call enters a retired pool");
    drop(under_way);
    retired.await;
    assert_eq!(pool.active(), 0);
}

#[tokio::test]
async fn a_draining_worker_gets_no_new_calls_and_its_drain_ends_with_its_last_call() {
    let pool = one_worker_pool(4, 4);
    let worker = pool.workers()[0].clone();
    let under_way = pool.pick().unwrap();
    let mut drained = Box::pin(worker.drain());
    assert!(futures::poll!(drained.as_mut()).is_pending(), "a call is still on it");
    assert!(matches!(pool.pick(), Err(GatewayError::NoReadyWorker { .. })), "no new call is given to it");
    drop(under_way);
    drained.await;
    assert_eq!(worker.outstanding(), 0);
    worker.set_draining(false);
    assert!(pool.pick().is_ok(), "undrained, it takes calls again");
}
