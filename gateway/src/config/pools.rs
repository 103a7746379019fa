//! `[[pools]]` checked: where each pool's workers come from and how calls
//! reach them.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::check::{ConfigError, duration, invalid};
use super::{components, raw};

/// A pool of workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKind,
    /// Calls given to one worker at once.
    pub max_in_flight_per_worker: usize,
    /// Calls that may wait for a free worker slot.
    pub max_queue: usize,
    pub circuit: components::CircuitConfig,
    /// `None`: no adaptive admission.
    pub adaptive: Option<components::AdaptiveConfig>,
    pub outlier: components::OutlierConfig,
    pub retry: components::RetryConfig,
    pub batching: components::BatchConfig,
}

/// Default calls per worker (per model thread for local pools).
pub const DEFAULT_IN_FLIGHT_PER_WORKER: u32 = 8;
/// Default bound of a pool's queue.
pub const DEFAULT_MAX_QUEUE: u32 = 256;

/// Where a pool's workers come from.
#[derive(Debug, Clone)]
pub enum PoolKind {
    /// Spawned and supervised by this gateway.
    Local { class: String, workers: NonZeroU32, threads: NonZeroU32, env: BTreeMap<String, String> },
    /// Run inside the gateway process (pyo3): one in-process worker making
    /// `threads` calls into Python at once.
    Embedded { class: String, threads: NonZeroU32 },
    /// Run elsewhere; reached at fixed addresses.
    Remote { addresses: Vec<WorkerAddr> },
    /// Run elsewhere; every address `host` resolves to is a worker on `port`,
    /// re-resolved `every` so workers come and go without a restart.
    Discovered { host: String, port: u16, every: Duration },
}

/// How to reach one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerAddr {
    Unix(PathBuf),
    Tcp(http::Uri),
    /// A worker inside this process (an embedded pool), by endpoint name.
    InProcess(String),
}

impl std::fmt::Display for WorkerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(uri) => write!(f, "{uri}"),
            Self::InProcess(name) => write!(f, "in-process:{name}"),
        }
    }
}

pub(super) fn pool_kind(pool: &raw::RawPool, key: impl Fn(&str) -> String) -> Result<PoolKind, ConfigError> {
    let remote_only = |field: &str| {
        if pool.kind.is_some() {
            return Err(invalid(key("kind"), "`kind` goes with `class`; remote pools have none"));
        }
        if pool.workers.is_some() || pool.threads.is_some() || !pool.env.is_empty() {
            return Err(invalid(key(field), "remote pools take no workers/threads/env"));
        }
        Ok(())
    };
    match (pool.class.is_empty(), pool.addresses.is_empty(), &pool.discover) {
        (false, true, None) => {
            let (module, class) = pool.class.split_once(':').unwrap_or_default();
            if module.is_empty() || class.is_empty() {
                return Err(invalid(key("class"), format!("expected `module:Class`, got {:?}", pool.class)));
            }
            let nonzero = |field: &str, v: Option<u32>| {
                NonZeroU32::new(v.unwrap_or(1)).ok_or_else(|| invalid(key(field), "must be at least 1"))
            };
            match pool.kind.as_deref() {
                None | Some("local") => Ok(PoolKind::Local {
                    class: pool.class.clone(),
                    workers: nonzero("workers", pool.workers)?,
                    threads: nonzero("threads", pool.threads)?,
                    env: pool.env.clone(),
                }),
                Some("embedded") => {
                    if pool.workers.is_some() {
                        return Err(invalid(
                            key("workers"),
                            "an embedded pool runs in the gateway's process: it has no worker processes (use `threads`)",
                        ));
                    }
                    if !pool.env.is_empty() {
                        return Err(invalid(
                            key("env"),
                            "an embedded pool runs in the gateway's process, whose environment it shares: \
                             set the variables on the gateway (or its PYTHONPATH for imports), or drop \
                             `kind = \"embedded\"` to run the class in worker processes with this `env`",
                        ));
                    }
                    Ok(PoolKind::Embedded { class: pool.class.clone(), threads: nonzero("threads", pool.threads)? })
                }
                Some(other) => Err(invalid(key("kind"), format!("expected \"local\" or \"embedded\", got {other:?}"))),
            }
        }
        (true, false, None) => {
            remote_only("addresses")?;
            let addresses = pool
                .addresses
                .iter()
                .enumerate()
                .map(|(j, a)| parse_worker_addr(a).map_err(|m| invalid(key(&format!("addresses[{j}]")), m)))
                .collect::<Result<_, _>>()?;
            Ok(PoolKind::Remote { addresses })
        }
        (true, true, Some(d)) => {
            remote_only("discover")?;
            let bad = || invalid(key("discover.dns"), format!("expected host:port, got {:?}", d.dns));
            let (host, port) = d.dns.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            if host.is_empty() || port == 0 {
                return Err(bad());
            }
            Ok(PoolKind::Discovered { host: host.to_owned(), port, every: duration(&key("discover.every"), &d.every)? })
        }
        (true, true, None) => {
            Err(invalid(key("class"), "give `class` (local workers), `addresses` or `discover` (remote workers)"))
        }
        _ => Err(invalid(key("class"), "give one of `class` (local), `addresses` or `discover` (remote)")),
    }
}

/// Parse `unix:/path`, `http://host:port` or bare `host:port`.
pub fn parse_worker_addr(s: &str) -> Result<WorkerAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.trim_start_matches("//");
        return if path.starts_with('/') {
            Ok(WorkerAddr::Unix(PathBuf::from(path)))
        } else {
            Err(format!("unix socket path must be absolute: {s:?}"))
        };
    }
    let with_scheme = if s.contains("://") { s.to_owned() } else { format!("http://{s}") };
    let uri: http::Uri = with_scheme.parse().map_err(|e| format!("bad address {s:?}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.port_u16().is_none() {
        return Err(format!("expected http://host:port, got {s:?}"));
    }
    Ok(WorkerAddr::Tcp(uri))
}

/// The socket path of local worker `n` of `pool` under the socket directory.
pub fn local_socket(dir: &std::path::Path, pool: &str, n: u32) -> std::path::PathBuf {
    dir.join(format!("{pool}-{n}.sock"))
}
