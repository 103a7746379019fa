//! Heap allocations the gateway makes per request on the happy path.
//!
//! Runs the gateway in this process (the same `server::run` the binary runs,
//! with its real Python workers) under a counting global allocator that
//! counts only on the gateway's own threads: the runtime's workers and
//! blocking threads, and the thread that drives `server::run`. The client
//! sends its requests from a thread of its own, so its allocations are not
//! counted. Requests go one at a time over one keep-alive connection; each
//! kind is measured over `--requests` calls after `--warmup` calls, and the
//! gateway's background work (health checks, metric upkeep) is measured over
//! an idle window as long as the calls took and taken off.
//!
//! `infergate-allocs --config infergate.toml --kind infer=/v2/models/echo/infer=body.json ...`
//! prints (and with `--json`, writes) allocations and bytes per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

/// Counts calls and bytes on threads that set [`COUNTED`], then lets the
/// system allocator do the work.
struct Counting;

static CALLS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread is one of the gateway's.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count(bytes: usize) {
    // A thread being torn down has no thread-locals left: not counted.
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

#[allow(unsafe_code, reason = "a global allocator is an unsafe trait; every call is passed on to System unchanged")]
// SAFETY: each method forwards its arguments to `System`, which upholds the
// GlobalAlloc contract; counting touches only atomics and a const
// thread-local without a destructor, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Parser)]
#[command(about = "Heap allocations per request in the gateway, by kind of request")]
struct Cli {
    /// The gateway's config (its HTTP listener is read from it).
    #[arg(long)]
    config: PathBuf,
    /// `NAME=PATH=BODY_FILE`: a POST of the file's contents to PATH, measured as NAME.
    #[arg(long = "kind", required = true)]
    kinds: Vec<String>,
    /// Measured calls of each kind.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Calls of each kind before measuring (caches, pools and connections warm).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Kind {
    name: String,
    path: String,
    body: Bytes,
}

fn parse_kind(spec: &str) -> anyhow::Result<Kind> {
    let mut parts = spec.splitn(3, '=');
    let (Some(name), Some(path), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--kind {spec}: expected NAME=PATH=BODY_FILE");
    };
    let body = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    Ok(Kind { name: name.to_owned(), path: path.to_owned(), body: body.into() })
}

fn snapshot() -> (u64, u64) {
    (CALLS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed))
}

/// Allocations and bytes per request of one kind, background taken off.
async fn measure(base: &str, kind: &Kind, cli: &Cli) -> anyhow::Result<serde_json::Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let call = || async {
        let req = http::Request::post(format!("{base}{}", kind.path))
            .header("content-type", "application/json")
            .body(Full::new(kind.body.clone()))?;
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{} answered {status}: {}", kind.path, String::from_utf8_lossy(&body));
        }
        anyhow::Ok(())
    };
    for _ in 0..cli.warmup {
        call().await?;
    }
    let before = snapshot();
    let started = Instant::now();
    for _ in 0..cli.requests {
        call().await?;
    }
    let took = started.elapsed();
    let after = snapshot();
    tokio::time::sleep(took).await;
    let idle = snapshot();
    let n = cli.requests as f64;
    let busy = ((after.0 - before.0) as f64, (after.1 - before.1) as f64);
    let background = ((idle.0 - after.0) as f64, (idle.1 - after.1) as f64);
    Ok(json!({
        "kind": kind.name,
        "path": kind.path,
        "requests": cli.requests,
        "seconds": took.as_secs_f64(),
        "allocations_per_request": (busy.0 - background.0) / n,
        "bytes_per_request": (busy.1 - background.1) / n,
        "background_allocations": background.0,
    }))
}

async fn ready(base: &str) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let req = http::Request::get(format!("{base}/readyz")).body(Full::default())?;
        if client.request(req).await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway was not ready within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let source = infergate::control::Source { path: Some(cli.config.clone()), env: Vec::new() };
    let kinds = cli.kinds.iter().map(|k| parse_kind(k)).collect::<anyhow::Result<Vec<_>>>()?;
    let config = infergate::config::Config::load(Some(&cli.config), std::env::vars())
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let base = format!("http://{}", config.raw.http.listen);
    let _log = infergate::telemetry::init(&config.log);
    infergate::telemetry::metrics::install();

    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let client = std::thread::spawn(move || -> anyhow::Result<Vec<serde_json::Value>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let figures = rt.block_on(async {
            ready(&base).await?;
            let mut figures = Vec::new();
            for kind in &kinds {
                figures.push(measure(&base, kind, &cli).await?);
            }
            anyhow::Ok(figures)
        });
        stop.cancel();
        let figures = figures?;
        let text = serde_json::to_string_pretty(&figures)?;
        #[expect(clippy::print_stdout, reason = "the figures are this command's output")]
        {
            println!("{text}");
        }
        if let Some(path) = &cli.json {
            std::fs::write(path, text)?;
        }
        Ok(figures)
    });

    // The gateway's runtime, as the binary builds it, counting on its threads.
    COUNTED.set(true);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().on_thread_start(|| COUNTED.set(true)).build()?;
    rt.block_on(infergate::server::run(config, source, shutdown)).map_err(|e| anyhow::anyhow!("gateway: {e}"))?;
    client.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    Ok(())
}
