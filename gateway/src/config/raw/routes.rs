//! `[[aliases]]` and their variants as written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[[aliases]]`: a model name clients use, served by one or more variants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlias {
    pub name: String,
    /// The variant used when no rule applies (default: the first).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stable: String,
    /// Tiers whose callers may pin a variant with `X-Model-Version`;
    /// `["*"]` (the default) is everyone, `[]` no one.
    pub pin_tiers: Vec<String>,
    /// Caller tier -> variant, e.g. `{ vip = "dedicated" }`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<String, String>,
    /// Tried in order when the chosen variant cannot take the call: a
    /// variant of this alias or another alias.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    pub variants: Vec<RawVariant>,
    /// Whether callers may also name the variants' models and pools
    /// directly; `false` serves them only through the alias (its limits,
    /// tier rules and prices then cannot be stepped around).
    pub direct: bool,
}

impl Default for RawAlias {
    fn default() -> Self {
        Self {
            name: String::new(),
            stable: String::new(),
            pin_tiers: vec!["*".into()],
            tiers: BTreeMap::new(),
            fallbacks: Vec::new(),
            variants: Vec::new(),
            direct: true,
        }
    }
}

/// One variant of an alias: a model on a pool.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawVariant {
    pub name: String,
    pub pool: String,
    /// The model name the pool's workers serve (default: the alias name).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Share of the canary split; variants without a weight get none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// What this variant must keep to stay in the split: breached over a
    /// window while the stable variant is not, its weight drops to 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo: Option<RawSlo>,
    /// Percent of the alias's calls this variant gets, step by step: the
    /// next step after each window it stays within its SLO (e.g. `[1, 5,
    /// 25, 50]`); needs `slo`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ramp: Vec<u32>,
}

/// `slo = { error_rate = 0.02, p99 = "800ms", min_requests = 200, window = "5m" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSlo {
    /// Share of calls that may fail (a 5xx) over a window.
    pub error_rate: f64,
    /// Latency that 99% of calls must stay under; empty: not judged.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub p99: String,
    /// Calls a window needs before it is judged.
    pub min_requests: u64,
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub window: String,
}

impl Default for RawSlo {
    fn default() -> Self {
        Self { error_rate: 0.02, p99: String::new(), min_requests: 200, window: "5m".into() }
    }
}
