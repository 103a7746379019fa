//! Routing: the model name a client sends may be an alias with variants,
//! each a model on a pool. A variant is chosen by, in order: an explicit
//! `X-Model-Version` pin (when the caller's tier may pin), a tier rule, a
//! weighted canary split that is sticky per caller, else the stable variant.
//! The plan continues with the alias's fallbacks; [`run`] walks it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use crate::call::Call;
use crate::call::{Caller, Principal};
use crate::config::routes::{AliasConfig, AliasFallback};
use crate::error::GatewayError;
use crate::proto::ModelEntry;
use crate::upstream::Upstream;

/// Request header (and gRPC metadata) that pins a variant.
pub const VERSION_HEADER: &str = "x-model-version";
/// Response header (and gRPC metadata) naming the variant that answered.
pub const VARIANT_HEADER: &str = "x-infergate-variant";

/// Where one attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The variant, for the response header and logs; `None` for a plain
    /// model name (no alias).
    pub variant: Option<Arc<str>>,
    /// The pool to use; `None`: whichever pool serves `model`.
    pub pool: Option<Arc<str>>,
    pub model: Arc<str>,
}

/// The chosen target first, then the fallbacks, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub targets: Vec<Target>,
}

/// The configured aliases.
#[derive(Debug, Default)]
pub struct Routes {
    aliases: HashMap<Arc<str>, AliasConfig>,
    /// Models and pools of aliases with `direct = false`, by the alias that
    /// closes them: callers reach them only through it.
    closed: HashMap<Arc<str>, Arc<str>>,
}

impl Routes {
    pub fn new(aliases: &[AliasConfig]) -> Self {
        let closed = aliases
            .iter()
            .filter(|a| !a.direct)
            .flat_map(|a| a.direct_names().map(|n| (Arc::from(n), a.name.clone())))
            .filter(|(n, _)| !aliases.iter().any(|a| &a.name == n))
            .collect();
        Self { aliases: aliases.iter().map(|a| (a.name.clone(), a.clone())).collect(), closed }
    }

    /// The plan for a call to `name` by `caller`, pinned to `pin` if given.
    pub fn plan(&self, name: &str, caller: &Caller, pin: Option<&str>) -> Result<Plan, GatewayError> {
        let Some(alias) = self.aliases.get(name) else {
            if let Some(alias) = self.closed.get(name) {
                tracing::debug!(model = name, alias = %alias, "direct name of an alias with direct = false");
                return Err(GatewayError::ModelForbidden { model: name.to_owned() });
            }
            if pin.is_some() {
                return Err(GatewayError::invalid("X-Model-Version", format!("model {name:?} has no versions")));
            }
            return Ok(Plan { targets: vec![Target { variant: None, pool: None, model: name.into() }] });
        };
        let chosen = match pin {
            Some(v) => {
                if alias.pin_tiers.as_ref().is_some_and(|tiers| !tiers.contains(&*caller.tier)) {
                    return Err(GatewayError::PinForbidden { model: name.to_owned() });
                }
                alias.variants.iter().position(|x| &*x.name == v).ok_or_else(|| {
                    GatewayError::invalid("X-Model-Version", format!("model {name:?} has no version {v:?}"))
                })?
            }
            None => choose(alias, caller),
        };
        let mut targets = vec![target(alias, chosen, None)];
        self.add_fallbacks(alias, caller, &mut targets, 0);
        Ok(Plan { targets })
    }

    /// Append `alias`'s fallbacks (other aliases routed for the same caller),
    /// skipping targets already in the plan.
    fn add_fallbacks(&self, alias: &AliasConfig, caller: &Caller, targets: &mut Vec<Target>, depth: usize) {
        for f in &alias.fallbacks {
            let next: Vec<Target> = match f {
                AliasFallback::Variant(v) => vec![target(alias, *v, None)],
                AliasFallback::Alias(other) => match self.aliases.get(other) {
                    // Config checking rules out loops; the depth bound is a backstop.
                    Some(o) if depth < 8 => {
                        let mut sub = vec![target(o, choose(o, caller), Some(&o.name))];
                        self.add_fallbacks(o, caller, &mut sub, depth + 1);
                        sub
                    }
                    _ => Vec::new(),
                },
            };
            for t in next {
                if !targets.iter().any(|x| x.pool == t.pool && x.model == t.model) {
                    targets.push(t);
                }
            }
        }
    }

    /// The entry clients see for `name`: an alias shows its stable variant's
    /// model under the alias name.
    pub fn entry(&self, upstream: &dyn Upstream, name: &str) -> Result<ModelEntry, GatewayError> {
        let Some(alias) = self.aliases.get(name) else { return upstream.model(name) };
        let v = &alias.variants[alias.stable];
        let mut entry = upstream.model_in(&v.pool, &v.model)?;
        if let Some(info) = entry.info.as_mut() {
            info.name = name.to_owned();
        }
        Ok(entry)
    }

    /// The entry for version `version` of `name` (OIP `/versions/{v}`
    /// routes), and the pin that selects it: an alias's versions are its
    /// variants; a plain model has the one version its workers report.
    pub fn version_entry(
        &self,
        upstream: &dyn Upstream,
        name: &str,
        version: &str,
    ) -> Result<(ModelEntry, Option<String>), GatewayError> {
        let missing = || GatewayError::VersionNotFound { model: name.to_owned(), version: version.to_owned() };
        let Some(alias) = self.aliases.get(name) else {
            let entry = upstream.model(name)?;
            let matches = entry.info.as_ref().is_some_and(|i| i.version == version);
            return if matches { Ok((entry, None)) } else { Err(missing()) };
        };
        let v = alias.variants.iter().find(|v| &*v.name == version).ok_or_else(missing)?;
        let mut entry = upstream.model_in(&v.pool, &v.model)?;
        if let Some(info) = entry.info.as_mut() {
            info.name = name.to_owned();
            info.version = version.to_owned();
        }
        Ok((entry, Some(version.to_owned())))
    }

    /// Every model clients can name: the pools' models and the aliases whose
    /// stable variant is known.
    pub fn entries(&self, upstream: &dyn Upstream) -> Vec<ModelEntry> {
        let mut all = upstream.models();
        let mut names: Vec<&Arc<str>> = self.aliases.keys().collect();
        names.sort();
        for name in names {
            if let Ok(entry) = self.entry(upstream, name) {
                all.retain(|e| e.info.as_ref().is_none_or(|i| i.name != **name));
                all.push(entry);
            }
        }
        all.sort_by(|a, b| a.info.as_ref().map(|i| &i.name).cmp(&b.info.as_ref().map(|i| &i.name)));
        all
    }
}

/// The entry of the model a target names (for its dimensions, kind, ...).
pub fn target_entry(upstream: &dyn Upstream, target: &Target) -> Result<ModelEntry, GatewayError> {
    match &target.pool {
        Some(pool) => upstream.model_in(pool, &target.model),
        None => upstream.model(&target.model),
    }
}

/// Name the answering variant on a response (nothing for a plain model).
pub fn tag(headers: &mut http::HeaderMap, target: &Target) {
    if let Some(v) = target.variant.as_deref().and_then(|v| http::HeaderValue::from_str(v).ok()) {
        headers.insert(VARIANT_HEADER, v);
    }
}

fn target(alias: &AliasConfig, v: usize, via: Option<&Arc<str>>) -> Target {
    let variant = &alias.variants[v];
    let label = match via {
        Some(other) => format!("{other}:{}", variant.name).into(),
        None => variant.name.clone(),
    };
    Target { variant: Some(label), pool: Some(variant.pool.clone()), model: variant.model.clone() }
}

/// A tier rule, else the sticky canary split, else the stable variant.
fn choose(alias: &AliasConfig, caller: &Caller) -> usize {
    if let Some(v) = alias.tiers.get(&*caller.tier) {
        return *v;
    }
    let total: u64 = alias.variants.iter().map(|v| u64::from(v.weight)).sum();
    if total == 0 {
        return alias.stable;
    }
    let mut point = sticky_hash(&alias.name, caller) % total;
    for (i, v) in alias.variants.iter().enumerate() {
        if point < u64::from(v.weight) {
            return i;
        }
        point -= u64::from(v.weight);
    }
    alias.stable
}

/// A hash of the alias and who the caller is (key id, user, else address),
/// the same in every replica and every release: FNV-1a, 64 bit.
fn sticky_hash(alias: &str, caller: &Caller) -> u64 {
    let who = match &caller.principal {
        Principal::Key(id) => format!("k:{id}"),
        Principal::User(sub) => format!("u:{}:{sub}", caller.tenant),
        Principal::Anonymous => format!("a:{}", caller.client),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in alias.bytes().chain([0]).chain(who.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether the next target in a plan may take a call this error stopped:
/// the target could not take it at all (nothing reached a model): no ready
/// worker, starting, a model that failed to load, shed by the pool's queue
/// or a worker's admission, or its circuit is open.
fn could_not_take(err: &GatewayError) -> bool {
    matches!(
        err,
        GatewayError::NoReadyWorker { .. }
            | GatewayError::ModelFailedToLoad { .. }
            | GatewayError::QueueFull { .. }
            | GatewayError::CircuitOpen { .. }
            | GatewayError::Starting { .. }
            | GatewayError::WorkerRefused { .. }
    )
}

/// For a stream that has not started: also a worker that failed before the
/// first chunk (the client has seen nothing, so another target may answer;
/// this is what makes a second provider a fallback for the first).
fn failed_before_first_chunk(err: &GatewayError) -> bool {
    could_not_take(err) || matches!(err, GatewayError::WorkerUnavailable { .. } | GatewayError::WorkerFailed { .. })
}

/// Send `call` to the plan's targets in order until one takes it: the first
/// whose failure is not a reason to fall back ends the walk. Returns the
/// answer and the target that gave it.
pub async fn run<P, T, F, Fut>(plan: &Plan, call: Call<P>, send: F) -> Result<(T, Target), GatewayError>
where
    P: Clone,
    F: Fn(Call<P>) -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    walk(plan, call, send, could_not_take).await
}

/// [`run`] for opening a stream: it also falls back when a target's worker
/// failed before the first chunk. Once a stream is returned, nothing falls
/// back any more.
pub async fn run_stream<P, T, F, Fut>(plan: &Plan, call: Call<P>, send: F) -> Result<(T, Target), GatewayError>
where
    P: Clone,
    F: Fn(Call<P>) -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    walk(plan, call, send, failed_before_first_chunk).await
}

async fn walk<P, T, F, Fut>(
    plan: &Plan,
    call: Call<P>,
    send: F,
    falls_back: fn(&GatewayError) -> bool,
) -> Result<(T, Target), GatewayError>
where
    P: Clone,
    F: Fn(Call<P>) -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    let last = plan.targets.len().saturating_sub(1);
    let mut error = None;
    let mut call = Some(call);
    for (i, t) in plan.targets.iter().enumerate() {
        // The last attempt takes the call itself; earlier ones a copy.
        let Some(mut attempt) = (if i == last { call.take() } else { call.clone() }) else { break };
        attempt.pool = t.pool.clone();
        attempt.model = t.model.to_string();
        let request_id = attempt.request_id.clone();
        match send(attempt).await {
            Ok(out) => return Ok((out, t.clone())),
            Err(e) if i < last && falls_back(&e) => {
                let next = &plan.targets[i + 1];
                tracing::warn!(
                    request_id,
                    from = t.variant.as_deref().unwrap_or(&*t.model),
                    pool = t.pool.as_deref().unwrap_or("-"),
                    to = next.variant.as_deref().unwrap_or(&*next.model),
                    error = %e,
                    "falling back"
                );
                error = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(error.unwrap_or_else(|| GatewayError::ModelNotFound { model: String::new() }))
}

#[cfg(test)]
mod tests;
