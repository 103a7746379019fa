//! Who is in a pool and whether it serves: one health watcher per worker,
//! and for a discovered pool the members DNS finds. Every A/AAAA record of
//! a name is a worker (a Kubernetes headless Service, or a Compose service
//! scaled to N), resolved at start and again every `every`, so workers join
//! and leave without a restart.
//!
//! A name that resolves to nothing empties the pool; a lookup that fails
//! (timeout, server down) keeps the workers it has, so a DNS hiccup never
//! takes a healthy pool away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use tokio_util::sync::CancellationToken;

use super::Pools;
use super::worker::Worker;
use crate::config::WorkerAddr;
use crate::proto::ModelInfo;

/// A discovered pool cannot resolve: the system's DNS configuration is
/// unreadable and no `nameservers` are configured.
#[derive(Debug, thiserror::Error)]
#[error("pools.{pool}.discover: cannot read the system's DNS config: {source}")]
pub struct DiscoveryError {
    pub pool: String,
    pub source: hickory_resolver::ResolveError,
}

/// A resolver asking `nameservers`, or the system's (`/etc/resolv.conf`,
/// `/etc/hosts`) when none are given. It caches nothing: each round asks.
pub fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, hickory_resolver::ResolveError> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let mut config = ResolverConfig::new();
        for ns in nameservers {
            config.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build())
}

/// What one lookup found.
enum Found {
    Addrs(BTreeSet<SocketAddr>),
    /// The lookup failed; nothing is known.
    Failed(String),
}

async fn lookup(resolver: &TokioResolver, host: &str, port: u16) -> Found {
    match resolver.lookup_ip(host).await {
        Ok(ips) => Found::Addrs(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Found::Addrs(BTreeSet::new()),
        Err(e) => Found::Failed(e.to_string()),
    }
}

impl Pools {
    /// Start one health watcher per worker, and the DNS discovery of
    /// discovered pools (asking `nameservers`, or the system's resolver);
    /// they end with `stop`.
    pub fn watch(
        self: &Arc<Self>,
        connect_timeout: std::time::Duration,
        nameservers: &[std::net::SocketAddr],
        stop: &CancellationToken,
    ) -> Result<(), DiscoveryError> {
        let watching = super::watching::Watching::new(connect_timeout, nameservers.to_vec(), stop.clone());
        let watching = self.watching.get_or_init(|| watching);
        for pool in self.all().iter() {
            self.watch_pool(pool, watching)?;
        }
        Ok(())
    }

    /// Watch `pool`'s workers, and discover its members if it is found by DNS.
    pub(super) fn watch_pool(
        self: &Arc<Self>,
        pool: &super::admission::Pool,
        watching: &super::watching::Watching,
    ) -> Result<(), DiscoveryError> {
        for worker in pool.workers().iter() {
            self.watch_worker(pool.index, worker, watching);
        }
        if let Some(spec) = pool.discover.clone() {
            let resolver =
                resolver(&watching.nameservers).map_err(|source| DiscoveryError { pool: pool.name.clone(), source })?;
            let stop = watching.token(&super::watching::discovery_key(pool.index));
            tokio::spawn(self.clone().discover(pool.index, spec, resolver, watching.connect_timeout, stop));
        }
        Ok(())
    }

    /// Follow `worker`'s health (and what it serves) until its watch is
    /// stopped ([`super::watching::Watching::stop`]) or the gateway stops.
    pub(super) fn watch_worker(self: &Arc<Self>, p: usize, worker: &Arc<Worker>, watching: &super::watching::Watching) {
        let me = self.clone();
        let on_describe = move |w: &Worker, models: Vec<ModelInfo>| me.register(p, w, models);
        let stop = watching.token(&super::watching::worker_key(worker));
        tokio::spawn(worker.clone().watch(watching.connect_timeout, on_describe, stop));
    }

    /// Keep pool `p`'s members equal to what `host` resolves to, until `stop`.
    pub(super) async fn discover(
        self: Arc<Self>,
        p: usize,
        (host, port, every): (String, u16, Duration),
        resolver: TokioResolver,
        connect_timeout: Duration,
        stop: CancellationToken,
    ) {
        let pool_name = self.pool(p).name.clone();
        let mut members: BTreeMap<SocketAddr, (Arc<Worker>, CancellationToken)> = BTreeMap::new();
        loop {
            match lookup(&resolver, &host, port).await {
                Found::Failed(why) => {
                    tracing::warn!(pool = %pool_name, %host, %why, workers = members.len(), "DNS lookup failed; keeping the workers known");
                }
                Found::Addrs(found) => {
                    let known: BTreeSet<SocketAddr> = members.keys().copied().collect();
                    if found != known {
                        for gone in known.difference(&found) {
                            if let Some((worker, watch)) = members.remove(gone) {
                                watch.cancel();
                                tracing::info!(pool = %pool_name, worker = %worker.id, "worker left DNS; no new calls");
                            }
                        }
                        for addr in found.difference(&known) {
                            let Ok(uri) = format!("http://{addr}").parse::<http::Uri>() else {
                                tracing::warn!(pool = %pool_name, %addr, "cannot make a URI of a resolved address");
                                continue;
                            };
                            let id = format!("{pool_name}-{addr}");
                            let max_message = self.pool(p).max_message;
                            let worker = Arc::new(Worker::new(&pool_name, id, WorkerAddr::Tcp(uri), max_message));
                            let watch = stop.child_token();
                            let me = self.clone();
                            let on_describe = move |w: &Worker, models: Vec<ModelInfo>| me.register(p, w, models);
                            tokio::spawn(worker.clone().watch(connect_timeout, on_describe, watch.clone()));
                            tracing::info!(pool = %pool_name, worker = %worker.id, "worker found in DNS");
                            members.insert(*addr, (worker, watch));
                        }
                        self.set_members(p, members.values().map(|(w, _)| w.clone()).collect());
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Replace pool `p`'s workers, resizing its bounds to match.
    pub(super) fn set_members(&self, p: usize, workers: Vec<Arc<Worker>>) {
        let pool = self.pool(p);
        let n = workers.len();
        let old =
            std::mem::replace(&mut *pool.workers.write().unwrap_or_else(PoisonError::into_inner), Arc::new(workers));
        // An ejected worker that left no longer counts against the cap.
        let left_ejected = old.iter().filter(|w| w.outlier.is_ejected() && !self.is_member(p, w)).count();
        if left_ejected > 0 {
            let _ = pool.ejected.fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |e| Some(e.saturating_sub(left_ejected)),
            );
        }
        pool.slots.resize(n.saturating_mul(pool.per_worker));
        let batch_slots = n * pool.batching.concurrency_per_worker;
        for ((i, _), b) in self.embed_batchers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            if *i == p {
                b.resize(batch_slots);
            }
        }
        for ((i, _), b) in self.infer_batchers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            if *i == p {
                b.resize(batch_slots);
            }
        }
        tracing::info!(pool = %pool.name, workers = n, "pool members changed");
    }

    fn is_member(&self, p: usize, worker: &Arc<Worker>) -> bool {
        self.pool(p).workers().iter().any(|w| Arc::ptr_eq(w, worker))
    }
}
