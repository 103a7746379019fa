//! The edge: REST (axum) and gRPC (tonic, grpc-web) in front of [`Upstream`].

pub mod grpc;
pub mod http;
pub mod json;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pool::Upstream;

/// What every edge handler shares.
pub struct EdgeState {
    pub upstream: Arc<dyn Upstream>,
    pub default_deadline: Duration,
    pub max_body_bytes: usize,
    pub max_message_bytes: usize,
    /// Cancelled when shutdown starts: `/readyz` turns 503 so balancers stop
    /// sending before the listeners close.
    pub draining: CancellationToken,
}
