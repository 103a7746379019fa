//! The edge: REST (axum) and gRPC (tonic, grpc-web) in front of [`Upstream`].

pub mod access;
pub mod chat;
#[cfg(test)]
mod chat_tests;
pub mod conn;
pub mod convert;
pub mod dialect;
pub mod gate;
pub mod grpc;
pub mod http;
pub mod json;
pub mod meta;
pub mod openapi;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::policy::{Caller, Policy};
use crate::pool::Upstream;

/// What every edge handler shares.
pub struct EdgeState {
    pub upstream: Arc<dyn Upstream>,
    /// Auth and limits.
    pub policy: Arc<Policy>,
    /// Aliases, variants and fallbacks.
    pub routes: Arc<crate::route::Routes>,
    /// Exact response cache with singleflight.
    pub cache: Arc<crate::cache::ResponseCache>,
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
    /// Per-token prices, for the token and cost metrics.
    pub prices: Arc<crate::telemetry::usage::Prices>,
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
