//! Adaptive admission by error rate (client-side throttling, as in the
//! Google SRE book, "Handling Overload"): over a sliding window, a call is
//! shed with probability `(requests - K·accepts) / (requests + 1)`, where
//! `K = 1 / (1 - threshold)`, capped at `max_shed`. Below the threshold
//! nothing is shed; past it, the share grows with the failure ratio `f` of
//! the calls the pool was sent (`1 - (1 - f)·K`), so a struggling pool
//! sheds early and gradually where the breaker flips all or nothing.
//!
//! `requests` are the calls sent to the pool, not those shed: counted, a
//! shed call would be evidence against the pool that the pool never saw,
//! and with `K` near 1 the admitted share could then grow back by only a
//! factor `K` a window after the pool healed (minutes at the defaults).
//! Counted this way, the share falls back to nothing within a window of
//! the pool's calls succeeding again; and it never reaches 1, so the pool
//! keeps getting calls to show that it healed.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::circuit::Outcome;
use crate::config::components::AdaptiveConfig;
use crate::error::GatewayError;

/// The window is kept as this many slots.
const SLOTS: usize = 10;

#[derive(Debug)]
struct Ring {
    /// (requests, accepts) per slot.
    slots: [(u64, u64); SLOTS],
    current: usize,
    /// When the current slot began.
    since: Instant,
}

impl Ring {
    fn rotate(&mut self, now: Instant, slot: Duration) {
        let mut moved = 0;
        while now.duration_since(self.since) >= slot && moved < SLOTS {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = (0, 0);
            self.since += slot;
            moved += 1;
        }
        if moved == SLOTS {
            // Idle for a whole window: start afresh from now.
            self.since = now;
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.slots.iter().fold((0, 0), |(r, a), (sr, sa)| (r + sr, a + sa))
    }
}

/// One pool's adaptive admission; does nothing when not configured.
#[derive(Debug)]
pub struct Adaptive {
    pool: String,
    config: Option<AdaptiveConfig>,
    ring: Mutex<Ring>,
    admitted: metrics::Gauge,
}

impl Adaptive {
    pub fn new(pool: &str, config: Option<AdaptiveConfig>) -> Self {
        let admitted = metrics::gauge!(crate::telemetry::metrics::ADMITTED_SHARE, "pool" => pool.to_owned());
        admitted.set(1.0);
        Self {
            pool: pool.to_owned(),
            config,
            ring: Mutex::new(Ring { slots: [(0, 0); SLOTS], current: 0, since: Instant::now() }),
            admitted,
        }
    }

    /// The share shed now.
    pub fn shed_share(&self) -> f64 {
        let Some(c) = &self.config else { return 0.0 };
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.rotate(Instant::now(), c.window / SLOTS as u32);
        shed_share(c, ring.totals())
    }

    /// Admit a call or shed it (503 `pool-shedding`, or the route's fallback).
    pub fn admit(&self) -> Result<(), GatewayError> {
        self.admit_with(fastrand::f64())
    }

    /// [`Adaptive::admit`] with the random draw given (`0..1`).
    fn admit_with(&self, draw: f64) -> Result<(), GatewayError> {
        let Some(c) = &self.config else { return Ok(()) };
        let slot = c.window / SLOTS as u32;
        let p = {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            ring.rotate(Instant::now(), slot);
            let p = shed_share(c, ring.totals());
            if draw >= p {
                let current = ring.current;
                ring.slots[current].0 += 1;
            }
            p
        };
        self.admitted.set(1.0 - p);
        if draw < p {
            return Err(GatewayError::Shed {
                pool: self.pool.clone(),
                shed_percent: (p * 100.0).round() as u32,
                retry_after: slot.max(Duration::from_secs(1)),
            });
        }
        Ok(())
    }

    /// How an admitted call ended: anything but a failure of the pool's
    /// (a client's error included) is an accept.
    pub fn record(&self, outcome: Outcome) {
        if self.config.is_none() || outcome == Outcome::Failure {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let current = ring.current;
        ring.slots[current].1 += 1;
    }
}

/// The share to shed with `(requests, accepts)` over the window.
fn shed_share(c: &AdaptiveConfig, (requests, accepts): (u64, u64)) -> f64 {
    if requests < c.min_requests {
        return 0.0;
    }
    let k = 1.0 / (1.0 - c.threshold);
    let p = (requests as f64 - k * accepts as f64) / (requests as f64 + 1.0);
    p.clamp(0.0, c.max_shed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive() -> Adaptive {
        let config =
            AdaptiveConfig { window: Duration::from_secs(10), threshold: 0.1, max_shed: 0.9, min_requests: 20 };
        Adaptive::new("p", Some(config))
    }

    /// Offer `n` calls (draws spread over 0..1), failing `fail_every`-th of
    /// those admitted; the share shed of the offered.
    fn offer(a: &Adaptive, n: u32, failing: impl Fn(u32) -> bool) -> f64 {
        let mut shed = 0;
        for i in 0..n {
            let draw = f64::from((i * 37) % 100) / 100.0;
            match a.admit_with(draw) {
                Ok(()) => a.record(if failing(i) { Outcome::Failure } else { Outcome::Success }),
                Err(e) => {
                    assert_eq!(e.http_status(), 503);
                    assert!(e.retry_after().is_some());
                    shed += 1;
                }
            }
        }
        f64::from(shed) / f64::from(n)
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_shed_below_the_threshold_or_without_enough_calls() {
        let a = adaptive();
        // Every call fails, but 19 calls are too few to judge.
        assert_eq!(offer(&a, 19, |_| true), 0.0);
        let a = adaptive();
        // 5% failures, under the 10% threshold.
        assert_eq!(offer(&a, 400, |i| i % 20 == 0), 0.0);
        assert_eq!(a.shed_share(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_share_shed_grows_with_the_failures_and_falls_when_the_pool_heals() {
        let a = adaptive();
        let tick = Duration::from_millis(250);
        let mut shares = Vec::new();
        // Half the admitted calls fail, 40 calls every 250 ms for 10 s.
        for _ in 0..40 {
            offer(&a, 40, |i| i % 2 == 0);
            shares.push(a.shed_share());
            tokio::time::advance(tick).await;
        }
        eprintln!("shed while failing: {shares:.2?}");
        // 1 - (1 - 0.5)·K = 0.44 once the window is full of failing calls.
        assert!(shares.windows(2).all(|w| (w[1] - w[0]).abs() < 0.15), "no flapping: {shares:.2?}");
        assert!(shares[39] > 0.35 && shares[39] < 0.55, "settles near 0.44: {shares:.2?}");
        assert!(shares.iter().all(|s| *s <= 0.9), "never past max_shed");
        // Healed: every admitted call succeeds; the share falls to nothing.
        let mut healed = Vec::new();
        for _ in 0..120 {
            offer(&a, 40, |_| false);
            healed.push(a.shed_share());
            tokio::time::advance(tick).await;
        }
        eprintln!("shed after healing: {healed:.2?}");
        let zero_at = healed.iter().position(|s| *s == 0.0).expect("recovers");
        assert!(zero_at <= 40, "recovered within a window (40 ticks), not after {zero_at}: {healed:.2?}");
        assert!(healed[zero_at..].iter().all(|s| *s == 0.0), "and stays recovered: {healed:.2?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_that_always_fails_is_shed_up_to_max_shed_and_no_further() {
        let a = adaptive();
        for _ in 0..40 {
            offer(&a, 40, |_| true);
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        let shed = offer(&a, 1000, |_| true);
        assert!((0.85..=0.9).contains(&shed), "{shed}");
        assert!((a.shed_share() - 0.9).abs() < 1e-9);
    }

    #[test]
    fn without_a_config_nothing_is_counted_or_shed() {
        let a = Adaptive::new("p", None);
        for _ in 0..100 {
            a.admit().unwrap();
            a.record(Outcome::Failure);
        }
        assert_eq!(a.shed_share(), 0.0);
    }
}
