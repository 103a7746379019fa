//! Local pools' worker processes as a reload changes them: started when a
//! pool grows, drained and stopped when it shrinks, and rolled worker by
//! worker when its class, threads or env change (start a new one, wait
//! until it is SERVING, drain an old one), so a pool never has fewer ready
//! workers than it had.
//!
//! Each pool's changes run one at a time in the background, towards the
//! latest config: a reload that lands while a roll is under way is picked
//! up when the step in progress ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{Config, PoolConfig, PoolKind, WorkerAddr};
use crate::pool::Pools;
use crate::supervisor::{Supervisor, SupervisorError, WorkerSpec};

/// How long a rolled-in worker may take to become SERVING before the roll
/// is given up (its model's load, typically seconds).
const READY_WITHIN: Duration = Duration::from_secs(300);
/// How often a rolled-in worker's state is looked at.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long calls on a worker being drained may take to finish.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);

/// One local pool's processes.
struct Local {
    /// The config to reach (the latest reload's).
    desired: Mutex<(PoolConfig, Option<Vec<String>>)>,
    /// The running workers and the number the next one gets; held while
    /// the pool changes, so changes run one at a time.
    running: tokio::sync::Mutex<Running>,
}

struct Running {
    workers: Vec<WorkerSpec>,
}

/// A local pool's processes, taken out of [`Locals`] when the pool is
/// removed, for [`Locals::stop_all`].
pub struct Processes {
    name: String,
    local: Arc<Local>,
}

pub struct Locals {
    pools: Arc<Pools>,
    supervisor: Arc<Supervisor>,
    socket_dir: PathBuf,
    by_pool: Mutex<HashMap<String, Arc<Local>>>,
    /// The number the next worker of a pool name gets. Kept when a pool is
    /// removed: one added again under its name while the old workers are
    /// still stopping gets other ids and sockets.
    next: Mutex<HashMap<String, u32>>,
}

impl Locals {
    /// Local workers' processes (by worker id).
    pub fn processes(&self) -> HashMap<String, crate::supervisor::Process> {
        self.supervisor.processes()
    }

    /// The local pools of `config`, as the supervisor started them.
    pub fn new(config: &Config, pools: Arc<Pools>, supervisor: Arc<Supervisor>, socket_dir: PathBuf) -> Arc<Self> {
        let by_pool = config
            .pools
            .iter()
            .filter_map(|p| {
                let PoolKind::Local { workers, .. } = &p.kind else { return None };
                let specs = (0..workers.get()).filter_map(|i| WorkerSpec::of(p, i, &socket_dir)).collect();
                Some((p.name.clone(), Arc::new(Local::new(p.clone(), specs))))
            })
            .collect();
        let next = config
            .pools
            .iter()
            .filter_map(|p| match &p.kind {
                PoolKind::Local { workers, .. } => Some((p.name.clone(), workers.get())),
                _ => None,
            })
            .collect();
        Arc::new(Self { pools, supervisor, socket_dir, by_pool: Mutex::new(by_pool), next: Mutex::new(next) })
    }

    /// The number of pool `name`'s next worker.
    fn next_number(&self, name: &str) -> u32 {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let n = next.entry(name.to_owned()).or_insert(0);
        *n += 1;
        *n - 1
    }

    /// Import `pools`' classes as the start does: model names by pool.
    pub async fn check(&self, pools: &[&PoolConfig]) -> Result<HashMap<String, Vec<String>>, SupervisorError> {
        if pools.is_empty() {
            return Ok(HashMap::new());
        }
        self.supervisor.check(pools).await
    }

    /// Start local pool `config`'s workers: their ids and addresses, for
    /// the pool to reach them.
    pub fn add(&self, config: &PoolConfig, models: Vec<String>) -> Vec<(String, WorkerAddr)> {
        let PoolKind::Local { workers, .. } = &config.kind else { return Vec::new() };
        let specs: Vec<WorkerSpec> = (0..workers.get())
            .filter_map(|_| WorkerSpec::of(config, self.next_number(&config.name), &self.socket_dir))
            .collect();
        self.supervisor.expect(&config.name, specs.len(), models);
        for spec in &specs {
            self.supervisor.spawn(spec.clone());
        }
        let addrs = specs.iter().map(|s| (s.id.clone(), WorkerAddr::Unix(s.socket.clone()))).collect();
        let local = Arc::new(Local::new(config.clone(), specs));
        self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).insert(config.name.clone(), local);
        addrs
    }

    /// Take local pool `name`'s processes out (its pool was removed): no
    /// change reaches them any more.
    pub fn take(&self, name: &str) -> Option<Processes> {
        let local = self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).remove(name)?;
        Some(Processes { name: name.to_owned(), local })
    }

    /// Stop the processes of a removed pool (after a change under way).
    pub async fn stop_all(&self, processes: Processes) {
        let mut running = processes.local.running.lock().await;
        for spec in running.workers.drain(..) {
            self.supervisor.stop(&processes.name, &spec.id).await;
        }
    }

    /// Bring local pool `config.name`'s workers to `config` in the
    /// background; `models` are its class's model names when it changed.
    pub fn reconcile(self: &Arc<Self>, config: PoolConfig, models: Option<Vec<String>>) {
        let local = self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).get(&config.name).cloned();
        let Some(local) = local else { return };
        let name = config.name.clone();
        *local.desired.lock().unwrap_or_else(PoisonError::into_inner) = (config, models);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(why) = me.converge(&name, &local).await {
                tracing::error!(pool = %name, %why, "pool change given up; the workers that serve stay");
            }
        });
    }

    async fn converge(&self, name: &str, local: &Local) -> Result<(), String> {
        let mut running = local.running.lock().await;
        let (config, models) = local.desired.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let PoolKind::Local { workers, .. } = &config.kind else { return Ok(()) };
        let want = workers.get() as usize;
        let template = WorkerSpec::of(&config, 0, &self.socket_dir).ok_or("not a local pool")?;
        let models = models.unwrap_or_else(|| self.supervisor.models(name));
        self.supervisor.expect(name, want.max(running.workers.len()), models.clone());
        // Roll: a new worker first (unless there are more than wanted), then an old one out.
        while let Some(i) = running.workers.iter().position(|w| !w.runs_as(&template)) {
            let fresh = running.workers.iter().filter(|w| w.runs_as(&template)).count();
            if fresh < want {
                let spec = self.start(name, &config, &mut running)?;
                if let Err(why) = self.wait_serving(name, &spec.id).await {
                    let at = running.workers.len() - 1;
                    let spec = running.workers.remove(at);
                    self.stop(name, &spec.id).await;
                    return Err(format!("new worker {}: {why}", spec.id));
                }
            }
            let old = running.workers.remove(i);
            self.stop(name, &old.id).await;
            tracing::info!(pool = %name, worker = %old.id, "worker rolled out");
        }
        while running.workers.len() < want {
            self.start(name, &config, &mut running)?;
        }
        while running.workers.len() > want {
            let Some(old) = running.workers.pop() else { break };
            self.stop(name, &old.id).await;
        }
        self.supervisor.expect(name, want, models);
        tracing::info!(pool = %name, workers = want, "pool workers changed");
        Ok(())
    }

    /// Start the pool's next worker and add it to the pool.
    fn start(&self, name: &str, config: &PoolConfig, running: &mut Running) -> Result<WorkerSpec, String> {
        let spec = WorkerSpec::of(config, self.next_number(name), &self.socket_dir).ok_or("not a local pool")?;
        self.supervisor.spawn(spec.clone());
        // Running from here, whatever follows: a pool removed meanwhile
        // stops it with the rest.
        running.workers.push(spec.clone());
        self.pools
            .add_worker(name, spec.id.clone(), WorkerAddr::Unix(spec.socket.clone()))
            .map_err(|e| e.to_string())?;
        tracing::info!(pool = %name, worker = %spec.id, "worker added");
        Ok(spec)
    }

    async fn wait_serving(&self, name: &str, id: &str) -> Result<(), String> {
        let waited = tokio::time::timeout(READY_WITHIN, async {
            loop {
                if self.pools.is_serving(name, id) {
                    return Ok(());
                }
                if self.supervisor.cannot_load(name, id) {
                    return Err("its model does not load".to_owned());
                }
                tokio::time::sleep(READY_POLL).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(format!("not SERVING within {READY_WITHIN:?}")))
    }

    /// Drain worker `id` (calls under way finish), then stop its process.
    async fn stop(&self, name: &str, id: &str) {
        match self.pools.remove_worker(name, id, DRAIN_WITHIN).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(pool = %name, worker = %id, "calls still under way after {DRAIN_WITHIN:?}; stopping the worker anyway")
            }
            Err(e) => tracing::warn!(pool = %name, worker = %id, error = %e, "cannot drain worker"),
        }
        self.supervisor.stop(name, id).await;
    }
}

impl Local {
    fn new(config: PoolConfig, workers: Vec<WorkerSpec>) -> Self {
        Self { desired: Mutex::new((config, None)), running: tokio::sync::Mutex::new(Running { workers }) }
    }
}
