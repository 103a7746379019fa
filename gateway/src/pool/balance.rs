//! Power-of-two-choices over ready workers, by outstanding requests.

/// What the balancer needs to know about a worker.
pub trait Candidate {
    fn ready(&self) -> bool;
    fn outstanding(&self) -> usize;
}

/// Pick two distinct ready workers at random and take the less loaded one
/// (the first on a tie). `rand(n)` returns a uniform index below `n`.
/// Runs on every request, so it picks by rank among the ready workers
/// instead of collecting them.
pub fn p2c<C: Candidate>(workers: &[C], mut rand: impl FnMut(usize) -> usize) -> Option<&C> {
    let ready = || workers.iter().filter(|w| w.ready());
    match ready().count() {
        0 => None,
        1 => ready().next(),
        n => {
            let a = rand(n);
            let b = (a + 1 + rand(n - 1)) % n; // distinct from a
            match (ready().nth(a), ready().nth(b)) {
                (Some(wa), Some(wb)) => Some(if wb.outstanding() < wa.outstanding() { wb } else { wa }),
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

    struct W(bool, usize);
    impl Candidate for W {
        fn ready(&self) -> bool {
            self.0
        }
        fn outstanding(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn none_when_no_worker_is_ready() {
        assert!(p2c(&[W(false, 0), W(false, 0)], |_| 0).is_none());
        assert!(p2c::<W>(&[], |_| 0).is_none());
    }

    #[test]
    fn skips_workers_that_are_not_ready() {
        let ws = [W(false, 0), W(true, 9), W(false, 0)];
        assert_eq!(p2c(&ws, |_| 0).map(|w| w.1), Some(9));
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let ws = [W(true, 5), W(true, 1)];
        for seed in 0..2 {
            assert_eq!(p2c(&ws, |n| seed % n).map(|w| w.1), Some(1));
        }
    }

    #[test]
    fn spreads_load_across_equal_workers() {
        let ws = [W(true, 0), W(true, 0), W(true, 0)];
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
