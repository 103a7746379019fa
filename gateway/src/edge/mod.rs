//! The edges: REST (axum) and gRPC (tonic, grpc-web). They accept
//! connections, bound them, identify callers, decode requests into the
//! request core's calls ([`crate::service`]) and encode its answers; the
//! model call itself is the core's.

pub mod access;
pub mod admin;
pub mod chat;
#[cfg(test)]
mod chat_tests;
pub mod conn;
pub mod console;
pub mod convert;
pub mod dialect;
pub mod frames;
pub mod gate;
pub mod grpc;
pub mod http;
pub mod identify;
pub mod json;
pub mod meta;
pub mod model_config;
pub mod oip_bytes;
pub mod openapi;
#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod policy_tests;
pub mod problem;
pub mod queued;
mod reply;
pub mod responses;
pub mod rest;
pub mod sse;
#[cfg(test)]
mod tests;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::policy::Caller;
use crate::service::Core;

/// What every edge handler shares.
pub struct EdgeState {
    /// The request core every model call goes through.
    pub core: Arc<Core>,
    /// Stored responses of the Responses API.
    pub conversations: Arc<crate::conversations::Conversations>,
    /// Async requests and batches; `None`: no `[queue]`.
    pub queue: Option<Arc<crate::queue::Queue>>,
    pub default_deadline: Duration,
    pub max_body_bytes: usize,
    pub max_message_bytes: usize,
    pub http_max_in_flight: usize,
    pub grpc_max_in_flight: usize,
    /// Request bytes buffered at once, across both listeners.
    pub buffered: Arc<gate::Buffered>,
    /// SSE comment this often while a streaming model is silent.
    pub sse_keep_alive: Duration,
    /// Largest image an infer call may send: pixels (from its header) and
    /// bytes its decoding may take.
    pub image: convert::ImageBounds,
    /// Cancelled when shutdown starts: `/readyz` turns 503 so balancers stop
    /// sending before the listeners close.
    pub draining: CancellationToken,
}

/// The caller the policy middleware attached to a request (anonymous from
/// nowhere if it did not run, which only a bare test router does).
pub fn caller_of(extensions: &::http::Extensions) -> Arc<Caller> {
    extensions
        .get::<Arc<Caller>>()
        .cloned()
        .unwrap_or_else(|| Arc::new(Caller::anonymous(std::net::IpAddr::from([0, 0, 0, 0]))))
}

/// The variant a caller pins with `X-Model-Version` (header or metadata).
pub fn version_pin(headers: &::http::HeaderMap) -> Result<Option<&str>, GatewayError> {
    headers
        .get(crate::route::VERSION_HEADER)
        .map(|v| v.to_str().map_err(|_| GatewayError::invalid("X-Model-Version", "must be a visible ASCII string")))
        .transpose()
}

/// Name what answered on a response's headers (HTTP) or metadata (gRPC,
/// whose metadata is a header map): the variant, when the model named was
/// an alias, and the cache's part in the answer.
pub fn tag(headers: &mut ::http::HeaderMap, served: &crate::service::Served) {
    use ::http::HeaderValue;
    if let Some(v) = served.target.variant.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(crate::route::VARIANT_HEADER, v);
    }
    if let Some(status) = served.cache {
        headers.insert("x-cache", HeaderValue::from_static(status.as_str()));
    }
    if let Some(v) = served.similarity.and_then(|s| HeaderValue::from_str(&format!("{s:.4}")).ok()) {
        headers.insert("x-cache-similarity", v);
    }
}
