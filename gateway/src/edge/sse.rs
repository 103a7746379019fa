//! A generation as Server-Sent Events, shared by chat completions and the
//! Responses API: a source turns each chunk of the core's stream (or its
//! end, or its failure) into queued events; [`events`] sends them in order
//! and stops once the source says it is done.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::Event;
use futures::{Stream, StreamExt};

use crate::error::GatewayError;
use crate::proto::GenerateChunk;
use crate::service::generate::Metered;

/// A generation and the events made of it so far.
pub struct Pump {
    pub chunks: Metered,
    /// Events ready to send.
    pub pending: VecDeque<Event>,
    /// No more events once `pending` is empty.
    pub done: bool,
}

impl Pump {
    pub fn new(chunks: Metered) -> Self {
        Self { chunks, pending: VecDeque::new(), done: false }
    }
}

/// What becomes of a generation's chunks.
pub trait Source: Send + 'static {
    fn pump(&mut self) -> &mut Pump;
    /// Queue the events of the next item of the generation: a chunk, a
    /// failure, or `None` when it ended.
    fn on(&mut self, next: Option<Result<GenerateChunk, GatewayError>>) -> impl Future<Output = ()> + Send;
}

/// The events of `source`, in order, until it is done.
pub fn events<S: Source>(source: S) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(source, |mut s| async move {
        loop {
            let pump = s.pump();
            if let Some(event) = pump.pending.pop_front() {
                return Some((Ok(event), s));
            }
            if pump.done {
                return None;
            }
            let next = pump.chunks.next().await;
            s.on(next).await;
        }
    })
}

/// Wait briefly (`within`) for the first chunk, so that a failure before
/// any output is still answered with its status: the chunk, if one came.
pub async fn first(chunks: &mut Metered, within: std::time::Duration) -> Result<Option<GenerateChunk>, GatewayError> {
    match tokio::time::timeout(within, chunks.next()).await {
        Ok(Some(Err(e))) => Err(e),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(None) | Err(_) => Ok(None),
    }
}

/// Headers of an event stream: proxies must pass events on as they come.
pub fn unbuffered(resp: &mut axum::response::Response) {
    let headers = resp.headers_mut();
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
}
