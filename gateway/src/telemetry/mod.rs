//! Logging setup: text for terminals, JSON lines for collectors.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Install the global subscriber. `RUST_LOG` overrides the configured filter.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if log.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
