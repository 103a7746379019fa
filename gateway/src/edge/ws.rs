//! `GET /v1/streams/{model}`: the stream of frames over WebSocket, for
//! browsers and clients without gRPC; the same stream as gRPC
//! `InferStream`, run by the core (`service::stream`).
//!
//! The stream's settings are the query string (`max_in_flight`, `order`,
//! `overflow`, `frame_timeout_ms`, `outputs`, `parameters` as a JSON
//! object); it is planned and admitted before the upgrade, so a refusal is
//! an ordinary problem+json answer (401, 404, 429, 503). Then:
//!
//! - a binary message is a frame: 8 bytes of sequence number, 8 bytes of
//!   timestamp (both big-endian), then a JPEG or PNG image;
//! - a text message is a frame of tensors (`{"seq", "timestamp", "inputs":
//!   [OIP JSON tensors], "parameters"}`) or the end of the frames (`{"end": true}`),
//!   after which every frame is answered and the gateway closes (1000);
//! - every result is a text message: `{"seq", "timestamp", "latency_ms"}`
//!   with `outputs` (OIP JSON tensors) and `model_version`, or `dropped`
//!   (the reason), or `error` (a problem document);
//! - a stream that cannot go on gets a last text message `{"error":
//!   problem}` and a close with code 1008 (the client's fault) or 1011.
//!
//! With auth off, a page of another site cannot open a stream: an `Origin`
//! must be a name the gateway serves (loopback, `http.allowed_hosts`).
//!
//! A browser cannot set `Authorization` on a WebSocket: it offers the
//! subprotocols `infergate.v1` and `infergate.bearer.<key>`, and the key is
//! read from the second ([`bearer_from_subprotocol`]) as if sent as a
//! bearer token. The gateway answers with `infergate.v1`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::EdgeState;
use super::frames::FrameReader;
use super::json::{TensorJson, params_from_json, params_to_json, tensor_from_json, tensor_to_json};
use super::reply::{Params, Reply, request_id};
use crate::error::GatewayError;
use crate::proto::Tensor;
use crate::service::stream::{Frame, FrameResult, Order, Outcome, Overflow, StreamSpec};

/// The subprotocol the gateway speaks.
pub const SUBPROTOCOL: &str = "infergate.v1";
/// A subprotocol that carries the caller's key.
const BEARER_PREFIX: &str = "infergate.bearer.";
/// Bytes of a binary frame's header: sequence number and timestamp.
const HEADER: usize = 16;

/// The query string of `/v1/streams/{model}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    max_in_flight: u32,
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    overflow: Option<String>,
    #[serde(default)]
    frame_timeout_ms: u32,
    /// Comma-separated output names.
    #[serde(default)]
    outputs: Option<String>,
    /// A JSON object of scalar parameters.
    #[serde(default)]
    parameters: Option<String>,
}

impl Settings {
    fn spec(self) -> Result<StreamSpec, GatewayError> {
        let parameters = match self.parameters.as_deref() {
            None | Some("") => HashMap::new(),
            Some(text) => {
                let map: Map<String, Value> = serde_json::from_str(text)
                    .map_err(|e| GatewayError::invalid("parameters", format!("not a JSON object: {e}")))?;
                params_from_json(Some(&map), "parameters")?
            }
        };
        Ok(StreamSpec {
            parameters,
            outputs: self
                .outputs
                .map(|o| o.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
            max_in_flight: self.max_in_flight,
            order: match self.order.as_deref() {
                None | Some("in_order") => Order::InOrder,
                Some("as_ready") => Order::AsReady,
                Some(other) => {
                    return Err(GatewayError::invalid("order", format!("{other:?}: use in_order or as_ready")));
                }
            },
            overflow: match self.overflow.as_deref() {
                None | Some("block") => Overflow::Block,
                Some("drop_oldest") => Overflow::DropOldest,
                Some("drop_newest") => Overflow::DropNewest,
                Some(other) => {
                    return Err(GatewayError::invalid(
                        "overflow",
                        format!("{other:?}: use block, drop_oldest or drop_newest"),
                    ));
                }
            },
            frame_timeout: (self.frame_timeout_ms > 0).then(|| Duration::from_millis(self.frame_timeout_ms.into())),
            deadline: None,
        })
    }
}

/// Middleware on the streams route, before the caller is identified: a
/// key offered as a subprotocol (`infergate.bearer.<key>`) becomes the
/// request's `Authorization` (unless it has one).
pub async fn bearer_from_subprotocol(mut req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/streams/") && !req.headers().contains_key(http::header::AUTHORIZATION) {
        let key = req
            .headers()
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(BEARER_PREFIX).map(str::to_owned));
        if let Some(v) = key.and_then(|k| http::HeaderValue::from_str(&format!("Bearer {k}")).ok()) {
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
    }
    next.run(req).await
}

/// `GET /v1/streams/{model}`: open the stream, then upgrade.
#[utoipa::path(get, path = "/v1/streams/{model}", tag = "streams",
    params(("model" = String, Path, description = "Model or alias name (an INFER model)"),
           ("max_in_flight" = Option<u32>, Query, description = "Frames at the model at once (and as many waiting); default 4, at most streams.max_in_flight"),
           ("order" = Option<String>, Query, description = "in_order (default) or as_ready"),
           ("overflow" = Option<String>, Query, description = "block (default), drop_oldest or drop_newest"),
           ("frame_timeout_ms" = Option<u32>, Query, description = "A frame's deadline from its arrival; default streams.frame_timeout"),
           ("outputs" = Option<String>, Query, description = "Comma-separated output names; default all"),
           ("parameters" = Option<String>, Query, description = "A JSON object of scalar parameters sent with every frame")),
    responses(
        (status = 101, description = "A WebSocket of frames in, results out (subprotocol infergate.v1; see the README)"),
        (status = "4XX", description = "The caller's error, before the upgrade (problem+json)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The gateway cannot open a stream now (problem+json)", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(super) async fn open(State(state): State<Arc<EdgeState>>, Params(model): Params<String>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let rid = request_id(&parts.headers);
    let result = async {
        let axum::extract::Query(settings) = axum::extract::Query::<Settings>::try_from_uri(&parts.uri)
            .map_err(|e| GatewayError::invalid("query", e.body_text()))?;
        let spec = settings.spec()?;
        // Over HTTP/2 (RFC 8441) a WebSocket is one stream of a connection
        // whose idle bounds count requests, not upgraded streams; browsers
        // open `ws://` over HTTP/1.1.
        if parts.version != http::Version::HTTP_11 {
            return Err(GatewayError::invalid("upgrade", "open the stream's WebSocket over HTTP/1.1"));
        }
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &state)
            .await
            .map_err(|e| GatewayError::invalid("upgrade", format!("{}: open a WebSocket here", e.body_text())))?;
        if let Some(origin) = parts.headers.get(http::header::ORIGIN) {
            let text = origin.to_str().unwrap_or("?");
            let authority = text.split_once("://").map_or(text, |(_, rest)| rest);
            state
                .core
                .policy()
                .check_host(authority)
                .map_err(|_| GatewayError::OriginNotAllowed { origin: text.to_owned() })?;
        }
        let mut ask = super::http::ask(&state, &parts)?;
        ask.model = model;
        let opened = state.core.open_stream(ask, spec, "websocket").await?;
        let reader = FrameReader::new(&opened.entry, state.image);
        let core = state.core.clone();
        let draining = state.draining.clone();
        Ok(upgrade
            .protocols([SUBPROTOCOL])
            .max_message_size(state.max_message_bytes)
            .on_upgrade(move |socket| async move {
                let (sink, source) = socket.split();
                let frames = frames(source, reader).take_until(draining.cancelled_owned());
                answer(sink, opened.run(core, frames)).await;
            })
            .into_response())
    }
    .await;
    Reply(result, rid).into_response()
}

/// The client's messages as frames, until `{"end": true}`; a client that
/// closes or breaks the socket ends the stream as cancelled.
fn frames(
    source: futures::stream::SplitStream<WebSocket>,
    reader: FrameReader,
) -> impl futures::Stream<Item = Result<Frame, GatewayError>> + Send + 'static {
    futures::stream::unfold((source, reader), |(mut source, reader)| async move {
        loop {
            let frame = match source.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Err(GatewayError::Cancelled),
                Some(Ok(Message::Binary(bytes))) => Ok(binary_frame(bytes, &reader)),
                Some(Ok(Message::Text(text))) => match text_frame(text.as_str(), &reader) {
                    Ok(None) => return None,
                    Ok(Some(frame)) => Ok(frame),
                    Err(e) => Err(e),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            };
            return Some((frame, (source, reader)));
        }
    })
}

/// A binary message: the header, then an image.
fn binary_frame(bytes: Bytes, reader: &FrameReader) -> Frame {
    let Some((header, _)) = bytes.split_first_chunk::<HEADER>() else {
        let e = GatewayError::invalid("frame", format!("a binary frame starts with {HEADER} bytes of header"));
        return Frame { seq: 0, timestamp: 0, inputs: futures::future::err(e).boxed(), parameters: HashMap::new() };
    };
    let (seq, timestamp) = header.split_at(8);
    let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
    let timestamp = i64::from_be_bytes(timestamp.try_into().unwrap_or_default());
    Frame { seq, timestamp, inputs: reader.inputs(Vec::new(), bytes.slice(HEADER..)), parameters: HashMap::new() }
}

/// A text message from the client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextFrame<'a> {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    timestamp: i64,
    #[serde(borrow, default)]
    inputs: Vec<TensorJson<'a>>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    end: bool,
}

/// A text message: a frame of tensors, or `None` for the end of frames.
/// A message that is not JSON at all ends the stream (there is no frame to
/// blame); one that is, with bad tensors, fails that frame alone.
fn text_frame(text: &str, reader: &FrameReader) -> Result<Option<Frame>, GatewayError> {
    let msg: TextFrame<'_> = serde_json::from_str(text).map_err(|e| {
        GatewayError::invalid("message", format!("a text message is a JSON frame or {{\"end\": true}}: {e}"))
    })?;
    if msg.end {
        return Ok(None);
    }
    let tensors = msg
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| tensor_from_json(t, &format!("inputs[{i}]")))
        .collect::<Result<Vec<Tensor>, _>>();
    let (inputs, parameters) = match (tensors, params_from_json(msg.parameters.as_ref(), "parameters")) {
        (Ok(tensors), Ok(parameters)) => (reader.inputs(tensors, Bytes::new()), parameters),
        (Err(e), _) | (_, Err(e)) => (futures::future::err(e).boxed(), HashMap::new()),
    };
    Ok(Some(Frame { seq: msg.seq, timestamp: msg.timestamp, inputs, parameters }))
}

/// Send every result as a text message, then close: normally once every
/// frame is answered, with the error when the stream cannot go on.
async fn answer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    results: impl futures::Stream<Item = Result<FrameResult, GatewayError>>,
) {
    let mut results = std::pin::pin!(results);
    let close = loop {
        match results.next().await {
            None => break CloseFrame { code: close_code::NORMAL, reason: "".into() },
            Some(Ok(r)) => {
                if sink.send(Message::Text(encode(r).to_string().into())).await.is_err() {
                    return;
                }
            }
            Some(Err(GatewayError::Cancelled)) => return,
            Some(Err(e)) => {
                let _ = sink.send(Message::Text(json!({"error": e.problem(None)}).to_string().into())).await;
                let code = if e.http_status().is_client_error() { close_code::POLICY } else { close_code::ERROR };
                let reason: String = e.slug().into();
                break CloseFrame { code, reason: reason.into() };
            }
        }
    };
    let _ = sink.send(Message::Close(Some(close))).await;
}

/// A frame's result as JSON.
fn encode(r: FrameResult) -> Value {
    let mut out = json!({
        "seq": r.seq,
        "timestamp": r.timestamp,
        "latency_ms": r.latency.as_secs_f64() * 1000.0,
    });
    match r.outcome {
        Outcome::Answered { version, outputs, parameters } => {
            out["model_version"] = version.into();
            out["outputs"] =
                serde_json::to_value(outputs.into_iter().map(tensor_to_json).collect::<Vec<_>>()).unwrap_or_default();
            if !parameters.is_empty() {
                out["parameters"] = Value::Object(params_to_json(&parameters));
            }
        }
        Outcome::Dropped(reason) => out["dropped"] = reason.as_str().into(),
        Outcome::Failed(e) => out["error"] = serde_json::to_value(e.problem(None)).unwrap_or_default(),
    }
    out
}
