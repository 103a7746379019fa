//! Changing the pools while they serve (a config reload, an operator):
//! pools added, retuned and removed, workers added and drained, and what
//! an operator sees of them.
//!
//! A pool keeps its index for as long as the gateway runs: the model
//! table and the batchers name pools by it. A retuned pool is replaced at
//! its index with the same workers; a removed one stays as a retired
//! entry that no call can enter.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::Pools;
use super::admission::Pool;
use super::members::DiscoveryError;
use super::watching::{Watching, discovery_key, worker_key};
use super::worker::Worker;
use crate::config::{PoolConfig, WorkerAddr};

/// Why a change to the pools cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no pool named {0:?}")]
    NoPool(String),
    #[error("pool {pool:?} has no worker {worker:?}")]
    NoWorker { pool: String, worker: String },
    #[error("a pool named {0:?} exists already")]
    Exists(String),
    #[error("the pools are not watched yet")]
    NotWatching,
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// A worker as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub id: String,
    pub address: String,
    /// `serving`, `starting` (not yet or no longer SERVING), `ejected`
    /// (outlier detection) or `draining` (out of rotation).
    pub state: &'static str,
    pub in_flight: usize,
    /// Its recent answer time (peak EWMA); `None` before its first answer.
    pub latency_ms: Option<f64>,
}

/// A pool as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolView {
    pub name: String,
    /// `closed`, `open` or `half-open`.
    pub circuit: &'static str,
    /// Share of calls adaptive admission lets through now (1 without it).
    pub admitted_share: f64,
    /// Calls routed to it and not yet ended.
    pub active: usize,
    /// Calls waiting for a slot.
    pub queued: usize,
    /// Items waiting in its batchers' queues.
    pub batch_queued: usize,
    pub slots: usize,
    pub workers: Vec<WorkerView>,
}

fn view(pool: &Pool, batch_queued: usize) -> PoolView {
    let workers = pool
        .workers()
        .iter()
        .map(|w| WorkerView {
            id: w.id.clone(),
            address: w.addr.to_string(),
            state: if w.is_draining() {
                "draining"
            } else if w.outlier.is_ejected() {
                "ejected"
            } else if w.is_serving() {
                "serving"
            } else {
                "starting"
            },
            in_flight: w.outstanding(),
            latency_ms: w.latency.get().map(|s| s * 1e3),
        })
        .collect();
    PoolView {
        name: pool.name.clone(),
        circuit: pool.circuit.state_name(),
        admitted_share: 1.0 - pool.adaptive.shed_share(),
        active: pool.active(),
        queued: pool.queued.load(std::sync::atomic::Ordering::Relaxed),
        batch_queued,
        slots: pool.slots.size(),
        workers,
    }
}

impl Pools {
    /// The live pool named `name`.
    fn live(&self, name: &str) -> Result<Arc<Pool>, ChangeError> {
        self.all()
            .iter()
            .find(|p| p.name == name && !p.is_retired())
            .cloned()
            .ok_or_else(|| ChangeError::NoPool(name.to_owned()))
    }

    fn watching(&self) -> Result<&Watching, ChangeError> {
        self.watching.get().ok_or(ChangeError::NotWatching)
    }

    /// Every pool and its workers, as an operator sees them.
    pub fn views(&self) -> Vec<PoolView> {
        let mut batch_queued = std::collections::HashMap::<usize, usize>::new();
        for ((index, _), b) in self.embed_batchers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            *batch_queued.entry(*index).or_default() += b.queued();
        }
        for ((index, _), b) in self.infer_batchers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            *batch_queued.entry(*index).or_default() += b.queued();
        }
        self.all()
            .iter()
            .filter(|p| !p.is_retired())
            .map(|p| view(p, batch_queued.get(&p.index).copied().unwrap_or(0)))
            .collect()
    }

    /// Add pool `config` with the workers `workers` (id, address) and start
    /// watching them.
    pub fn add_pool(
        self: &Arc<Self>,
        config: &PoolConfig,
        max_message: usize,
        workers: Vec<(String, WorkerAddr)>,
    ) -> Result<(), ChangeError> {
        if self.live(&config.name).is_ok() {
            return Err(ChangeError::Exists(config.name.clone()));
        }
        let watching = self.watching()?;
        let workers =
            workers.into_iter().map(|(id, addr)| Arc::new(Worker::new(&config.name, id, addr, max_message))).collect();
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let index = table.add(config.name.clone());
        let pool = Arc::new(Pool::new(index, config, max_message, Arc::new(workers)));
        self.pools.rcu(|pools| {
            let mut pools = Vec::clone(pools);
            pools.push(pool.clone());
            pools
        });
        drop(table);
        self.watch_pool(&pool, watching)?;
        tracing::info!(pool = %config.name, workers = pool.workers().len(), "pool added");
        Ok(())
    }

    /// Apply pool `config`'s bounds, circuit, outlier, retry and batching
    /// settings to the live pool of that name, keeping its workers. Calls
    /// under way finish under the old settings.
    pub fn retune(&self, config: &PoolConfig) -> Result<(), ChangeError> {
        let old = self.live(&config.name)?;
        let fresh = Arc::new(Pool::new(old.index, config, old.max_message, old.workers()));
        self.pools.rcu(|pools| {
            let mut pools = Vec::clone(pools);
            pools[old.index] = fresh.clone();
            pools
        });
        // Batchers start again with the new batching settings on first use.
        self.embed_batchers.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), _| *p != old.index);
        self.infer_batchers.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), _| *p != old.index);
        tracing::info!(pool = %config.name, "pool settings changed");
        Ok(())
    }

    /// Remove pool `name`: from now on no new call enters it (its models
    /// are not found, unless another pool serves them). Ending it — waiting
    /// for the calls under way, then ending its watches — is
    /// [`Retired::finish`]'s.
    pub fn remove_pool(&self, name: &str) -> Result<Retired, ChangeError> {
        let pool = self.live(name)?;
        self.table.write().unwrap_or_else(PoisonError::into_inner).retire(pool.index);
        pool.mark_retired();
        self.embed_batchers.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), _| *p != pool.index);
        self.infer_batchers.lock().unwrap_or_else(PoisonError::into_inner).retain(|(p, _), _| *p != pool.index);
        tracing::info!(pool = %name, "pool removed: no new calls");
        Ok(Retired { pools: self.me.upgrade().ok_or(ChangeError::NotWatching)?, pool })
    }

    /// Add worker `id` at `addr` to pool `pool`; it takes calls once it is
    /// SERVING.
    pub fn add_worker(self: &Arc<Self>, pool: &str, id: String, addr: WorkerAddr) -> Result<Arc<Worker>, ChangeError> {
        let live = self.live(pool)?;
        let watching = self.watching()?;
        let worker = Arc::new(Worker::new(pool, id, addr, live.max_message));
        let mut members = live.workers().to_vec();
        members.push(worker.clone());
        self.set_members(live.index, members);
        self.watch_worker(live.index, &worker, watching);
        Ok(worker)
    }

    /// Take worker `id` out of pool `pool`: no new calls, and once those it
    /// has finished (or `grace` passed), its watch ends. False when the
    /// grace ran out first.
    pub async fn remove_worker(&self, pool: &str, id: &str, grace: Duration) -> Result<bool, ChangeError> {
        let live = self.live(pool)?;
        let workers = live.workers();
        let worker = workers
            .iter()
            .find(|w| w.id == id)
            .cloned()
            .ok_or_else(|| ChangeError::NoWorker { pool: pool.to_owned(), worker: id.to_owned() })?;
        let drained = tokio::time::timeout(grace, worker.drain()).await.is_ok();
        self.set_members(live.index, workers.iter().filter(|w| w.id != id).cloned().collect());
        self.watching()?.stop(&worker_key(&worker));
        Ok(drained)
    }

    /// Take worker `id` of pool `pool` out of rotation (`draining`) or put
    /// it back. Its calls under way finish.
    pub fn set_draining(&self, pool: &str, id: &str, draining: bool) -> Result<(), ChangeError> {
        let live = self.live(pool)?;
        let workers = live.workers();
        let worker = workers
            .iter()
            .find(|w| w.id == id)
            .ok_or_else(|| ChangeError::NoWorker { pool: pool.to_owned(), worker: id.to_owned() })?;
        worker.set_draining(draining);
        Ok(())
    }

    /// Whether worker `id` of pool `pool` is SERVING.
    pub fn is_serving(&self, pool: &str, id: &str) -> bool {
        self.live(pool).is_ok_and(|p| p.workers().iter().any(|w| w.id == id && w.is_serving()))
    }
}

/// A pool removed from the pools, its calls still ending.
pub struct Retired {
    pools: Arc<Pools>,
    pool: Arc<Pool>,
}

impl Retired {
    /// Wait for the calls that entered the pool to end, then end its
    /// watches: its workers, for the caller to stop.
    pub async fn finish(self) -> Vec<Arc<Worker>> {
        self.pool.until_idle().await;
        let workers = self.pool.workers();
        if let Ok(watching) = self.pools.watching() {
            watching.stop(&discovery_key(self.pool.index));
            for w in workers.iter() {
                watching.stop(&worker_key(w));
            }
        }
        tracing::info!(pool = %self.pool.name, "pool removed: its calls have ended");
        workers.to_vec()
    }
}
