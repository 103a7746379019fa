//! Worker pools: which pool serves a model, which worker takes a call, and
//! the call itself with its deadline. The request core sees them only as
//! its [`crate::upstream::Upstream`].
//!
//! By job: `table` (which pool serves a model), `admission` (a pool's
//! slots, queue and worker pick, and what a finished call says about the
//! worker), `attempts` (one call bounded by its deadline, with retries),
//! `status` (worker answers as the gateway's errors), `batched` (batch
//! requests and their dispatch), `calls` (the `Upstream` implementation),
//! [`members`] (health watchers and DNS discovery); and per worker:
//! [`worker`], [`balance`], [`outlier`], [`latency`], [`circuit`],
//! [`retry`].

pub mod adaptive;
pub mod balance;
pub mod circuit;
pub mod latency;
pub mod members;
pub mod outlier;
pub mod retry;
pub mod worker;

mod admission;
mod attempts;
mod background;
mod batched;
mod calls;
pub mod changes;
mod status;
mod table;
#[cfg(test)]
mod tests;
mod watching;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::batch::Batcher;
use crate::config::{Config, PoolKind, WorkerAddr};
use crate::load_state::LoadState;
use crate::proto::{InferItem, InferOutputs};
use admission::Pool;
use table::ModelTable;
use worker::Worker;

/// All configured pools and the model table learned from their workers.
pub struct Pools {
    /// By index, which never changes: a pool added by a reload is
    /// appended, one removed stays as a retired entry, one retuned is
    /// replaced at its index (see [`changes`]).
    pools: arc_swap::ArcSwap<Vec<Arc<Pool>>>,
    table: RwLock<ModelTable>,
    /// For the batchers' dispatchers (they outlive a call, not the pools).
    me: Weak<Pools>,
    embed_batchers: Batchers<String, Embedded>,
    infer_batchers: Batchers<InferItem, InferOutputs>,
    /// How loading local workers' models goes (the supervisor's word).
    loads: Arc<LoadState>,
    /// What [`Pools::watch`] was given, for workers and pools added later.
    watching: std::sync::OnceLock<watching::Watching>,
}

/// The batchers of one kind, by (pool index, model), started on first use.
type Batchers<I, O> = Mutex<HashMap<(usize, String), Arc<Batcher<I, O>>>>;

/// One text's vector and token count.
type Embedded = (Vec<f32>, u32);

impl Pools {
    /// Build pools from config. Local pools' workers listen on
    /// `socket_dir/<pool>-<n>.sock` (see [`crate::config::local_socket`]).
    pub fn new(config: &Config, socket_dir: &Path, loads: Arc<LoadState>) -> Arc<Self> {
        let mut pools = Vec::with_capacity(config.pools.len());
        for (index, pool) in config.pools.iter().enumerate() {
            let workers = first_workers(pool, socket_dir)
                .into_iter()
                .map(|(id, addr)| Arc::new(Worker::new(&pool.name, id, addr, config.workers.max_message_bytes)))
                .collect();
            pools.push(Arc::new(Pool::new(index, pool, config.workers.max_message_bytes, Arc::new(workers))));
        }
        let table = ModelTable::new(pools.iter().map(|p| p.name.clone()).collect());
        Arc::new_cyclic(|me| Self {
            pools: arc_swap::ArcSwap::from_pointee(pools),
            table: RwLock::new(table),
            me: me.clone(),
            embed_batchers: Mutex::default(),
            infer_batchers: Mutex::default(),
            loads,
            watching: std::sync::OnceLock::new(),
        })
    }

    /// Pool `p` as it is now.
    fn pool(&self, p: usize) -> Arc<Pool> {
        self.pools.load()[p].clone()
    }

    /// Every pool, retired ones included (their index stays theirs).
    fn all(&self) -> Arc<Vec<Arc<Pool>>> {
        self.pools.load_full()
    }
}

/// The ids and addresses of a pool's workers at start. Local pools'
/// workers listen on `socket_dir/<pool>-<n>.sock` (see
/// [`crate::config::local_socket`]).
fn first_workers(pool: &crate::config::PoolConfig, socket_dir: &Path) -> Vec<(String, WorkerAddr)> {
    let addrs: Vec<WorkerAddr> = match &pool.kind {
        PoolKind::Local { workers, .. } => (0..workers.get())
            .map(|i| WorkerAddr::Unix(crate::config::local_socket(socket_dir, &pool.name, i)))
            .collect(),
        PoolKind::Remote { addresses } => addresses.clone(),
        // Found by `discover`, which fills the pool as records arrive.
        PoolKind::Discovered { .. } => Vec::new(),
        PoolKind::Embedded { .. } => vec![WorkerAddr::InProcess(crate::embedded::endpoint(&pool.name))],
    };
    addrs.into_iter().enumerate().map(|(i, addr)| (format!("{}-{i}", pool.name), addr)).collect()
}
