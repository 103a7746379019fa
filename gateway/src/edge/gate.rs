//! Admission at the edge: a request's body is read whole, bounded in size
//! (`max_body_bytes`), in time (`body_timeout`, `min_body_rate`) and in the
//! memory all buffered requests take together (`http.max_buffered_bytes`),
//! before it takes one of the listener's in-flight permits. A client that
//! stalls its body therefore holds a connection and a little memory, never
//! a permit that an ordinary client needs. A stream of frames (gRPC
//! `InferStream`) is the exception: its body is read message by message
//! for as long as it lasts, under the core's stream bounds instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use crate::error::GatewayError;
use crate::policy::Caller;
use crate::service::Core;

/// Bytes of request bodies the gateway holds at once, across both listeners.
#[derive(Debug)]
pub struct Buffered {
    held: AtomicUsize,
    max: usize,
}

impl Buffered {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { held: AtomicUsize::new(0), max })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Bytes a request holds in [`Buffered`] until it is dropped.
pub struct Reservation {
    buffered: Arc<Buffered>,
    bytes: usize,
}

impl Reservation {
    fn new(buffered: &Arc<Buffered>) -> Self {
        Self { buffered: buffered.clone(), bytes: 0 }
    }

    /// Hold `total` bytes in all, or refuse at once when that would take
    /// the gateway past its bound.
    fn grow_to(&mut self, total: usize) -> Result<(), GatewayError> {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        let max = self.buffered.max;
        self.buffered
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|after| *after <= max)
            })
            .map_err(|_| GatewayError::MemoryFull { limit: max })?;
        self.bytes = total;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.buffered.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One listener's admission: its in-flight permits, shared by all its
/// routes, and how its bodies are bounded.
pub struct Gate {
    permits: Semaphore,
    limit: usize,
    max_body: usize,
    buffered: Arc<Buffered>,
    /// Asked before a body is read whether the caller's own rate is spent
    /// (`None` where the gate also covers calls that limits never refuse).
    spent: Option<Arc<Core>>,
    /// Renders a refusal in the listener's protocol, with the request id.
    reject: fn(GatewayError, Option<&str>) -> Response,
}

impl Gate {
    pub fn new(
        limit: usize,
        max_body: usize,
        buffered: Arc<Buffered>,
        spent: Option<Arc<Core>>,
        reject: fn(GatewayError, Option<&str>) -> Response,
    ) -> Self {
        Self { permits: Semaphore::new(limit), limit, max_body, buffered, spent, reject }
    }

    /// Put `router` behind the gate. `Router::layer` wraps each route on its
    /// own; the one gate is shared through the middleware's state, so the
    /// in-flight bound is the listener's, not each route's.
    pub fn guard(self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(Arc::new(self), admit))
    }
}

/// Refuse a caller whose own rate is spent, unread; else read the body
/// whole, then take a permit (or be shed at once: 503), and hold both the
/// permit and the body's bytes until the response head.
async fn admit(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let reject = |e| {
        let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok());
        (gate.reject)(e, request_id)
    };
    if let (Some(core), Some(caller)) = (&gate.spent, parts.extensions.get::<Arc<Caller>>())
        && let Err(spent) = core.policy().refuse_spent(caller)
    {
        return reject(spent);
    }
    // A stream of frames is read message by message for as long as it
    // lasts; the core bounds how many are open (`streams.max_open`).
    if super::conn::body::STREAMING_PATHS.contains(&parts.uri.path()) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let mut reservation = Reservation::new(&gate.buffered);
    let bytes = match read_limited(&parts.headers, body, gate.max_body, |n| reservation.grow_to(n)).await {
        Ok(bytes) => bytes,
        Err(e) => return reject(e),
    };
    let Ok(_permit) = gate.permits.try_acquire() else {
        return reject(GatewayError::Overloaded { limit: gate.limit });
    };
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    drop(reservation);
    resp
}

/// Read a body of at most `limit` bytes: 413 when Content-Length says more
/// (before reading) or the body turns out longer (never buffering past the
/// limit); 408 when it comes too slowly (see `conn::body`). `reserve` is
/// told the bytes needed so far (the declared length first) and may refuse.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    mut reserve: impl FnMut(usize) -> Result<(), GatewayError>,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if declared.is_some_and(|n| n > limit) {
        drain(body, DRAIN_MAX_BYTES, Some(DRAIN_MAX_TIME)).await;
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    if let Err(e) = reserve(declared.unwrap_or(0)) {
        // Read and dropped (never held), so the client sees the answer; the
        // body's own deadlines (`conn::body`) bound how long that takes.
        drain(body, limit, None).await;
        return Err(e);
    }
    // A body that comes as one frame (a body already read whole) is kept
    // as it is; only one in pieces is copied together.
    let mut first: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e = e.into_inner();
            match super::conn::body::timed_out(e.as_ref()) {
                Some(t) => GatewayError::BodyTimeout { received: t.received, after: t.after },
                None => GatewayError::invalid("body", format!("cannot read body: {e}")),
            }
        })?;
        let Ok(data) = frame.into_data() else { continue };
        let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if held + data.len() > limit {
            drain(body, DRAIN_MAX_BYTES, Some(DRAIN_MAX_TIME)).await;
            return Err(GatewayError::PayloadTooLarge { limit });
        }
        if let Err(e) = reserve(held + data.len()) {
            drain(body, limit - held, None).await;
            return Err(e);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    buf.reserve(declared.unwrap_or(0).max(earlier.len() + data.len()));
                    buf.extend_from_slice(&earlier);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Most of an oversized body read and dropped before answering 413, and
/// how long that may take. Answering while the client still writes makes it
/// see a broken pipe instead of the answer (no lingering close in hyper). A
/// body refused for memory is drained whole (it is within `max_body_bytes`),
/// for as long as its own deadlines allow: read and dropped, it costs time,
/// not memory.
const DRAIN_MAX_BYTES: usize = 1 << 20;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(1);

/// Read and drop at most `max` bytes of `body`, for at most `max_time`
/// (`None`: the body's own deadlines).
async fn drain(mut body: Body, max: usize, max_time: Option<Duration>) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > max {
                break;
            }
        }
    };
    match max_time {
        Some(t) => {
            let _ = tokio::time::timeout(t, read).await;
        }
        None => read.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_bound_and_give_their_bytes_back() {
        let buffered = Buffered::new(100);
        let mut a = Reservation::new(&buffered);
        a.grow_to(60).unwrap();
        let mut b = Reservation::new(&buffered);
        assert!(matches!(b.grow_to(41), Err(GatewayError::MemoryFull { limit: 100 })));
        b.grow_to(40).unwrap();
        assert_eq!(buffered.held(), 100);
        drop(a);
        assert_eq!(buffered.held(), 40);
        b.grow_to(100).unwrap();
        drop(b);
        assert_eq!(buffered.held(), 0);
    }
}
