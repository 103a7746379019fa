//! Retries of worker calls: which failures may be retried, how long to wait,
//! and a budget per pool so a failing pool cannot multiply its own load.
//!
//! A call is retried when it provably never started on the worker
//! (connection refused, stream refused, the worker's admission full), or
//! when the worker became unavailable mid-call and running it again is
//! harmless: embeddings and tensor inference are pure functions of their
//! input and are retried unless the pool says `idempotent = false`; a
//! generation only when the pool says `idempotent = true`; at most `max` extra attempts, with jittered backoff, never
//! past the deadline, and only while retries stay within `ratio` of the
//! pool's recent requests plus `floor`.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::components::RetryConfig;
use crate::error::GatewayError;

/// What running a call twice would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerun {
    /// Nothing: the answer is a function of the input (embed, infer).
    Pure,
    /// A second, different answer, possibly billed (generate).
    Generation,
}

/// How far back the budget looks.
const WINDOW: Duration = Duration::from_secs(10);
/// First backoff; each retry doubles it, with ±50% jitter.
const BACKOFF: Duration = Duration::from_millis(20);

impl RetryConfig {
    /// May this failure be retried at all?
    pub fn retryable(&self, err: &GatewayError, rerun: Rerun) -> bool {
        match err {
            GatewayError::WorkerRefused { .. } => true,
            GatewayError::WorkerUnavailable { .. } => self.idempotent.unwrap_or(rerun == Rerun::Pure),
            _ => false,
        }
    }
}

/// The wait before retry number `n` (1-based): 20 ms × 2^(n-1), ±50%.
pub fn backoff(n: u32) -> Duration {
    let base = BACKOFF.saturating_mul(1 << n.saturating_sub(1).min(6));
    base.mul_f64(0.5 + fastrand::f64())
}

#[derive(Debug)]
struct Window {
    start: Instant,
    requests: u64,
    retries: u64,
    /// The previous window's counts, so the budget does not reset to empty
    /// at each window boundary.
    previous: (u64, u64),
}

/// Requests and retries of one pool over the last window or two.
#[derive(Debug)]
pub struct Budget {
    window: Mutex<Window>,
}

impl Default for Budget {
    fn default() -> Self {
        Self { window: Mutex::new(Window { start: Instant::now(), requests: 0, retries: 0, previous: (0, 0) }) }
    }
}

impl Budget {
    fn roll(w: &mut Window) {
        let now = Instant::now();
        if now.duration_since(w.start) >= WINDOW {
            let stale = now.duration_since(w.start) >= WINDOW * 2;
            w.previous = if stale { (0, 0) } else { (w.requests, w.retries) };
            w.start = now;
            w.requests = 0;
            w.retries = 0;
        }
    }

    pub fn count_request(&self) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        Self::roll(&mut w);
        w.requests += 1;
    }

    /// Take one retry from the budget, if any is left.
    pub fn try_retry(&self, config: &RetryConfig) -> bool {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        Self::roll(&mut w);
        let requests = (w.requests + w.previous.0) as f64;
        let retries = w.retries + w.previous.1;
        let allowed = (requests * config.ratio).floor() as u64 + u64::from(config.floor);
        if retries < allowed {
            w.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_that_never_started_are_retried_and_started_ones_when_rerunning_is_harmless() {
        use Rerun::{Generation, Pure};
        let refused = GatewayError::WorkerRefused { worker: "w".into(), detail: "connection refused".into() };
        let unavailable = GatewayError::WorkerUnavailable { worker: "w".into(), detail: "reset".into() };
        let failed = GatewayError::WorkerFailed { worker: "w".into(), detail: "raised".into() };
        let default = RetryConfig::default();
        let on = RetryConfig { idempotent: Some(true), ..default };
        let off = RetryConfig { idempotent: Some(false), ..default };
        for config in [default, on, off] {
            assert!(config.retryable(&refused, Pure) && config.retryable(&refused, Generation));
            assert!(!config.retryable(&failed, Pure), "a model error would only fail again");
            assert!(!config.retryable(&GatewayError::DeadlineExceeded { after: Duration::from_secs(1) }, Pure));
        }
        // A worker that died mid-call: embeddings and tensors go again by
        // default, generations only when the pool says so.
        assert!(default.retryable(&unavailable, Pure) && !default.retryable(&unavailable, Generation));
        assert!(on.retryable(&unavailable, Generation));
        assert!(!off.retryable(&unavailable, Pure));
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(10) && first <= Duration::from_millis(30), "{first:?}");
            let second = backoff(2);
            assert!(second >= Duration::from_millis(20) && second <= Duration::from_millis(60), "{second:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_a_share_of_requests_plus_a_floor() {
        let b = Budget::default();
        let c = RetryConfig { ratio: 0.2, floor: 2, ..RetryConfig::default() };
        for _ in 0..10 {
            b.count_request();
        }
        // 10 requests: 2 + 2 retries.
        let granted = (0..10).filter(|_| b.try_retry(&c)).count();
        assert_eq!(granted, 4);
        // A window later, the last window still counts ...
        tokio::time::advance(WINDOW).await;
        assert!(!b.try_retry(&c));
        // ... two windows later, only the floor is left.
        tokio::time::advance(WINDOW * 2).await;
        assert_eq!((0..10).filter(|_| b.try_retry(&c)).count(), 2);
    }
}
