//! The admin API, on its own listener (`admin.listen`): reload and show
//! the config, list the pools and their workers, drain and undrain a
//! worker, and the Open Inference Protocol's model repository extension.
//! Every request needs an admin credential (an API key named in
//! `admin.keys`, or a JWT holding `admin.role`), whether or not auth is on
//! for the client listeners; every action is logged with who took it.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::reply::Params;
use crate::control::{Control, ReloadError, Reloaded};

/// Who an admin request comes from (`key:<id>` or `user:<sub>`).
#[derive(Debug, Clone)]
struct Admin(Arc<str>);

/// An RFC 9457 problem document.
pub(super) fn problem(status: StatusCode, slug: &str, detail: impl Into<String>, extra: Option<Value>) -> Response {
    let mut body = json!({
        "type": format!("urn:infergate:error:{slug}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let (Some(Value::Object(extra)), Value::Object(body)) = (extra, &mut body) {
        body.extend(extra);
    }
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn ok(body: Value) -> Response {
    axum::Json(body).into_response()
}

/// The admin router.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/admin/reload", post(reload))
        .route("/admin/config", get(config))
        .route("/admin/pools", get(pools))
        .route("/admin/pools/{pool}/workers/{worker}/drain", post(drain))
        .route("/admin/pools/{pool}/workers/{worker}/undrain", post(undrain))
        .route("/admin/aliases/{alias}/variants/{variant}/restore", post(restore))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .fallback(|req: Request| async move {
            problem(StatusCode::NOT_FOUND, "route-not-found", format!("no admin route {}", req.uri().path()), None)
        })
        .layer(axum::middleware::from_fn_with_state(control.clone(), authenticate))
        .with_state(control)
}

/// Refuse anyone without an admin credential: 401 without a valid one,
/// 403 with a valid credential that is not an admin's.
async fn authenticate(State(control): State<Arc<Control>>, mut req: Request, next: Next) -> Response {
    let admin = control.applied().config.admin.clone();
    match control.core().policy().admin(req.headers(), &admin) {
        Ok(who) => {
            req.extensions_mut().insert(Admin(who.into()));
            next.run(req).await
        }
        Err(reason) => {
            metrics::counter!(crate::telemetry::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
            tracing::warn!(reason, path = %req.uri().path(), "admin request refused");
            if reason == "not_admin" {
                problem(StatusCode::FORBIDDEN, "forbidden", "this credential may not use the admin API", None)
            } else {
                let hint = if admin.keys.is_empty() && admin.role.is_none() {
                    "an admin API key is required, and none is configured (admin.keys names API key ids)"
                } else {
                    "an admin API key or JWT is required"
                };
                problem(StatusCode::UNAUTHORIZED, "unauthenticated", hint, None)
            }
        }
    }
}

fn who(req: &axum::http::Extensions) -> Arc<str> {
    req.get::<Admin>().map_or_else(|| Arc::from("?"), |a| a.0.clone())
}

fn reloaded(result: Result<Reloaded, ReloadError>) -> Response {
    match result {
        Ok(done) => ok(json!(done)),
        Err(e) => {
            let errors: Vec<String> = match &e {
                ReloadError::NeedsRestart(keys) => {
                    keys.iter().map(|k| format!("{k} cannot change without a restart")).collect()
                }
                other => vec![other.to_string()],
            };
            problem(StatusCode::BAD_REQUEST, "config-refused", e.to_string(), Some(json!({ "errors": errors })))
        }
    }
}

async fn reload(State(control): State<Arc<Control>>, req: Request) -> Response {
    let who = who(req.extensions());
    tracing::info!(admin = %who, action = "reload", "admin action");
    reloaded(control.reload("admin api", &who).await)
}

async fn config(State(control): State<Arc<Control>>, req: Request) -> Response {
    tracing::info!(admin = %who(req.extensions()), action = "config", "admin action");
    let applied = control.applied();
    let mut config = serde_json::to_value(&applied.config.raw).unwrap_or(Value::Null);
    redact(&mut config);
    let since = applied.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    ok(json!({
        "version": applied.version,
        "hash": applied.hash,
        "since_unix": since,
        "config": config,
        // Weights as the split uses them now (canaries rolled back or ramping).
        "aliases": control.core().live().routes.views(),
    }))
}

async fn pools(State(control): State<Arc<Control>>, req: Request) -> Response {
    tracing::debug!(admin = %who(req.extensions()), action = "pools", "admin action");
    // Serialized as declared (a worker's id, address, then state), not as
    // a map with its keys sorted.
    #[derive(serde::Serialize)]
    struct Pools {
        pools: Vec<crate::pool::changes::PoolView>,
    }
    axum::Json(Pools { pools: control.pools().views() }).into_response()
}

async fn set_draining(control: &Control, who: &str, pool: &str, worker: &str, draining: bool) -> Response {
    let action = if draining { "drain" } else { "undrain" };
    tracing::info!(admin = %who, action, pool, worker, "admin action");
    match control.pools().set_draining(pool, worker, draining) {
        Ok(()) => ok(json!({ "pool": pool, "worker": worker, "draining": draining })),
        Err(e) => problem(StatusCode::NOT_FOUND, "not-found", e.to_string(), None),
    }
}

async fn drain(
    State(control): State<Arc<Control>>,
    Params((pool, worker)): Params<(String, String)>,
    req: Request,
) -> Response {
    set_draining(&control, &who(req.extensions()), &pool, &worker, true).await
}

async fn undrain(
    State(control): State<Arc<Control>>,
    Params((pool, worker)): Params<(String, String)>,
    req: Request,
) -> Response {
    set_draining(&control, &who(req.extensions()), &pool, &worker, false).await
}

/// Put a rolled-back canary back in its alias's split.
async fn restore(
    State(control): State<Arc<Control>>,
    Params((alias, variant)): Params<(String, String)>,
    req: Request,
) -> Response {
    tracing::info!(admin = %who(req.extensions()), action = "restore", alias, variant, "admin action");
    if control.core().live().routes.restore(&alias, &variant) {
        ok(json!({ "alias": alias, "variant": variant, "restored": true }))
    } else {
        let detail = format!("no variant {variant:?} with an slo in alias {alias:?}");
        problem(StatusCode::NOT_FOUND, "not-found", detail, None)
    }
}

/// OIP repository index: every configured pool and repository entry, with
/// its state (`READY`, `LOADING`, `UNAVAILABLE`).
async fn index(State(control): State<Arc<Control>>, req: Request) -> Response {
    tracing::info!(admin = %who(req.extensions()), action = "repository index", "admin action");
    let applied = control.applied();
    let status = control.core().pools();
    let mut models: Vec<Value> = status
        .iter()
        .map(|p| {
            let (state, reason) = match (&p.load_error, p.ready_workers) {
                (Some(e), _) => ("UNAVAILABLE", e.clone()),
                (None, 0) => ("LOADING", String::new()),
                (None, _) => ("READY", String::new()),
            };
            json!({ "name": p.pool, "version": "", "state": state, "reason": reason })
        })
        .collect();
    for entry in applied.config.raw.admin.repository.iter().filter(|r| status.iter().all(|p| p.pool != r.name)) {
        models.push(json!({ "name": entry.name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded" }));
    }
    ok(Value::Array(models))
}

async fn load(State(control): State<Arc<Control>>, Params(model): Params<String>, req: Request) -> Response {
    let who = who(req.extensions());
    tracing::info!(admin = %who, action = "repository load", model, "admin action");
    reloaded(control.load_model(&model, &who).await)
}

async fn unload(State(control): State<Arc<Control>>, Params(model): Params<String>, req: Request) -> Response {
    let who = who(req.extensions());
    tracing::info!(admin = %who, action = "repository unload", model, "admin action");
    reloaded(control.unload_model(&model, &who).await)
}

/// Names of keys whose values are never shown.
fn secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["SECRET", "PASSWORD", "TOKEN", "KEY", "SHA256"].iter().any(|s| upper.contains(s)) && upper != "KEYS_FILE"
}

/// Hide secrets in a config shown to an admin: digests of API keys, JWT
/// secrets, passwords in URLs, and pool environment values whose names
/// look secret.
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if v.is_string() && secret_name(k) {
                    *v = Value::from("[redacted]");
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(text) => {
            if let Some((scheme, rest)) = text.split_once("://")
                && let Some((_, host)) = rest.rsplit_once('@')
            {
                *text = format!("{scheme}://[redacted]@{host}");
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_shown() {
        let mut v = json!({
            "redis": { "url": "redis://user:hunter2@db:6379/0", "prefix": "ig" },
            "auth": { "keys": [{ "id": "ops", "sha256": "abcd" }], "keys_file": "/etc/keys.toml",
                      "jwt": { "secret_env": "JWT_SECRET" } },
            "pools": [{ "name": "rag", "env": { "OPENAI_API_KEY": "sk-1", "MODEL_DIR": "/m" } }],
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in ["hunter2", "abcd", "sk-1", "JWT_SECRET"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        for shown in ["db:6379/0", "ops", "/etc/keys.toml", "/m", "ig"] {
            assert!(text.contains(shown), "{shown} hidden: {text}");
        }
    }
}
