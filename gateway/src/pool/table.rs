//! The model table: which pool serves a model, learned from what each
//! pool's workers describe.

use std::collections::HashMap;
use std::sync::PoisonError;

use super::Pools;
use super::admission::Pool;
use super::worker::Worker;
use crate::call::Call;
use crate::error::GatewayError;
use crate::proto::{ModelEntry, ModelInfo};

#[derive(Default)]
pub(super) struct ModelTable {
    /// model name -> the pool that claimed it first (for calls that name a
    /// model rather than a route variant).
    pub(super) first: HashMap<String, usize>,
    /// Per pool: model name -> what its workers said about it. Several pools
    /// may serve the same model name (the variants of a route).
    pub(super) by_pool: Vec<HashMap<String, ModelInfo>>,
    /// Pools that have described their models at least once.
    pub(super) described: Vec<bool>,
}

/// How long an unknown model name is answered "starting" (503) rather than
/// "not found" (404) while some pool has not yet described its models.
pub(super) const STARTUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Pools {
    pub(super) fn register(&self, pool: usize, worker: &Worker, models: Vec<ModelInfo>) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.described[pool] = true;
        for info in models {
            match table.first.get(&info.name) {
                Some(owner) if *owner != pool => tracing::debug!(
                    model = %info.name, worker = %worker.id, pool = %self.pools[pool].name,
                    "model also served by pool {:?}; a bare model name goes there, a route variant may name this pool",
                    self.pools[*owner].name
                ),
                Some(_) => {}
                None => {
                    table.first.insert(info.name.clone(), pool);
                }
            }
            table.by_pool[pool].insert(info.name.clone(), info);
        }
    }

    pub(super) fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    pub(super) fn index_of(&self, pool: &Pool) -> usize {
        self.pools.iter().position(|p| std::ptr::eq(p, pool)).unwrap_or_default()
    }

    /// The pool and model for a call: the named pool when the call carries
    /// one (a route variant), else the pool that first claimed the model.
    pub(super) fn route_call<P>(&self, call: &Call<P>) -> Result<(&Pool, ModelInfo), GatewayError> {
        match &call.pool {
            Some(pool) => self.route_in(pool, &call.model),
            None => self.route(&call.model),
        }
    }

    pub(super) fn route_in(&self, pool: &str, name: &str) -> Result<(&Pool, ModelInfo), GatewayError> {
        let p = self.pool_index(pool).ok_or_else(|| GatewayError::ModelNotFound { model: name.to_owned() })?;
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        match table.by_pool[p].get(name) {
            Some(info) => Ok((&self.pools[p], info.clone())),
            None if table.described[p] || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    pub(super) fn route(&self, name: &str) -> Result<(&Pool, ModelInfo), GatewayError> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let found = table.first.get(name).and_then(|p| Some((*p, table.by_pool[*p].get(name)?)));
        match found {
            Some((p, info)) => Ok((&self.pools[p], info.clone())),
            // A pool that never answers (a wrong remote address) must not make
            // every typo a 503 forever.
            None if table.described.iter().all(|d| *d) || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    pub(super) fn entry(&self, pool: &Pool, info: ModelInfo) -> ModelEntry {
        let ready = pool.workers().iter().any(|w| w.is_serving());
        ModelEntry { info: Some(info), pool: pool.name.clone(), ready }
    }
}
