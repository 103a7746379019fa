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

pub mod balance;
pub mod circuit;
pub mod latency;
pub mod members;
pub mod outlier;
pub mod retry;
pub mod worker;

mod admission;
mod attempts;
mod batched;
mod calls;
mod status;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::batch::Batcher;
use crate::config::{Config, PoolKind, WorkerAddr};
use crate::load_state::LoadState;
use crate::proto::{InferItem, InferOutputs};
use admission::Pool;
use circuit::Circuit;
use table::ModelTable;
use worker::Worker;

/// All configured pools and the model table learned from their workers.
pub struct Pools {
    pools: Vec<Pool>,
    table: RwLock<ModelTable>,
    /// For the batchers' dispatchers (they outlive a call, not the pools).
    me: Weak<Pools>,
    embed_batchers: Batchers<String, Embedded>,
    infer_batchers: Batchers<InferItem, InferOutputs>,
    /// How loading local workers' models goes (the supervisor's word).
    loads: Arc<LoadState>,
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
        for pool in &config.pools {
            let addrs: Vec<WorkerAddr> = match &pool.kind {
                PoolKind::Local { workers, .. } => (0..workers.get())
                    .map(|i| WorkerAddr::Unix(crate::config::local_socket(socket_dir, &pool.name, i)))
                    .collect(),
                PoolKind::Remote { addresses } => addresses.clone(),
                // Found by `discover`, which fills the pool as records arrive.
                PoolKind::Discovered { .. } => Vec::new(),
                PoolKind::Embedded { .. } => vec![WorkerAddr::InProcess(crate::embedded::endpoint(&pool.name))],
            };
            let workers: Vec<_> = addrs
                .into_iter()
                .enumerate()
                .map(|(i, addr)| {
                    Arc::new(Worker::new(
                        &pool.name,
                        format!("{}-{i}", pool.name),
                        addr,
                        config.workers.max_message_bytes,
                    ))
                })
                .collect();
            let slots = crate::slots::Slots::new(workers.len().saturating_mul(pool.max_in_flight_per_worker));
            // Counted from 0, so the series exist before the first event.
            for name in [crate::telemetry::metrics::RETRIES, crate::telemetry::metrics::QUEUE_REJECTIONS] {
                metrics::counter!(name, "pool" => pool.name.clone()).increment(0);
            }
            pools.push(Pool {
                name: pool.name.clone(),
                max_message: config.workers.max_message_bytes,
                workers: RwLock::new(Arc::new(workers)),
                per_worker: pool.max_in_flight_per_worker,
                discover: match &pool.kind {
                    PoolKind::Discovered { host, port, every } => Some((host.clone(), *port, *every)),
                    _ => None,
                },
                circuit: Circuit::new(&pool.name, pool.circuit),
                outlier: pool.outlier,
                ejected: AtomicUsize::new(0),
                retry: pool.retry,
                budget: retry::Budget::default(),
                slots,
                queued: AtomicUsize::new(0),
                depth: metrics::gauge!(crate::telemetry::metrics::QUEUE_DEPTH, "pool" => pool.name.clone()),
                max_queue: pool.max_queue,
                batching: pool.batching.clone(),
            });
        }
        let table = ModelTable::new(pools.iter().map(|p| p.name.clone()).collect());
        Arc::new_cyclic(|me| Self {
            pools,
            table: RwLock::new(table),
            me: me.clone(),
            embed_batchers: Mutex::default(),
            infer_batchers: Mutex::default(),
            loads,
        })
    }
}
