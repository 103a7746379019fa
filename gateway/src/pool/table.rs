//! The model table: which pool serves a model, learned from what each
//! pool's workers describe. Pools are named here by their index.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::error::GatewayError;
use crate::proto::ModelInfo;

/// How long an unknown model name is answered "starting" (503) rather than
/// "not found" (404) while some pool has not yet described its models.
pub(super) const STARTUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) struct ModelTable {
    /// The pools' names, by index.
    names: Vec<String>,
    /// model name -> the pool that claimed it first (for calls that name a
    /// model rather than a route variant).
    first: HashMap<String, usize>,
    /// Per pool: model name -> what its workers said about it. Several pools
    /// may serve the same model name (the variants of a route).
    by_pool: Vec<HashMap<String, ModelInfo>>,
    /// Pools that have described their models at least once.
    described: Vec<bool>,
    created: Instant,
}

impl ModelTable {
    /// An empty table of the pools `names`.
    pub(super) fn new(names: Vec<String>) -> Self {
        let n = names.len();
        Self {
            names,
            first: HashMap::new(),
            by_pool: vec![HashMap::new(); n],
            described: vec![false; n],
            created: Instant::now(),
        }
    }

    /// A pool added by a reload; its index.
    pub(super) fn add(&mut self, name: String) -> usize {
        self.names.push(name);
        self.by_pool.push(HashMap::new());
        self.described.push(false);
        self.names.len() - 1
    }

    /// Forget pool `pool` (removed by a reload): its models go to the next
    /// pool that serves them, or are not found.
    pub(super) fn retire(&mut self, pool: usize) {
        self.names[pool].clear();
        self.described[pool] = true;
        let models = std::mem::take(&mut self.by_pool[pool]);
        for name in models.keys() {
            if self.first.get(name) == Some(&pool) {
                self.first.remove(name);
                if let Some(next) = self.by_pool.iter().position(|m| m.contains_key(name)) {
                    self.first.insert(name.clone(), next);
                }
            }
        }
    }

    /// What a worker (`worker`, for the log) of pool `pool` described.
    pub(super) fn register(&mut self, pool: usize, worker: &str, models: Vec<ModelInfo>) {
        if self.names[pool].is_empty() {
            return; // retired: a last word from a worker being stopped
        }
        self.described[pool] = true;
        for info in models {
            match self.first.get(&info.name) {
                Some(owner) if *owner != pool => tracing::debug!(
                    model = %info.name, worker, pool = %self.names[pool],
                    "model also served by pool {:?}; a bare model name goes there, a route variant may name this pool",
                    self.names[*owner]
                ),
                Some(_) => {}
                None => {
                    self.first.insert(info.name.clone(), pool);
                }
            }
            self.by_pool[pool].insert(info.name.clone(), info);
        }
    }

    /// The index of the pool named `name`.
    pub(super) fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|p| p == name && !name.is_empty())
    }

    /// Model `name` as served by pool `pool` (a route variant's target).
    pub(super) fn route_in(&self, pool: &str, name: &str) -> Result<(usize, ModelInfo), GatewayError> {
        let p = self.index(pool).ok_or_else(|| GatewayError::ModelNotFound { model: name.to_owned() })?;
        match self.by_pool[p].get(name) {
            Some(info) => Ok((p, info.clone())),
            None if self.described[p] || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    /// Model `name` in the pool that claimed it first.
    pub(super) fn route(&self, name: &str) -> Result<(usize, ModelInfo), GatewayError> {
        let found = self.first.get(name).and_then(|p| Some((*p, self.by_pool[*p].get(name)?)));
        match found {
            Some((p, info)) => Ok((p, info.clone())),
            // A pool that never answers (a wrong remote address) must not make
            // every typo a 503 forever.
            None if self.described.iter().all(|d| *d) || self.created.elapsed() > STARTUP_WINDOW => {
                Err(GatewayError::ModelNotFound { model: name.to_owned() })
            }
            None => Err(GatewayError::Starting { model: name.to_owned() }),
        }
    }

    /// The pools that have not described their models yet, by index.
    pub(super) fn undescribed(&self) -> impl Iterator<Item = usize> + '_ {
        self.described.iter().enumerate().filter(|(_, d)| !**d).map(|(p, _)| p)
    }

    /// Every model with the pool that claimed it first.
    pub(super) fn models(&self) -> impl Iterator<Item = (usize, &ModelInfo)> {
        self.first.iter().filter_map(|(name, p)| Some((*p, self.by_pool[*p].get(name)?)))
    }
}
