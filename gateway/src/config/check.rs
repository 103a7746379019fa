//! How checked values are read from the raw config, and the error that
//! names the key to blame.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A config that cannot be used, with the key to blame.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

pub(super) fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| invalid(key, format!("{s:?} is not ip:port ({e})")))
}

pub(super) fn positive_size(key: &str, v: u64) -> Result<usize, ConfigError> {
    usize::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| invalid(key, "must be a positive number"))
}

pub(super) fn duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s)
        .map_err(|e| invalid(key, format!("{s:?} is not a duration like 250ms or 30s ({e})")))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}
