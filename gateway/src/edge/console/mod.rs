//! The console: a page on the admin listener (`/console`) with the live
//! status of the pools, workers, aliases and traffic, and a playground
//! that calls any served model through the client API.
//!
//! Its files are embedded in the binary (`assets/`, plain HTML, CSS and
//! JavaScript: no CDN, no build step) and public; they hold no secret.
//! Its data (`/console/api/...`) needs a console credential (see
//! [`crate::policy::Policy::console`]): an admin key or JWT for status and
//! playground, a viewer's for status alone; with auth off and none
//! configured it is open, as the client listeners are. The page keeps the
//! key in memory and sends it as `Authorization`, never in a cookie, so
//! another site cannot make a browser use it; the playground also wants a
//! header only the page's own script sends (`x-infergate-console`), which
//! a cross-site form cannot, and an open console answers only to the
//! `Host` names the client listeners do with auth off (no DNS rebinding).
//!
//! The playground hands each request, as the page sent it, to the REST
//! edge's own router in process: it is admitted, limited, cached,
//! metered and logged as any client's request, under the caller's key.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::admin::problem;
use crate::control::Control;
use crate::policy::{ConsoleAccess, PeerAddr};

/// The page's files, embedded: (path under `/console/`, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    ("console.js", "text/javascript; charset=utf-8", include_str!("assets/console.js")),
    ("console.css", "text/css; charset=utf-8", include_str!("assets/console.css")),
    ("icon.svg", "image/svg+xml", include_str!("assets/icon.svg")),
];
const INDEX: &str = include_str!("assets/index.html");

/// The header the page's own script sends with every playground request.
pub const CONSOLE_HEADER: &str = "x-infergate-console";

/// How often the status stream sends a snapshot.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// The longest a status stream stays open; the page opens another.
const STATUS_STREAM_MAX: Duration = Duration::from_secs(600);

/// What the console's handlers share.
struct Console {
    control: Arc<Control>,
    /// The REST edge's router, for the playground.
    public: Router,
    /// Cancelled when the gateway drains: status streams end.
    draining: CancellationToken,
    /// Where the client listeners are bound (for the curl commands shown).
    listening: Listening,
}

/// The addresses the client listeners are bound to.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub http: std::net::SocketAddr,
    pub grpc: std::net::SocketAddr,
}

/// The console's routes, for the admin listener: `public` is the REST
/// edge's router, listening on `listening.http`.
pub fn router(control: Arc<Control>, public: Router, listening: Listening, draining: CancellationToken) -> Router {
    let console = Arc::new(Console { control, public, draining, listening });
    let api = Router::new()
        .route("/console/api/status", get(status))
        .route("/console/api/events", get(events))
        .route("/console/api/play/{*path}", any(play))
        .route_layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        // Says whether to sign in: no guard of its own (see `session`).
        .route("/console/api/session", get(session))
        .layer(axum::middleware::map_response(|mut resp: Response| async move {
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }));
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(index))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/{file}", get(asset))
        .merge(api)
        .layer(axum::middleware::map_response(secure))
        .with_state(console)
}

/// Headers every console response carries: its files and data only from
/// itself, never in a frame, nothing sniffed, no referrer.
async fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
             connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX).into_response()
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => {
            ([(header::CONTENT_TYPE, *kind), (header::CACHE_CONTROL, "no-cache")], *body).into_response()
        }
        None => problem(StatusCode::NOT_FOUND, "route-not-found", format!("no console file {file:?}"), None),
    }
}

/// Why a console request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {
    /// No credential, or one the gateway does not know (401).
    Unauthenticated,
    /// A credential that is not a console user's (403).
    Forbidden(&'static str),
    /// An open console asked for by a name it does not answer to (421).
    Host(String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthenticated => {
                problem(StatusCode::UNAUTHORIZED, "unauthenticated", "an admin or viewer API key is required", None)
            }
            Refused::Forbidden(detail) => problem(StatusCode::FORBIDDEN, "forbidden", detail, None),
            Refused::Host(host) => crate::error::GatewayError::HostNotAllowed { host }.into_http(None),
        }
    }
}

/// The access `headers` grant, or why not. Without a credential to refuse,
/// `asking` (the page asking whether to sign in) counts and logs nothing.
fn admit(console: &Console, headers: &HeaderMap, path: &str, asking: bool) -> Result<ConsoleAccess, Refused> {
    let admin = console.control.applied().config.admin.clone();
    let policy = console.control.core().policy();
    match policy.console(headers, &admin) {
        Ok(access) => {
            // An open console answers to the names the client listeners do
            // with auth off (loopback, `http.allowed_hosts`): a page elsewhere
            // cannot reach it by rebinding its own name to this machine.
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if access == ConsoleAccess::Open && policy.check_host(host).is_err() {
                return Err(Refused::Host(host.to_owned()));
            }
            Ok(access)
        }
        Err(reason) => {
            if !(asking && reason == "missing") {
                metrics::counter!(crate::telemetry::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
                tracing::warn!(reason, path, "console request refused");
            }
            Err(if reason == "not_admin" {
                Refused::Forbidden("this credential may not use the console")
            } else {
                Refused::Unauthenticated
            })
        }
    }
}

/// Let in a console credential (see [`crate::policy::Policy::console`]);
/// the access it grants goes in the request's extensions.
async fn guard(State(console): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    match admit(&console, req.headers(), req.uri().path(), false) {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        Err(refused) => refused.into_response(),
    }
}

fn access_of(req: &Request) -> ConsoleAccess {
    req.extensions().get::<ConsoleAccess>().cloned().unwrap_or(ConsoleAccess::Viewer("?".into()))
}

/// Who the page is talking for, what it may do, and where the client API
/// listens (for the curl commands it shows). Asked without a credential
/// where one is needed, it answers `{"sign_in": true}`: not being signed in
/// yet is no error. A credential sent and refused is (401, 403).
async fn session(State(console): State<Arc<Console>>, req: Request) -> Response {
    let asking = !req.headers().contains_key(header::AUTHORIZATION) && !req.headers().contains_key("x-api-key");
    let access = match admit(&console, req.headers(), req.uri().path(), asking) {
        Ok(access) => access,
        Err(_) if asking => {
            return axum::Json(json!({ "sign_in": true })).into_response();
        }
        Err(refused) => return refused.into_response(),
    };
    let (role, who) = match access {
        ConsoleAccess::Open => ("admin", None),
        ConsoleAccess::Admin(who) => ("admin", Some(who)),
        ConsoleAccess::Viewer(who) => ("viewer", Some(who)),
    };
    let applied = console.control.applied();
    // A listener on every address is reached by the name the page used.
    let host = |addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            let name = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
            let name = name.rsplit_once(':').map_or(name, |(n, p)| if p.contains(']') { name } else { n });
            format!("{name}:{}", addr.port())
        } else {
            addr.to_string()
        }
    };
    axum::Json(json!({
        "role": role,
        "who": who,
        "auth": applied.config.auth.enabled,
        "playground": role == "admin",
        "public_url": format!("http://{}", host(console.listening.http)),
        "grpc_address": host(console.listening.grpc),
        "config_version": applied.version,
        "gateway_version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

/// Everything the status view shows, now.
fn snapshot(control: &Control) -> Value {
    let processes = control.processes();
    let readiness = control.core().pools();
    let models = control.core().models();
    let pools: Vec<Value> = control
        .pools()
        .views()
        .into_iter()
        .map(|pool| {
            let status = readiness.iter().find(|p| p.pool == pool.name);
            let mut v = serde_json::to_value(&pool).unwrap_or(Value::Null);
            if let Some(workers) = v.get_mut("workers").and_then(Value::as_array_mut) {
                for w in workers {
                    let id = w.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    let process = processes.get(&id);
                    w["pid"] = json!(process.and_then(|p| p.pid));
                    w["restarts"] = json!(process.map(|p| p.restarts));
                }
            }
            let served: Vec<&str> = models
                .iter()
                .filter(|e| e.pool == pool.name)
                .filter_map(|e| e.info.as_ref().map(|i| i.name.as_str()))
                .collect();
            v["models"] = json!(served);
            v["ready_workers"] = json!(status.map(|s| s.ready_workers));
            v["load_error"] = json!(status.and_then(|s| s.load_error.as_ref()));
            v
        })
        .collect();
    let applied = control.applied();
    json!({
        "at_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()),
        "config": { "version": applied.version, "hash": applied.hash },
        "pools": pools,
        "aliases": control.core().live().routes.all_views(),
        "traffic": crate::telemetry::window::snapshot(),
    })
}

async fn status(State(console): State<Arc<Console>>) -> Response {
    axum::Json(snapshot(&console.control)).into_response()
}

/// The status, once a second, as server-sent events (`status`), until the
/// client leaves, the gateway drains or [`STATUS_STREAM_MAX`] passes.
async fn events(State(console): State<Arc<Console>>) -> Response {
    let control = console.control.clone();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks = futures::stream::poll_fn(move |cx| tick.poll_tick(cx).map(Some));
    let stop = console.draining.clone().cancelled_owned();
    let stream = ticks
        .map(move |_| Ok::<_, Infallible>(Event::default().event("status").data(snapshot(&control).to_string())))
        .take_until(async move {
            tokio::select! {
                () = stop => {}
                () = tokio::time::sleep(STATUS_STREAM_MAX) => {}
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Whether a request could have been sent by another site's page: it
/// lacks the console's header (which a cross-site form cannot send, and a
/// cross-site script cannot without a CORS preflight no route answers), or
/// the browser says it came from another site.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    headers.get(CONSOLE_HEADER).is_none() || matches!(fetch_site, Some("cross-site" | "same-site"))
}

/// The playground: the request, as sent, to the REST edge's router under
/// `/{path}` (`/v1/...` and `/v2/...` only).
async fn play(State(console): State<Arc<Console>>, req: Request) -> Response {
    if matches!(access_of(&req), ConsoleAccess::Viewer(_)) {
        return problem(StatusCode::FORBIDDEN, "forbidden", "a viewer may not use the playground", None);
    }
    if cross_site(req.headers()) {
        let detail = format!("playground requests come from the console's page (with {CONSOLE_HEADER})");
        return problem(StatusCode::FORBIDDEN, "forbidden", detail, None);
    }
    let path = req.uri().path().strip_prefix("/console/api/play").unwrap_or_default();
    if !(path.starts_with("/v1/") || path.starts_with("/v2/")) {
        let detail = format!("the playground calls /v1/... and /v2/..., not {path:?}");
        return problem(StatusCode::NOT_FOUND, "route-not-found", detail, None);
    }
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let (parts, body) = req.into_parts();
    let mut forward = Request::new(body);
    *forward.method_mut() = parts.method.clone();
    *forward.version_mut() = parts.version;
    match target.parse() {
        Ok(uri) => *forward.uri_mut() = uri,
        Err(_) => return problem(StatusCode::BAD_REQUEST, "invalid-request", "not a path", None),
    }
    for (name, value) in &parts.headers {
        if name != header::HOST
            && name != header::COOKIE
            && name != CONSOLE_HEADER
            && !name.as_str().starts_with("sec-")
        {
            forward.headers_mut().append(name, value.clone());
        }
    }
    // The client's own address, for limits by client and the access line.
    if let Some(peer) = parts.extensions.get::<PeerAddr>() {
        forward.extensions_mut().insert(*peer);
    }
    if parts.method == Method::GET || parts.method == Method::HEAD {
        forward.headers_mut().remove(header::CONTENT_LENGTH);
    }
    match console.public.clone().oneshot(forward).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playground_requests_need_the_console_header_and_no_cross_site_fetch() {
        let mut h = HeaderMap::new();
        assert!(cross_site(&h));
        h.insert(CONSOLE_HEADER, HeaderValue::from_static("1"));
        assert!(!cross_site(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        for name in ["console.js", "console.css", "icon.svg"] {
            assert!(INDEX.contains(&format!("/console/{name}")), "index.html does not name {name}");
            assert!(ASSETS.iter().any(|(n, _, _)| *n == name), "{name} is not embedded");
        }
    }
}
