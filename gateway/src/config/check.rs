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
    parse_duration(s).map_err(|m| invalid(key, m))
}

/// The one duration syntax of files, environment overrides and headers:
/// bare seconds (`5`, `2.5`) or with a unit (`250ms`, `30s`, `1m`), above
/// zero. The error says which was wrong.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs < 1e9 => Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default(),
        Ok(_) => return Err(format!("{s:?} is out of range")),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration: seconds (2.5) or with a unit (250ms, 30s, 1m) ({e})"))?,
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be above zero"));
    }
    Ok(d)
}

/// An optional duration field of the raw config (see [`text_or_seconds`]);
/// absent is `None` by the field's default.
pub fn some_text_or_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    text_or_seconds(d).map(Some)
}

/// A duration field of the raw config: a string (`"250ms"`) or a number of
/// seconds (`5`, as `INFERGATE__DEADLINES__DEFAULT=5` arrives), kept as text
/// for [`duration`] to check.
pub fn text_or_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        Float(f64),
    }
    Ok(match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::Text(s) => s,
        Raw::Int(n) => n.to_string(),
        Raw::Float(x) => x.to_string(),
    })
}
