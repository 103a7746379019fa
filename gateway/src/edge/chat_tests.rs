//! `POST /v1/chat/completions` against a scripted generator: the answer's
//! shape, the SSE stream, failures before and after the first chunk,
//! keep-alives, and bad input that never reaches a worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::EdgeState;
use crate::call::Call;
use crate::error::GatewayError;
use crate::proto::{FinishReason, GenerateChunk, GenerateRequest, ModelEntry, ModelInfo, ModelKind, Usage};
use crate::upstream::{ChunkStream, PoolStatus, Upstream};

#[derive(Clone)]
enum Step {
    Text(&'static str),
    Silence(Duration),
    Fail,
    Finish,
}

/// Model `g` plays `script`: text chunks with running usage, pauses, a
/// failure, a finish.
struct Scripted {
    script: Vec<Step>,
    calls: AtomicUsize,
}

fn gen_model() -> ModelInfo {
    ModelInfo { name: "g".into(), kind: ModelKind::Generate as i32, streaming: true, ..Default::default() }
}

#[async_trait::async_trait]
impl Upstream for Scripted {
    fn models(&self) -> Vec<ModelEntry> {
        vec![ModelEntry { info: Some(gen_model()), pool: "p".into(), ready: true, ..Default::default() }]
    }
    fn status(&self) -> Vec<PoolStatus> {
        vec![PoolStatus { pool: "p".into(), ready_workers: 1, workers: 1, load_error: None }]
    }
    async fn generate(&self, call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
        self.model(&call.model)?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let steps = self.script.clone().into_iter();
        let stream = futures::stream::unfold((steps, 0u32), |(mut steps, produced)| async move {
            loop {
                let usage = |n| Some(Usage { prompt_tokens: 3, completion_tokens: n });
                match steps.next()? {
                    Step::Silence(d) => tokio::time::sleep(d).await,
                    Step::Text(t) => {
                        let chunk = GenerateChunk { text: t.into(), usage: usage(produced + 1), ..Default::default() };
                        return Some((Ok(chunk), (steps, produced + 1)));
                    }
                    Step::Fail => {
                        let e = GatewayError::WorkerUnavailable { worker: "g-0".into(), detail: "killed".into() };
                        return Some((Err(e), (steps, produced)));
                    }
                    Step::Finish => {
                        let chunk = GenerateChunk {
                            finish_reason: FinishReason::Stop as i32,
                            usage: usage(produced),
                            ..Default::default()
                        };
                        return Some((Ok(chunk), (steps, produced)));
                    }
                }
            }
        });
        Ok(stream.boxed())
    }
}

fn app(script: Vec<Step>, keep_alive: Duration) -> (axum::Router, Arc<Scripted>) {
    app_with(script, keep_alive, crate::policy::Policy::unrestricted())
}

fn app_with(
    script: Vec<Step>,
    keep_alive: Duration,
    policy: Arc<crate::policy::Policy>,
) -> (axum::Router, Arc<Scripted>) {
    let upstream = Arc::new(Scripted { script, calls: AtomicUsize::new(0) });
    let core = crate::service::Core::new(
        upstream.clone(),
        crate::service::Live {
            policy,
            routes: Default::default(),
            cache: crate::cache::ResponseCache::disabled(),
            prices: Arc::default(),
            streams: Default::default(),
        },
    );
    let state = Arc::new(EdgeState {
        conversations: crate::conversations::Conversations::in_memory(),
        queue: None,
        core: Arc::new(core),
        default_deadline: Duration::from_secs(30),
        max_body_bytes: 64 * 1024,
        max_message_bytes: 64 * 1024,
        http_max_in_flight: 8,
        grpc_max_in_flight: 8,
        buffered: super::gate::Buffered::new(1 << 30),
        sse_keep_alive: keep_alive,
        image: super::convert::ImageBounds { pixels: 1 << 24, bytes: 1 << 28 },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    (super::rest::router(state), upstream)
}

async fn chat(app: &axum::Router, body: Value) -> (StatusCode, http::HeaderMap, String) {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// `(event name, data)` of each SSE event, comments as `(":", text)`.
fn events(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(c) = line.strip_prefix(':') {
                    return (":".to_owned(), c.to_owned());
                } else if let Some(n) = line.strip_prefix("event: ") {
                    n.clone_into(&mut name);
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, data)
        })
        .collect()
}

fn hello() -> Vec<Step> {
    vec![Step::Text("hello"), Step::Text(" world"), Step::Finish]
}

fn ask(stream: bool) -> Value {
    json!({"model": "g", "messages": [{"role": "user", "content": "say hello"}], "stream": stream})
}

#[tokio::test]
async fn a_plain_call_answers_a_chat_completion_with_usage() {
    let (app, _) = app(hello(), Duration::from_secs(15));
    let (status, _, body) = chat(&app, ask(false)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "g");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": "hello world"}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
}

#[tokio::test]
async fn a_stream_sends_role_deltas_finish_usage_then_done() {
    let (app, _) = app(hello(), Duration::from_secs(15));
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, headers, text) = chat(&app, body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    let events = events(&text);
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(last, &("message".to_owned(), "[DONE]".to_owned()));
    let chunks: Vec<Value> = chunks.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "hello world");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[3]["usage"].is_null(), "usage only in the last chunk");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["total_tokens"], 5);
}

#[tokio::test]
async fn without_include_usage_chunks_carry_no_usage_key() {
    let (app, _) = app(hello(), Duration::from_secs(15));
    let (_, _, text) = chat(&app, ask(true)).await;
    let events = events(&text);
    assert_eq!(events.len(), 5, "role, two deltas, finish, [DONE]: {events:?}");
    assert!(events[..4].iter().all(|(_, d)| serde_json::from_str::<Value>(d).unwrap().get("usage").is_none()));
}

#[tokio::test]
async fn a_failure_after_the_first_chunk_is_an_error_event_not_a_finish() {
    let (app, _) = app(vec![Step::Text("half"), Step::Fail, Step::Finish], Duration::from_secs(15));
    let (status, _, text) = chat(&app, ask(true)).await;
    assert_eq!(status, 200, "the status was sent with the first chunk");
    let events = events(&text);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    let err: Value = serde_json::from_str(data).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("killed"), "{err}");
    assert_eq!(err["error"]["code"], 503);
    assert!(!text.contains("[DONE]") && !text.contains("finish_reason\":\"stop"), "{text}");
}

#[tokio::test]
async fn a_failure_before_the_first_chunk_is_answered_with_its_status() {
    let (app, _) = app(vec![Step::Fail], Duration::from_secs(15));
    let (status, headers, body) = chat(&app, ask(true)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let (status, _, _) = chat(&app, ask(false)).await;
    assert_eq!(status, 503);
}

#[tokio::test(start_paused = true)]
async fn a_silent_model_gets_keep_alive_comments() {
    let script = vec![Step::Silence(Duration::from_millis(350)), Step::Text("late"), Step::Finish];
    let (app, _) = app(script, Duration::from_millis(100));
    let (status, _, text) = chat(&app, ask(true)).await;
    assert_eq!(status, 200);
    let events = events(&text);
    let comments = events.iter().filter(|(n, _)| n == ":").count();
    assert!(comments >= 2, "{events:?}");
    assert!(text.contains("late") && text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn bad_input_is_a_precise_400_and_never_reaches_the_model() {
    let (app, upstream) = app(hello(), Duration::from_secs(15));
    let msg = |m: Value| json!({"model": "g", "messages": [m]});
    let cases = [
        (json!({"model": "g", "messages": []}), "messages"),
        (msg(json!({"role": "wizard", "content": "x"})), "messages[0].role"),
        (msg(json!({"role": "user", "content": 42})), "messages[0].content"),
        (msg(json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})), "messages[0].content"),
        (json!({"model": "g", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
        (json!({"model": "g", "messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
        (json!({"model": "g", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
        (json!({"model": "g", "messages": "hi"}), "messages"),
        (
            json!({"model": "g", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
    ];
    for (body, field) in cases {
        let (status, _, text) = chat(&app, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {text}");
        let problem: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["field"], field, "{body} -> {problem}");
        // OpenAI's error object rides along for the openai SDKs.
        assert_eq!(problem["error"]["param"], field);
        assert_eq!(problem["error"]["message"], problem["detail"]);
        assert_eq!(problem["error"]["type"], "invalid_request");
    }
    let (status, _, _) = chat(&app, json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(status, 404);
    assert_eq!(upstream.calls.load(Ordering::Relaxed), 0);
    // Text parts are joined.
    let parts = msg(json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}));
    assert_eq!(chat(&app, parts).await.0, 200);
}

#[tokio::test]
async fn a_stream_cut_short_is_charged_the_tokens_it_produced_and_no_more() {
    // 40 tokens a minute for everyone (auth is off: keyed by client address).
    let raw: crate::config::RawConfig =
        toml::from_str("[limits]\nper_key = { tokens_per_minute = 40 }\n[[pools]]\nname = \"p\"\nclass = \"x:Y\"\n")
            .unwrap();
    let policy = crate::policy::Policy::new(&crate::config::Config::from_raw(raw).unwrap()).unwrap();
    // Two chunks (3 prompt + 2 completion tokens reported), then the worker dies.
    let (app, _) = app_with(vec![Step::Text("a"), Step::Text("b"), Step::Fail], Duration::from_secs(15), policy);
    let prompt = crate::policy::estimate_tokens("say hello");
    let ask = |max_tokens: u64| {
        json!({"model": "g", "stream": true, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": "say hello"}]})
    };
    // Reserves prompt + 30, is charged 5: 35 of 40 left.
    let (status, _, text) = chat(&app, ask(30)).await;
    assert_eq!(status, 200);
    assert!(text.contains("event: error"), "{text}");
    // Kept whole, the reservation would leave 40 - 30 - prompt; given back
    // whole, 40. Charged 5, an estimate of 36 or more no longer fits ...
    let (status, _, body) = chat(&app, ask(36 - prompt)).await;
    assert_eq!(status, 429, "{body}");
    // ... and one of 35 does.
    assert_eq!(chat(&app, ask(35 - prompt)).await.0, 200);
}
