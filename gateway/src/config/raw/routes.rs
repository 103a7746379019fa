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
}
