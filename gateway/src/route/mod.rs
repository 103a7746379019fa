//! Routing: the model name a client sends may be an alias with variants,
//! each a model on a pool. A variant is chosen by, in order: an explicit
//! `X-Model-Version` pin (when the caller's tier may pin), a tier rule, a
//! weighted canary split that is sticky per caller, else the stable variant.
//! The plan continues with the alias's fallbacks; [`run`] walks it.

pub mod canary;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use canary::Canary;

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
#[derive(Clone, Default)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Per target: the canary state its outcome is recorded in, and the
    /// variant's index there; empty when no target has any.
    pub watch: Vec<Option<(Arc<Canary>, usize)>>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("targets", &self.targets).finish_non_exhaustive()
    }
}

impl Plan {
    /// A plan of `targets` with no canary state (no allocation for it).
    pub fn of(targets: Vec<Target>) -> Self {
        Self { targets, watch: Vec::new() }
    }

    fn push(&mut self, target: Target, watch: Option<(Arc<Canary>, usize)>) {
        self.targets.push(target);
        self.watch.push(watch);
    }
}

/// The configured aliases.
#[derive(Debug, Default)]
pub struct Routes {
    aliases: HashMap<Arc<str>, AliasConfig>,
    /// Models and pools of aliases with `direct = false`, by the alias that
    /// closes them: callers reach them only through it.
    closed: HashMap<Arc<str>, Arc<str>>,
    /// Aliases whose variants have an SLO or a ramp.
    canaries: HashMap<Arc<str>, Arc<Canary>>,
}

/// An alias's variants as the split sees them now (for the admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AliasView {
    pub alias: String,
    pub variants: Vec<canary::VariantView>,
}

impl Routes {
    pub fn new(aliases: &[AliasConfig]) -> Self {
        let closed = aliases
            .iter()
            .filter(|a| !a.direct)
            .flat_map(|a| a.direct_names().map(|n| (Arc::from(n), a.name.clone())))
            .filter(|(n, _)| !aliases.iter().any(|a| &a.name == n))
            .collect();
        let canaries = aliases.iter().filter_map(|a| Some((a.name.clone(), Arc::new(Canary::of(a)?)))).collect();
        Self { aliases: aliases.iter().map(|a| (a.name.clone(), a.clone())).collect(), closed, canaries }
    }

    /// The aliases with canary state, and their variants' weights now.
    pub fn views(&self) -> Vec<AliasView> {
        let mut views: Vec<AliasView> = self
            .canaries
            .iter()
            .map(|(alias, c)| AliasView { alias: alias.to_string(), variants: c.views() })
            .collect();
        views.sort_by(|a, b| a.alias.cmp(&b.alias));
        views
    }

    /// Every alias and its variants' weights now (those without canary
    /// state as configured).
    pub fn all_views(&self) -> Vec<AliasView> {
        let mut views: Vec<AliasView> = self
            .aliases
            .iter()
            .map(|(name, alias)| AliasView {
                alias: name.to_string(),
                variants: self.canaries.get(name).map_or_else(|| canary::plain_views(alias), |c| c.views()),
            })
            .collect();
        views.sort_by(|a, b| a.alias.cmp(&b.alias));
        views
    }

    /// Put a rolled-back variant back in its alias's split; false when
    /// there is no such alias or variant with canary state.
    pub fn restore(&self, alias: &str, variant: &str) -> bool {
        let (Some(c), Some(a)) = (self.canaries.get(alias), self.aliases.get(alias)) else { return false };
        let Some(v) = a.variants.iter().position(|x| &*x.name == variant) else { return false };
        c.restore(v);
        tracing::info!(alias, variant, "canary restored to the split");
        true
    }

    /// `alias`'s variant `v` as a target, with its canary state.
    fn planned(&self, alias: &AliasConfig, v: usize, via: Option<&Arc<str>>) -> (Target, Option<(Arc<Canary>, usize)>) {
        (target(alias, v, via), self.canaries.get(&alias.name).map(|c| (c.clone(), v)))
    }

    /// The variant of `alias` for `caller`: a tier rule, else the sticky split.
    fn choose(&self, alias: &AliasConfig, caller: &Caller) -> usize {
        if let Some(v) = alias.tiers.get(&*caller.tier) {
            return *v;
        }
        match self.canaries.get(&alias.name) {
            Some(c) => split(alias, &c.weights(), caller),
            None => {
                let weights: Vec<f64> = alias.variants.iter().map(|v| f64::from(v.weight)).collect();
                split(alias, &weights, caller)
            }
        }
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
            return Ok(Plan::of(vec![Target { variant: None, pool: None, model: name.into() }]));
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
            None => self.choose(alias, caller),
        };
        let mut plan = Plan::default();
        let (first, watch) = self.planned(alias, chosen, None);
        plan.push(first, watch);
        self.add_fallbacks(alias, caller, &mut plan, 0);
        Ok(plan)
    }

    /// Append `alias`'s fallbacks (other aliases routed for the same caller),
    /// skipping targets already in the plan.
    fn add_fallbacks(&self, alias: &AliasConfig, caller: &Caller, plan: &mut Plan, depth: usize) {
        for f in &alias.fallbacks {
            let next: Plan = match f {
                AliasFallback::Variant(v) => {
                    let mut p = Plan::default();
                    let (t, w) = self.planned(alias, *v, None);
                    p.push(t, w);
                    p
                }
                AliasFallback::Alias(other) => match self.aliases.get(other) {
                    // Config checking rules out loops; the depth bound is a backstop.
                    Some(o) if depth < 8 => {
                        let mut sub = Plan::default();
                        let (t, w) = self.planned(o, self.choose(o, caller), Some(&o.name));
                        sub.push(t, w);
                        self.add_fallbacks(o, caller, &mut sub, depth + 1);
                        sub
                    }
                    _ => Plan::default(),
                },
            };
            for (t, w) in next.targets.into_iter().zip(next.watch) {
                if !plan.targets.iter().any(|x| x.pool == t.pool && x.model == t.model) {
                    plan.push(t, w);
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

/// The sticky split: rendezvous hashing over `weights` (weighted highest
/// random weight), so a caller keeps its variant while that variant stays
/// in play, and a variant taken out moves only its own callers. No weight
/// anywhere: the stable variant.
fn split(alias: &AliasConfig, weights: &[f64], caller: &Caller) -> usize {
    let who = caller_key(caller);
    let mut best: Option<(f64, usize)> = None;
    for (i, (v, w)) in alias.variants.iter().zip(weights).enumerate() {
        if *w <= 0.0 {
            continue;
        }
        // A uniform draw in (0, 1) per (alias, variant, caller).
        let h = mix(fnv1a(&[alias.name.as_bytes(), v.name.as_bytes(), who.as_bytes()]));
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -u.ln() / w;
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, i));
        }
    }
    best.map_or(alias.stable, |(_, i)| i)
}

/// The splitmix64 finalizer: every input bit moves every output bit (FNV's
/// high bits barely change with the last bytes of similar inputs).
fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Who the caller is for stickiness: key id, user, else address.
fn caller_key(caller: &Caller) -> String {
    match &caller.principal {
        Principal::Key(id) => format!("k:{id}"),
        Principal::User(sub) => format!("u:{}:{sub}", caller.tenant),
        Principal::Anonymous => format!("a:{}", caller.client),
    }
}

/// FNV-1a, 64 bit, of `parts` joined with NULs: the same in every replica
/// and every release.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let sep: &[u8] = if i == 0 { &[] } else { &[0] };
        for b in sep.iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
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
            | GatewayError::Shed { .. }
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
        let started = tokio::time::Instant::now();
        let sent = send(attempt).await;
        if let Some((canary, v)) = plan.watch.get(i).and_then(Option::as_ref) {
            let failed = sent.as_ref().err().is_some_and(|e| e.http_status().is_server_error());
            canary.record(*v, failed, started.elapsed());
        }
        match sent {
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
