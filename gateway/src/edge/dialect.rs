//! Error bodies in the dialect each surface's clients parse. Every error
//! stays an RFC 9457 problem document and gains an `error` member: OpenAI's
//! object under `/v1` (the `openai` SDKs show `error.message`), the Open
//! Inference Protocol's string under `/v2` (`{"error": "..."}`). Runs on
//! error responses only; problem bodies are small.

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::header;
use serde_json::{Map, Value, json};

/// Largest problem body rewritten (larger ones pass unchanged).
const MAX_PROBLEM_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum Dialect {
    OpenAi,
    Oip,
}

/// Middleware: add the surface's `error` member to problem responses.
pub async fn error_dialect(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let dialect = if path.starts_with("/v1/") {
        Dialect::OpenAi
    } else if path == "/v2" || path.starts_with("/v2/") {
        Dialect::Oip
    } else {
        return next.run(req).await;
    };
    let resp = next.run(req).await;
    let is_problem = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/problem+json");
    if !is_problem {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_PROBLEM_BYTES).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(mut problem) = serde_json::from_slice::<Map<String, Value>>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let detail = problem.get("detail").cloned().unwrap_or(Value::Null);
    let error = match dialect {
        Dialect::Oip => detail,
        Dialect::OpenAi => {
            let slug = problem
                .get("type")
                .and_then(Value::as_str)
                .and_then(|t| t.rsplit(':').next())
                .unwrap_or("error")
                .replace('-', "_");
            json!({
                "message": detail,
                "type": slug,
                "param": problem.get("field").cloned().unwrap_or(Value::Null),
                "code": slug,
            })
        }
    };
    problem.insert("error".into(), error);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(serde_json::to_vec(&problem).unwrap_or_default()))
}
