//! The OpenAI Batch API: `/v1/files` (JSONL of requests, checked line by
//! line at upload) and `/v1/batches` (a file's requests queued, their
//! answers gathered into output and error files).

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Query, Request, State};
use axum::response::IntoResponse;
use http::{HeaderValue, header};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::super::EdgeState;
use super::super::reply::{Params, Reply, request_id};
use super::{Asked, QueueErrors, queue};
use crate::error::GatewayError;
use crate::queue::QueuedCaller;
use crate::queue::batches::{Line, NewBatch};

/// The endpoints a batch may call: the model routes that answer whole.
pub const ENDPOINTS: &[&str] = &["/v1/embeddings", "/v1/chat/completions", "/v1/responses"];

/// Lines named in an error at most.
const NAMED_LINES: usize = 20;

/// Batches created at once: each reads its input file whole (at most
/// `queue.max_file_bytes`) to check and queue its lines.
static CREATING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Lines that failed, by number (from 1; 0: the file as a whole), and why.
type LineErrors = Vec<(usize, String)>;

/// One line of a batch input file, as OpenAI defines it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Map<String, Json>,
}

/// The requests of a JSONL batch file: each line checked (a JSON request
/// to a served endpoint, with a model, not streamed, its `custom_id` not
/// seen before); every line that fails is named by its number (from 1).
fn parse_lines(content: &[u8], max: usize) -> Result<Vec<(usize, RequestLine)>, LineErrors> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: RequestLine = match serde_json::from_slice(raw) {
            Ok(l) => l,
            Err(e) => {
                errors.push((n, format!("not a batch request: {e}")));
                continue;
            }
        };
        let problem = if line.custom_id.is_empty() {
            Some("custom_id must not be empty".to_owned())
        } else if !seen.insert(line.custom_id.clone()) {
            Some(format!("custom_id {:?} is used by an earlier line", line.custom_id))
        } else if line.method != "POST" {
            Some(format!("method must be POST, not {:?}", line.method))
        } else if !ENDPOINTS.contains(&line.url.as_str()) {
            Some(format!("url {:?} is not one of {}", line.url, ENDPOINTS.join(", ")))
        } else if line.body.get("model").and_then(Json::as_str).is_none_or(str::is_empty) {
            Some("body.model must be a model name".to_owned())
        } else if line.body.get("stream").and_then(Json::as_bool) == Some(true) {
            Some("body.stream must not be true: a batch's answers are stored whole".to_owned())
        } else {
            None
        };
        match problem {
            Some(p) => errors.push((n, p)),
            None => lines.push((n, line)),
        }
    }
    if lines.len() + errors.len() > max {
        errors
            .push((0, format!("{} requests, more than queue.max_batch_requests ({max})", lines.len() + errors.len())));
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push((0, "the file has no requests".to_owned()));
    }
    if errors.is_empty() { Ok(lines) } else { Err(errors) }
}

/// "line 3: …; line 9: …" (the first [`NAMED_LINES`]).
fn name_lines(errors: &[(usize, String)]) -> String {
    let mut named: Vec<String> = errors
        .iter()
        .take(NAMED_LINES)
        .map(|(n, e)| if *n == 0 { e.clone() } else { format!("line {n}: {e}") })
        .collect();
    if errors.len() > NAMED_LINES {
        named.push(format!("and {} more", errors.len() - NAMED_LINES));
    }
    named.join("; ")
}

/// `POST /v1/files` (multipart: `purpose=batch` and `file`).
#[utoipa::path(post, path = "/v1/files", tag = "queue",
    request_body(content_type = "multipart/form-data", description = "purpose=batch and file: JSONL, one request a line; every line is checked and each that fails is named"),
    responses(
        (status = 200, description = "The file object (OpenAI's)"),
        QueueErrors))]
pub(in crate::edge) async fn create_file(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let rid = request_id(req.headers());
    let result = async {
        let queue = queue(&state)?;
        let caller = super::super::caller_of(req.extensions());
        let mut form = <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
            .await
            .map_err(|e| GatewayError::invalid("body", e.body_text()))?;
        let (mut purpose, mut file) = (None, None);
        while let Some(field) = form.next_field().await.map_err(|e| GatewayError::invalid("body", e.body_text()))? {
            match field.name() {
                Some("purpose") => {
                    purpose = Some(field.text().await.map_err(|e| GatewayError::invalid("purpose", e.body_text()))?)
                }
                Some("file") => {
                    let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                    file = Some((name, field.bytes().await.map_err(|e| GatewayError::invalid("file", e.body_text()))?));
                }
                _ => {}
            }
        }
        let purpose = purpose.ok_or_else(|| GatewayError::invalid("purpose", "is required"))?;
        if purpose != "batch" {
            return Err(GatewayError::invalid(
                "purpose",
                format!("only \"batch\" files are kept here, not {purpose:?}"),
            ));
        }
        let (filename, content) = file.ok_or_else(|| GatewayError::invalid("file", "is required"))?;
        if let Err(errors) = parse_lines(&content, queue.config().max_batch_requests) {
            return Err(GatewayError::invalid(
                "file",
                format!("{} lines are not batch requests: {}", errors.len(), name_lines(&errors)),
            ));
        }
        let object = queue.create_file(&caller.tenant, &filename, &purpose, content).await?;
        Ok(axum::Json(object).into_response())
    }
    .await;
    Reply(result, rid)
}

/// `GET /v1/files`.
#[utoipa::path(get, path = "/v1/files", tag = "queue",
    responses(
        (status = 200, description = "The tenant's files"),
        QueueErrors))]
pub(in crate::edge) async fn list_files(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let rid = request_id(req.headers());
    let caller = super::super::caller_of(req.extensions());
    drop(req);
    let result = async {
        let files = queue(&state)?.files(&caller.tenant, 10_000).await?;
        Ok(axum::Json(json!({"object": "list", "data": files, "has_more": false})).into_response())
    }
    .await;
    Reply(result, rid)
}

/// `GET /v1/files/{id}`.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "queue",
    params(("id" = String, Path, description = "The id")),
    responses(
        (status = 200, description = "The file object"),
        QueueErrors))]
pub(in crate::edge) async fn get_file(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async { Ok(axum::Json(queue(&state)?.file(&caller.tenant, &id).await?).into_response()) }.await;
    Reply(result, rid)
}

/// `GET /v1/files/{id}/content`.
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "queue",
    params(("id" = String, Path, description = "The id")),
    responses(
        (status = 200, description = "The file's bytes (JSONL)", content_type = "application/jsonl"),
        QueueErrors))]
pub(in crate::edge) async fn file_content(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async {
        let (len, pieces) = queue(&state)?.file_pieces(&caller.tenant, &id).await?;
        let mut resp = axum::body::Body::from_stream(futures::StreamExt::map(pieces, |p| {
            p.map_err(|e| std::io::Error::other(e.to_string()))
        }))
        .into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jsonl"));
        resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        Ok(resp)
    }
    .await;
    Reply(result, rid)
}

/// `DELETE /v1/files/{id}`.
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "queue",
    params(("id" = String, Path, description = "The id")),
    responses(
        (status = 200, description = "Deleted"),
        QueueErrors))]
pub(in crate::edge) async fn delete_file(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async {
        queue(&state)?.delete_file(&caller.tenant, &id).await?;
        Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
    }
    .await;
    Reply(result, rid)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Json>>,
}

/// `POST /v1/batches`.
#[utoipa::path(post, path = "/v1/batches", tag = "queue",
    request_body(content_type = "application/json", description = "input_file_id, endpoint, completion_window (24h), metadata"),
    responses(
        (status = 200, description = "The batch object (OpenAI's)"),
        (status = 429, description = "The tenant's queued work would pass queue.max_queued_per_tenant", body = crate::error::Problem, content_type = "application/problem+json"),
        QueueErrors))]
pub(in crate::edge) async fn create_batch(State(state): State<Arc<EdgeState>>, req: Request) -> Reply {
    let rid = request_id(req.headers());
    let result = async {
        let queue = queue(&state)?;
        let (parts, body) = req.into_parts();
        let caller = super::super::caller_of(&parts.extensions);
        let body = axum::body::to_bytes(body, state.max_body_bytes)
            .await
            .map_err(|_| GatewayError::PayloadTooLarge { limit: state.max_body_bytes })?;
        let ask: CreateBatch = super::super::http::parse_json(&body)?;
        if !ENDPOINTS.contains(&ask.endpoint.as_str()) {
            return Err(GatewayError::invalid("endpoint", format!("must be one of {}", ENDPOINTS.join(", "))));
        }
        if let Some(m) = &ask.metadata
            && (m.len() > 16 || m.values().any(|v| !v.is_string()))
        {
            return Err(GatewayError::invalid("metadata", "at most 16 pairs of strings"));
        }
        let _turn = CREATING.acquire().await.map_err(|_| GatewayError::ShuttingDown)?;
        let content = queue.file_content(&caller.tenant, &ask.input_file_id).await?;
        let lines = parse_lines(&content, queue.config().max_batch_requests)
            .map_err(|errors| GatewayError::invalid("input_file_id", name_lines(&errors)))?;
        let mismatched: Vec<(usize, String)> = lines
            .iter()
            .filter(|(_, l)| l.url != ask.endpoint)
            .map(|(n, l)| (*n, format!("url {:?} is not the batch's endpoint {:?}", l.url, ask.endpoint)))
            .collect();
        let lines = if mismatched.is_empty() {
            Ok(lines
                .into_iter()
                .map(|(_, l)| Line {
                    model: l.body.get("model").and_then(Json::as_str).unwrap_or_default().to_owned(),
                    body: serde_json::to_vec(&l.body).unwrap_or_default().into(),
                    custom_id: l.custom_id,
                })
                .collect())
        } else {
            Err(mismatched)
        };
        let batch = queue
            .create_batch(NewBatch {
                caller: QueuedCaller::from(&*caller),
                input_file_id: ask.input_file_id,
                endpoint: ask.endpoint,
                completion_window: ask.completion_window,
                metadata: ask.metadata.map(Json::Object),
                lines,
            })
            .await?;
        Ok(axum::Json(batch).into_response())
    }
    .await;
    Reply(result, rid)
}

/// `GET /v1/batches/{id}`.
#[utoipa::path(get, path = "/v1/batches/{id}", tag = "queue",
    params(("id" = String, Path, description = "The id")),
    responses(
        (status = 200, description = "The batch object, with its request_counts"),
        QueueErrors))]
pub(in crate::edge) async fn get_batch(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async { Ok(axum::Json(queue(&state)?.batch(&caller.tenant, &id).await?).into_response()) }.await;
    Reply(result, rid)
}

#[derive(Deserialize)]
pub struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/batches?after=&limit=` (newest first, 20 a page, at most 100).
#[utoipa::path(get, path = "/v1/batches", tag = "queue",
    params(("after" = Option<String>, Query, description = "The last id of the page before"), ("limit" = Option<usize>, Query, description = "1 to 100, 20 by default")),
    responses(
        (status = 200, description = "The tenant's batches, newest first"),
        QueueErrors))]
pub(in crate::edge) async fn list_batches(
    State(state): State<Arc<EdgeState>>,
    page: Result<Query<Page>, QueryRejection>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result = async {
        let Query(page) = page.map_err(|e| GatewayError::invalid("query", e.body_text()))?;
        let limit = page.limit.unwrap_or(20).clamp(1, 100);
        let (data, has_more) = queue(&state)?.batches(&caller.tenant, page.after.as_deref(), limit).await?;
        let first = data.first().map(|b| b["id"].clone()).unwrap_or(Json::Null);
        let last = data.last().map(|b| b["id"].clone()).unwrap_or(Json::Null);
        Ok(axum::Json(
            json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}),
        )
        .into_response())
    }
    .await;
    Reply(result, rid)
}

/// `POST /v1/batches/{id}/cancel`.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "queue",
    params(("id" = String, Path, description = "The id")),
    responses(
        (status = 200, description = "Cancelling: lines not run are not run"),
        (status = 409, description = "It has finished already", body = crate::error::Problem, content_type = "application/problem+json"),
        QueueErrors))]
pub(in crate::edge) async fn cancel_batch(
    State(state): State<Arc<EdgeState>>,
    Params(id): Params<String>,
    asked: Asked,
) -> Reply {
    let Asked { rid, caller } = asked;
    let result =
        async { Ok(axum::Json(queue(&state)?.cancel_batch(&caller.tenant, &id).await?).into_response()) }.await;
    Reply(result, rid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let good = |id: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/embeddings","body":{{"model":"m","input":"x"}}}}"#
            )
        };
        let file = [
            good("a"),
            "not json".to_owned(),
            good("a"),
            r#"{"custom_id":"c","method":"GET","url":"/v1/embeddings","body":{"model":"m"}}"#.to_owned(),
            r#"{"custom_id":"d","method":"POST","url":"/v1/images","body":{"model":"m"}}"#.to_owned(),
            r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"#.to_owned(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#
                .to_owned(),
            String::new(),
            good("h"),
        ]
        .join("\n");
        let errors = parse_lines(file.as_bytes(), 100).unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|(n, _)| *n).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7]);
        assert!(errors[1].1.contains("used by an earlier line"), "{errors:?}");
        assert!(name_lines(&errors).starts_with("line 2: not a batch request"), "{}", name_lines(&errors));
        let ok = parse_lines(format!("{}\n{}\n", good("a"), good("b")).as_bytes(), 100).unwrap();
        assert_eq!(ok.len(), 2);
        let over = parse_lines(format!("{}\n{}\n", good("a"), good("b")).as_bytes(), 1).unwrap_err();
        assert!(over[0].1.contains("max_batch_requests"), "{over:?}");
    }
}
