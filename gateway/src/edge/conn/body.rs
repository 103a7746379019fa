//! A request body with a deadline and a rate floor: a client that sends its
//! head and then stalls or trickles its body cannot hold a request slot.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::watch::ConnState;

/// Routes whose request body is a stream of messages that lasts as long as
/// the call (gRPC `InferStream`): not read whole, not under the body
/// deadlines, bounded instead by the stream's own idle timeout and
/// duration (`[streams]`) and by HTTP/2 flow control.
pub const STREAMING_PATHS: [&str; 1] = ["/infergate.v1.Inference/InferStream"];

/// The rate floor applies after this much of the body's time.
pub const MIN_RATE_AFTER: Duration = Duration::from_secs(5);

/// How long a body may take, and how slowly it may come.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub timeout: Duration,
    /// Bytes a second, after [`MIN_RATE_AFTER`]; 0: no floor.
    pub min_rate: u64,
}

impl BodyLimits {
    /// No deadline and no floor (a body of [`STREAMING_PATHS`]).
    pub const UNBOUNDED: Self = Self { timeout: Duration::MAX, min_rate: 0 };
}

/// The error a stalled body ends with. Its source is the gRPC status the
/// gRPC edge answers with (tonic looks for one in the chain).
#[derive(Debug, thiserror::Error)]
#[error("request body too slow: {received} bytes in {}", humantime::format_duration(*.after))]
pub struct BodyTimedOut {
    pub received: u64,
    pub after: Duration,
    #[source]
    status: tonic::Status,
}

/// `B` with [`BodyLimits`]; when they are broken the body ends with
/// [`BodyTimedOut`] and the connection is closed once its answer is sent.
pub struct TimedBody<B> {
    inner: B,
    limits: BodyLimits,
    started: Instant,
    received: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    conn: Arc<ConnState>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, limits: BodyLimits, conn: Arc<ConnState>) -> Self {
        Self { inner, limits, started: Instant::now(), received: 0, sleep: None, conn }
    }

    /// When the body is late given what has arrived so far.
    fn deadline(&self) -> Instant {
        let by_rate = match self.limits.min_rate {
            0 => self.limits.timeout,
            rate => Duration::from_secs_f64(self.received as f64 / rate as f64).max(MIN_RATE_AFTER),
        };
        self.started + by_rate.min(self.limits.timeout)
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.limits.timeout == Duration::MAX => Poll::Pending,
            Poll::Pending => {
                let deadline = this.deadline();
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let after = this.started.elapsed();
                this.conn.doom();
                let message =
                    format!("request body too slow: {} bytes in {}", this.received, humantime::format_duration(after));
                Poll::Ready(Some(Err(Box::new(BodyTimedOut {
                    received: this.received,
                    after,
                    status: tonic::Status::deadline_exceeded(message),
                }))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyTimedOut`] behind a body read error, if that is what it was.
pub fn timed_out<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimedOut> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(t) = e.downcast_ref::<BodyTimedOut>() {
            return Some(t);
        }
        source = e.source();
    }
    None
}
