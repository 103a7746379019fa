//! The REST edge's read-only routes: model lists and metadata (OpenAI and
//! Open Inference Protocol), health, readiness and metrics. Their answers
//! are typed so `/openapi.json` describes exactly what they send.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::EdgeState;
use super::reply::{Params, Reply, request_id};
use crate::error::Problem;
use crate::proto::{ModelEntry, ModelKind};
use crate::upstream::PoolStatus;

/// One model in `GET /v1/models` (OpenAI's model object, plus what the
/// gateway knows about it).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub version: String,
    /// `embed`, `infer` or `generate`.
    pub kind: String,
    pub max_batch_size: u32,
    pub streaming: bool,
    /// The pool that serves it.
    pub pool: String,
    /// Some worker of that pool is SERVING.
    pub ready: bool,
    /// Why the pool cannot serve it: its workers failed to load it
    /// `workers.max_load_failures` times in a row (the last error's first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// A tensor a model takes or gives (OIP metadata).
#[derive(Debug, Serialize, ToSchema)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    /// -1 marks a variable dimension.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{model}`: OIP model metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// `GET /v2/models/{model}/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelReadiness {
    pub name: String,
    pub ready: bool,
}

/// `GET /v2`: OIP server metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// `GET /healthz`, `/v2/health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: String,
}

/// `GET /readyz`, `/v2/health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// Every pool has a SERVING worker and the gateway is not draining.
    pub ready: bool,
    pub draining: bool,
    pub pools: Vec<PoolStatus>,
}

fn kind_name(kind: i32) -> &'static str {
    match ModelKind::try_from(kind).unwrap_or(ModelKind::Unspecified) {
        ModelKind::Embed => "embed",
        ModelKind::Infer => "infer",
        ModelKind::Generate => "generate",
        ModelKind::Unspecified => "unspecified",
    }
}

fn card(entry: &ModelEntry) -> ModelCard {
    let info = entry.info.clone().unwrap_or_default();
    ModelCard {
        id: info.name,
        object: "model".into(),
        created: 0,
        owned_by: "infergate".into(),
        version: info.version,
        kind: kind_name(info.kind).into(),
        max_batch_size: info.max_batch_size,
        streaming: info.streaming,
        pool: entry.pool.clone(),
        ready: entry.ready,
        load_error: (!entry.load_error.is_empty()).then(|| entry.load_error.clone()),
    }
}

/// Every model and alias clients can name.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, body = ModelList)))]
pub(super) async fn list_models(State(state): State<Arc<EdgeState>>) -> Response {
    let data = state.core.models().iter().map(card).collect();
    axum::Json(ModelList { object: "list".into(), data }).into_response()
}

fn metadata(entry: ModelEntry) -> Response {
    axum::Json(metadata_of(entry)).into_response()
}

/// A model's OIP metadata, REST and gRPC.
pub(super) fn metadata_of(entry: ModelEntry) -> ModelMetadata {
    let info = entry.info.unwrap_or_default();
    let spec = |s: &crate::proto::TensorSpec| TensorMetadata {
        name: s.name.clone(),
        datatype: s.datatype.clone(),
        shape: s.shape.clone(),
    };
    ModelMetadata {
        inputs: info.inputs.iter().map(spec).collect(),
        outputs: info.outputs.iter().map(spec).collect(),
        name: info.name,
        versions: vec![info.version],
        platform: info.platform,
    }
}

/// 200 or 503, with the answer in the body too.
fn readiness(model: &str, entry: &ModelEntry) -> Response {
    let status = if entry.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(ModelReadiness { name: model.to_owned(), ready: entry.ready })).into_response()
}

/// A model's metadata (an alias shows its stable variant).
#[utoipa::path(get, path = "/v2/models/{model}", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name")),
    responses((status = 200, body = ModelMetadata),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn model_metadata(
    State(state): State<Arc<EdgeState>>,
    Params(model): Params<String>,
    headers: HeaderMap,
) -> Reply {
    Reply(state.core.entry(&model).map(metadata), request_id(&headers))
}

/// Whether a model can answer now.
#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name")),
    responses((status = 200, body = ModelReadiness), (status = 503, body = ModelReadiness),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn model_ready(
    State(state): State<Arc<EdgeState>>,
    Params(model): Params<String>,
    headers: HeaderMap,
) -> Reply {
    let result = state.core.entry(&model).map(|entry| readiness(&model, &entry));
    Reply(result, request_id(&headers))
}

/// Metadata of one version: an alias's variant, or the version a plain
/// model's workers report.
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name"),
           ("version" = String, Path, description = "Variant name, or the model's version")),
    responses((status = 200, body = ModelMetadata),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn version_metadata(
    State(state): State<Arc<EdgeState>>,
    Params((model, version)): Params<(String, String)>,
    headers: HeaderMap,
) -> Reply {
    let result = state.core.version_entry(&model, &version).map(|(entry, _)| metadata(entry));
    Reply(result, request_id(&headers))
}

/// Whether one version can answer now.
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}/ready", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name"),
           ("version" = String, Path, description = "Variant name, or the model's version")),
    responses((status = 200, body = ModelReadiness), (status = 503, body = ModelReadiness),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn version_ready(
    State(state): State<Arc<EdgeState>>,
    Params((model, version)): Params<(String, String)>,
    headers: HeaderMap,
) -> Reply {
    let result = state.core.version_entry(&model, &version).map(|(entry, _)| readiness(&model, &entry));
    Reply(result, request_id(&headers))
}

/// OIP server metadata.
#[utoipa::path(get, path = "/v2", tag = "oip", responses((status = 200, body = ServerMetadata)))]
pub(super) async fn server_metadata() -> Response {
    axum::Json(server()).into_response()
}

/// The OIP extensions served: the binary tensor form (REST) and model
/// configuration (`/v2/models/{model}/config`).
const EXTENSIONS: [&str; 2] = ["binary_tensor_data", "model_configuration"];

/// OIP server metadata, REST and gRPC.
pub(super) fn server() -> ServerMetadata {
    ServerMetadata {
        name: "infergate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: EXTENSIONS.map(str::to_owned).to_vec(),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub(super) async fn metrics() -> Response {
    match crate::telemetry::metrics::render() {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed\n").into_response(),
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> Response {
    axum::Json(Health { status: "ok".into() }).into_response()
}

/// OIP liveness (same as `/healthz`).
#[utoipa::path(get, path = "/v2/health/live", tag = "oip", responses((status = 200, body = Health)))]
pub(super) async fn live() -> Response {
    healthz().await
}

/// 200 only when every pool has a SERVING worker and the gateway is not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(super) async fn readyz(State(state): State<Arc<EdgeState>>) -> Response {
    let pools = state.core.pools();
    let draining = state.draining.is_cancelled();
    let ready = !draining && all_ready(&pools);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(Readiness { ready, draining, pools })).into_response()
}

fn all_ready(pools: &[PoolStatus]) -> bool {
    pools.iter().all(|p| p.ready_workers > 0)
}

/// What `/readyz` says: every pool has a SERVING worker and the gateway is
/// not draining.
pub(super) fn server_ready(state: &EdgeState) -> bool {
    !state.draining.is_cancelled() && all_ready(&state.core.pools())
}

/// OIP readiness (same as `/readyz`).
#[utoipa::path(get, path = "/v2/health/ready", tag = "oip",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(super) async fn ready(state: State<Arc<EdgeState>>) -> Response {
    readyz(state).await
}
