//! Changing a running gateway: a new config is checked whole (the same
//! checks as at start, plus what cannot change without a restart), then
//! applied without dropping a request. Routes, limits, auth, cache, prices
//! and the log level are replaced in one step ([`crate::service::Live`]);
//! pools are added before the routes that use them, changed in the
//! background (workers started, rolled or drained: [`locals`]) and removed
//! after no route uses them, once their calls have ended.
//!
//! A reload comes from SIGHUP, a change of the config file or the admin
//! API; one runs at a time. Its result is counted in
//! `infergate_config_reloads_total{result}`.

mod diff;
mod locals;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, PoolConfig, PoolKind};
use crate::pool::Pools;
use crate::service::{Core, Live};
use crate::supervisor::Supervisor;

pub use diff::restart_only;

/// Where the config comes from: the file (or the embedded default) and
/// the `INFERGATE__…` overrides the gateway started with.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

/// A config in force.
#[derive(Debug, Clone)]
pub struct Applied {
    pub config: Arc<Config>,
    /// 1 at start, one more for each reload that changed something.
    pub version: u64,
    /// SHA-256 of the effective config (as `check-config` prints it).
    pub hash: String,
    pub since: SystemTime,
}

/// Why a reload was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("{} cannot change without a restart", .0.join(", "))]
    NeedsRestart(Vec<String>),
    #[error(transparent)]
    Classes(#[from] crate::supervisor::SupervisorError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cache: {0}")]
    Cache(crate::redis_pool::RedisSetupError),
    #[error("log.level: {0}")]
    LogLevel(String),
    #[error("pools: {0}")]
    Pools(#[from] crate::pool::changes::ChangeError),
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub version: u64,
    pub hash: String,
    /// One line per change, e.g. `pool echo: workers 1 -> 3`; empty when
    /// the config was the one in force.
    pub changes: Vec<String>,
}

/// The running gateway's changeable parts.
pub struct Control {
    source: Source,
    applied: Mutex<Applied>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    core: Arc<Core>,
    pools: Arc<Pools>,
    locals: Arc<locals::Locals>,
    /// Model repository changes on top of the file: pools of
    /// `[[admin.repository]]` loaded, and configured pools unloaded.
    overlay: Mutex<Overlay>,
}

#[derive(Debug, Default, Clone)]
struct Overlay {
    loaded: BTreeSet<String>,
    unloaded: BTreeSet<String>,
}

fn hash(config: &Config) -> String {
    hex::encode(sha2::Sha256::digest(config.to_toml().as_bytes()))
}

fn count(result: &'static str) {
    metrics::counter!(crate::telemetry::metrics::CONFIG_RELOADS, "result" => result).increment(1);
}

impl Control {
    pub fn new(
        source: Source,
        config: Config,
        core: Arc<Core>,
        pools: Arc<Pools>,
        supervisor: Arc<Supervisor>,
        socket_dir: PathBuf,
    ) -> Arc<Self> {
        for result in ["applied", "unchanged", "refused"] {
            metrics::counter!(crate::telemetry::metrics::CONFIG_RELOADS, "result" => result).increment(0);
        }
        let locals = locals::Locals::new(&config, pools.clone(), supervisor, socket_dir);
        let applied = Applied { hash: hash(&config), config: Arc::new(config), version: 1, since: SystemTime::now() };
        Arc::new(Self {
            source,
            applied: Mutex::new(applied),
            reloading: tokio::sync::Mutex::new(()),
            core,
            pools,
            locals,
            overlay: Mutex::default(),
        })
    }

    /// The config in force.
    pub fn applied(&self) -> Applied {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Local workers' processes (pid, restarts), by worker id.
    pub fn processes(&self) -> std::collections::HashMap<String, crate::supervisor::Process> {
        self.locals.processes()
    }

    /// Read the config again and apply it. `why` (sighup, file, api) and
    /// `who` are logged.
    pub async fn reload(&self, why: &str, who: &str) -> Result<Reloaded, ReloadError> {
        self.reload_with(why, who, |_, _| Ok(())).await
    }

    /// Load the repository model (pool) `name` of `[[admin.repository]]`,
    /// or a configured pool unloaded before.
    pub async fn load_model(&self, name: &str, who: &str) -> Result<Reloaded, ReloadError> {
        self.reload_with("repository load", who, |overlay, config| {
            if overlay.unloaded.remove(name) {
                return Ok(());
            }
            if config.raw.admin.repository.iter().all(|p| p.name != name) && config.pools.iter().all(|p| p.name != name)
            {
                let message = format!("no model {name:?} in the repository");
                return Err(ConfigError::Invalid { key: "admin.repository".into(), message }.into());
            }
            overlay.loaded.insert(name.to_owned());
            Ok(())
        })
        .await
    }

    /// Unload model (pool) `name`: its pool is drained and removed.
    pub async fn unload_model(&self, name: &str, who: &str) -> Result<Reloaded, ReloadError> {
        self.reload_with("repository unload", who, |overlay, config| {
            if overlay.loaded.remove(name) {
                return Ok(());
            }
            if config.pools.iter().all(|p| p.name != name) {
                let message = format!("no loaded model {name:?}");
                return Err(ConfigError::Invalid { key: "pools".into(), message }.into());
            }
            overlay.unloaded.insert(name.to_owned());
            Ok(())
        })
        .await
    }

    /// One reload at a time: the repository changes `edit` makes to the
    /// overlay (given the config in force), then the file read and applied.
    async fn reload_with(
        &self,
        why: &str,
        who: &str,
        edit: impl FnOnce(&mut Overlay, &Config) -> Result<(), ReloadError>,
    ) -> Result<Reloaded, ReloadError> {
        let _one = self.reloading.lock().await;
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let result = match edit(&mut overlay, &self.applied().config) {
            Ok(()) => self.apply(&overlay).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(done) => {
                *self.overlay.lock().unwrap_or_else(PoisonError::into_inner) = overlay;
                if done.changes.is_empty() {
                    count("unchanged");
                    tracing::info!(why, who, version = done.version, "config reloaded: nothing changed");
                } else {
                    count("applied");
                    tracing::info!(why, who, version = done.version, hash = %done.hash, changes = ?done.changes, "config reloaded");
                }
                Ok(done)
            }
            Err(e) => {
                count("refused");
                tracing::error!(why, who, error = %e, "config reload refused; the running config stays");
                Err(e)
            }
        }
    }

    /// The file's config with `overlay`'s repository changes.
    fn load(&self, overlay: &Overlay) -> Result<Config, ConfigError> {
        Config::load_edited(self.source.path.as_deref(), self.source.env.clone(), |raw| {
            raw.pools.retain(|p| !overlay.unloaded.contains(&p.name));
            let loaded = raw.admin.repository.iter().filter(|p| overlay.loaded.contains(&p.name)).cloned();
            raw.pools.extend(loaded.collect::<Vec<_>>());
        })
    }

    async fn apply(&self, overlay: &Overlay) -> Result<Reloaded, ReloadError> {
        let new = self.load(overlay)?;
        let old = self.applied();
        let new_hash = hash(&new);
        if new_hash == old.hash {
            return Ok(Reloaded { version: old.version, hash: old.hash, changes: Vec::new() });
        }
        let refused = restart_only(&old.config, &new);
        if !refused.is_empty() {
            return Err(ReloadError::NeedsRestart(refused));
        }
        crate::telemetry::check_log_filter(&new.log.filter).map_err(ReloadError::LogLevel)?;
        let plan = diff::pools(&old.config, &new);
        // Classes are imported (in their pools' environments) before anything changes.
        let checked: Vec<&PoolConfig> = plan.checked(&new);
        let models = self.locals.check(&checked).await?;
        let live = self.core.live();
        let policy = live.policy.reloaded(&new)?;
        let cache = if new.cache == old.config.cache && new.cache_pools == old.config.cache_pools {
            live.cache.clone()
        } else {
            Arc::new(
                crate::cache::ResponseCache::new(new.cache.clone(), new.redis.as_ref(), new.cache_pools.clone())
                    .map_err(ReloadError::Cache)?,
            )
        };
        // Checked: from here on, the new config is applied.
        let mut changes = plan.describe();
        for pool in pools_of(&new, &plan.added) {
            self.add_pool(pool, &new, models.get(&pool.name).cloned().unwrap_or_default())?;
        }
        self.core.replace(Live {
            policy,
            routes: Arc::new(crate::route::Routes::new(&new.aliases)),
            cache,
            prices: Arc::new(new.prices.clone()),
            streams: new.streams,
        });
        if new.log.filter != old.config.log.filter {
            crate::telemetry::set_log_filter(&new.log.filter).map_err(ReloadError::LogLevel)?;
        }
        for pool in pools_of(&new, &plan.retuned) {
            self.pools.retune(pool)?;
        }
        for (before, after) in pools_of(&old.config, &plan.members).zip(pools_of(&new, &plan.members)) {
            self.change_members(before, after)?;
        }
        for pool in pools_of(&new, &plan.local) {
            self.locals.reconcile(pool.clone(), models.get(&pool.name).cloned());
        }
        for pool in &plan.removed {
            // No new call enters it from here; its processes stop once the
            // calls in it have ended.
            let retired = self.pools.remove_pool(pool)?;
            let processes = self.locals.take(pool);
            let locals = self.locals.clone();
            tokio::spawn(async move {
                retired.finish().await;
                if let Some(processes) = processes {
                    locals.stop_all(processes).await;
                }
            });
        }
        changes.extend(diff::sections(&old.config, &new));
        let version = old.version + 1;
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) =
            Applied { config: Arc::new(new), version, hash: new_hash.clone(), since: SystemTime::now() };
        Ok(Reloaded { version, hash: new_hash, changes })
    }

    fn add_pool(&self, config: &PoolConfig, whole: &Config, models: Vec<String>) -> Result<(), ReloadError> {
        let max_message = whole.workers.max_message_bytes;
        match &config.kind {
            PoolKind::Local { .. } => {
                let workers = self.locals.add(config, models);
                self.pools.add_pool(config, max_message, workers)?;
            }
            PoolKind::Remote { addresses } => {
                let workers = addresses.iter().enumerate().map(|(i, a)| (format!("{}-{i}", config.name), a.clone()));
                self.pools.add_pool(config, max_message, workers.collect())?;
            }
            PoolKind::Discovered { .. } => self.pools.add_pool(config, max_message, Vec::new())?,
            // Refused by `restart_only`.
            PoolKind::Embedded { .. } => {}
        }
        Ok(())
    }

    /// A remote pool's addresses changed: workers for the new ones join,
    /// the ones gone are drained.
    fn change_members(&self, old: &PoolConfig, new: &PoolConfig) -> Result<(), ReloadError> {
        let (PoolKind::Remote { addresses: before }, PoolKind::Remote { addresses: after }) = (&old.kind, &new.kind)
        else {
            return Ok(());
        };
        let views = self.pools.views();
        let current = views.iter().find(|p| p.name == new.name).map(|p| p.workers.clone()).unwrap_or_default();
        for addr in after.iter().filter(|a| !before.contains(a)) {
            let id = format!("{}-{}", new.name, fastrand::u32(..));
            self.pools.add_worker(&new.name, id, addr.clone())?;
        }
        for addr in before.iter().filter(|a| !after.contains(a)) {
            let shown = addr.to_string();
            if let Some(w) = current.iter().find(|w| w.address == shown) {
                let (pools, pool, id) = (self.pools.clone(), new.name.clone(), w.id.clone());
                tokio::spawn(async move {
                    let _ = pools.remove_worker(&pool, &id, std::time::Duration::from_secs(30)).await;
                });
            }
        }
        Ok(())
    }

    /// Reload on SIGHUP and, when `admin.watch_config`, when the config
    /// file changes (debounced: once its content holds still), until `stop`.
    pub fn start_watching(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        let on_hup = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot watch SIGHUP; reload through the admin API");
                return;
            };
            loop {
                tokio::select! {
                    () = on_hup.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                let _ = me.reload("sighup", "signal").await;
            }
        });
        let Some(path) = self.source.path.clone().filter(|_| self.applied().config.admin.watch_config) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let read = |p: &std::path::Path| std::fs::read(p).ok().map(|b| sha2::Sha256::digest(b).to_vec());
            let mut seen = read(&path);
            let mut pending: Option<Vec<u8>> = None;
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = read(&path);
                if now == seen {
                    pending = None;
                    continue;
                }
                // Changed: reload once the content is the same two looks in a row.
                if pending.is_some() && pending == now {
                    seen = now;
                    pending = None;
                    let _ = me.reload("file changed", "file watch").await;
                } else {
                    pending = now;
                }
            }
        });
    }
}

/// How often the config file is looked at.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The pools of `config` named in `names` (a plan's, so all of them).
fn pools_of<'a>(config: &'a Config, names: &'a [String]) -> impl Iterator<Item = &'a PoolConfig> {
    names.iter().filter_map(|name| config.pools.iter().find(|p| &p.name == name))
}
