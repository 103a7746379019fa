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
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Problem;

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
    let mut resp = next.run(req).await;
    let is_problem = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/problem+json");
    if !is_problem {
        return resp;
    }
    // Our own errors carry their problem: written again with the member,
    // without reading the body back.
    // It stays in the extensions: the access layer keeps its detail for the console.
    if let Some(problem) = resp.extensions().get::<Problem>() {
        let body = serde_json::to_vec(&InDialect { problem, error: error_of(dialect, problem) });
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        *resp.body_mut() = Body::from(body.unwrap_or_default());
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_PROBLEM_BYTES).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(mut problem) = serde_json::from_slice::<Map<String, Value>>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let text = |key| problem.get(key).and_then(Value::as_str);
    let error = serde_json::to_value(ErrorMember::new(
        dialect,
        text("detail").unwrap_or_default(),
        text("type").unwrap_or_default(),
        text("field"),
    ))
    .unwrap_or(Value::Null);
    problem.insert("error".into(), error);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(serde_json::to_vec(&problem).unwrap_or_default()))
}

/// A problem document with the dialect's `error` member.
#[derive(Serialize)]
struct InDialect<'a> {
    #[serde(flatten)]
    problem: &'a Problem,
    error: ErrorMember<'a>,
}

/// OpenAI's error object, or the Open Inference Protocol's string.
#[derive(Serialize)]
#[serde(untagged)]
enum ErrorMember<'a> {
    OpenAi { message: &'a str, r#type: Slug<'a>, param: Option<&'a str>, code: Slug<'a> },
    Oip(&'a str),
}

impl<'a> ErrorMember<'a> {
    fn new(dialect: Dialect, detail: &'a str, kind: &'a str, field: Option<&'a str>) -> Self {
        match dialect {
            Dialect::Oip => Self::Oip(detail),
            Dialect::OpenAi => {
                let slug = Slug(kind.rsplit(':').next().filter(|s| !s.is_empty()).unwrap_or("error"));
                Self::OpenAi { message: detail, r#type: slug, param: field, code: slug }
            }
        }
    }
}

fn error_of(dialect: Dialect, p: &Problem) -> ErrorMember<'_> {
    ErrorMember::new(dialect, &p.detail, &p.kind, p.field.as_deref())
}

/// A problem type's last part with `_` for `-` (`rate_limited`), written
/// without a copy.
#[derive(Clone, Copy)]
struct Slug<'a>(&'a str);

impl Serialize for Slug<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Slug<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        self.0.chars().try_for_each(|c| f.write_char(if c == '-' { '_' } else { c }))
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use http::StatusCode;
    use tower::ServiceExt;

    use crate::error::GatewayError;

    async fn error_at(path: &str, handler: Router) -> serde_json::Value {
        let app = handler.layer(axum::middleware::from_fn(super::error_dialect));
        let req = http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn limited() -> GatewayError {
        GatewayError::RateLimited { limit: "requests_per_minute".into(), quota: 10, remaining: 0, retry_after: None }
    }

    #[tokio::test]
    async fn our_errors_and_foreign_problem_bodies_get_the_same_member() {
        let ours = Router::new().route("/v1/x", get(|| async { limited() }));
        // A problem body made elsewhere: only its bytes are known.
        let foreign = Router::new().route(
            "/v1/x",
            get(|| async {
                let mut resp = limited().into_http(None);
                resp.extensions_mut().clear();
                resp
            }),
        );
        let (a, b) = (error_at("/v1/x", ours).await, error_at("/v1/x", foreign).await);
        assert_eq!(a, b);
        assert_eq!(a["error"]["type"], "rate_limited", "{a}");
        assert_eq!(a["error"]["code"], "rate_limited");
        assert_eq!(a["error"]["param"], "requests_per_minute");
        assert_eq!(a["error"]["message"], a["detail"]);
        let oip = Router::new().route("/v2/x", get(|| async { limited() }));
        let c = error_at("/v2/x", oip).await;
        assert_eq!(c["error"], c["detail"], "{c}");
    }
}
