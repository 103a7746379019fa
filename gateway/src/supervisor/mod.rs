//! Local worker processes: spawn, forward their output, restart with capped
//! backoff when they die, and stop them (SIGTERM, grace, SIGKILL) at shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::local_socket;
use crate::config::{Config, PoolConfig, PoolKind, WorkersConfig};
use crate::load_state::LoadState;
use crate::telemetry::python_log::{EXIT_LOAD_FAILED, PythonRecord};

/// A run of this long resets the restart backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// Why local workers cannot start at all.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot run the worker Python {python} (workers.python): {source}")]
    Python { python: PathBuf, source: std::io::Error },
    #[error(
        "the worker Python {python} has no infergate_worker: set workers.python to the interpreter of \
         the environment it is installed in (`pip install -e python-worker`)"
    )]
    NoSdk { python: PathBuf },
    #[error("a pool's class cannot be served (checked with {python}):\n{stderr}")]
    Import { python: PathBuf, stderr: String },
}

/// Everything needed to run one worker process.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub pool: String,
    pub id: String,
    class: String,
    pub socket: PathBuf,
    threads: u32,
    env: Vec<(String, String)>,
}

impl WorkerSpec {
    /// Whether `other` runs the same code the same way (class, threads, env).
    pub fn runs_as(&self, other: &Self) -> bool {
        self.class == other.class && self.threads == other.threads && self.env == other.env
    }

    /// Worker `n` of local pool `pool` (`None` for other kinds), listening
    /// in `socket_dir`.
    pub fn of(pool: &PoolConfig, n: u32, socket_dir: &Path) -> Option<Self> {
        let PoolKind::Local { class, threads, env, .. } = &pool.kind else { return None };
        Some(Self {
            pool: pool.name.clone(),
            id: format!("{}-{n}", pool.name),
            class: class.clone(),
            socket: local_socket(socket_dir, &pool.name, n),
            threads: threads.get(),
            env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }
}

/// Supervises every local worker until stopped; workers are added and
/// stopped one by one as a reload changes the pools.
pub struct Supervisor {
    workers: Mutex<HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>>,
    /// Each worker's process now and its restarts, for an operator's view.
    processes: Arc<Mutex<HashMap<String, Process>>>,
    config: WorkersConfig,
    loads: Arc<LoadState>,
    stop: CancellationToken,
}

fn local_workers(config: &Config, socket_dir: &Path) -> Vec<WorkerSpec> {
    config
        .pools
        .iter()
        .flat_map(|pool| match &pool.kind {
            PoolKind::Local { workers, .. } => {
                (0..workers.get()).filter_map(|i| WorkerSpec::of(pool, i, socket_dir)).collect::<Vec<_>>()
            }
            PoolKind::Remote { .. } | PoolKind::Discovered { .. } | PoolKind::Embedded { .. } => Vec::new(),
        })
        .collect()
}

/// One pool's class to import, in the environment its code will run in.
struct ClassCheck<'a> {
    pool: &'a str,
    class: &'a str,
    env: Vec<(String, String)>,
}

/// The classes of local pools, and of embedded ones too when `embedded`
/// (those run in the gateway, with the same interpreter's packages and no
/// `env` of their own).
fn classes(config: &Config, embedded: bool) -> Vec<ClassCheck<'_>> {
    config.pools.iter().filter_map(|pool| class_check(pool, embedded)).collect()
}

/// `pool`'s class to check, if it is local (or embedded, when `embedded`).
fn class_check(pool: &PoolConfig, embedded: bool) -> Option<ClassCheck<'_>> {
    match &pool.kind {
        PoolKind::Local { class, env, .. } => {
            Some(ClassCheck { pool: &pool.name, class, env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect() })
        }
        PoolKind::Embedded { class, .. } if embedded => Some(ClassCheck { pool: &pool.name, class, env: Vec::new() }),
        _ => None,
    }
}

/// The start-up check alone (`infergate check-config`): every local pool's
/// class imports, in its pool's environment, and is a Model or a
/// WorkerServicer whose declarations hold; so does every embedded pool's,
/// with the same interpreter's packages (the gateway imports those itself
/// when it starts).
pub async fn check(config: &Config) -> Result<(), SupervisorError> {
    check_classes(&config.workers.python, &config.workers.inherit_env, &classes(config, true)).await.map(drop)
}

impl Supervisor {
    /// Check every local pool's class (as [`check`] does), then spawn all
    /// local workers, telling `loads` how their models' loading goes.
    /// Remote pools are not touched.
    pub async fn start(config: &Config, socket_dir: &Path, loads: Arc<LoadState>) -> Result<Self, SupervisorError> {
        let models =
            check_classes(&config.workers.python, &config.workers.inherit_env, &classes(config, false)).await?;
        for pool in &config.pools {
            if let PoolKind::Local { workers, .. } = &pool.kind {
                loads.expect(&pool.name, workers.get() as usize, models.get(&pool.name).cloned().unwrap_or_default());
            }
        }
        let me = Self {
            workers: Mutex::default(),
            processes: Arc::default(),
            config: config.workers.clone(),
            loads,
            stop: CancellationToken::new(),
        };
        for spec in local_workers(config, socket_dir) {
            me.spawn(spec);
        }
        Ok(me)
    }

    /// Check the classes of `pools` (the local ones) as the start does:
    /// the model names each declares, by pool.
    pub async fn check(&self, pools: &[&PoolConfig]) -> Result<HashMap<String, Vec<String>>, SupervisorError> {
        let checks: Vec<ClassCheck<'_>> = pools.iter().filter_map(|pool| class_check(pool, false)).collect();
        check_classes(&self.config.python, &self.config.inherit_env, &checks).await
    }

    /// Local pool `pool` runs `workers` processes whose class declares `models`.
    pub fn expect(&self, pool: &str, workers: usize, models: Vec<String>) {
        self.loads.expect(pool, workers, models);
    }

    /// The model names local pool `pool`'s class declares.
    pub fn models(&self, pool: &str) -> Vec<String> {
        self.loads.models(pool)
    }

    /// Whether worker `id` of `pool` has failed to load its model as many
    /// times in a row as `workers.max_load_failures`.
    pub fn cannot_load(&self, pool: &str, id: &str) -> bool {
        self.loads.failures(pool, id) >= self.loads.max_failures()
    }

    /// How long a stopped worker gets to finish before it is killed.
    pub fn stop_grace(&self) -> std::time::Duration {
        self.config.stop_grace
    }

    /// Start worker `spec` and keep it running (restarts with backoff).
    pub fn spawn(&self, spec: WorkerSpec) {
        let stop = self.stop.child_token();
        let id = spec.id.clone();
        let processes = self.processes.clone();
        let task = tokio::spawn(supervise(spec, self.config.clone(), self.loads.clone(), processes, stop.clone()));
        let old = self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, (stop, task));
        if let Some((stop, _)) = old {
            stop.cancel();
        }
    }

    /// Stop worker `id` (SIGTERM, then SIGKILL after the grace) and wait.
    pub async fn stop(&self, pool: &str, id: &str) {
        let entry = self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
        if let Some((stop, task)) = entry {
            stop.cancel();
            let _ = task.await;
        }
        self.processes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
        self.loads.forget(pool, id);
    }

    /// Every supervised worker's process now (by worker id).
    pub fn processes(&self) -> HashMap<String, Process> {
        self.processes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Stop every worker (SIGTERM, then SIGKILL after the grace) and wait.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let tasks: Vec<_> = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, (_, t))| t)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Fail fast, with Python's own message, when the environment is wrong:
/// each pool's class is imported (`infergate-worker check`) in the
/// environment its workers will have. The model names each pool's class
/// declares, by pool.
async fn check_classes(
    python: &Path,
    inherit: &[String],
    checks: &[ClassCheck<'_>],
) -> Result<HashMap<String, Vec<String>>, SupervisorError> {
    let mut by_env: BTreeMap<&[(String, String)], BTreeSet<String>> = BTreeMap::new();
    for check in checks {
        by_env.entry(&check.env).or_default().insert(format!("{}={}", check.pool, check.class));
    }
    #[derive(serde::Deserialize)]
    struct Checked {
        target: String,
        models: Vec<String>,
    }
    let mut models = HashMap::new();
    for (env, targets) in by_env {
        let out = python_command(python, inherit, env)
            .args(["-m", "infergate_worker", "check"])
            .args(&targets)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| SupervisorError::Python { python: python.to_owned(), source })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.contains("No module named infergate_worker") {
            return Err(SupervisorError::NoSdk { python: python.to_owned() });
        }
        if !out.status.success() {
            return Err(SupervisorError::Import { python: python.to_owned(), stderr });
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(c) = serde_json::from_str::<Checked>(line) {
                models.insert(c.target, c.models);
            }
        }
    }
    Ok(models)
}

/// Variables a Python process needs, passed to workers by name ...
const PASSED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "NVIDIA_VISIBLE_DEVICES",
];
/// ... and by prefix (locale, interpreter, thread pools, accelerators, model
/// hubs, the worker SDK's own settings).
const PASSED_PREFIXES: &[&str] =
    &["LC_", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "CUDA_", "HF_", "INFERGATE_"];

/// Whether a variable of the gateway's environment reaches its workers:
/// the ones Python needs and those `workers.inherit_env` names (an entry
/// ending in `*` is a prefix). The gateway's own config overrides
/// (`INFERGATE__…`, which may hold a Redis password) never do, nor does
/// anything else it read (a JWT secret, cloud credentials).
pub fn passed_to_workers(name: &str, inherit: &[String]) -> bool {
    if name.starts_with(crate::config::ENV_PREFIX) {
        return inherit.iter().any(|i| i == name);
    }
    PASSED.contains(&name)
        || PASSED_PREFIXES.iter().any(|p| name.starts_with(p))
        || inherit.iter().any(|i| match i.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => i == name,
        })
}

/// A worker's Python command with a clean environment: what
/// [`passed_to_workers`] lets through, then `env` (the pool's own).
fn python_command(python: &Path, inherit: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(python);
    cmd.env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(|k| passed_to_workers(k, inherit))))
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn spawn(spec: &WorkerSpec, workers: &WorkersConfig) -> std::io::Result<Child> {
    let mut cmd = python_command(&workers.python, &workers.inherit_env, &spec.env);
    cmd.args(["-m", "infergate_worker", "serve", &spec.class, "--log-format", "json"])
        .arg("--listen")
        .arg(format!("unix:{}", spec.socket.display()))
        .arg("--threads")
        .arg(spec.threads.to_string())
        .arg("--max-message-bytes")
        .arg(workers.max_message_bytes.to_string())
        .arg("--exit-with-parent")
        .env("PYTHONUNBUFFERED", "1")
        .env("INFERGATE_WORKER_ID", &spec.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn()
}

/// Longest worker output line forwarded as one record; longer lines are
/// forwarded in pieces of this size.
const MAX_LOG_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines of at most `max` bytes. It never holds
/// more than `max` bytes of an unfinished line, so the pipe is always drained
/// (a worker blocked on a full stderr pipe would hang).
struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// Feed bytes; get the complete lines (without the newline).
    fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            let (body, ended) = match chunk.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (chunk, false),
            };
            for piece in body.chunks(self.max.max(1)) {
                let room = self.max - self.buf.len();
                let (now, later) = piece.split_at(piece.len().min(room));
                self.buf.extend_from_slice(now);
                if !later.is_empty() || self.buf.len() == self.max {
                    lines.push(std::mem::take(&mut self.buf));
                    self.buf.extend_from_slice(later);
                }
            }
            // An empty line is a line; the end of a line already flushed at
            // exactly `max` bytes is not another one.
            if ended && (!self.buf.is_empty() || body.is_empty()) {
                lines.push(std::mem::take(&mut self.buf));
            }
        }
        lines
    }

    /// What is left when the stream ends.
    fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

fn log_worker_line(id: &str, bytes: &[u8]) {
    let line = String::from_utf8_lossy(bytes);
    // The worker SDK starts its log lines with the level name.
    if line.starts_with("ERROR") || line.starts_with("CRITICAL") || line.starts_with("Traceback") {
        tracing::error!(target: "worker", worker = %id, "{line}");
    } else if line.starts_with("WARNING") {
        tracing::warn!(target: "worker", worker = %id, "{line}");
    } else if line.starts_with("DEBUG") {
        tracing::debug!(target: "worker", worker = %id, "{line}");
    } else {
        tracing::info!(target: "worker", worker = %id, "{line}");
    }
}

/// What the supervisor hears from one worker process's output.
#[derive(Clone)]
struct Listener {
    pool: String,
    id: String,
    loads: Arc<LoadState>,
    /// The message of its `load_failed` record, for the exit that follows.
    load_error: Arc<Mutex<Option<String>>>,
}

impl Listener {
    fn heard(&self, bytes: &[u8]) {
        let Some(record) = std::str::from_utf8(bytes).ok().and_then(PythonRecord::parse) else {
            return log_worker_line(&self.id, bytes);
        };
        record.log(&self.id);
        match record.event.as_deref() {
            Some("loaded") => self.loads.loaded(&self.pool, &self.id),
            Some("load_failed") => {
                *self.load_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(record.message);
            }
            _ => {}
        }
    }
}

/// Forward each line a worker prints into the gateway's log, until it
/// closes the stream.
fn forward(to: &Listener, stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> tokio::task::JoinHandle<()> {
    let to = to.clone();
    tokio::spawn(async move {
        let Some(mut stream) = stream else { return };
        let mut lines = LineSplitter::new(MAX_LOG_LINE);
        let mut chunk = vec![0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => lines.push(&chunk[..n]).iter().for_each(|l| to.heard(l)),
            }
        }
        if let Some(rest) = lines.finish() {
            to.heard(&rest);
        }
    })
}

/// How long the supervisor waits for an exited worker's last output.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// A local worker's process as an operator sees it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Process {
    /// Its process id while it runs; `None` between an exit and its restart.
    pub pid: Option<u32>,
    /// Times it exited (or could not be spawned) and was started again.
    pub restarts: u64,
}

async fn supervise(
    spec: WorkerSpec,
    cfg: WorkersConfig,
    loads: Arc<LoadState>,
    processes: Arc<Mutex<HashMap<String, Process>>>,
    stop: CancellationToken,
) {
    let mut backoff = cfg.restart_backoff_min;
    let mut restarts = 0u64;
    let note = |pid: Option<u32>, restarts: u64| {
        processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(spec.id.clone(), Process { pid, restarts });
    };
    let listener =
        Listener { pool: spec.pool.clone(), id: spec.id.clone(), loads, load_error: Arc::new(Mutex::new(None)) };
    // At 0 from the start: a dashboard shows "no restarts", not "no data".
    metrics::counter!(crate::telemetry::metrics::WORKER_RESTARTS, "worker" => spec.id.clone()).increment(0);
    loop {
        let started = tokio::time::Instant::now();
        let exited: Result<ExitStatus, std::io::Error> = match spawn(&spec, &cfg) {
            Ok(mut child) => {
                tracing::info!(worker = %spec.id, pid = child.id(), class = %spec.class, restarts, "worker started");
                note(child.id(), restarts);
                let output = [forward(&listener, child.stdout.take()), forward(&listener, child.stderr.take())];
                tokio::select! {
                    status = child.wait() => {
                        // Its last records (why it could not load) may still be in the pipe.
                        let _ = tokio::time::timeout(LAST_WORDS, futures::future::join_all(output)).await;
                        status
                    }
                    () = stop.cancelled() => {
                        terminate(&spec.id, &mut child, cfg.stop_grace).await;
                        return;
                    }
                }
            }
            Err(e) => Err(e),
        };
        note(None, restarts);
        let load_error = listener.load_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        match exited {
            Ok(status) if status.code() == Some(EXIT_LOAD_FAILED) => {
                let error = load_error.unwrap_or_else(|| "its model's load() raised".to_owned());
                let (times, failed) = listener.loads.load_failed(&spec.pool, &spec.id, &error);
                metrics::counter!(crate::telemetry::metrics::WORKER_RESTARTS, "worker" => spec.id.clone()).increment(1);
                if failed {
                    tracing::error!(
                        pool = %spec.pool, worker = %spec.id, times, error = %error,
                        "pool failed: its model did not load {times} times in a row; calls get 503 model-failed-to-load, restarts go on every {:?}",
                        cfg.restart_backoff_max.min(backoff)
                    );
                } else {
                    tracing::warn!(worker = %spec.id, times, error = %error, "model did not load; restarting in {backoff:?}");
                }
            }
            Ok(status) => {
                tracing::warn!(worker = %spec.id, %status, "worker exited; restarting in {backoff:?}");
                metrics::counter!(crate::telemetry::metrics::WORKER_RESTARTS, "worker" => spec.id.clone()).increment(1);
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

#[cfg(test)]
mod tests {
    use super::{LineSplitter, passed_to_workers};

    #[test]
    fn workers_get_what_python_needs_and_what_is_named_never_the_rest() {
        let inherit = ["OPENAI_BASE_URL".to_owned(), "MYAPP_*".to_owned()];
        for passed in ["PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "OMP_NUM_THREADS", "INFERGATE_WORKER_ID"] {
            assert!(passed_to_workers(passed, &[]), "{passed}");
        }
        for named in ["OPENAI_BASE_URL", "MYAPP_MODEL_DIR"] {
            assert!(passed_to_workers(named, &inherit) && !passed_to_workers(named, &[]), "{named}");
        }
        for secret in ["JWT_SECRET", "AWS_SECRET_ACCESS_KEY", "INFERGATE__REDIS__URL", "OPENAI_API_KEY"] {
            assert!(!passed_to_workers(secret, &inherit), "{secret}");
        }
    }

    fn text(lines: Vec<Vec<u8>>) -> Vec<String> {
        lines.into_iter().map(|l| String::from_utf8(l).unwrap()).collect()
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut s = LineSplitter::new(100);
        assert_eq!(text(s.push(b"INFO one\nINFO tw")), ["INFO one"]);
        assert_eq!(text(s.push(b"o\n\nlast")), ["INFO two", ""]);
        assert_eq!(s.finish().unwrap(), b"last");
    }

    #[test]
    fn long_lines_come_out_in_bounded_pieces() {
        let mut s = LineSplitter::new(4);
        assert_eq!(text(s.push(b"abcdefghij\nxy")), ["abcd", "efgh", "ij"]);
        assert_eq!(text(s.push(b"zw12")), ["xyzw"]);
        assert_eq!(s.finish().unwrap(), b"12");
        let mut s = LineSplitter::new(4);
        assert_eq!(text(s.push(b"abcd\nefghijkl\n")), ["abcd", "efgh", "ijkl"]);
        assert!(s.finish().is_none());
        let mut s = LineSplitter::new(4);
        for _ in 0..1000 {
            s.push(b"0123456789");
            assert!(s.buf.len() <= 4);
        }
    }
}
