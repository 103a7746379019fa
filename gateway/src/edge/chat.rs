//! The OpenAI-compatible chat surface over the core's generation: the
//! `chat.completion` answer and its `chat.completion.chunk` SSE stream
//! (the checks, the cache and the metering are the core's: `service`).
//!
//! Before the first chunk an error is the response (an HTTP status); after
//! it, the stream ends with an SSE `error` event and never with a finish
//! reason it did not get.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::proto::{ChatMessage, FinishReason, GenerateChunk, GenerateRequest, GenerationParams, Source, Usage};
use crate::service::generate::MAX_STOP;
use crate::service::generate::Metered;

/// `POST /v1/chat/completions` body (fields the gateway does not use are
/// ignored, as OpenAI-compatible servers do).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ChatRequest {
    #[schema(min_length = 1)]
    pub model: String,
    /// At most 1,024 (`MAX_MESSAGES`).
    #[schema(min_items = 1, max_items = 1024)]
    pub messages: Vec<MessageJson>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// At most 2^20 (`MAX_TOKENS`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    #[schema(schema_with = stop_schema)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Only one choice is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// One message: `content` is a string, or a list of text parts.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct MessageJson {
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    pub role: String,
    #[serde(default)]
    #[schema(value_type = Content, required = true)]
    pub content: Value,
}

/// A message's content: a string, or a list of text parts.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code, reason = "a schema only: content is read from JSON as it comes")]
enum Content {
    Text(String),
    Parts(Vec<TextPart>),
}

/// A text part of a message's content.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only")]
struct TextPart {
    #[schema(pattern = "^text$")]
    r#type: String,
    text: String,
}

/// One stop string or up to [`MAX_STOP`] of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The schema of `stop`: a non-empty string, or up to [`MAX_STOP`] of them.
fn stop_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
    let many = ArrayBuilder::new().items(text()).min_items(Some(1)).max_items(Some(MAX_STOP));
    OneOfBuilder::new().item(ObjectBuilder::new().schema_type(Type::Null)).item(text()).item(many).into()
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

impl ChatRequest {
    /// The worker request, with every field checked.
    pub fn to_generate(&self) -> Result<GenerateRequest, GatewayError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(GatewayError::invalid("n", "only one choice (n = 1) is supported"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => 0,
            Some(n) if n < 1 => return Err(GatewayError::invalid("max_tokens", "must be at least 1")),
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| Ok(ChatMessage { role: m.role.clone(), content: content_text(&m.content, i)? }))
            .collect::<Result<Vec<_>, GatewayError>>()?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let req = GenerateRequest {
            model: self.model.clone(),
            messages,
            params: Some(GenerationParams {
                temperature: self.temperature.unwrap_or(0.0),
                has_temperature: self.temperature.is_some(),
                max_tokens,
                stop,
                seed: self.seed.unwrap_or(0),
            }),
            user: self.user.clone().unwrap_or_default(),
        };
        Ok(req)
    }
}

/// A message's text: a string, or the concatenated text of `{"type": "text"}` parts.
fn content_text(content: &Value, i: usize) -> Result<String, GatewayError> {
    let field = || format!("messages[{i}].content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(GatewayError::invalid(
                    field(),
                    "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(GatewayError::invalid(field(), "must be a string or a list of text parts")),
    }
}

fn finish_name(reason: i32) -> Option<&'static str> {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Unspecified => None,
        FinishReason::Stop => Some("stop"),
        FinishReason::Length => Some("length"),
    }
}

/// `chat.completion`: the answer of a non-streaming call.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: ChatUsage,
    /// Passages the answer draws on (retrieval models; an extension).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceJson>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Always null: log probabilities are not produced.
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    pub content: String,
}

/// Token counts as the worker reported them.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct ChatUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<Usage> for ChatUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// A passage an answer draws on.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SourceJson {
    /// Where it comes from, e.g. `README.md:33`.
    pub source: String,
    pub text: String,
    /// Similarity to the question (higher is closer).
    pub score: f32,
}

impl From<&Source> for SourceJson {
    fn from(s: &Source) -> Self {
        Self { source: s.source.clone(), text: s.text.clone(), score: s.score }
    }
}

/// `chat.completion.chunk`: one event of a streaming call (`data:` lines of
/// `text/event-stream`, ending with `data: [DONE]`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// With `stream_options.include_usage`: null on every chunk but an extra
    /// last one (with no choices) that carries the totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<ChatUsage>>,
    /// Passages the answer draws on, on the chunk where they arrive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceJson>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the message.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Identity of one completion, shared by its chunks.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    pub fn new(request_id: &str, model: &str) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { id: format!("chatcmpl-{request_id}"), created, model: model.to_owned() }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Option<ChatUsage>>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            sources: Vec::new(),
        }
    }

    /// The whole answer of a non-streaming call.
    pub async fn collect(&self, mut chunks: Metered) -> Result<ChatCompletion, GatewayError> {
        let mut text = String::new();
        let mut finish = None;
        let mut sources = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            text.push_str(&chunk.text);
            sources.extend(chunk.sources.iter().map(SourceJson::from));
            finish = finish_name(chunk.finish_reason);
            if finish.is_some() {
                break;
            }
        }
        let finish = finish.ok_or_else(ended_early)?;
        Ok(ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage { role: "assistant".into(), content: text },
                logprobs: None,
                finish_reason: finish.into(),
            }],
            usage: chunks.usage().into(),
            sources,
        })
    }

    /// The SSE answer of a streaming call: `first` is a chunk already taken
    /// from `chunks` (to answer an early failure with a status), then
    /// keep-alive comments every `keep_alive` while the model is silent.
    pub fn sse(
        self,
        first: Option<GenerateChunk>,
        chunks: Metered,
        include_usage: bool,
        keep_alive: Duration,
    ) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
        let mut pending = VecDeque::new();
        let delta = Delta { role: Some("assistant".into()), content: Some(String::new()) };
        let usage = include_usage.then_some(None);
        pending.push_back(data(&self.chunk(vec![ChunkChoice { index: 0, delta, finish_reason: None }], usage)));
        let pump = super::sse::Pump { pending, ..super::sse::Pump::new(chunks) };
        let mut state = SseState { completion: self, pump, include_usage };
        if let Some(chunk) = first {
            state.on_chunk(chunk);
        }
        Sse::new(super::sse::events(state)).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
    }
}

fn data(chunk: &ChatCompletionChunk) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

fn ended_early() -> GatewayError {
    GatewayError::WorkerFailed { worker: "-".into(), detail: "the generation ended without a finish reason".into() }
}

struct SseState {
    completion: Completion,
    pump: super::sse::Pump,
    include_usage: bool,
}

impl super::sse::Source for SseState {
    fn pump(&mut self) -> &mut super::sse::Pump {
        &mut self.pump
    }

    async fn on(&mut self, next: Option<Result<GenerateChunk, GatewayError>>) {
        match next {
            Some(Ok(chunk)) => self.on_chunk(chunk),
            Some(Err(e)) => self.on_error(&e),
            None => self.on_error(&ended_early()),
        }
    }
}

impl SseState {
    fn on_chunk(&mut self, chunk: GenerateChunk) {
        let c = &self.completion;
        let usage = self.include_usage.then_some(None);
        if !chunk.text.is_empty() || !chunk.sources.is_empty() {
            let delta = Delta { role: None, content: Some(chunk.text) };
            let mut event = c.chunk(vec![ChunkChoice { index: 0, delta, finish_reason: None }], usage);
            event.sources = chunk.sources.iter().map(SourceJson::from).collect();
            self.pump.pending.push_back(data(&event));
        }
        if let Some(finish) = finish_name(chunk.finish_reason) {
            let last = ChunkChoice { index: 0, delta: Delta::default(), finish_reason: Some(finish.into()) };
            self.pump.pending.push_back(data(&c.chunk(vec![last], usage)));
            if self.include_usage {
                self.pump.pending.push_back(data(&c.chunk(Vec::new(), Some(Some(self.pump.chunks.usage().into())))));
            }
            self.pump.pending.push_back(Event::default().data("[DONE]"));
            self.pump.done = true;
        }
    }

    /// After the first byte the status is sent: say what went wrong in an
    /// `error` event and end the stream without `[DONE]`.
    fn on_error(&mut self, e: &GatewayError) {
        tracing::warn!(id = %self.completion.id, error = %e, "generation failed mid-stream");
        let body = json!({ "error": {
            "message": e.to_string(),
            "type": e.problem_type(),
            "code": e.http_status().as_u16(),
        }});
        self.pump.pending.push_back(Event::default().event("error").data(body.to_string()));
        self.pump.done = true;
    }
}
