//! Passive outlier detection: a worker that fails `consecutive` calls in a
//! row, or more than `ratio` of its last `window` calls, is ejected from
//! balancing for `base_ejection` × the number of times it has been ejected.
//! When that time is up it gets one probe call at a time: a success
//! re-admits it, a failure ejects it again for longer. A pool never has more
//! than `max_ejected` of its workers ejected, so one bad deploy cannot empty it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub use crate::config::components::OutlierConfig;
use tokio::time::Instant;

/// How long after its last failure a worker's balancing penalty lasts.
const PENALTY_LAPSE_MS: u64 = 2_000;

impl OutlierConfig {
    /// Workers of a pool of `n` that may be ejected at once.
    pub fn cap(&self, n: usize) -> usize {
        ((n as f64) * self.max_ejected).floor() as usize
    }
}

/// Counters behind the decision (under a lock; touched once per call).
#[derive(Debug, Default)]
struct Counts {
    consecutive: u32,
    /// Last outcomes, newest in bit 0; 1 = failure.
    recent: u64,
    seen: u32,
    ejections: u32,
}

/// What a recorded outcome did to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    /// Crossed a threshold: eject it if the pool's cap allows.
    ShouldEject,
    /// A probe succeeded: back in rotation.
    Readmitted,
    /// A probe failed: out again, for this long.
    EjectedAgain(Duration),
}

/// A worker's outlier state. The hot path (is it eligible? how loaded?)
/// reads atomics only.
pub struct Outlier {
    epoch: Instant,
    /// 0: in rotation; else ms since `epoch` when it may be probed.
    ejected_until_ms: AtomicU64,
    probing: AtomicBool,
    /// Consecutive failures, as a balancing penalty ...
    penalty: AtomicU64,
    /// ... that lapses this long after the last failure (ms since `epoch`),
    /// so a worker that recovered is not starved of the calls that would show it.
    last_failure_ms: AtomicU64,
    counts: Mutex<Counts>,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            ejected_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            penalty: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            counts: Mutex::new(Counts::default()),
        }
    }
}

impl Outlier {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// In rotation, or ejected with its time up and no probe out.
    pub fn eligible(&self) -> bool {
        match self.ejected_until_ms.load(Ordering::Acquire) {
            0 => true,
            until => self.now_ms() >= until && !self.probing.load(Ordering::Acquire),
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) != 0
    }

    /// Extra load the balancer adds for recent failures, so a worker that
    /// fails fast does not look idle and attract more calls.
    pub fn penalty(&self) -> usize {
        let penalty = self.penalty.load(Ordering::Relaxed);
        if penalty == 0 || self.now_ms() > self.last_failure_ms.load(Ordering::Relaxed) + PENALTY_LAPSE_MS {
            return 0;
        }
        usize::try_from(penalty).unwrap_or(usize::MAX).saturating_mul(2)
    }

    /// A new process answers for this worker (it turned SERVING): its
    /// predecessor's failures are not its own. An ejection stands.
    pub fn reset_failures(&self) {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.consecutive = 0;
        c.recent = 0;
        c.seen = 0;
        self.penalty.store(0, Ordering::Relaxed);
    }

    /// A call was just given to this worker: if it is ejected, it is the probe.
    pub fn on_pick(&self) {
        if self.is_ejected() {
            self.probing.store(true, Ordering::Release);
        }
    }

    /// Record a call's outcome (`true`: the pool's failure).
    pub fn record(&self, failed: bool, config: &OutlierConfig) -> Event {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = config.window.clamp(1, 64);
        c.recent = (c.recent << 1) | u64::from(failed);
        c.seen = (c.seen + 1).min(window);
        c.consecutive = if failed { c.consecutive + 1 } else { 0 };
        self.penalty.store(u64::from(c.consecutive), Ordering::Relaxed);
        if failed {
            self.last_failure_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        if self.is_ejected() {
            if !self.probing.swap(false, Ordering::AcqRel) {
                // A call picked before the ejection: says nothing new.
                return Event::None;
            }
            if failed {
                c.ejections += 1;
                let d = self.eject_for(&c, config);
                return Event::EjectedAgain(d);
            }
            self.ejected_until_ms.store(0, Ordering::Release);
            c.recent = 0;
            c.seen = 0;
            return Event::Readmitted;
        }
        let mask = if window == 64 { u64::MAX } else { (1u64 << window) - 1 };
        let failures = (c.recent & mask).count_ones();
        let ratio_hit = c.seen >= window && f64::from(failures) >= config.ratio * f64::from(window);
        if c.consecutive >= config.consecutive || ratio_hit { Event::ShouldEject } else { Event::None }
    }

    /// Take it out of rotation (the pool decided its cap allows it).
    pub fn eject(&self, config: &OutlierConfig) -> Duration {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.ejections += 1;
        c.recent = 0;
        c.seen = 0;
        self.eject_for(&c, config)
    }

    fn eject_for(&self, c: &Counts, config: &OutlierConfig) -> Duration {
        let d = config.base_ejection.saturating_mul(c.ejections.max(1));
        // Never 0, which means "in rotation".
        let until = self.now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).max(1);
        self.ejected_until_ms.store(until, Ordering::Release);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive: 3,
            ratio: 0.5,
            window: 10,
            base_ejection: Duration::from_secs(10),
            max_ejected: 0.5,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_then_a_probe_readmits() {
        let o = Outlier::default();
        let c = config();
        assert_eq!(o.record(true, &c), Event::None);
        assert_eq!(o.record(true, &c), Event::None);
        assert!(o.penalty() > 0, "failing fast must not look idle");
        tokio::time::advance(Duration::from_millis(2_001)).await;
        assert_eq!(o.penalty(), 0, "the penalty lapses, so a recovered worker is tried again");
        assert_eq!(o.record(true, &c), Event::ShouldEject);
        assert_eq!(o.eject(&c), Duration::from_secs(10));
        assert!(!o.eligible());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(o.eligible(), "time is up: one probe may go");
        o.on_pick();
        assert!(!o.eligible(), "one probe at a time");
        assert_eq!(o.record(false, &c), Event::Readmitted);
        assert!(o.eligible() && !o.is_ejected());
        assert_eq!(o.penalty(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_for_longer_each_time() {
        let o = Outlier::default();
        let c = config();
        o.eject(&c);
        tokio::time::advance(Duration::from_secs(10)).await;
        o.on_pick();
        assert_eq!(o.record(true, &c), Event::EjectedAgain(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(!o.eligible());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(o.eligible());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ratio_over_the_window_ejects_too() {
        let o = Outlier::default();
        let c = config();
        // Alternate: never 3 in a row, but half of the last 10.
        let mut events = Vec::new();
        for i in 0..10 {
            events.push(o.record(i % 2 == 0, &c));
        }
        assert_eq!(events[..9], [Event::None; 9]);
        assert_eq!(events[9], Event::ShouldEject);
    }

    #[test]
    fn the_cap_is_a_share_of_the_pool_rounded_down() {
        let c = config();
        assert_eq!((c.cap(1), c.cap(2), c.cap(4), c.cap(5)), (0, 1, 2, 2));
    }
}
