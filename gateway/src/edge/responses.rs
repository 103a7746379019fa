//! The OpenAI Responses API (`POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`) over the core's generation, as chat completions
//! are: the checks, limits, token accounting, routing, cache and metering
//! are the core's. What is its own: input items become the conversation's
//! turns (after those of `previous_response_id`, which is looked up for the
//! caller's tenant only), the answer is a `response` object or its stream of
//! typed events, and a stored response is kept in [`crate::conversations`].
//!
//! Before the first chunk an error is the response (an HTTP status); after
//! it, the stream ends with `response.failed` and never with a completion it
//! did not get.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::conversations::{Conversations, Stored, Turn};
use crate::error::GatewayError;
use crate::proto::{ChatMessage, FinishReason, GenerateChunk, GenerateRequest, GenerationParams, Usage};
use crate::service::generate::{MAX_MESSAGES, MAX_TOKENS, Metered};

/// Most metadata pairs, and the longest key and value, as OpenAI allows.
const MAX_METADATA: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

/// `POST /v1/responses` body (fields the gateway does not use are ignored,
/// as OpenAI-compatible servers do).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ResponseRequest {
    #[schema(min_length = 1)]
    pub model: String,
    /// A string (one user message), or a list of message items
    /// (`{"role": ..., "content": string or [{"type": "input_text", "text": ...}]}`).
    #[schema(value_type = Object)]
    pub input: Value,
    /// A system message put before the conversation (not carried over to a
    /// continuation).
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Up to 16 pairs, kept with the response.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    pub stream: bool,
    /// Keep the response for `previous_response_id` and `GET` (default true).
    #[serde(default)]
    pub store: Option<bool>,
    /// Continue the conversation of this stored response.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `DELETE /v1/responses/{id}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ResponseDeleted {
    pub id: String,
    /// Always `response.deleted`.
    pub object: String,
    pub deleted: bool,
}

/// The `response` object (see OpenAI's Responses API), as JSON.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only: the object is built as JSON")]
pub struct ResponseObject {
    id: String,
    /// Always `response`.
    object: String,
    created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    status: String,
    model: String,
    #[schema(value_type = Vec<Object>)]
    output: Vec<Value>,
    #[schema(value_type = Object)]
    usage: Value,
    previous_response_id: Option<String>,
}

impl ResponseRequest {
    /// The turns of this request's input.
    fn turns(&self) -> Result<Vec<Turn>, GatewayError> {
        match &self.input {
            Value::String(s) => Ok(vec![Turn { role: "user".into(), content: s.clone() }]),
            Value::Array(items) => items.iter().enumerate().map(|(i, item)| turn(item, i)).collect(),
            _ => Err(GatewayError::invalid("input", "must be a string or a list of message items")),
        }
    }

    fn check(&self) -> Result<(), GatewayError> {
        if let Some(m) = &self.metadata {
            if m.len() > MAX_METADATA {
                return Err(GatewayError::invalid("metadata", format!("at most {MAX_METADATA} pairs")));
            }
            if let Some((k, _)) = m.iter().find(|(k, v)| k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE) {
                return Err(GatewayError::invalid(
                    format!("metadata.{k}"),
                    format!("keys are at most {MAX_METADATA_KEY} characters, values {MAX_METADATA_VALUE}"),
                ));
            }
        }
        Ok(())
    }

    fn max_tokens(&self) -> Result<u32, GatewayError> {
        match self.max_output_tokens {
            None => Ok(0),
            Some(n) if n < 1 => Err(GatewayError::invalid("max_output_tokens", "must be at least 1")),
            Some(n) => Ok(u32::try_from(n).unwrap_or(u32::MAX).min(MAX_TOKENS)),
        }
    }
}

/// One input item: a message with a role and text content.
fn turn(item: &Value, i: usize) -> Result<Turn, GatewayError> {
    let field = |f: &str| format!("input[{i}]{f}");
    if let Some(kind) = item.get("type").and_then(Value::as_str)
        && kind != "message"
    {
        return Err(GatewayError::invalid(field(".type"), format!("{kind:?} items are not supported; send messages")));
    }
    let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
    if !matches!(role, "user" | "assistant" | "system" | "developer") {
        return Err(GatewayError::invalid(field(".role"), "must be user, assistant, system or developer"));
    }
    let content = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("input_text" | "output_text" | "text"), Some(t)) => Ok(t),
                _ => Err(GatewayError::invalid(
                    field(&format!(".content[{j}]")),
                    "only text parts ({\"type\": \"input_text\", \"text\": ...}) are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .concat(),
        _ => return Err(GatewayError::invalid(field(".content"), "must be a string or a list of text parts")),
    };
    Ok(Turn { role: role.to_owned(), content })
}

/// One response being made: its identity, what it was asked, and the
/// conversation it continues.
pub struct Making {
    id: String,
    item_id: String,
    created_at: u64,
    model: String,
    request: ResponseRequest,
    /// The conversation before the answer (previous turns, then the input).
    turns: Vec<Turn>,
    tenant: Arc<str>,
}

impl Making {
    /// Check `request` and gather its conversation: the stored turns of
    /// `previous_response_id` (of `tenant`'s responses only), then its input.
    pub async fn new(
        request: ResponseRequest,
        store: &Conversations,
        tenant: Arc<str>,
    ) -> Result<(Self, GenerateRequest), GatewayError> {
        request.check()?;
        let mut turns = match &request.previous_response_id {
            None => Vec::new(),
            Some(prev) => {
                let stored = store.get(&tenant, prev).await.map_err(unavailable)?;
                stored.ok_or_else(|| GatewayError::ResponseNotFound { id: prev.clone() })?.turns
            }
        };
        turns.extend(request.turns()?);
        if turns.len() >= MAX_MESSAGES {
            return Err(GatewayError::invalid("input", format!("a conversation holds at most {MAX_MESSAGES} turns")));
        }
        let mut messages: Vec<ChatMessage> = Vec::with_capacity(turns.len() + 1);
        if let Some(instructions) = &request.instructions {
            messages.push(ChatMessage { role: "system".into(), content: instructions.clone() });
        }
        messages.extend(turns.iter().map(|t| ChatMessage { role: t.role.clone(), content: t.content.clone() }));
        let generate = GenerateRequest {
            model: request.model.clone(),
            messages,
            params: Some(GenerationParams {
                temperature: request.temperature.unwrap_or(0.0),
                has_temperature: request.temperature.is_some(),
                max_tokens: request.max_tokens()?,
                ..Default::default()
            }),
            user: request.user.clone().unwrap_or_default(),
        };
        let created_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let making = Self {
            id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
            item_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            created_at,
            model: request.model.clone(),
            request,
            turns,
            tenant,
        };
        Ok((making, generate))
    }

    pub fn streams(&self) -> bool {
        self.request.stream
    }

    /// The output message item with `text` so far.
    fn item(&self, text: Option<&str>, status: &str) -> Value {
        let content = text.map_or_else(Vec::new, |t| vec![part(t)]);
        json!({"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content})
    }

    /// The response object: `status`, its `output`, `usage` and the rest.
    fn object(&self, status: &str, output: Vec<Value>, usage: Option<Usage>, end: Option<End>) -> Value {
        let usage = usage.map(|u| {
            json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            })
        });
        let (error, incomplete) = match end {
            Some(End::Failed(e)) => (json!({"code": "server_error", "message": e}), Value::Null),
            Some(End::Length) => (Value::Null, json!({"reason": "max_output_tokens"})),
            _ => (Value::Null, Value::Null),
        };
        let r = &self.request;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": false,
            "previous_response_id": r.previous_response_id,
            "store": r.store.unwrap_or(true),
            "temperature": r.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": null,
            "truncation": "disabled",
            "usage": usage,
            "user": r.user,
            "metadata": r.metadata.clone().unwrap_or_default(),
        })
    }

    /// The finished response for `text` and how the model ended.
    fn finished(&self, text: &str, usage: Usage, end: End) -> Value {
        let status = if matches!(end, End::Length) { "incomplete" } else { "completed" };
        self.object(status, vec![self.item(Some(text), status)], Some(usage), Some(end))
    }

    /// Keep the finished `response` with its conversation, unless the
    /// request said `store: false`. A store that fails loses the
    /// continuation, not the answer: logged.
    async fn keep(&self, store: &Conversations, response: &Value, text: &str) {
        if !self.request.store.unwrap_or(true) {
            return;
        }
        let mut turns = self.turns.clone();
        turns.push(Turn { role: "assistant".into(), content: text.to_owned() });
        let stored = Stored { response: response.clone(), turns };
        if let Err(e) = store.put(&self.tenant, &self.id, &stored).await {
            tracing::warn!(id = %self.id, error = %e, "response not stored: previous_response_id will not find it");
        }
    }

    /// The whole answer of a non-streaming call, stored.
    pub async fn collect(self, mut chunks: Metered, store: &Conversations) -> Result<Value, GatewayError> {
        let mut text = String::new();
        let mut end = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            text.push_str(&chunk.text);
            end = End::of(chunk.finish_reason);
            if end.is_some() {
                break;
            }
        }
        let end = end.ok_or_else(ended_early)?;
        let response = self.finished(&text, chunks.usage(), end);
        self.keep(store, &response, &text).await;
        Ok(response)
    }

    /// The event stream of a streaming call: `first` is a chunk already
    /// taken from `chunks` (to answer an early failure with a status), then
    /// keep-alive comments every `keep_alive` while the model is silent.
    pub fn sse(
        self,
        first: Option<GenerateChunk>,
        chunks: Metered,
        store: Arc<Conversations>,
        keep_alive: Duration,
    ) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
        let mut state =
            SseState { making: self, pump: super::sse::Pump::new(chunks), store, seq: 0, text: String::new() };
        let created = state.making.object("in_progress", Vec::new(), None, None);
        state.emit("response.created", json!({"response": created}));
        let in_progress = state.making.object("in_progress", Vec::new(), None, None);
        state.emit("response.in_progress", json!({"response": in_progress}));
        let item = state.making.item(None, "in_progress");
        state.emit("response.output_item.added", json!({"output_index": 0, "item": item}));
        let part = part("");
        state.emit("response.content_part.added", state.at(json!({"part": part})));
        if let Some(chunk) = first {
            state.on_chunk(chunk);
        }
        Sse::new(super::sse::events(state)).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
    }
}

/// How a generation ended.
enum End {
    Stop,
    Length,
    Failed(String),
}

impl End {
    fn of(reason: i32) -> Option<Self> {
        match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
            FinishReason::Unspecified => None,
            FinishReason::Stop => Some(Self::Stop),
            FinishReason::Length => Some(Self::Length),
        }
    }
}

fn part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

fn ended_early() -> GatewayError {
    GatewayError::WorkerFailed { worker: "-".into(), detail: "the generation ended without a finish reason".into() }
}

pub(super) fn unavailable(e: crate::conversations::Unavailable) -> GatewayError {
    GatewayError::StoreUnavailable { detail: e.to_string() }
}

struct SseState {
    making: Making,
    pump: super::sse::Pump,
    store: Arc<Conversations>,
    /// The next event's `sequence_number`.
    seq: u64,
    text: String,
}

impl super::sse::Source for SseState {
    fn pump(&mut self) -> &mut super::sse::Pump {
        &mut self.pump
    }

    async fn on(&mut self, next: Option<Result<GenerateChunk, GatewayError>>) {
        match next {
            Some(Ok(chunk)) => {
                if let Some(end) = self.on_chunk(chunk) {
                    self.complete(end).await;
                }
            }
            Some(Err(e)) => self.fail(&e),
            None => self.fail(&ended_early()),
        }
    }
}

impl SseState {
    /// Queue an event of `kind` with `fields`, numbered.
    fn emit(&mut self, kind: &str, mut fields: Value) {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.pump.pending.push_back(Event::default().event(kind).data(fields.to_string()));
    }

    /// `fields` with where in the output they are (the one message's one part).
    fn at(&self, mut fields: Value) -> Value {
        fields["item_id"] = json!(self.making.item_id);
        fields["output_index"] = json!(0);
        fields["content_index"] = json!(0);
        fields
    }

    /// Queue the chunk's text; how the generation ended, if it did.
    fn on_chunk(&mut self, chunk: GenerateChunk) -> Option<End> {
        if !chunk.text.is_empty() {
            self.text.push_str(&chunk.text);
            let delta = self.at(json!({"delta": chunk.text, "logprobs": []}));
            self.emit("response.output_text.delta", delta);
        }
        End::of(chunk.finish_reason)
    }

    /// The closing events of a finished generation, after it is stored.
    async fn complete(&mut self, end: End) {
        let text = std::mem::take(&mut self.text);
        let status = if matches!(end, End::Length) { "incomplete" } else { "completed" };
        let done = self.at(json!({"text": text, "logprobs": []}));
        self.emit("response.output_text.done", done);
        let part = self.at(json!({"part": part(&text)}));
        self.emit("response.content_part.done", part);
        let item = self.making.item(Some(&text), status);
        self.emit("response.output_item.done", json!({"output_index": 0, "item": item}));
        let response = self.making.finished(&text, self.pump.chunks.usage(), end);
        self.making.keep(&self.store, &response, &text).await;
        let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
        self.emit(kind, json!({"response": response}));
        self.pump.done = true;
    }

    /// After the first byte the status is sent: say what went wrong in a
    /// `response.failed` event and end the stream.
    fn fail(&mut self, e: &GatewayError) {
        tracing::warn!(id = %self.making.id, error = %e, "response failed mid-stream");
        let text = std::mem::take(&mut self.text);
        let output = if text.is_empty() { Vec::new() } else { vec![self.making.item(Some(&text), "incomplete")] };
        let failed = self.making.object("failed", output, None, Some(End::Failed(e.to_string())));
        self.emit("response.failed", json!({"response": failed}));
        self.pump.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponseRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn input_is_a_string_or_message_items_of_text() {
        let r = request(json!({"model": "m", "input": "hi"}));
        assert_eq!(r.turns().unwrap(), vec![Turn { role: "user".into(), content: "hi".into() }]);
        let items = json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
        ]);
        let turns = request(json!({"model": "m", "input": items})).turns().unwrap();
        let got: Vec<_> = turns.iter().map(|t| (t.role.as_str(), t.content.as_str())).collect();
        assert_eq!(got, [("developer", "be brief"), ("user", "ab"), ("assistant", "c")]);
        let field =
            |input: Value| request(json!({"model": "m", "input": input})).turns().unwrap_err().problem(None).field;
        assert_eq!(field(json!([{"type": "function_call", "name": "f"}])).as_deref(), Some("input[0].type"));
        assert_eq!(field(json!([{"role": "robot", "content": "x"}])).as_deref(), Some("input[0].role"));
        let image = json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]);
        assert_eq!(field(image).as_deref(), Some("input[0].content[0]"));
        assert_eq!(field(json!(7)).as_deref(), Some("input"));
    }

    #[test]
    fn metadata_and_output_caps_are_bounded() {
        let many: HashMap<String, String> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        let e = request(json!({"model": "m", "input": "x", "metadata": many})).check().unwrap_err();
        assert_eq!(e.problem(None).field.as_deref(), Some("metadata"));
        let long = request(json!({"model": "m", "input": "x", "metadata": {"k": "v".repeat(513)}}));
        assert_eq!(long.check().unwrap_err().problem(None).field.as_deref(), Some("metadata.k"));
        let zero = request(json!({"model": "m", "input": "x", "max_output_tokens": 0}));
        assert_eq!(zero.max_tokens().unwrap_err().problem(None).field.as_deref(), Some("max_output_tokens"));
        assert_eq!(request(json!({"model": "m", "input": "x", "max_output_tokens": 5})).max_tokens().unwrap(), 5);
    }
}
