//! [`GatewayError`] on the wire: an `application/problem+json` response
//! over HTTP, a status with `retry-after` and rate-limit metadata over gRPC.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::error::{GatewayError, RpcCode};

impl GatewayError {
    /// The HTTP response: status, `application/problem+json` body, `Retry-After`.
    pub fn into_http(self, request_id: Option<&str>) -> Response {
        let problem = self.problem(request_id);
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Unauthenticated) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        for (name, value) in self.rate_limit_fields().into_iter().flatten() {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
        // For the error dialect (`edge::dialect`) to write it again with its
        // `error` member, without reading the body back.
        response.extensions_mut().insert(problem);
        response
    }

    /// The gRPC code this error answers with.
    pub fn grpc_code(&self) -> tonic::Code {
        match self.rpc_code() {
            RpcCode::Cancelled => tonic::Code::Cancelled,
            RpcCode::InvalidArgument => tonic::Code::InvalidArgument,
            RpcCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            RpcCode::NotFound => tonic::Code::NotFound,
            RpcCode::PermissionDenied => tonic::Code::PermissionDenied,
            RpcCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            RpcCode::Unimplemented => tonic::Code::Unimplemented,
            RpcCode::Internal => tonic::Code::Internal,
            RpcCode::Unavailable => tonic::Code::Unavailable,
            RpcCode::Unauthenticated => tonic::Code::Unauthenticated,
        }
    }
}

/// A gRPC error as a complete HTTP response (trailers-only), for middleware
/// that answers before a tonic service runs.
pub fn grpc_response(err: GatewayError) -> Response {
    tonic::Status::from(err).into_http::<axum::body::Body>()
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_http(None)
    }
}

impl From<GatewayError> for tonic::Status {
    /// The message names the offending field where there is one (over HTTP
    /// it is the problem's `field`).
    fn from(err: GatewayError) -> Self {
        let message = match &err {
            GatewayError::InvalidRequest { field: Some(field), detail } => {
                format!("invalid request: {field}: {detail}")
            }
            other => other.to_string(),
        };
        let mut status = tonic::Status::new(err.grpc_code(), message);
        let md = status.metadata_mut();
        if let Some(secs) = err.retry_after()
            && let Ok(v) = secs.to_string().parse()
        {
            md.insert("retry-after", v);
        }
        for (name, value) in err.rate_limit_fields().into_iter().flatten() {
            if let Ok(v) = value.parse() {
                md.insert(name, v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use crate::error::GatewayError;

    #[test]
    fn grpc_codes_match_the_contract() {
        assert_eq!(GatewayError::PayloadTooLarge { limit: 1 }.grpc_code(), tonic::Code::ResourceExhausted);
        assert_eq!(GatewayError::ModelNotFound { model: "m".into() }.grpc_code(), tonic::Code::NotFound);
        let d = GatewayError::DeadlineExceeded { after: Duration::from_millis(5) };
        assert_eq!(d.grpc_code(), tonic::Code::DeadlineExceeded);
        assert_eq!(d.http_status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(GatewayError::NoReadyWorker { pool: "p".into() }.retry_after(), Some(1));
        let named = tonic::Status::from(GatewayError::invalid("inputs[0].shape", "dimensions must be >= 0"));
        assert_eq!(named.message(), "invalid request: inputs[0].shape: dimensions must be >= 0");
    }
}
