//! The request core. Every edge decodes its request into an [`Ask`] and a
//! payload, calls [`Core`] once, and encodes the [`Answer`]. Between the
//! two, once for every edge: plan (aliases, variants, pins, fallbacks) →
//! admit (auth is the edge's, limits are here) → route the call through the
//! response cache to the pools → settle the reservation with what was used
//! → meter tokens and cost.
//!
//! An edge never calls the policy, the routes, the cache or the pools for a
//! model call itself; what it reports (the variant that answered, whether
//! the cache did) comes back in [`Served`].

pub mod contract;
pub mod generate;
mod open_streams;
pub mod stream;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::cache::{CacheMode, CacheStatus, ResponseCache};
use crate::call::{Call, Class, Deadline};
use crate::config::components::StreamsConfig;
use crate::error::GatewayError;
use crate::policy::{Admission, Caller, Policy, Tokens, estimate_tokens};
use crate::proto::{InferItem, InferOutputs, ModelEntry, ModelInfo, TensorSpec};
use crate::route::{self, Plan, Routes, Target};
use crate::telemetry::usage::{Meter, Prices};
use crate::upstream::{Batching, EmbedOutput, PoolStatus, Upstream};

/// What the core needs to answer a call: the pools, and the settings a
/// config reload replaces ([`Live`]).
pub struct Core {
    pub upstream: Arc<dyn Upstream>,
    live: ArcSwap<Live>,
    /// Streams of frames open now.
    open_streams: Arc<open_streams::OpenStreams>,
}

/// The parts of the core a reload replaces whole. A call takes one
/// snapshot when it starts and keeps it to its end, so it is planned,
/// admitted and cached under one config even while a reload lands.
pub struct Live {
    /// Limits (and the caller identification the edges' middleware uses).
    pub policy: Arc<Policy>,
    /// Aliases, variants and fallbacks.
    pub routes: Arc<Routes>,
    /// The response cache (exact, chat exact and semantic).
    pub cache: Arc<ResponseCache>,
    /// Per-token prices, for the token and cost metrics.
    pub prices: Arc<Prices>,
    /// Bounds of streams of frames.
    pub streams: StreamsConfig,
}

/// A call as an edge hands it over: what it names and who asks.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The model or alias the caller named.
    pub model: String,
    pub request_id: String,
    pub deadline: Deadline,
    pub caller: Arc<Caller>,
    /// The variant the caller pins (`x-model-version`).
    pub pin: Option<String>,
    /// What the caller's `cache-control` lets the cache do.
    pub cache: CacheMode,
    /// A client's call, or the queue's.
    pub class: Class,
}

impl Ask {
    fn call<P>(&self, payload: P) -> Call<P> {
        Call {
            model: self.model.clone(),
            payload,
            deadline: self.deadline,
            request_id: self.request_id.clone(),
            caller: self.caller.clone(),
            pool: None,
            class: self.class,
        }
    }
}

/// What answered, for the edge to report: the variant (`x-infergate-variant`
/// and the access log) and the cache (`x-cache`, `x-cache-similarity`).
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub target: Target,
    /// `None`: the call did not go through the cache.
    pub cache: Option<CacheStatus>,
    /// Cosine similarity of a semantic cache hit.
    pub similarity: Option<f32>,
}

impl Served {
    fn by(target: Target, cache: Option<CacheStatus>) -> Self {
        Self { target, cache, similarity: None }
    }
}

/// A result and what answered it.
#[derive(Debug)]
pub struct Answer<T> {
    pub value: T,
    pub served: Served,
}

/// A tensor call that was planned and admitted and waits for its item: an
/// edge that must read and convert a body does so only once the call was
/// let in (the model is known before the body is read).
pub struct Admitted {
    ask: Ask,
    plan: Plan,
    admission: Admission,
    live: Arc<Live>,
    /// The model the call goes to first (its inputs, for converting a body).
    pub entry: ModelEntry,
}

/// Tell the request's telemetry which model it named, and whether that
/// name is one the gateway knows (what looking it up came to says so).
fn name_model<T>(model: &str, looked_up: &Result<T, GatewayError>) {
    let known = !matches!(looked_up, Err(GatewayError::ModelNotFound { .. } | GatewayError::Starting { .. }));
    crate::telemetry::timing::with_current(|t| t.name_model(model, known));
}

impl Core {
    pub fn new(upstream: Arc<dyn Upstream>, live: Live) -> Self {
        Self { upstream, live: ArcSwap::from_pointee(live), open_streams: Arc::default() }
    }

    /// The settings now; a call keeps the snapshot it started with.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The policy now (for the edges' caller identification).
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }

    /// Replace the settings: calls that start from now on use `live`.
    pub fn replace(&self, live: Live) {
        self.live.store(Arc::new(live));
    }

    /// Every model clients can name (pools' models and aliases).
    pub fn models(&self) -> Vec<ModelEntry> {
        self.live.load().routes.entries(&*self.upstream)
    }

    /// The entry clients see for `name`.
    pub fn entry(&self, name: &str) -> Result<ModelEntry, GatewayError> {
        let entry = self.live.load().routes.entry(&*self.upstream, name);
        name_model(name, &entry);
        entry
    }

    /// Version `version` of `name` and the pin that selects it.
    pub fn version_entry(&self, name: &str, version: &str) -> Result<(ModelEntry, Option<String>), GatewayError> {
        let routes = &self.live.load().routes;
        name_model(name, &routes.entry(&*self.upstream, name));
        routes.version_entry(&*self.upstream, name, version)
    }

    /// How the pool behind `entry` batches its calls; `None` when one by one.
    pub fn batching(&self, entry: &ModelEntry) -> Option<Batching> {
        self.upstream.batching(&entry.pool, entry.info.as_ref()?)
    }

    /// Readiness of every pool.
    pub fn pools(&self) -> Vec<PoolStatus> {
        self.upstream.status()
    }

    /// Tell the request's telemetry the model a request named when it is
    /// refused before it is planned (its body's type, say).
    pub fn name(&self, model: &str) {
        name_model(model, &self.live.load().routes.entry(&*self.upstream, model));
    }

    /// The targets to try for `ask`, and the entry of the first (its
    /// declared inputs, dimensions, ...). The request's telemetry learns
    /// the model it named, and whether that name is known.
    fn plan(&self, live: &Live, ask: &Ask) -> Result<(Plan, ModelEntry), GatewayError> {
        if ask.model.is_empty() {
            return Err(GatewayError::invalid("model", "is required"));
        }
        let planned = live.routes.plan(&ask.model, &ask.caller, ask.pin.as_deref()).and_then(|plan| {
            let entry = route::target_entry(&*self.upstream, &plan.targets[0])?;
            Ok((plan, entry))
        });
        name_model(&ask.model, &planned);
        planned
    }

    /// Embeddings of `texts`; `dimensions`, when given, must be the model's.
    pub async fn embed(
        &self,
        ask: Ask,
        texts: Vec<String>,
        dimensions: Option<u32>,
    ) -> Result<Answer<EmbedOutput>, GatewayError> {
        let live = self.live();
        let (plan, entry) = self.plan(&live, &ask)?;
        let dim = entry.info.as_ref().map_or(0, |i| i.embedding_dim);
        if let Some(d) = dimensions.filter(|d| *d != dim) {
            return Err(GatewayError::invalid(
                "dimensions",
                format!("model {:?} returns {dim} dimensions, not {d}", ask.model),
            ));
        }
        let tokens = Tokens::input(texts.iter().map(|t| estimate_tokens(t)).sum());
        let admission = live.policy.admit(&ask.caller, &ask.model, tokens).await?;
        let ((out, cached), target) =
            route::run(&plan, ask.call(texts), |c| live.cache.embed(&*self.upstream, c, ask.cache)).await?;
        admission.settle((out.prompt_tokens > 0).then_some(out.prompt_tokens.into()));
        // A cached answer costs the caller no model tokens.
        if cached != Some(CacheStatus::Hit) {
            meter(&live, &ask, &target).record(out.prompt_tokens.into(), 0);
        }
        Ok(Answer { value: out, served: Served::by(target, cached) })
    }

    /// Plan and admit a tensor call to `ask.model`; [`Core::infer`] sends it.
    pub async fn admit_infer(&self, ask: Ask) -> Result<Admitted, GatewayError> {
        let live = self.live();
        let (plan, entry) = self.plan(&live, &ask)?;
        // Tensor calls carry no token estimate.
        let admission = live.policy.admit(&ask.caller, &ask.model, Tokens::NONE).await?;
        Ok(Admitted { ask, plan, admission, entry, live })
    }

    /// Send an admitted tensor call's item. The answer's model info carries
    /// the name the caller used.
    pub async fn infer(
        &self,
        admitted: Admitted,
        item: InferItem,
    ) -> Result<Answer<(ModelInfo, InferOutputs)>, GatewayError> {
        let Admitted { ask, plan, admission, entry, live } = admitted;
        let declared = entry.info.as_ref().map_or(&[][..], |i| &i.inputs[..]);
        let ((mut info, out), cached, target) = self.send_infer(&live, &plan, &ask, declared, item).await?;
        admission.settle(None);
        info.name = ask.model;
        Ok(Answer { value: (info, out), served: Served::by(target, cached) })
    }

    /// Check a tensor item against the inputs its first target declares,
    /// then send it through the cache to the pools along `plan`.
    async fn send_infer(
        &self,
        live: &Live,
        plan: &Plan,
        ask: &Ask,
        declared: &[TensorSpec],
        item: InferItem,
    ) -> Result<((ModelInfo, InferOutputs), Option<CacheStatus>, Target), GatewayError> {
        contract::check_inputs(&ask.model, declared, &item)?;
        let (((info, out), cached), target) =
            route::run(plan, ask.call(item), |c| live.cache.infer(&*self.upstream, c, ask.cache)).await?;
        Ok(((info, out), cached, target))
    }
}

fn meter(live: &Live, ask: &Ask, target: &Target) -> Meter {
    Meter::new(&live.prices, &ask.model, &target.model, ask.caller.tenant.clone())
}
