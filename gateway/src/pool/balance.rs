//! Power-of-two-choices over ready workers, by expected wait: outstanding
//! calls times recent latency (the cost of Finagle's and Linkerd's
//! peak-EWMA balancers). Load alone would keep sending a worker 500 ms
//! slower than its peers one call in every pair it wins while idle; latency
//! makes it lose those pairs until its estimate decays (see `latency`).

use tokio::time::Instant;

/// What the balancer needs to know about a worker.
pub trait Candidate {
    fn ready(&self) -> bool;
    /// Calls outstanding, plus any penalty for recent failures.
    fn load(&self) -> usize;
    /// Recent answer time in seconds at `now`; `None` before its first answer.
    fn latency(&self, now: Instant) -> Option<f64>;
    /// Seconds its oldest outstanding call has run at least, at `now`.
    fn busy_for(&self, now: Instant) -> f64;
}

/// Keeps load deciding between workers with no latency figures at all.
const MIN_LATENCY: f64 = 1e-6;

/// Expected waits on `a` and `b`; a worker with no figures yet is assumed
/// as fast as the other, and one whose outstanding call has already run
/// longer than its estimate is at least that slow.
fn costs<C: Candidate>(a: &C, b: &C) -> (f64, f64) {
    let now = Instant::now();
    let (la, lb) = (a.latency(now), b.latency(now));
    let cost = |c: &C, own: Option<f64>, other: Option<f64>| {
        let latency = own.or(other).unwrap_or(0.0).max(c.busy_for(now));
        (c.load() as f64 + 1.0) * (latency + MIN_LATENCY)
    };
    (cost(a, la, lb), cost(b, lb, la))
}

/// Pick two distinct ready workers at random and take the cheaper one (the
/// first on a tie). `rand(n)` returns a uniform index below `n`. Runs on
/// every request, so it picks by rank among the ready workers instead of
/// collecting them.
pub fn p2c<C: Candidate>(workers: &[C], mut rand: impl FnMut(usize) -> usize) -> Option<&C> {
    let ready = || workers.iter().filter(|w| w.ready());
    match ready().count() {
        0 => None,
        1 => ready().next(),
        n => {
            let a = rand(n);
            let b = (a + 1 + rand(n - 1)) % n; // distinct from a
            match (ready().nth(a), ready().nth(b)) {
                (Some(wa), Some(wb)) => {
                    let (ca, cb) = costs(wa, wb);
                    Some(if cb < ca { wb } else { wa })
                }
                // Readiness changed between counting and picking.
                (Some(w), None) | (None, Some(w)) => Some(w),
                (None, None) => ready().next(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ready, load, latency, busy_for
    #[derive(Clone, Copy)]
    struct W(bool, usize, Option<f64>, f64);
    impl Candidate for W {
        fn ready(&self) -> bool {
            self.0
        }
        fn load(&self) -> usize {
            self.1
        }
        fn latency(&self, _: Instant) -> Option<f64> {
            self.2
        }
        fn busy_for(&self, _: Instant) -> f64 {
            self.3
        }
    }

    fn idle(load: usize) -> W {
        W(true, load, None, 0.0)
    }

    /// Which of `ws` the balancer picks over every pair order.
    fn picks(ws: &[W]) -> Vec<usize> {
        (0..2)
            .map(|seed| {
                let w = p2c(ws, |n| seed % n).unwrap();
                ws.iter().position(|x| std::ptr::eq(x, w)).unwrap()
            })
            .collect()
    }

    #[test]
    fn none_when_no_worker_is_ready() {
        assert!(p2c(&[W(false, 0, None, 0.0), W(false, 0, None, 0.0)], |_| 0).is_none());
        assert!(p2c::<W>(&[], |_| 0).is_none());
    }

    #[test]
    fn skips_workers_that_are_not_ready() {
        let ws = [W(false, 0, None, 0.0), idle(9), W(false, 0, None, 0.0)];
        assert_eq!(p2c(&ws, |_| 0).map(|w| w.1), Some(9));
    }

    #[test]
    fn without_latency_figures_the_less_loaded_of_two_wins() {
        assert_eq!(picks(&[idle(5), idle(1)]), [1, 1]);
    }

    #[test]
    fn a_slow_worker_loses_even_when_idle() {
        let fast_busy = W(true, 3, Some(0.002), 0.001);
        let slow_idle = W(true, 0, Some(0.5), 0.0);
        assert_eq!(picks(&[slow_idle, fast_busy]), [1, 1]);
    }

    #[test]
    fn a_new_worker_is_taken_as_fast_as_its_peer_and_load_decides() {
        assert_eq!(picks(&[W(true, 2, Some(0.05), 0.0), idle(0)]), [1, 1]);
        assert_eq!(picks(&[W(true, 0, Some(0.05), 0.0), idle(2)]), [0, 0]);
    }

    #[test]
    fn a_call_outstanding_longer_than_the_estimate_counts_as_latency() {
        // Same estimate and load, but one has a call running for 300 ms: hung.
        let hung = W(true, 1, Some(0.002), 0.3);
        let fine = W(true, 1, Some(0.002), 0.001);
        assert_eq!(picks(&[hung, fine]), [1, 1]);
    }

    #[test]
    fn spreads_load_across_equal_workers() {
        let ws = [idle(0), idle(0), idle(0)];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = [0usize; 3];
        for _ in 0..3000 {
            let w = p2c(&ws, |n| rng.usize(..n)).unwrap();
            let idx = ws.iter().position(|x| std::ptr::eq(x, w)).unwrap();
            hits[idx] += 1;
        }
        assert!(hits.iter().all(|h| *h > 700), "{hits:?}");
    }
}
