//! What loading local workers' models has come to, per pool. The supervisor
//! writes it as workers load or fail to; the pools read it, so that a call
//! for a model that cannot load is told why at once instead of "starting"
//! for as long as the restarts go on.

use std::collections::HashMap;
use std::sync::Mutex;

/// Every local pool's loading, shared by the supervisor and the pools.
#[derive(Debug)]
pub struct LoadState {
    /// Consecutive load failures of every worker of a pool that make it failed.
    max_failures: u32,
    pools: Mutex<HashMap<String, PoolLoad>>,
}

#[derive(Debug, Default)]
struct PoolLoad {
    /// The model names the pool's class declares (from the start-up check).
    models: Vec<String>,
    /// Per worker: its load failures in a row since it last loaded.
    failures: HashMap<String, u32>,
    workers: usize,
    /// The first line of the last failure.
    last_error: String,
}

impl PoolLoad {
    fn failed(&self, max: u32) -> Option<&str> {
        let all = self.workers > 0 && self.failures.len() == self.workers && self.failures.values().all(|n| *n >= max);
        all.then_some(self.last_error.as_str())
    }
}

impl LoadState {
    pub fn new(max_failures: u32) -> Self {
        Self { max_failures: max_failures.max(1), pools: Mutex::new(HashMap::new()) }
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, PoolLoad>> {
        self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pool `pool` runs `workers` processes serving `models`.
    pub fn expect(&self, pool: &str, workers: usize, models: Vec<String>) {
        let mut pools = self.pools();
        let entry = pools.entry(pool.to_owned()).or_default();
        entry.workers = workers;
        entry.models = models;
    }

    /// Load failures in a row of worker `worker` of `pool`.
    pub fn failures(&self, pool: &str, worker: &str) -> u32 {
        self.pools().get(pool).and_then(|p| p.failures.get(worker).copied()).unwrap_or(0)
    }

    /// The failures in a row that make a worker's loading hopeless.
    pub fn max_failures(&self) -> u32 {
        self.max_failures
    }

    /// Worker `worker` of `pool` was stopped for good.
    pub fn forget(&self, pool: &str, worker: &str) {
        if let Some(p) = self.pools().get_mut(pool) {
            p.failures.remove(worker);
        }
    }

    /// Worker `worker` of `pool` loaded its models.
    pub fn loaded(&self, pool: &str, worker: &str) {
        if let Some(p) = self.pools().get_mut(pool) {
            p.failures.insert(worker.to_owned(), 0);
        }
    }

    /// Worker `worker` of `pool` exited because its model did not load:
    /// its failures in a row, and whether the pool is failed now.
    pub fn load_failed(&self, pool: &str, worker: &str, error: &str) -> (u32, bool) {
        let mut pools = self.pools();
        let p = pools.entry(pool.to_owned()).or_default();
        let n = p.failures.entry(worker.to_owned()).or_default();
        *n += 1;
        let times = *n;
        p.last_error = error.lines().next().unwrap_or_default().to_owned();
        (times, p.failed(self.max_failures).is_some())
    }

    /// Why `pool` cannot serve: every one of its workers failed to load its
    /// model `max_failures` times in a row (the last error's first line).
    pub fn failed(&self, pool: &str) -> Option<String> {
        self.pools().get(pool)?.failed(self.max_failures).map(str::to_owned)
    }

    /// The model names `pool`'s class declares.
    pub fn models(&self, pool: &str) -> Vec<String> {
        self.pools().get(pool).map(|p| p.models.clone()).unwrap_or_default()
    }

    /// The failed pool whose class declares model `model`, and why.
    pub fn failed_for_model(&self, model: &str) -> Option<(String, String)> {
        self.pools().iter().find_map(|(name, p)| {
            let error = p.failed(self.max_failures).filter(|_| p.models.iter().any(|m| m == model))?;
            Some((name.clone(), error.to_owned()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::LoadState;

    #[test]
    fn a_pool_is_failed_only_when_every_worker_failed_enough_times_in_a_row() {
        let s = LoadState::new(3);
        s.expect("clf", 2, vec!["tfidf".into()]);
        for _ in 0..3 {
            s.load_failed("clf", "clf-0", "ValueError: no weights\nmore");
        }
        assert_eq!(s.failed("clf"), None, "one worker has not failed yet");
        s.load_failed("clf", "clf-1", "ValueError: no weights");
        s.load_failed("clf", "clf-1", "ValueError: no weights");
        assert_eq!(s.failed("clf"), None, "two of three");
        assert_eq!(s.load_failed("clf", "clf-1", "OSError: gone\ntraceback"), (3, true));
        assert_eq!(s.failed("clf").as_deref(), Some("OSError: gone"));
        assert_eq!(s.failed_for_model("tfidf"), Some(("clf".into(), "OSError: gone".into())));
        assert_eq!(s.failed_for_model("other"), None);
        s.loaded("clf", "clf-0");
        assert_eq!(s.failed("clf"), None, "a worker that loads ends it");
        assert_eq!(s.load_failed("clf", "clf-0", "again"), (1, false), "the count starts over");
    }
}
