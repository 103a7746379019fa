//! Checked `[[aliases]]`: every variant names a configured pool, every rule
//! and fallback names something that exists, and fallbacks do not loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::check::{ConfigError, invalid};
use super::pools::PoolConfig;
use super::raw::RawAlias;

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
            variants.push(VariantConfig {
                name: v.name.as_str().into(),
                pool: v.pool.as_str().into(),
                model: model.into(),
                weight: v.weight.unwrap_or(0),
            });
        }
        let variant = |k: String, name: &str| {
            index.get(name).copied().ok_or_else(|| invalid(k, format!("no variant named {name:?}")))
        };
        let stable = if a.stable.is_empty() { 0 } else { variant(key("stable"), &a.stable)? };
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
