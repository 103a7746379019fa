//! Generation through the core: the checks every generation request passes
//! (REST and gRPC alike), the token reservation, the chat cache (exact and
//! semantic), and the metering of a stream as it is consumed.
//!
//! Failure semantics of a stream: before the first chunk the error is the
//! answer and the route may fall back; after it, the stream ends with the
//! error and never with a finish reason it did not get.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};

use super::{Answer, Ask, Core, Served};
use crate::cache::CacheStatus;
use crate::cache::chat::{ChatHit, replay};
use crate::error::GatewayError;
use crate::policy::{Admission, Tokens};
use crate::proto::{FinishReason, GenerateChunk, GenerateRequest, Usage};
use crate::route;
use crate::telemetry::usage::Meter;
use crate::upstream::ChunkStream;

/// Most messages one conversation may carry.
pub const MAX_MESSAGES: usize = 1024;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Largest `max_tokens` accepted.
pub const MAX_TOKENS: u32 = 1 << 20;
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks shared by `POST /v1/chat/completions` and gRPC `Generate`.
pub fn validate(req: &GenerateRequest) -> Result<(), GatewayError> {
    if req.model.is_empty() {
        return Err(GatewayError::invalid("model", "is required"));
    }
    if req.messages.is_empty() {
        return Err(GatewayError::invalid("messages", "must not be empty"));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(GatewayError::invalid("messages", format!("at most {MAX_MESSAGES} messages")));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(GatewayError::invalid(
                format!("messages[{i}].role"),
                format!("must be one of {}, got {:?}", ROLES.join(", "), m.role),
            ));
        }
    }
    if let Some(p) = &req.params {
        if p.has_temperature && !(0.0..=2.0).contains(&p.temperature) {
            return Err(GatewayError::invalid("temperature", "must be between 0 and 2"));
        }
        if p.max_tokens > MAX_TOKENS {
            return Err(GatewayError::invalid("max_tokens", format!("must be at most {MAX_TOKENS}")));
        }
        if p.stop.len() > MAX_STOP {
            return Err(GatewayError::invalid("stop", format!("at most {MAX_STOP} stop strings")));
        }
        if p.stop.iter().any(String::is_empty) {
            return Err(GatewayError::invalid("stop", "stop strings must not be empty"));
        }
    }
    Ok(())
}

/// Tokens a generation may use at most, reserved at admission: the prompt
/// estimate plus `max_tokens`, or the configured default when it sets none
/// (settled with the worker's usage at the end).
pub fn estimate(req: &GenerateRequest) -> Tokens {
    let prompt: u64 = req.messages.iter().map(|m| crate::policy::estimate_tokens(&m.content)).sum();
    let output = req.params.as_ref().map(|p| u64::from(p.max_tokens)).filter(|n| *n > 0);
    Tokens { prompt, output }
}

impl Core {
    /// A generation, as a stream of chunks that settles the caller's
    /// reservation and meters the tokens as it is consumed. Answered from
    /// the chat cache when the call is deterministic (temperature 0, or a
    /// pool listed as deterministic) or semantically close to an earlier
    /// one, and kept there when it completes.
    pub async fn generate(&self, ask: Ask, req: GenerateRequest) -> Result<Answer<Metered>, GatewayError> {
        validate(&req)?;
        let live = self.live();
        let (plan, _) = self.plan(&live, &ask)?;
        let admission = live.policy.admit(&ask.caller, &ask.model, estimate(&req)).await?;
        let first = &plan.targets[0];
        let call = ask.call(req);
        let looked_up = {
            let mut probe = call.clone();
            probe.pool.clone_from(&first.pool);
            probe.model = first.model.to_string();
            live.cache.chat_lookup(&*self.upstream, &probe, &ask.model, first, ask.cache).await
        };
        let keep = match looked_up {
            // A cached answer costs the caller no model tokens.
            Ok((answer, hit)) => {
                let (cache, similarity) = match hit {
                    ChatHit::Exact => (CacheStatus::Hit, None),
                    ChatHit::Semantic(score) => (CacheStatus::SemanticHit, Some(score)),
                };
                let served = Served { target: first.clone(), cache: Some(cache), similarity };
                return Ok(Answer { value: Metered::new(replay(&answer), Admission::default(), None), served });
            }
            Err(keep) => keep,
        };
        // Fallbacks apply until the stream starts, never after.
        let (stream, target) = route::run_stream(&plan, call, |c| self.upstream.generate(c)).await?;
        // Keep the answer only if the variant it was keyed for gave it.
        let same = target.pool == first.pool && target.model == first.model;
        let stream = if same { live.cache.recording(stream, keep) } else { stream };
        let meter = super::meter(&live, &ask, &target);
        Ok(Answer { value: Metered::new(stream, admission, Some(meter)), served: Served::by(target, None) })
    }
}

/// A generation stream holding its admission: the token reservation is
/// settled with the worker's last reported usage when the stream finishes,
/// fails or is dropped — a stream cut short pays for what it produced, and
/// one that produced nothing gives the reservation back.
pub struct Metered {
    inner: ChunkStream,
    admission: Option<Admission>,
    usage: Option<Usage>,
    /// Counts the tokens once settled; `None` for answers no model gave (cache hits).
    meter: Option<Meter>,
}

impl Metered {
    pub fn new(inner: ChunkStream, admission: Admission, meter: Option<Meter>) -> Self {
        Self { inner, admission: Some(admission), usage: None, meter }
    }

    /// Tokens reported so far.
    pub fn usage(&self) -> Usage {
        self.usage.unwrap_or_default()
    }

    fn settle(&mut self) {
        if let (Some(meter), Some(u)) = (self.meter.take(), self.usage) {
            meter.record(u.prompt_tokens.into(), u.completion_tokens.into());
        }
        if let Some(admission) = self.admission.take() {
            match self.usage {
                Some(u) => admission.settle(Some(u64::from(u.prompt_tokens) + u64::from(u.completion_tokens))),
                None => drop(admission),
            }
        }
    }
}

impl Stream for Metered {
    type Item = Result<GenerateChunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        match &next {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(u) = chunk.usage {
                    self.usage = Some(u);
                }
                if chunk.finish_reason != FinishReason::Unspecified as i32 {
                    self.settle();
                }
            }
            Poll::Ready(_) => self.settle(),
            Poll::Pending => {}
        }
        next
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.settle();
    }
}
