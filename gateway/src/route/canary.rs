//! SLO-guarded canaries. An alias whose variants declare an `slo` (or a
//! `ramp`) keeps, per window, each variant's calls, failures and latency
//! histogram. A variant that breaches its SLO with `min_requests` calls
//! while the stable variant, judged by the same SLO, does not, is rolled
//! back: its weight drops to 0 and stays there until a reload or an
//! operator restores it. A ramping variant takes its next step after each
//! window it stays within its SLO.
//!
//! The split is rendezvous hashing over the effective weights: a caller
//! keeps its variant while that variant stays in play, and only the callers
//! of a variant taken out (or the share a step moves) change variant.

use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::routes::{AliasConfig, SloConfig};

/// Latency histogram buckets: upper bounds 1 ms × 1.25^k.
const BUCKETS: usize = 64;

fn bucket(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1e3;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.ln() / 1.25f64.ln()).ceil() as usize).min(BUCKETS - 1)
}

fn upper_bound(bucket: usize) -> Duration {
    Duration::from_secs_f64(1.25f64.powi(i32::try_from(bucket).unwrap_or(i32::MAX)) / 1e3)
}

/// One variant's figures over the current window.
#[derive(Debug, Clone, Default)]
struct Window {
    calls: u64,
    failures: u64,
    latency: Vec<u64>,
}

impl Window {
    fn add(&mut self, failed: bool, took: Duration) {
        if self.latency.is_empty() {
            self.latency = vec![0; BUCKETS];
        }
        self.calls += 1;
        self.failures += u64::from(failed);
        self.latency[bucket(took)] += 1;
    }

    /// The 99th percentile, as its bucket's upper bound.
    fn p99(&self) -> Duration {
        let want = (self.calls * 99).div_ceil(100);
        let mut seen = 0;
        for (b, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return upper_bound(b);
            }
        }
        Duration::ZERO
    }

    /// Whether these figures breach `slo` (judged only with enough calls).
    fn breaches(&self, slo: &SloConfig) -> Option<String> {
        if self.calls < slo.min_requests {
            return None;
        }
        let rate = self.failures as f64 / self.calls as f64;
        if rate > slo.error_rate {
            return Some(format!("error rate {rate:.3} over {}", slo.error_rate));
        }
        let p99 = self.p99();
        match slo.p99 {
            Some(limit) if p99 > limit => Some(format!("p99 {p99:?} over {limit:?}")),
            _ => None,
        }
    }
}

/// A variant as the split sees it now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantView {
    pub name: String,
    /// As configured.
    pub weight: u32,
    /// What the split uses now (a share in percent when the alias ramps).
    pub effective_weight: f64,
    /// `stable`, `steady`, `ramping`, or `rolled-back`.
    pub state: &'static str,
    /// The ramp's step now (index into `ramp`), for a ramping variant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// Calls and failures in the window so far.
    pub window_calls: u64,
    pub window_failures: u64,
}

#[derive(Debug)]
struct State {
    started: Instant,
    windows: Vec<Window>,
    /// Per variant: its ramp step.
    step: Vec<usize>,
    /// Per variant: rolled back.
    out: Vec<bool>,
}

impl State {
    /// A start: every variant at its ramp's first step, none rolled back.
    fn fresh(n: usize) -> Self {
        Self { started: Instant::now(), windows: vec![Window::default(); n], step: vec![0; n], out: vec![false; n] }
    }
}

/// The canary state of one alias.
#[derive(Debug)]
pub struct Canary {
    alias: AliasConfig,
    window: Duration,
    state: Mutex<State>,
    weights: RwLock<Vec<f64>>,
}

impl Canary {
    /// The state of `alias`, if any of its variants has an SLO or a ramp.
    pub fn of(alias: &AliasConfig) -> Option<Self> {
        let window = alias.variants.iter().filter_map(|v| v.slo.map(|s| s.window)).min()?;
        let n = alias.variants.len();
        for v in &alias.variants {
            metrics::counter!(crate::telemetry::metrics::CANARY_ROLLBACKS,
                "alias" => alias.name.to_string(), "variant" => v.name.to_string())
            .increment(0);
        }
        let state = State::fresh(n);
        let weights = effective(alias, &state);
        Some(Self { alias: alias.clone(), window, state: Mutex::new(state), weights: RwLock::new(weights) })
    }

    /// The weights the split uses now.
    pub fn weights(&self) -> Vec<f64> {
        self.weights.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A call to variant `v` ended after `took`; `failed` when the gateway
    /// answers it with a server error.
    pub fn record(&self, v: usize, failed: bool, took: Duration) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(state.started) >= self.window {
            self.close_window(&mut state, now);
        }
        let Some(window) = state.windows.get_mut(v) else { return };
        window.add(failed, took);
        let Some(slo) = self.alias.variants[v].slo else { return };
        if state.out[v] {
            return;
        }
        let Some(why) = state.windows[v].breaches(&slo) else { return };
        if let Some(also) = state.windows[self.alias.stable].breaches(&slo) {
            tracing::warn!(alias = %self.alias.name, variant = %self.alias.variants[v].name, %why, stable = %also,
                "canary breaches its SLO, but so does the stable variant: not rolled back");
            return;
        }
        state.out[v] = true;
        self.reweigh(&state);
        metrics::counter!(crate::telemetry::metrics::CANARY_ROLLBACKS,
            "alias" => self.alias.name.to_string(), "variant" => self.alias.variants[v].name.to_string())
        .increment(1);
        tracing::warn!(alias = %self.alias.name, variant = %self.alias.variants[v].name, %why,
            calls = state.windows[v].calls, "canary rolled back: its weight is 0 until a reload or an admin restores it");
    }

    /// End the window: a ramping variant within its SLO over a full
    /// window takes its next step.
    fn close_window(&self, state: &mut State, now: Instant) {
        for (v, variant) in self.alias.variants.iter().enumerate() {
            let (Some(slo), false) = (variant.slo, state.out[v]) else { continue };
            let judged = state.windows[v].calls >= slo.min_requests && state.windows[v].breaches(&slo).is_none();
            if judged && state.step[v] + 1 < variant.ramp.len() {
                state.step[v] += 1;
                tracing::info!(alias = %self.alias.name, variant = %variant.name,
                    percent = variant.ramp[state.step[v]], "canary within its SLO for a window: ramped up");
            }
        }
        state.windows.iter_mut().for_each(|w| *w = Window::default());
        state.started = now;
        self.reweigh(state);
    }

    fn reweigh(&self, state: &State) {
        *self.weights.write().unwrap_or_else(PoisonError::into_inner) = effective(&self.alias, state);
    }

    /// Put variant `v` back in the split (at its ramp's first step).
    pub fn restore(&self, v: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(out) = state.out.get_mut(v) {
            *out = false;
            state.step[v] = 0;
            state.windows[v] = Window::default();
            self.reweigh(&state);
        }
    }

    pub fn views(&self) -> Vec<VariantView> {
        views_of(&self.alias, &self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The variants of `alias`, which has no canary state (no SLO): the
/// weights as configured are the ones the split uses.
pub fn plain_views(alias: &AliasConfig) -> Vec<VariantView> {
    views_of(alias, &State::fresh(alias.variants.len()))
}

fn views_of(alias: &AliasConfig, state: &State) -> Vec<VariantView> {
    let weights = effective(alias, state);
    alias
        .variants
        .iter()
        .enumerate()
        .map(|(v, variant)| VariantView {
            name: variant.name.to_string(),
            weight: variant.weight,
            effective_weight: weights[v],
            state: if v == alias.stable {
                "stable"
            } else if state.out[v] {
                "rolled-back"
            } else if !variant.ramp.is_empty() {
                "ramping"
            } else {
                "steady"
            },
            step: (!variant.ramp.is_empty()).then_some(state.step[v]),
            window_calls: state.windows[v].calls,
            window_failures: state.windows[v].failures,
        })
        .collect()
}

/// The weights of `alias`'s variants now: 0 for one rolled back; a ramping
/// variant's step as a percentage, the rest shared by the others' weights
/// (all of it to the stable variant when they have none).
fn effective(alias: &AliasConfig, state: &State) -> Vec<f64> {
    let mut weights: Vec<f64> = alias.variants.iter().map(|v| f64::from(v.weight)).collect();
    let ramping: Vec<usize> =
        (0..weights.len()).filter(|v| !alias.variants[*v].ramp.is_empty() && !state.out[*v]).collect();
    if !ramping.is_empty() {
        let shares: f64 = ramping.iter().map(|v| f64::from(alias.variants[*v].ramp[state.step[*v]])).sum();
        let rest = (100.0 - shares).max(0.0);
        let others: f64 = (0..weights.len())
            .filter(|v| !ramping.contains(v) && !state.out[*v])
            .map(|v| f64::from(alias.variants[v].weight))
            .sum();
        for (v, weight) in weights.iter_mut().enumerate() {
            *weight = if ramping.contains(&v) {
                f64::from(alias.variants[v].ramp[state.step[v]])
            } else if others > 0.0 {
                rest * f64::from(alias.variants[v].weight) / others
            } else if v == alias.stable {
                rest
            } else {
                0.0
            };
        }
    }
    for (v, out) in state.out.iter().enumerate() {
        if *out {
            weights[v] = 0.0;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_read_from_the_histogram() {
        let mut w = Window::default();
        for _ in 0..99 {
            w.add(false, Duration::from_millis(10));
        }
        w.add(false, Duration::from_secs(2));
        assert!(w.p99() >= Duration::from_millis(10) && w.p99() < Duration::from_millis(13), "{:?}", w.p99());
        w.add(false, Duration::from_secs(2));
        assert!(w.p99() >= Duration::from_secs(2), "{:?}", w.p99());
    }
}
