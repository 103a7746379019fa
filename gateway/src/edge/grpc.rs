//! The gRPC edge (tonic): the public `Inference` service, `grpc.health.v1`,
//! reflection, and grpc-web on the same port.
//!
//! The routes are served by axum's server rather than `tonic::transport::Server`
//! because tonic's server answers an expired client `grpc-timeout` with
//! CANCELLED; here the handler owns the deadline and answers DEADLINE_EXCEEDED.

use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};

use super::EdgeState;
use crate::call::{Deadline, parse_grpc_timeout};
use crate::error::GatewayError;
use crate::proto::inference_server::{Inference, InferenceServer};
use crate::proto::{
    EmbedRequest, EmbedResponse, Embedding, GenerateChunk, GenerateRequest, InferItem, InferRequest, InferResponse,
    ListModelsRequest, ListModelsResponse, Usage,
};
use crate::service::{Answer, Ask, Served};

/// The public Inference service over the shared upstream.
pub struct InferenceService {
    state: Arc<EdgeState>,
}

/// Every service the gRPC port serves: what reflection lists and health
/// knows, no more (a listed service that answers UNIMPLEMENTED misleads the
/// tools that list and call, grpcurl and the like).
pub const SERVICES: [&str; 4] = [
    "infergate.v1.Inference",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A reflection builder that lists [`SERVICES`] alone.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    SERVICES.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(*name),
    )
}

/// The gRPC router: Inference, health, reflection (v1 and v1alpha), grpc-web.
pub fn router(
    state: Arc<EdgeState>,
    health: HealthServer<impl Health>,
) -> Result<axum::Router, tonic_reflection::server::Error> {
    let max = state.max_message_bytes;
    let max_in_flight = state.grpc_max_in_flight;
    let buffered = state.buffered.clone();
    let policy = state.core.policy.clone();
    let inference =
        InferenceServer::new(InferenceService { state }).max_decoding_message_size(max).max_encoding_message_size(max);
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = tonic::service::Routes::new(inference)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router();
    // A request's frames are read whole before it takes an in-flight
    // permit; tonic then checks the message size exactly (grpc-web text
    // is base64, a third longer, hence the slack here).
    let routes =
        super::gate::Gate::new(max_in_flight, max / 3 * 4 + 1024, buffered, |e, _| super::problem::grpc_response(e))
            .guard(routes)
            // Who is calling, before a message is decoded (health passes).
            .layer(axum::middleware::from_fn_with_state(policy, super::identify::identify_grpc));
    Ok(routes
        // Report over-size messages the way gRPC core does (below).
        .layer(axum::middleware::map_response(oversize_is_resource_exhausted))
        // Request id, trace context, access line and metrics.
        .layer(axum::middleware::from_fn(super::access::grpc_access_log))
        // Browsers speak grpc-web over HTTP/1.1; translate before routing.
        .layer(tonic_web::GrpcWebLayer::new()))
}

/// tonic rejects a request over `max_decoding_message_size` with OUT_OF_RANGE;
/// gRPC core, grpc-go and grpc-java say RESOURCE_EXHAUSTED, which is what
/// clients retry-classify on. The rejection is a trailers-only response, so
/// the status sits in the headers.
async fn oversize_is_resource_exhausted(mut resp: axum::response::Response) -> axum::response::Response {
    let headers = resp.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let oversize = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains("message length too large") || m.contains("message%20length%20too%20large"));
    if out_of_range && oversize {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}

/// The core's view of a call from its metadata: who asks, its deadline
/// (`grpc-timeout`, counted from now), pin (`x-model-version`) and cache
/// mode (`cache-control`); the model is filled in from the message.
fn ask<T>(state: &EdgeState, req: &Request<T>) -> Result<Ask, Status> {
    let md = req.metadata();
    let requested = match md.get("grpc-timeout") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(parse_grpc_timeout)
                .ok_or_else(|| Status::invalid_argument("malformed grpc-timeout metadata"))?,
        ),
    };
    // Checked, or generated, by the access middleware.
    let request_id = md
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::telemetry::trace::valid_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let pin = match md.get(crate::route::VERSION_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| Status::invalid_argument("malformed x-model-version metadata"))?.into()),
    };
    let cache = crate::cache::CacheMode::from_cache_control(md.get("cache-control").and_then(|v| v.to_str().ok()));
    Ok(Ask {
        model: String::new(),
        request_id,
        deadline: Deadline::from_request(state.default_deadline, requested),
        caller: super::caller_of(req.extensions()),
        pin,
        cache,
    })
}

/// The response with its request id and what answered (variant and cache
/// in metadata, the model for the access log).
fn respond<T>(msg: T, request_id: &str, served: &Served) -> Response<T> {
    let mut resp = Response::new(msg);
    resp.extensions_mut().insert(super::access::Served::of(&served.target));
    let mut headers = std::mem::take(resp.metadata_mut()).into_headers();
    super::tag(&mut headers, served);
    *resp.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    if let Ok(v) = request_id.parse() {
        resp.metadata_mut().insert("x-request-id", v);
    }
    resp
}

fn fail(err: GatewayError, request_id: &str) -> Status {
    if err.http_status().is_server_error() {
        tracing::warn!(request_id, error = %err, "grpc request failed");
    }
    let mut status = Status::from(err);
    if let Ok(v) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", v);
    }
    status
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn list_models(&self, _req: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse { models: self.state.core.models() }))
    }

    async fn infer(&self, req: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let mut r = req.into_inner();
        let result = async {
            if r.inputs.is_empty() {
                return Err(GatewayError::invalid("inputs", "at least one input tensor is required"));
            }
            for (i, t) in r.inputs.iter_mut().enumerate() {
                super::convert::check_tensor(t, &format!("inputs[{i}]"))?;
            }
            ask.model.clone_from(&r.model);
            let core = &self.state.core;
            let admitted = core.admit_infer(ask).await?;
            let item = InferItem { id: r.id.clone(), inputs: r.inputs, outputs: r.outputs, parameters: r.parameters };
            let Answer { value: (info, out), served } = core.infer(admitted, item).await?;
            let msg = InferResponse {
                model: info.name,
                model_version: info.version,
                id: r.id,
                outputs: out.tensors,
                parameters: out.parameters,
            };
            Ok((msg, served))
        }
        .await;
        result.map(|(msg, served)| respond(msg, &rid, &served)).map_err(|e| fail(e, &rid))
    }

    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let r = req.into_inner();
        let result = async {
            if r.inputs.is_empty() {
                return Err(GatewayError::invalid("inputs", "must not be empty"));
            }
            if r.inputs.len() > super::json::MAX_EMBED_INPUTS {
                return Err(GatewayError::invalid(
                    "inputs",
                    format!("at most {} inputs per request", super::json::MAX_EMBED_INPUTS),
                ));
            }
            ask.model.clone_from(&r.model);
            let Answer { value: out, served } = self.state.core.embed(ask, r.inputs, None).await?;
            let msg = EmbedResponse {
                model: r.model,
                data: out.vectors.into_iter().map(|values| Embedding { values }).collect(),
                usage: Some(Usage { prompt_tokens: out.prompt_tokens, completion_tokens: 0 }),
            };
            Ok((msg, served))
        }
        .await;
        result.map(|(msg, served)| respond(msg, &rid, &served)).map_err(|e| fail(e, &rid))
    }

    type GenerateStream = futures::stream::BoxStream<'static, Result<GenerateChunk, Status>>;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let r = req.into_inner();
        ask.model.clone_from(&r.model);
        let Answer { value: chunks, served } = self.state.core.generate(ask, r).await.map_err(|e| fail(e, &rid))?;
        // An error after the first chunk ends the stream with its status.
        let stream = {
            let rid = rid.clone();
            chunks.map(move |c| c.map_err(|e| fail(e, &rid)))
        };
        Ok(respond(stream.boxed(), &rid, &served))
    }
}
