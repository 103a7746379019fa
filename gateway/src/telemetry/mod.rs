//! Logging setup (text for terminals, JSON lines for collectors) and metrics.

pub mod metrics;
pub mod timing;
pub mod trace;
pub mod usage;

use std::io::Write;

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Install the global subscriber. `RUST_LOG` overrides the configured filter.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LossyStderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if log.json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
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
