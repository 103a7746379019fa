//! Local worker processes: spawn, forward their output, restart with capped
//! backoff when they die, and stop them (SIGTERM, grace, SIGKILL) at shutdown.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PoolKind, WorkersConfig};
use crate::pool::local_socket;

/// A run of this long resets the restart backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// Why local workers cannot start at all.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot run the worker Python {python}: {source}")]
    Python { python: PathBuf, source: std::io::Error },
    #[error("the worker Python {python} cannot import the configured classes:\n{stderr}")]
    Import { python: PathBuf, stderr: String },
}

/// Everything needed to run one worker process.
#[derive(Debug, Clone)]
struct WorkerSpec {
    id: String,
    class: String,
    socket: PathBuf,
    threads: u32,
    env: Vec<(String, String)>,
}

/// Supervises every local worker until stopped.
pub struct Supervisor {
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Supervisor {
    /// Check that the interpreter can import every configured class, then
    /// spawn all local workers. Remote pools are not touched.
    pub async fn start(config: &Config, socket_dir: &Path) -> Result<Self, SupervisorError> {
        let specs: Vec<WorkerSpec> = config
            .pools
            .iter()
            .flat_map(|pool| match &pool.kind {
                PoolKind::Local { class, workers, threads, env } => (0..workers.get())
                    .map(|i| WorkerSpec {
                        id: format!("{}-{i}", pool.name),
                        class: class.clone(),
                        socket: local_socket(socket_dir, &pool.name, i),
                        threads: threads.get(),
                        env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    })
                    .collect::<Vec<_>>(),
                PoolKind::Remote { .. } => Vec::new(),
            })
            .collect();
        if !specs.is_empty() {
            check_imports(&config.workers.python, &specs).await?;
        }
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for spec in specs {
            tasks.spawn(supervise(spec, config.workers.clone(), stop.clone()));
        }
        Ok(Self { tasks, stop })
    }

    /// Stop every worker (SIGTERM, then SIGKILL after the grace) and wait.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Fail fast, with Python's own message, when the environment is wrong.
async fn check_imports(python: &Path, specs: &[WorkerSpec]) -> Result<(), SupervisorError> {
    let mut classes: Vec<&str> = specs.iter().map(|s| s.class.as_str()).collect();
    classes.dedup();
    let script = "import importlib, sys\nimport infergate_worker\nfor spec in sys.argv[1:]:\n    m, c = spec.split(':')\n    getattr(importlib.import_module(m), c)\n";
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(&classes)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| SupervisorError::Python { python: python.to_owned(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SupervisorError::Import {
            python: python.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn spawn(spec: &WorkerSpec, python: &Path) -> std::io::Result<Child> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "infergate_worker", "serve", &spec.class])
        .arg("--listen")
        .arg(format!("unix:{}", spec.socket.display()))
        .arg("--threads")
        .arg(spec.threads.to_string())
        .arg("--exit-with-parent")
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("INFERGATE_WORKER_ID", &spec.id)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn()
}

/// Forward each line a worker prints into the gateway's log.
fn forward(id: &str, stream: Option<impl AsyncRead + Unpin + Send + 'static>) {
    let Some(stream) = stream else { return };
    let id = id.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // The worker SDK starts its log lines with the level name.
            if line.starts_with("ERROR") || line.starts_with("CRITICAL") || line.starts_with("Traceback") {
                tracing::error!(target: "worker", worker = %id, "{line}");
            } else if line.starts_with("WARNING") {
                tracing::warn!(target: "worker", worker = %id, "{line}");
            } else {
                tracing::info!(target: "worker", worker = %id, "{line}");
            }
        }
    });
}

async fn supervise(spec: WorkerSpec, cfg: WorkersConfig, stop: CancellationToken) {
    let mut backoff = cfg.restart_backoff_min;
    let mut restarts = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let exited: Result<ExitStatus, std::io::Error> = match spawn(&spec, &cfg.python) {
            Ok(mut child) => {
                tracing::info!(worker = %spec.id, pid = child.id(), class = %spec.class, restarts, "worker started");
                forward(&spec.id, child.stdout.take());
                forward(&spec.id, child.stderr.take());
                tokio::select! {
                    status = child.wait() => status,
                    () = stop.cancelled() => {
                        terminate(&spec.id, &mut child, cfg.stop_grace).await;
                        return;
                    }
                }
            }
            Err(e) => Err(e),
        };
        match exited {
            Ok(status) => {
                tracing::warn!(worker = %spec.id, %status, "worker exited; restarting in {backoff:?}")
            }
            Err(e) => {
                tracing::error!(worker = %spec.id, error = %e, "cannot spawn worker; retrying in {backoff:?}")
            }
        }
        if started.elapsed() >= STABLE_RUN {
            backoff = cfg.restart_backoff_min;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.restart_backoff_max);
        restarts += 1;
    }
}

/// SIGTERM, wait up to `grace` for a drained exit, then SIGKILL.
async fn terminate(id: &str, child: &mut Child, grace: Duration) {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
        return;
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(worker = %id, %status, "worker stopped"),
        Ok(Err(e)) => tracing::warn!(worker = %id, error = %e, "cannot wait for worker"),
        Err(_) => {
            tracing::warn!(worker = %id, "worker ignored SIGTERM for {grace:?}; killing it");
            let _ = child.kill().await;
        }
    }
}
