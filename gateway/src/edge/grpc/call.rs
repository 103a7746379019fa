//! What every gRPC service of the edge does to a call: read the core's view
//! of it from the metadata, tag the answer, map a failure to its status.

use tonic::{Request, Response, Status};

use super::super::EdgeState;
use crate::call::{Deadline, parse_grpc_timeout};
use crate::error::GatewayError;
use crate::service::{Ask, Served};

/// The core's view of a call from its metadata: who asks, its deadline
/// (`grpc-timeout`, counted from now), pin (`x-model-version`) and cache
/// mode (`cache-control`); the model is filled in from the message.
pub fn ask<T>(state: &EdgeState, req: &Request<T>) -> Result<Ask, Status> {
    let md = req.metadata();
    let requested = requested_timeout(req)?;
    let request_id = request_id(req);
    let pin = match md.get(crate::route::VERSION_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| Status::invalid_argument("malformed x-model-version metadata"))?.into()),
    };
    let cache = crate::cache::CacheMode::from_cache_control(md.get("cache-control").and_then(|v| v.to_str().ok()));
    Ok(Ask {
        model: String::new(),
        request_id,
        deadline: Deadline::from_request(state.default_deadline, requested),
        caller: super::super::caller_of(req.extensions()),
        pin,
        cache,
        class: crate::call::Class::Interactive,
    })
}

/// The client's `grpc-timeout`, if it sent one.
pub fn requested_timeout<T>(req: &Request<T>) -> Result<Option<std::time::Duration>, Status> {
    match req.metadata().get("grpc-timeout") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_grpc_timeout)
            .map(Some)
            .ok_or_else(|| Status::invalid_argument("malformed grpc-timeout metadata")),
    }
}

/// The call's request id: checked, or generated, by the access middleware.
pub fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::telemetry::trace::valid_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// The response with its request id and what answered (variant and cache
/// in metadata, the model for the access log).
pub fn respond<T>(msg: T, request_id: &str, served: &Served) -> Response<T> {
    let mut resp = Response::new(msg);
    resp.extensions_mut().insert(super::super::access::Served::of(&served.target));
    let mut headers = std::mem::take(resp.metadata_mut()).into_headers();
    super::super::tag(&mut headers, served);
    *resp.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    if let Ok(v) = request_id.parse() {
        resp.metadata_mut().insert("x-request-id", v);
    }
    resp
}

pub fn fail(err: GatewayError, request_id: &str) -> Status {
    if err.http_status().is_server_error() {
        tracing::warn!(request_id, error = %err, "grpc request failed");
    }
    let mut status = Status::from(err);
    if let Ok(v) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", v);
    }
    status
}
