//! A worker's recent latency, as a peak-sensitive moving average (the
//! "peak EWMA" of Finagle, Linkerd and tower's `PeakEwma`), so the balancer
//! sends less to a worker that answers slowly.
//!
//! - An answer slower than the estimate replaces it at once (the peak); a
//!   faster one moves it by a weight that grows with the time since the last
//!   sample, so the estimate spans about [`DECAY`] of history.
//! - Read without new samples, the estimate decays towards zero with time
//!   constant [`DECAY`]: a worker the balancer avoided because it was slow is
//!   tried again after a while, and one good answer brings it back.
//! - A failure never lowers the estimate (failing fast must not look fast)
//!   and stops its decay; a failure that took long raises it like any answer.
//! - A worker with no answers yet has no estimate; the balancer then assumes
//!   it is as fast as the worker it is compared with.
//!
//! Plain atomics: the balancer reads two workers per call, and a torn read
//! (a new estimate with an old stamp) only decays it a little more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Time constant of the decay, in seconds.
pub const DECAY: f64 = 1.0;

/// Weight of a new answer in the typical latency (no decay with time).
const TYPICAL_WEIGHT: f64 = 0.2;

/// How many times its typical latency a worker must have had before a
/// missed deadline says it was slow rather than the caller impatient.
pub const BLAME_MARGIN: f64 = 2.0;

/// The estimate of one worker.
pub struct Latency {
    epoch: Instant,
    /// Seconds as `f64` bits; NaN while unknown.
    estimate: AtomicU64,
    /// When the estimate last changed, µs since `epoch`.
    stamp_us: AtomicU64,
    /// Seconds as `f64` bits, NaN while unknown: a moving average of
    /// answers that does not decay while idle, to judge missed deadlines by.
    typical: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            estimate: AtomicU64::new(f64::NAN.to_bits()),
            stamp_us: AtomicU64::new(0),
            typical: AtomicU64::new(f64::NAN.to_bits()),
        }
    }
}

impl Latency {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn load(&self) -> (f64, u64) {
        (f64::from_bits(self.estimate.load(Ordering::Relaxed)), self.stamp_us.load(Ordering::Relaxed))
    }

    fn store(&self, estimate: f64, now_us: u64) {
        self.estimate.store(estimate.to_bits(), Ordering::Relaxed);
        self.stamp_us.store(now_us, Ordering::Relaxed);
    }

    /// Weight of the old estimate after `dt_us` without samples.
    fn decay(dt_us: u64) -> f64 {
        (-(dt_us as f64) / 1e6 / DECAY).exp()
    }

    /// The estimate now, in seconds; `None` before the first answer.
    pub fn get(&self) -> Option<f64> {
        self.get_at(Instant::now())
    }

    /// The estimate at `now` (one clock read serves a whole pick).
    pub fn get_at(&self, now: Instant) -> Option<f64> {
        let (estimate, stamp) = self.load();
        if estimate.is_nan() {
            return None;
        }
        let now_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        Some(estimate * Self::decay(now_us.saturating_sub(stamp)))
    }

    /// The worker answered after `took`.
    pub fn observe(&self, took: Duration) {
        let sample = took.as_secs_f64();
        let (estimate, stamp) = self.load();
        let now = self.now_us();
        let next = if estimate.is_nan() || sample > estimate {
            sample
        } else {
            let w = Self::decay(now.saturating_sub(stamp));
            estimate * w + sample * (1.0 - w)
        };
        self.store(next, now);
        let typical = f64::from_bits(self.typical.load(Ordering::Relaxed));
        let typical =
            if typical.is_nan() { sample } else { typical * (1.0 - TYPICAL_WEIGHT) + sample * TYPICAL_WEIGHT };
        self.typical.store(typical.to_bits(), Ordering::Relaxed);
    }

    /// Whether a call that missed its caller's deadline after `took` shows
    /// the worker slow: it had more than [`BLAME_MARGIN`] times its typical
    /// latency. A deadline shorter than that was the caller's choice, and a
    /// worker with no answers yet has no typical latency to fall short of.
    pub fn abnormally_slow(&self, took: Duration) -> bool {
        let typical = f64::from_bits(self.typical.load(Ordering::Relaxed));
        !typical.is_nan() && took.as_secs_f64() > BLAME_MARGIN * typical
    }

    /// A call to the worker failed after `took`.
    pub fn observe_failure(&self, took: Duration) {
        let (estimate, _) = self.load();
        if estimate.is_nan() {
            return;
        }
        self.store(estimate.max(took.as_secs_f64()), self.now_us());
    }

    /// A new process answers for the worker: forget the old one's figures.
    pub fn reset(&self) {
        self.store(f64::NAN, self.now_us());
        self.typical.store(f64::NAN.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_deadline_blames_only_a_worker_that_had_twice_its_typical_time() {
        let l = Latency::default();
        assert!(!l.abnormally_slow(ms(10_000)), "no answers yet: nothing to compare with");
        for _ in 0..20 {
            l.observe(ms(2000));
        }
        assert!(!l.abnormally_slow(ms(300)), "a 300 ms deadline on a 2 s model is the caller's");
        assert!(!l.abnormally_slow(ms(3900)));
        assert!(l.abnormally_slow(ms(4100)), "twice its usual time and still nothing");
        l.reset();
        assert!(!l.abnormally_slow(ms(4100)), "a new process has no history");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-4)
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_until_the_first_answer_then_a_slower_answer_is_taken_at_once() {
        let l = Latency::default();
        assert_eq!(l.get(), None);
        l.observe(ms(2));
        assert!(close(l.get(), 0.002), "{:?}", l.get());
        l.observe(ms(500));
        assert!(close(l.get(), 0.5), "the peak replaces the estimate: {:?}", l.get());
    }

    #[tokio::test(start_paused = true)]
    async fn a_faster_answer_moves_it_by_the_time_since_the_last() {
        let l = Latency::default();
        l.observe(ms(100));
        // Right after: almost no weight for the new sample.
        l.observe(ms(0));
        assert!(l.get().unwrap() > 0.099, "{:?}", l.get());
        // After a long quiet spell one good answer is nearly all that counts.
        tokio::time::advance(Duration::from_secs(10)).await;
        l.observe(ms(2));
        assert!((l.get().unwrap() - 0.002).abs() < 1e-3, "{:?}", l.get());
    }

    #[tokio::test(start_paused = true)]
    async fn it_decays_towards_zero_while_the_worker_is_not_asked() {
        let l = Latency::default();
        l.observe(ms(500));
        tokio::time::advance(Duration::from_secs_f64(DECAY)).await;
        assert!(close(l.get(), 0.5 * (-1f64).exp()), "{:?}", l.get());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_never_make_a_worker_look_faster() {
        let l = Latency::default();
        l.observe_failure(ms(1));
        assert_eq!(l.get(), None, "a failure is not an answer");
        l.observe(ms(10));
        tokio::time::advance(Duration::from_secs(5)).await;
        l.observe_failure(ms(1));
        assert!(close(l.get(), 0.01), "a failure stops the decay and keeps the estimate: {:?}", l.get());
        l.observe_failure(ms(200));
        assert!(close(l.get(), 0.2), "a slow failure (a timeout) raises it: {:?}", l.get());
        l.reset();
        assert_eq!(l.get(), None);
    }
}
