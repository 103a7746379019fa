//! Checked `[[aliases]]`: every variant names a configured pool, every rule
//! and fallback names something that exists, and fallbacks do not loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::check::{ConfigError, duration, invalid};
use super::pools::PoolConfig;
use super::raw::{RawAlias, RawSlo};

/// A model name clients use and the variants behind it.
#[derive(Debug, Clone)]
pub struct AliasConfig {
    pub name: Arc<str>,
    pub variants: Vec<VariantConfig>,
    /// Index into `variants`.
    pub stable: usize,
    /// `None`: anyone may pin; else these tiers only (empty: no one).
    pub pin_tiers: Option<HashSet<String>>,
    /// Tier -> index into `variants`.
    pub tiers: HashMap<String, usize>,
    pub fallbacks: Vec<AliasFallback>,
    /// Callers may name the variants' models directly too.
    pub direct: bool,
}

impl AliasConfig {
    /// The names a caller could use to reach this alias's variants without
    /// the alias: their models and their pools.
    pub fn direct_names(&self) -> impl Iterator<Item = &str> {
        self.variants.iter().flat_map(|v| [&*v.model, &*v.pool]).filter(|n| *n != &*self.name)
    }
}

/// A variant: `model` as served by `pool`.
#[derive(Debug, Clone)]
pub struct VariantConfig {
    pub name: Arc<str>,
    pub pool: Arc<str>,
    pub model: Arc<str>,
    pub weight: u32,
    /// Its SLO, judged against the stable variant's figures.
    pub slo: Option<SloConfig>,
    /// Percent of the alias's calls, step by step (`ramp` in the config).
    pub ramp: Vec<u32>,
}

/// A variant's service level objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SloConfig {
    pub error_rate: f64,
    pub p99: Option<std::time::Duration>,
    pub min_requests: u64,
    pub window: std::time::Duration,
}

fn slo(key: &dyn Fn(&str) -> String, raw: &RawSlo) -> Result<SloConfig, ConfigError> {
    if !(0.0..=1.0).contains(&raw.error_rate) {
        return Err(invalid(key("slo.error_rate"), "must be a share between 0 and 1"));
    }
    if raw.min_requests == 0 {
        return Err(invalid(key("slo.min_requests"), "must be above zero"));
    }
    let window = duration(&key("slo.window"), &raw.window)?;
    if window.is_zero() {
        return Err(invalid(key("slo.window"), "must be above zero"));
    }
    let p99 = if raw.p99.is_empty() { None } else { Some(duration(&key("slo.p99"), &raw.p99)?) };
    Ok(SloConfig { error_rate: raw.error_rate, p99, min_requests: raw.min_requests, window })
}

/// Where an alias falls back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasFallback {
    /// Another variant of the same alias (index).
    Variant(usize),
    /// Another alias (by name), routed for the same caller.
    Alias(Arc<str>),
}

/// Check every alias against the pools; `names` are the pool names.
pub fn check(raw: &[RawAlias], pools: &[PoolConfig]) -> Result<Vec<AliasConfig>, ConfigError> {
    let pool_names: HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let alias_names: HashSet<&str> = raw.iter().map(|a| a.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let key = |k: &str| format!("aliases[{i}].{k}");
        if a.name.is_empty() {
            return Err(invalid(key("name"), "is required"));
        }
        if !seen.insert(a.name.as_str()) {
            return Err(invalid(key("name"), format!("duplicate alias {:?}", a.name)));
        }
        if a.variants.is_empty() {
            return Err(invalid(key("variants"), "at least one variant is required"));
        }
        let mut variants = Vec::with_capacity(a.variants.len());
        let mut index = HashMap::new();
        for (j, v) in a.variants.iter().enumerate() {
            let vkey = |k: &str| format!("aliases[{i}].variants[{j}].{k}");
            if v.name.is_empty() {
                return Err(invalid(vkey("name"), "is required"));
            }
            if index.insert(v.name.clone(), j).is_some() {
                return Err(invalid(vkey("name"), format!("duplicate variant {:?}", v.name)));
            }
            if !pool_names.contains(v.pool.as_str()) {
                return Err(invalid(vkey("pool"), format!("no pool named {:?}", v.pool)));
            }
            let model = if v.model.is_empty() { a.name.as_str() } else { v.model.as_str() };
            let slo = v.slo.as_ref().map(|s| slo(&vkey, s)).transpose()?;
            if !v.ramp.is_empty() {
                if slo.is_none() {
                    return Err(invalid(vkey("ramp"), "needs an slo: a step is taken after a window within it"));
                }
                if v.ramp.iter().any(|p| !(1..=100).contains(p)) || v.ramp.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(invalid(vkey("ramp"), "must be rising percentages between 1 and 100"));
                }
            }
            variants.push(VariantConfig {
                name: v.name.as_str().into(),
                pool: v.pool.as_str().into(),
                model: model.into(),
                weight: v.weight.unwrap_or(0),
                slo,
                ramp: v.ramp.clone(),
            });
        }
        let variant = |k: String, name: &str| {
            index.get(name).copied().ok_or_else(|| invalid(k, format!("no variant named {name:?}")))
        };
        let stable = if a.stable.is_empty() { 0 } else { variant(key("stable"), &a.stable)? };
        if variants[stable].slo.is_some() || !variants[stable].ramp.is_empty() {
            return Err(invalid(
                format!("aliases[{i}].variants[{stable}].slo"),
                "the stable variant is what a canary is judged against; give the slo and ramp to a canary",
            ));
        }
        let tiers = a
            .tiers
            .iter()
            .map(|(tier, v)| Ok((tier.clone(), variant(key(&format!("tiers.{tier}")), v)?)))
            .collect::<Result<_, ConfigError>>()?;
        let mut fallbacks = Vec::with_capacity(a.fallbacks.len());
        for (j, f) in a.fallbacks.iter().enumerate() {
            fallbacks.push(match index.get(f) {
                Some(v) => AliasFallback::Variant(*v),
                None if f != &a.name && alias_names.contains(f.as_str()) => AliasFallback::Alias(f.as_str().into()),
                None => {
                    return Err(invalid(
                        format!("aliases[{i}].fallbacks[{j}]"),
                        format!("{f:?} is neither a variant of this alias nor another alias"),
                    ));
                }
            });
        }
        let pin_tiers =
            if a.pin_tiers.iter().any(|t| t == "*") { None } else { Some(a.pin_tiers.iter().cloned().collect()) };
        out.push(AliasConfig {
            name: a.name.as_str().into(),
            variants,
            stable,
            pin_tiers,
            tiers,
            fallbacks,
            direct: a.direct,
        });
    }
    check_cycles(&out)?;
    Ok(out)
}

/// Alias fallbacks must not lead back to where they started.
fn check_cycles(aliases: &[AliasConfig]) -> Result<(), ConfigError> {
    let edges: BTreeMap<&str, Vec<&str>> = aliases
        .iter()
        .map(|a| {
            let to = a
                .fallbacks
                .iter()
                .filter_map(|f| match f {
                    AliasFallback::Alias(n) => Some(&**n),
                    AliasFallback::Variant(_) => None,
                })
                .collect();
            (&*a.name, to)
        })
        .collect();
    for start in edges.keys() {
        let mut stack = vec![(*start, vec![*start])];
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(at).into_iter().flatten() {
                if next == start {
                    return Err(invalid("aliases", format!("fallbacks form a loop: {} -> {start}", path.join(" -> "))));
                }
                if !path.contains(next) {
                    let mut p = path.clone();
                    p.push(next);
                    stack.push((next, p));
                }
            }
        }
    }
    Ok(())
}
