//! A REST handler's outcome, the request id it is reported under, and its
//! path parameters (refused as problem+json when they do not decode).

use axum::extract::{FromRequestParts, Path};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::request::Parts;
use serde::de::DeserializeOwned;

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

/// A route's path parameters, as axum's `Path`, but a path that does not
/// decode (percent-encoded bytes that are not UTF-8) is refused as every
/// other client error is: 400 problem+json with the request id.
pub(super) struct Params<T>(pub(super) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(e) => {
                let rid = request_id(&parts.headers);
                Err(Reply(Err(GatewayError::invalid("path", e.body_text())), rid).into_response())
            }
        }
    }
}
