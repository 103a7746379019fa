//! Logging setup (text for terminals, JSON lines for collectors) and metrics.

pub mod metrics;
pub mod otlp;
pub mod python_log;
pub mod timing;
pub mod trace;
pub mod usage;

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
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) =
        NonBlockingBuilder::default().buffered_lines_limit(LOG_BUFFER_LINES).lossy(true).finish(LossyStderr);
    let _ = DROPPED.set(writer.error_counter());
    // Colours only for a person at a terminal, not in a file or a collector's pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if log.json {
        // Each line carries its request's span fields (request id, trace id).
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
    guard
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
