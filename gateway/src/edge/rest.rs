//! The REST router: every route, and the layers each request passes
//! through, outermost first.

use std::sync::Arc;

use ::http::HeaderMap;
use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use super::reply::{Reply, request_id};
use super::{EdgeState, http, meta, model_config, openapi, queued};

/// Batch files uploaded at once (each may be `queue.max_file_bytes`).
const UPLOADS_AT_ONCE: usize = 4;
use crate::error::GatewayError;

/// The model routes: every call that reaches a worker.
fn model_routes(state: Arc<EdgeState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(http::chat_completions))
        .route("/v1/embeddings", post(http::embeddings))
        .route("/v1/responses", post(http::create_response))
        .route("/v2/models/{model}/infer", post(http::infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(http::infer_version))
        .with_state(state)
}

/// The model routes as the queue's consumer calls them: no listener
/// bounds (the consumer bounds itself) and no caller identification (the
/// caller comes with the entry).
pub fn queued_routes(state: Arc<EdgeState>) -> Router {
    model_routes(state).fallback(not_found)
}

/// The REST router with its layers, outermost first.
pub fn router(state: Arc<EdgeState>) -> Router {
    // Work that reaches workers is bounded; health and metadata stay
    // answerable under overload so probes do not flap. A request that
    // prefers an async answer is queued rather than answered.
    let api = model_routes(state.clone())
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::queued::respond_async));
    // Bodies are read whole before a request takes an in-flight permit.
    // A caller whose own rate is spent is refused before that.
    let api = super::gate::Gate::new(
        state.http_max_in_flight,
        state.max_body_bytes,
        state.buffered.clone(),
        Some(state.core.clone()),
        |e, rid| e.into_http(rid),
    )
    .guard(api);
    // A batch file is read whole (within `queue.max_file_bytes` and the
    // memory all bodies share) before it is checked line by line.
    let upload = Router::new()
        .route("/v1/files", post(queued::batch::create_file))
        .with_state(state.clone())
        .layer(axum::extract::DefaultBodyLimit::disable());
    let upload = super::gate::Gate::new(
        UPLOADS_AT_ONCE,
        state.queue.as_ref().map_or(state.max_body_bytes, |q| q.config().max_file_bytes),
        state.buffered.clone(),
        Some(state.core.clone()),
        |e, rid| e.into_http(rid),
    )
    .guard(upload);
    let routes = Router::new()
        .route("/v1/async/{id}", get(queued::get_async).delete(queued::cancel_async))
        .route("/v1/files", get(queued::batch::list_files))
        .route("/v1/files/{id}", get(queued::batch::get_file).delete(queued::batch::delete_file))
        .route("/v1/files/{id}/content", get(queued::batch::file_content))
        .route("/v1/batches", post(queued::batch::create_batch).get(queued::batch::list_batches))
        .route("/v1/batches/{id}", get(queued::batch::get_batch))
        .route("/v1/batches/{id}/cancel", post(queued::batch::cancel_batch))
        .route("/v1/models", get(meta::list_models))
        // A stream of frames: bounded by `streams.*`, not the body gate.
        .route("/v1/streams/{model}", get(super::ws::open))
        .route("/v1/responses/{id}", get(http::get_response).delete(http::delete_response))
        .route("/v2", get(meta::server_metadata))
        .route("/v2/health/live", get(meta::live))
        .route("/v2/health/ready", get(meta::ready))
        .route("/v2/models/{model}", get(meta::model_metadata))
        .route("/v2/models/{model}/ready", get(meta::model_ready))
        .route("/v2/models/{model}/config", get(model_config::model_config))
        .route("/v2/models/{model}/versions/{version}", get(meta::version_metadata))
        .route("/v2/models/{model}/versions/{version}/ready", get(meta::version_ready))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config::version_config))
        .route("/healthz", get(meta::healthz))
        .route("/metrics", get(meta::metrics))
        .route("/readyz", get(meta::readyz))
        .route("/openapi.json", get(openapi::document))
        .with_state(state.clone())
        .merge(api)
        .merge(upload)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Which route matched, for the access log outside the router.
        .layer(super::access::NameRoute);
    // The layers every request passes, outermost first, wrapped once around
    // the router: `Router::layer` would wrap each route on its own, and a
    // route's layers are cloned for every request it serves.
    let app = tower::ServiceBuilder::new()
        // A caller's id is taken only when it is safe to log and forward.
        .layer(axum::middleware::from_fn(super::access::sanitize_request_id))
        // Give every request an id before anything else sees it.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Echo the request id on every response, errors included.
        .layer(PropagateRequestIdLayer::x_request_id())
        // One access-log line and the request metrics, refusals included.
        .layer(axum::middleware::from_fn(super::access::access_log))
        // Errors in the dialect of each surface's clients (auth refusals too).
        .layer(axum::middleware::from_fn(super::dialect::error_dialect))
        // A browser's WebSocket offers its key as a subprotocol.
        .layer(axum::middleware::from_fn(super::ws::bearer_from_subprotocol))
        // Who is calling, before any body is read (public routes pass).
        .layer(axum::middleware::from_fn_with_state(state.core.clone(), super::identify::identify_http))
        .service(routes);
    Router::new().fallback_service(app)
}

async fn not_found(req: Request) -> Reply {
    let rid = request_id(req.headers());
    Reply(Err(GatewayError::RouteNotFound { path: req.uri().path().to_owned() }), rid)
}

async fn method_not_allowed(headers: HeaderMap) -> Reply {
    Reply(Err(GatewayError::MethodNotAllowed), request_id(&headers))
}
