//! A REST handler's outcome and the request id it is reported under.

use axum::response::{IntoResponse, Response};
use http::HeaderMap;

use crate::error::GatewayError;

/// The request id the request carries (set by the id layer before any
/// handler runs).
pub(super) fn request_id(headers: &HeaderMap) -> String {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// A handler outcome: the answer, or an error rendered with the request id.
pub(super) struct Reply(pub(super) Result<Response, GatewayError>, pub(super) String);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(r) => r,
            Err(e) => {
                if e.http_status().is_server_error() {
                    tracing::warn!(request_id = %self.1, error = %e, "request failed");
                }
                e.into_http(Some(&self.1))
            }
        }
    }
}
