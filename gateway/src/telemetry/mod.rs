//! Logging setup (text for terminals, JSON lines for collectors) and metrics.

pub mod metrics;
pub mod otlp;
pub mod python_log;
pub mod timing;
pub mod trace;
pub mod usage;
pub mod window;

use std::io::Write;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Log lines held for the writer thread at most; past it lines are dropped
/// and counted (`infergate_log_lines_dropped_total`) rather than blocking
/// requests on a slow log reader.
pub const LOG_BUFFER_LINES: usize = 128_000;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Install the global subscriber. `RUST_LOG` overrides the configured filter.
/// Lines are formatted on the logging thread and written by a dedicated
/// thread; keep the returned guard alive until exit (dropping it flushes).
pub fn init(log: &LogConfig) -> WorkerGuard {
    let from_env = EnvFilter::try_from_default_env().ok();
    let _ = FILTER_FROM_ENV.set(from_env.is_some());
    let filter = from_env.or_else(|| EnvFilter::try_new(&log.filter).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    let (writer, guard) =
        NonBlockingBuilder::default().buffered_lines_limit(LOG_BUFFER_LINES).lossy(true).finish(LossyStderr);
    let _ = DROPPED.set(writer.error_counter());
    // Colours only for a person at a terminal, not in a file or a collector's pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    // A second init (tests) is harmless: the first subscriber stays.
    if log.json {
        // Each line carries its request's span fields (request id, trace id).
        let builder =
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).with_filter_reloading();
        let handle = builder.reload_handle();
        if builder.try_init().is_ok() {
            let _ = SET_FILTER.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        }
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        if builder.try_init().is_ok() {
            let _ = SET_FILTER.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        }
    }
    guard
}

/// Replaces the installed subscriber's filter.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();
static FILTER_FROM_ENV: OnceLock<bool> = OnceLock::new();

/// Whether `filter` is a filter [`set_log_filter`] would take.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter).map(drop).map_err(|e| format!("{filter:?}: {e}"))
}

/// Apply `log.level` from a reloaded config. `RUST_LOG`, when set, wins
/// (as it does at start): the filter is left as it is.
pub fn set_log_filter(filter: &str) -> Result<(), String> {
    if FILTER_FROM_ENV.get().copied().unwrap_or(false) {
        return Ok(());
    }
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("log.level {filter:?}: {e}"))?;
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Ok(()),
    }
}

/// Log lines dropped so far because the writer fell behind.
pub fn dropped_log_lines() -> usize {
    DROPPED.get().map_or(0, ErrorCounter::dropped_lines)
}

/// Stderr that drops what it cannot write. When the log reader goes away
/// (a closed pipe), tracing-subscriber would otherwise report the failure
/// with `eprintln!`, which panics on the same broken pipe and takes down
/// whichever task was logging — the shutdown signal task included.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
