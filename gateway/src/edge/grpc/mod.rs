//! The gRPC edge (tonic): the public `infergate.v1.Inference` service
//! ([`inference`]), Open Inference Protocol v2 (`inference.GRPCInferenceService`,
//! [`oip`]), `grpc.health.v1`, reflection, and grpc-web on the same port.
//!
//! The routes are served by axum's server rather than `tonic::transport::Server`
//! because tonic's server answers an expired client `grpc-timeout` with
//! CANCELLED; here the handler owns the deadline and answers DEADLINE_EXCEEDED.

mod call;
mod inference;
mod oip;
mod stream;

use std::sync::Arc;

use tonic_health::pb::health_server::{Health, HealthServer};

use super::EdgeState;
use crate::proto::inference_server::InferenceServer;
use crate::proto::oip::grpc_inference_service_server::GrpcInferenceServiceServer;

/// Every service the gRPC port serves: what reflection lists and health
/// knows, no more (a listed service that answers UNIMPLEMENTED misleads the
/// tools that list and call, grpcurl and the like).
pub const SERVICES: [&str; 5] = [
    "infergate.v1.Inference",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The services of [`SERVICES`] that call models: NOT_SERVING in health
/// while the gateway drains.
pub const MODEL_SERVICES: [&str; 2] = [SERVICES[0], SERVICES[1]];

/// A reflection builder that lists [`SERVICES`] alone.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    SERVICES.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Reflection describes itself too: a listed service whose
            // descriptor it cannot give stops grpcurl's `describe`.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET),
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
    let core = state.core.clone();
    let inference = InferenceServer::new(inference::InferenceService { state: state.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let oip = GrpcInferenceServiceServer::new(oip::OipService { state })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = tonic::service::Routes::new(inference)
        .add_service(oip)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router();
    // A request's frames are read whole before it takes an in-flight
    // permit; tonic then checks the message size exactly (grpc-web text
    // is base64, a third longer, hence the slack here). The gate covers
    // health, reflection and metadata too, which limits never refuse, so
    // a spent caller is refused by the core here, not by the gate.
    let routes = super::gate::Gate::new(max_in_flight, max / 3 * 4 + 1024, buffered, None, |e, _| {
        super::problem::grpc_response(e)
    })
    .guard(routes)
    // Who is calling, before a message is decoded (health passes).
    .layer(axum::middleware::from_fn_with_state(core, super::identify::identify_grpc));
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
