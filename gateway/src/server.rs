//! `infergate serve`: wire config, supervisor, pools and both edges together,
//! and shut them down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::edge::{self, EdgeState};
use crate::pool::Pools;
use crate::supervisor::{Supervisor, SupervisorError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot create the worker socket directory {path}: {source}")]
    SocketDir { path: PathBuf, source: std::io::Error },
    #[error("workers.socket_dir {path} is not safe: {why}")]
    SocketDirUnsafe { path: PathBuf, why: UnsafeDir },
    #[error(transparent)]
    Workers(#[from] SupervisorError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cache: {0}")]
    Cache(crate::redis_pool::RedisSetupError),
    #[error(transparent)]
    Discovery(#[from] crate::pool::members::DiscoveryError),
    #[error(transparent)]
    Embedded(#[from] crate::embedded::EmbedError),
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot read the address the {edge} listener is bound to: {source}")]
    LocalAddr { edge: &'static str, source: std::io::Error },
}

/// Why an existing `workers.socket_dir` is refused.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeDir {
    #[error("it is not a directory")]
    NotADirectory,
    #[error("it belongs to uid {owner}, not to the gateway's uid {gateway}")]
    NotOurs { owner: u32, gateway: u32 },
    #[error("its mode {mode:o} lets others write to it (chmod 700)")]
    WritableByOthers { mode: u32 },
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

struct SocketDir {
    path: PathBuf,
    owned: bool,
}

impl SocketDir {
    /// The configured directory, or a fresh one in the temp dir. A new one
    /// is made 0700; an existing one must be this user's and writable by no
    /// one else, since whoever can write it can put a socket where a worker
    /// is expected and read every request.
    fn create(configured: Option<&PathBuf>) -> Result<Self, ServeError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let (path, owned) = match configured {
            Some(p) => (p.clone(), false),
            None => {
                (std::env::temp_dir().join(format!("infergate-{}-{:08x}", std::process::id(), fastrand::u32(..))), true)
            }
        };
        let io = |source| ServeError::SocketDir { path: path.clone(), source };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                let me = nix::unistd::geteuid().as_raw();
                let unsafe_because = if !meta.is_dir() {
                    Some(UnsafeDir::NotADirectory)
                } else if meta.uid() != me {
                    Some(UnsafeDir::NotOurs { owner: meta.uid(), gateway: me })
                } else if meta.mode() & 0o022 != 0 {
                    Some(UnsafeDir::WritableByOthers { mode: meta.mode() & 0o777 })
                } else {
                    None
                };
                if let Some(why) = unsafe_because {
                    return Err(ServeError::SocketDirUnsafe { path, why });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        Ok(Self { path, owned })
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Descriptors the gateway needs beside client connections: worker sockets
/// and pipes, listeners, the log, Python's files.
const OWN_DESCRIPTORS: u64 = 512;

/// Raise the open-files soft limit to the hard limit (as Go's runtime does),
/// then make the connection caps fit in it (see [`fit_connection_caps`]).
fn raise_open_files_limit(config: &mut Config) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit");
            return;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    let defaults = (
        crate::config::raw::RawHttp::default().max_connections as usize,
        crate::config::raw::RawGrpc::default().max_connections as usize,
    );
    let caps = (config.http_connections.max_connections, config.grpc_connections.max_connections);
    match fit_connection_caps(limit, caps, defaults) {
        Fit::Fits => {}
        Fit::Lowered { http, grpc } => {
            tracing::info!(
                open_files_limit = limit,
                http_max_connections = http,
                grpc_max_connections = grpc,
                "the default connection caps were lowered to fit the open-files limit"
            );
            config.http_connections.max_connections = http;
            config.grpc_connections.max_connections = grpc;
        }
        Fit::TooLow { wanted } => tracing::warn!(
            open_files_limit = limit,
            wanted,
            "the open-files limit is below http.max_connections + grpc.max_connections; \
             accepts will fail before the connection caps are reached (raise `ulimit -n` or lower the caps)"
        ),
    }
}

/// Whether the connection caps fit an open-files limit.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    Fits,
    /// The caps were the defaults: lowered in proportion to fit.
    Lowered {
        http: usize,
        grpc: usize,
    },
    /// Caps someone chose do not fit; `wanted` descriptors are needed.
    TooLow {
        wanted: u64,
    },
}

/// Connection caps `(http, grpc)` against `limit` open files, with
/// [`OWN_DESCRIPTORS`] kept for the gateway itself. Default caps that do
/// not fit are lowered (past the limit, accepting fails with EMFILE instead
/// of the precise refusal the caps give); caps someone set are theirs to
/// change, so they are only warned about.
fn fit_connection_caps(limit: u64, caps: (usize, usize), defaults: (usize, usize)) -> Fit {
    let wanted = (caps.0 + caps.1) as u64 + OWN_DESCRIPTORS;
    if limit >= wanted {
        return Fit::Fits;
    }
    let room = limit.saturating_sub(OWN_DESCRIPTORS);
    if caps != defaults || room < 64 {
        return Fit::TooLow { wanted };
    }
    let total = (caps.0 + caps.1) as u64;
    let http = usize::try_from(room * caps.0 as u64 / total).unwrap_or(caps.0).max(1);
    let grpc = usize::try_from(room).unwrap_or(usize::MAX).saturating_sub(http).max(1);
    Fit::Lowered { http, grpc }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// Log once when every pool first has a SERVING worker, so a person
/// watching `make run` knows when to send requests.
fn announce_ready(pools: Arc<Pools>, console: Option<String>, stop: CancellationToken) {
    use crate::upstream::Upstream;
    let started = tokio::time::Instant::now();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let status = pools.status();
            if status.iter().all(|p| p.ready_workers > 0) {
                let pools: Vec<String> =
                    status.iter().map(|p| format!("{} {}/{}", p.pool, p.ready_workers, p.workers)).collect();
                tracing::info!(
                    after = ?started.elapsed(),
                    pools = %pools.join(", "),
                    console = console.as_deref().unwrap_or("off"),
                    "infergate ready"
                );
                return;
            }
        }
    });
}

/// Run the gateway until `shutdown` is cancelled, then drain: stop accepting,
/// let in-flight requests finish (up to `shutdown.grace`), stop the workers.
/// `source` is where the config came from, read again on a reload.
pub async fn run(
    mut config: Config,
    source: crate::control::Source,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    raise_open_files_limit(&mut config);
    let http_listener = bind(config.http_listen).await?;
    let grpc_listener = bind(config.grpc_listen).await?;
    let admin_listener = match config.admin.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let sockets = SocketDir::create(config.workers.socket_dir.as_ref())?;

    // Key files and Redis settings fail here, before any worker is spawned.
    let policy = crate::policy::Policy::new(&config)?;
    let loads = Arc::new(crate::load_state::LoadState::new(config.workers.max_load_failures));
    let supervisor = Arc::new(Supervisor::start(&config, &sockets.path, loads.clone()).await?);
    // Embedded pools' classes are imported now: one that cannot be refuses the start.
    let embedded = CancellationToken::new();
    crate::embedded::start(&config, &embedded).await?;
    if let Some(otlp) = &config.otlp {
        crate::telemetry::otlp::start(otlp);
    }
    let pools = Pools::new(&config, &sockets.path, loads);
    let watchers = CancellationToken::new();
    pools.watch(config.workers.connect_timeout, &config.nameservers, &watchers)?;

    // Where an operator opens the console (the admin listener's page).
    let console_url = admin_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| format!("http://{a}/console"));
    announce_ready(pools.clone(), console_url.clone(), watchers.clone());

    let draining = CancellationToken::new();
    let core = Arc::new(crate::service::Core::new(
        pools.clone(),
        crate::service::Live {
            policy,
            routes: Arc::new(crate::route::Routes::new(&config.aliases)),
            cache: Arc::new(
                crate::cache::ResponseCache::new(
                    config.cache.clone(),
                    config.redis.as_ref(),
                    config.cache_pools.clone(),
                )
                .map_err(ServeError::Cache)?,
            ),
            prices: Arc::new(config.prices.clone()),
            streams: config.streams,
        },
    ));
    let current = core.clone();
    crate::policy::Policy::start_housekeeping(move || current.policy(), watchers.clone());
    let conversations = crate::conversations::Conversations::new(config.responses.clone(), config.redis.as_ref())
        .map_err(ServeError::Cache)?;
    let queue = config.queue.clone().map(crate::queue::Queue::new).transpose().map_err(ServeError::Cache)?;
    let state = Arc::new(EdgeState {
        core: core.clone(),
        conversations: Arc::new(conversations),
        queue: queue.clone(),
        default_deadline: config.default_deadline,
        max_body_bytes: config.max_body_bytes,
        max_message_bytes: config.max_message_bytes,
        http_max_in_flight: config.http_max_in_flight,
        grpc_max_in_flight: config.grpc_max_in_flight,
        buffered: edge::gate::Buffered::new(config.max_buffered_bytes),
        sse_keep_alive: config.sse_keep_alive,
        image: edge::convert::ImageBounds { pixels: config.max_image_pixels, bytes: config.max_image_bytes },
        draining: draining.clone(),
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in edge::grpc::SERVICES {
        health.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let http_app = edge::rest::router(state.clone());
    // The queue's consumer takes no new entries once draining starts; what
    // it has not settled by the end stays pending for another replica.
    if let Some(queue) = queue {
        edge::queued::consumer::spawn(queue, core.clone(), edge::rest::queued_routes(state.clone()), draining.clone());
    }
    let grpc_app = edge::grpc::router(state, health_service)?;
    // The console's playground calls the REST edge's router in process.
    let public_app = http_app.clone();

    let local =
        |edge, listener: &TcpListener| listener.local_addr().map_err(|source| ServeError::LocalAddr { edge, source });
    let admin_addr = match &admin_listener {
        Some(l) => Some(local("admin", l)?),
        None => None,
    };
    let listening =
        edge::console::Listening { http: local("http", &http_listener)?, grpc: local("grpc", &grpc_listener)? };
    tracing::info!(
        http = %listening.http,
        grpc = %listening.grpc,
        admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        console = console_url.as_deref().unwrap_or("off"),
        pools = config.pools.len(),
        "infergate listening"
    );
    let http_limits = config.http_connections.clone();
    let grpc_limits = config.grpc_connections.clone();
    let grace = config.shutdown_grace;
    let control = crate::control::Control::new(source, config, core, pools, supervisor.clone(), sockets.path.clone());
    control.start_watching(watchers.clone());
    let admin = admin_listener.map(|listener| {
        let limits = crate::config::ConnLimits { max_connections: ADMIN_CONNECTIONS, ..http_limits.clone() };
        tokio::spawn(edge::conn::serve(
            "admin",
            listener,
            edge::admin::router(control.clone()).merge(edge::console::router(
                control.clone(),
                public_app,
                listening,
                draining.clone(),
            )),
            limits,
            draining.clone(),
        ))
    });
    let http = tokio::spawn(edge::conn::serve("http", http_listener, http_app, http_limits, draining.clone()));
    let grpc = tokio::spawn(edge::conn::serve("grpc", grpc_listener, grpc_app, grpc_limits, draining.clone()));

    shutdown.cancelled().await;
    tracing::info!(?grace, "draining: no new connections, finishing in-flight requests");
    for service in edge::grpc::MODEL_SERVICES {
        health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
    }
    draining.cancel();
    let drained = tokio::time::timeout(grace, async {
        let _ = http.await;
        let _ = grpc.await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("in-flight requests did not finish within the grace period; stopping anyway");
    }
    watchers.cancel();
    embedded.cancel();
    supervisor.shutdown().await;
    tracing::info!("infergate stopped");
    Ok(())
}

/// Admin connections open at once.
const ADMIN_CONNECTIONS: usize = 64;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infergate-sockdir-{:x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_new_socket_dir_is_private_and_an_unsafe_existing_one_stops_the_start() {
        let root = scratch();
        let fresh = root.join("new/sockets");
        let made = SocketDir::create(Some(&fresh)).unwrap();
        assert_eq!(std::fs::metadata(&made.path).unwrap().mode() & 0o777, 0o700);

        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = SocketDir::create(Some(&open)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("lets others write"), "{err}");

        // Someone else's directory (needs root to make one; CI runs as root).
        if nix::unistd::geteuid().is_root() {
            let theirs = root.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = SocketDir::create(Some(&theirs)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("belongs to uid 65534"), "{err}");
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn default_caps_are_fitted_to_the_open_files_limit_and_chosen_ones_are_warned_about() {
        let defaults = (16_384, 4096);
        assert_eq!(fit_connection_caps(1 << 20, defaults, defaults), Fit::Fits);
        assert_eq!(fit_connection_caps(20_992, defaults, defaults), Fit::Fits);
        // This machine's CI: a hard limit of 20,000.
        let Fit::Lowered { http, grpc } = fit_connection_caps(20_000, defaults, defaults) else { panic!() };
        assert_eq!(http + grpc + OWN_DESCRIPTORS as usize, 20_000);
        assert_eq!((http, grpc), (15_590, 3898));
        // Caps someone set are theirs.
        assert_eq!(fit_connection_caps(20_000, (20_000, 10), defaults), Fit::TooLow { wanted: 20_522 });
        // A limit that leaves no room is only warned about.
        assert_eq!(fit_connection_caps(256, defaults, defaults), Fit::TooLow { wanted: 20_992 });
    }
}
