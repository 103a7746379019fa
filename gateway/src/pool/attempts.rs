//! One call on a pool: an attempt on a leased worker, bounded by the
//! caller's deadline, judged, and retried where that is safe.

use std::sync::Arc;

use super::admission::{Abandoned, Lease, Pool, missed_deadline};
use super::circuit::Outcome;
use super::retry;
use super::status::from_status;
use super::worker::Worker;
use crate::call::Deadline;
use crate::error::GatewayError;
use crate::telemetry::timing;

impl Pool {
    /// Run `once` on a leased worker; when it fails in a way that may be
    /// retried, try again (the balancer now sees the failure, so usually on
    /// another worker) up to `retry.max` times, after a jittered backoff,
    /// within the deadline and the pool's retry budget. Returns the result
    /// with the lease of the attempt that produced it (a stream holds it).
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        deadline: &Deadline,
        request_id: &str,
        rerun: retry::Rerun,
        once: F,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        self.with_retries_judged(deadline, request_id, rerun, once, Outcome::of).await
    }

    /// [`Pool::with_retries`] where `judge` says what an attempt's result
    /// means for the worker and the circuit (a batch whose every item the
    /// model failed is a failure, though the call itself succeeded).
    pub(super) async fn with_retries_judged<T, F, Fut>(
        &self,
        deadline: &Deadline,
        request_id: &str,
        rerun: retry::Rerun,
        once: F,
        judge: fn(&Result<T, GatewayError>) -> Outcome,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        self.budget.count_request();
        let mut retries = 0;
        loop {
            let queued = std::time::Instant::now();
            let lease = self.lease(deadline).await?;
            timing::with_current(|t| t.add_queue(queued.elapsed()));
            let worker = lease.worker().clone();
            tracing::debug!(request_id, pool = %self.name, worker = %worker.id, "call sent");
            let abandoned =
                Abandoned { pool: self, worker: &worker, deadline, started: tokio::time::Instant::now(), armed: true };
            let result = once(worker.clone()).await;
            abandoned.disarm();
            let took = lease.in_flight.elapsed();
            worker.metrics.call_duration.record(took.as_secs_f64());
            timing::with_current(|t| t.add_worker(took));
            let outcome = match (&result, judge(&result)) {
                (Err(GatewayError::DeadlineExceeded { .. }), Outcome::Failure) => missed_deadline(&worker, took),
                (_, outcome) => outcome,
            };
            self.record(&worker, outcome, took);
            let err = match result {
                Ok(value) => return Ok((value, lease)),
                Err(e) if retries < self.retry.max && self.retry.retryable(&e, rerun) => e,
                Err(e) => return Err(e),
            };
            drop(lease);
            retries += 1;
            let wait = retry::backoff(retries);
            if deadline.remaining() <= wait {
                return Err(err);
            }
            if !self.budget.try_retry(&self.retry) {
                tracing::warn!(request_id, pool = %self.name, worker = %worker.id, error = %err, "not retrying: retry budget spent");
                return Err(err);
            }
            tracing::warn!(request_id, pool = %self.name, worker = %worker.id, retry = retries, error = %err, "retrying");
            metrics::counter!(crate::telemetry::metrics::RETRIES, "pool" => self.name.clone()).increment(1);
            tokio::time::sleep(wait).await;
        }
    }
}

/// Attach the deadline, request id and trace context to a worker call.
pub(super) fn request<T>(msg: T, call_deadline: &Deadline, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(call_deadline.remaining());
    if let Ok(v) = request_id.parse() {
        req.metadata_mut().insert("x-request-id", v);
    }
    if let Some(Ok(v)) = crate::telemetry::trace::current().map(|t| t.to_string().parse()) {
        req.metadata_mut().insert("traceparent", v);
    }
    req
}

/// Await a worker call, bounded by the deadline.
pub(super) async fn bounded<T>(
    deadline: &Deadline,
    worker: &Worker,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, GatewayError> {
    let resp = within(deadline, worker, fut).await?;
    worker.metrics.reported(resp.metadata());
    Ok(resp.into_inner())
}

/// Await one step of a worker call (its answer, or a stream's next
/// message), bounded by the deadline, as the gateway's error.
pub(super) async fn within<T>(
    deadline: &Deadline,
    worker: &Worker,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, GatewayError> {
    match tokio::time::timeout_at(deadline.at, fut).await {
        Err(_) => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
        // tonic's client enforces the propagated timeout too (as CANCELLED):
        // any failure once the deadline has passed is the deadline's doing.
        Ok(Err(_)) if deadline.remaining().is_zero() => Err(GatewayError::DeadlineExceeded { after: deadline.budget }),
        Ok(Err(status)) => Err(from_status(&worker.id, status, deadline)),
        Ok(Ok(value)) => Ok(value),
    }
}
