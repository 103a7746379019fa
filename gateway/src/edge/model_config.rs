//! `GET /v2/models/{model}/config`: a model's configuration in the shape
//! Triton answers it (its `ModelConfig` message as JSON), which Triton and
//! KServe clients (`tritonclient`'s `get_model_config`) ask for before they
//! build a request.
//!
//! Triton's `max_batch_size` is the largest batch *one request* may carry
//! along a first dimension the server does not list in `dims`. A model here
//! declares whole per-request shapes, so it is reported as batching in that
//! sense only when every input's declared shape starts with a free dimension
//! (-1): `dims` are then the shapes without it, and a client that prepends a
//! batch dimension sends what the model accepts. Otherwise `max_batch_size`
//! is 0 and `dims` are the declared shapes. How the gateway groups requests
//! into worker calls is `dynamic_batching`, present whenever it does.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use serde::Serialize;
use utoipa::ToSchema;

use super::EdgeState;
use super::reply::{Params, Reply, request_id};
use crate::error::Problem;
use crate::proto::{ModelEntry, TensorSpec};
use crate::upstream::Batching;

/// A model's configuration, as Triton's `ModelConfig`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelConfig {
    pub name: String,
    /// What the workers report (`python` for the SDK's models).
    pub platform: String,
    /// Always `infergate`.
    pub backend: String,
    pub version_policy: VersionPolicy,
    /// The largest batch along a leading dimension one request may carry
    /// (0: requests carry whole shapes, see `dims`).
    pub max_batch_size: u32,
    pub input: Vec<ModelInput>,
    pub output: Vec<ModelOutput>,
    /// How the gateway groups requests into one worker call; absent when
    /// each request is its own call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_batching: Option<DynamicBatching>,
    /// The pool's workers.
    pub instance_group: Vec<InstanceGroup>,
    /// `infergate.pool`, `infergate.kind`, `infergate.version`.
    pub parameters: std::collections::BTreeMap<String, Parameter>,
}

/// Triton's `version_policy`: one version is served.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionPolicy {
    pub latest: LatestVersions,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatestVersions {
    pub num_versions: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInput {
    pub name: String,
    /// Triton's type name: `TYPE_FP32`, `TYPE_STRING` (OIP `BYTES`), ...
    pub data_type: String,
    /// Always `FORMAT_NONE`.
    pub format: String,
    /// -1 marks a variable dimension.
    pub dims: Vec<i64>,
    pub is_shape_tensor: bool,
    pub allow_ragged_batch: bool,
    pub optional: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelOutput {
    pub name: String,
    pub data_type: String,
    pub dims: Vec<i64>,
    pub label_filename: String,
    pub is_shape_tensor: bool,
}

/// Triton's `dynamic_batching`, filled from the pool's `[pools.batching]`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DynamicBatching {
    /// The batch size the pool fills to (its effective `max_batch_size`).
    pub preferred_batch_size: Vec<u32>,
    /// `batching.max_delay` in microseconds (0 when it is learned: "auto").
    pub max_queue_delay_microseconds: u64,
    pub preserve_ordering: bool,
    pub default_queue_policy: QueuePolicy,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuePolicy {
    /// `batching.max_queue`: requests waiting at most before 503.
    pub max_queue_size: u64,
}

/// The pool's workers, as one Triton instance group.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceGroup {
    /// The pool's name.
    pub name: String,
    /// Always `KIND_MODEL`: the model's code places itself.
    pub kind: String,
    /// Workers in the pool.
    pub count: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Parameter {
    pub string_value: String,
}

/// OIP datatype → Triton's config type name.
fn triton_type(datatype: &str) -> String {
    match datatype {
        "BYTES" => "TYPE_STRING".into(),
        other => format!("TYPE_{other}"),
    }
}

/// Build the config of `entry`, served by a pool of `workers` workers that
/// batches as `batching` says.
pub fn config(entry: &ModelEntry, batching: Option<Batching>, workers: usize) -> ModelConfig {
    let info = entry.info.clone().unwrap_or_default();
    let leading_free = !info.inputs.is_empty() && info.inputs.iter().all(|s| s.shape.first() == Some(&-1));
    let max_batch_size = if leading_free { info.max_batch_size.max(1) } else { 0 };
    let dims = |s: &TensorSpec| {
        let skip = usize::from(leading_free && s.shape.first() == Some(&-1));
        s.shape[skip..].to_vec()
    };
    let input = info
        .inputs
        .iter()
        .map(|s| ModelInput {
            name: s.name.clone(),
            data_type: triton_type(&s.datatype),
            format: "FORMAT_NONE".into(),
            dims: dims(s),
            is_shape_tensor: false,
            allow_ragged_batch: false,
            optional: false,
        })
        .collect();
    let output = info
        .outputs
        .iter()
        .map(|s| ModelOutput {
            name: s.name.clone(),
            data_type: triton_type(&s.datatype),
            dims: dims(s),
            label_filename: String::new(),
            is_shape_tensor: false,
        })
        .collect();
    let dynamic_batching = batching.map(|b| DynamicBatching {
        preferred_batch_size: vec![u32::try_from(b.max_batch_size).unwrap_or(u32::MAX)],
        max_queue_delay_microseconds: u64::try_from(b.max_delay.unwrap_or_default().as_micros()).unwrap_or(u64::MAX),
        preserve_ordering: false,
        default_queue_policy: QueuePolicy { max_queue_size: b.max_queue as u64 },
    });
    let kind = crate::proto::ModelKind::try_from(info.kind).unwrap_or(crate::proto::ModelKind::Unspecified);
    let parameters = [
        ("infergate.pool", entry.pool.clone()),
        ("infergate.kind", kind.as_str_name().trim_start_matches("MODEL_KIND_").to_lowercase()),
        ("infergate.version", info.version.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Parameter { string_value: v }))
    .collect();
    ModelConfig {
        name: info.name,
        platform: info.platform,
        backend: "infergate".into(),
        version_policy: VersionPolicy { latest: LatestVersions { num_versions: 1 } },
        max_batch_size,
        input,
        output,
        dynamic_batching,
        instance_group: vec![InstanceGroup {
            name: entry.pool.clone(),
            kind: "KIND_MODEL".into(),
            count: u32::try_from(workers).unwrap_or(u32::MAX),
        }],
        parameters,
    }
}

fn answer(state: &EdgeState, entry: &ModelEntry) -> Response {
    let workers = state.core.pools().into_iter().find(|p| p.pool == entry.pool).map_or(0, |p| p.workers);
    axum::Json(config(entry, state.core.batching(entry), workers)).into_response()
}

/// A model's configuration in Triton's shape (an alias shows its stable variant).
#[utoipa::path(get, path = "/v2/models/{model}/config", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name")),
    responses((status = 200, body = ModelConfig),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn model_config(
    State(state): State<Arc<EdgeState>>,
    Params(model): Params<String>,
    headers: HeaderMap,
) -> Reply {
    Reply(state.core.entry(&model).map(|entry| answer(&state, &entry)), request_id(&headers))
}

/// One version's configuration: an alias's variant, or the version a plain
/// model's workers report.
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}/config", tag = "oip",
    params(("model" = String, Path, description = "Model or alias name"),
           ("version" = String, Path, description = "Variant name, or the model's version")),
    responses((status = 200, body = ModelConfig),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn version_config(
    State(state): State<Arc<EdgeState>>,
    Params((model, version)): Params<(String, String)>,
    headers: HeaderMap,
) -> Reply {
    let result = state.core.version_entry(&model, &version).map(|(entry, _)| answer(&state, &entry));
    Reply(result, request_id(&headers))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::{ModelInfo, ModelKind};

    fn spec(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype: datatype.into(), shape: shape.to_vec() }
    }

    fn entry(inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> ModelEntry {
        let info = ModelInfo {
            name: "clf".into(),
            version: "2".into(),
            kind: ModelKind::Infer as i32,
            platform: "python".into(),
            max_batch_size: 32,
            inputs,
            outputs,
            ..Default::default()
        };
        ModelEntry { info: Some(info), pool: "text".into(), ready: true, load_error: String::new() }
    }

    #[test]
    fn a_free_leading_dimension_is_reported_as_the_batch_dimension() {
        let e = entry(vec![spec("text", "BYTES", &[-1])], vec![spec("label", "INT64", &[-1, 1])]);
        let batching = Batching { max_batch_size: 16, max_delay: Some(Duration::from_millis(2)), max_queue: 1024 };
        let c = config(&e, Some(batching), 2);
        assert_eq!(c.max_batch_size, 32);
        assert_eq!(c.input[0].dims, Vec::<i64>::new());
        assert_eq!(c.input[0].data_type, "TYPE_STRING");
        assert_eq!(c.output[0].dims, vec![1]);
        assert_eq!(c.output[0].data_type, "TYPE_INT64");
        let b = c.dynamic_batching.expect("batched");
        assert_eq!((b.preferred_batch_size, b.max_queue_delay_microseconds), (vec![16], 2000));
        assert_eq!(b.default_queue_policy.max_queue_size, 1024);
        assert_eq!((c.instance_group[0].name.as_str(), c.instance_group[0].count), ("text", 2));
        assert_eq!(c.parameters["infergate.kind"].string_value, "infer");
    }

    #[test]
    fn fixed_shapes_are_whole_and_max_batch_size_is_zero() {
        let e = entry(vec![spec("x", "FP32", &[1, 3]), spec("y", "FP32", &[-1])], vec![spec("z", "FP32", &[3])]);
        let c = config(&e, None, 1);
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![1, 3]);
        assert_eq!(c.input[1].dims, vec![-1]);
        assert_eq!(c.output[0].dims, vec![3]);
        assert!(c.dynamic_batching.is_none());
    }
}
