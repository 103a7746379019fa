//! Who is calling, decided before a body is read: the REST and gRPC
//! middleware over [`Policy::identify`] of the policy in force (and, with auth off, the `Host`
//! check), answering refusals in each surface's own form.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::GatewayError;
use crate::policy::{PeerAddr, Policy};
use crate::service::Core;

/// The name a request is addressed to: HTTP/2's `:authority`, else `Host`.
fn host_of(req: &Request) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()),
    }
}

/// Middleware: resolve the caller before the body is read; refuse with
/// `reject` (same body for every auth failure).
async fn identify_with(
    policy: &Policy,
    mut req: Request,
    next: Next,
    reject: fn(GatewayError) -> Response,
) -> Response {
    if let Some(host) = host_of(&req)
        && let Err(refused) = policy.check_host(host)
    {
        tracing::info!(host, path = %req.uri().path(), "request for a host not served with auth off");
        return reject(refused);
    }
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    match policy.identify(req.uri().path(), req.headers(), peer) {
        Ok(caller) => {
            let caller = Arc::new(caller);
            req.extensions_mut().insert(caller.clone());
            let mut resp = next.run(req).await;
            // For the access log, which sees only the response.
            resp.extensions_mut().insert(caller);
            resp
        }
        Err(reason) => {
            metrics::counter!(crate::telemetry::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
            tracing::info!(reason, path = %req.uri().path(), "authentication failed");
            reject(GatewayError::Unauthenticated)
        }
    }
}

/// REST: identify the caller or answer 401 problem+json.
pub async fn identify_http(State(core): State<Arc<Core>>, req: Request, next: Next) -> Response {
    identify_with(&core.policy(), req, next, |e| e.into_http(None)).await
}

/// gRPC: identify the caller or answer UNAUTHENTICATED.
pub async fn identify_grpc(State(core): State<Arc<Core>>, req: Request, next: Next) -> Response {
    identify_with(&core.policy(), req, next, super::problem::grpc_response).await
}
