//! A circuit breaker per pool: closed → open after `failures` consecutive
//! worker failures → half-open after `open_for`, letting `probes` calls
//! through → closed when they all succeed, open again when one fails.
//! While open, calls fail fast (503 with `Retry-After`) or take a fallback.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::components::CircuitConfig;
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `since`: when probing (re)started; probes that never report back
    /// (a call dropped before it reached a worker) are replaced after `open_for`.
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        since: Instant,
    },
}

/// What a finished call tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The pool failed it: a worker error, an unreachable worker, a timeout.
    Failure,
    /// Says nothing about the pool (the client's fault, a cancellation).
    Neutral,
}

impl Outcome {
    pub fn of<T>(result: &Result<T, GatewayError>) -> Self {
        use GatewayError as E;
        match result {
            Ok(_) => Self::Success,
            Err(
                E::WorkerFailed { .. }
                | E::WorkerUnavailable { .. }
                | E::WorkerRefused { .. }
                | E::DeadlineExceeded { .. },
            ) => Self::Failure,
            Err(_) => Self::Neutral,
        }
    }
}

/// The breaker of one pool.
pub struct Circuit {
    pool: String,
    config: CircuitConfig,
    state: Mutex<State>,
}

impl Circuit {
    pub fn new(pool: &str, config: CircuitConfig) -> Self {
        let circuit = Self { pool: pool.to_owned(), config, state: Mutex::new(State::Closed { failures: 0 }) };
        circuit.report(0.0);
        circuit
    }

    /// May a call go to the pool now? Refused while open, and past the probe
    /// count while half-open.
    pub fn admit(&self) -> Result<(), GatewayError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(self.open(until - now)),
            State::Open { .. } => {
                tracing::info!(pool = %self.pool, probes = self.config.probes, "circuit half-open: probing");
                self.report(1.0);
                *state = State::HalfOpen { admitted: 1, succeeded: 0, since: now };
                Ok(())
            }
            State::HalfOpen { admitted, succeeded, since } if admitted < self.config.probes => {
                *state = State::HalfOpen { admitted: admitted + 1, succeeded, since };
                Ok(())
            }
            State::HalfOpen { since, .. } if now.duration_since(since) >= self.config.open_for => {
                *state = State::HalfOpen { admitted: 1, succeeded: 0, since: now };
                Ok(())
            }
            // Probes are out; the next decision comes with their results.
            State::HalfOpen { .. } => Err(self.open(self.config.open_for.min(Duration::from_secs(1)))),
        }
    }

    /// Record how an admitted call ended.
    pub fn record(&self, outcome: Outcome) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let next = match (*state, outcome) {
            (_, Outcome::Neutral) | (State::Open { .. }, _) => return,
            (State::Closed { .. }, Outcome::Success) => State::Closed { failures: 0 },
            (State::Closed { failures }, Outcome::Failure) if failures + 1 >= self.config.failures => {
                tracing::warn!(
                    pool = %self.pool, failures = failures + 1, open_for = ?self.config.open_for,
                    "circuit opened: calls fail fast or fall back"
                );
                self.report(2.0);
                State::Open { until: Instant::now() + self.config.open_for }
            }
            (State::Closed { failures }, Outcome::Failure) => State::Closed { failures: failures + 1 },
            (State::HalfOpen { succeeded, .. }, Outcome::Success) if succeeded + 1 >= self.config.probes => {
                tracing::info!(pool = %self.pool, "circuit closed: probes succeeded");
                self.report(0.0);
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { admitted, succeeded, since }, Outcome::Success) => {
                State::HalfOpen { admitted, succeeded: succeeded + 1, since }
            }
            (State::HalfOpen { .. }, Outcome::Failure) => {
                tracing::warn!(pool = %self.pool, open_for = ?self.config.open_for, "circuit re-opened: a probe failed");
                self.report(2.0);
                State::Open { until: Instant::now() + self.config.open_for }
            }
        };
        *state = next;
    }

    /// The state as a gauge: 0 closed, 1 half-open, 2 open.
    fn report(&self, state: f64) {
        metrics::gauge!(crate::telemetry::metrics::CIRCUIT_STATE, "pool" => self.pool.clone()).set(state);
    }

    fn open(&self, retry_in: Duration) -> GatewayError {
        GatewayError::CircuitOpen { pool: self.pool.clone(), retry_after: retry_in }
    }

    /// `closed`, `open` or `half-open`, for status pages and metrics.
    pub fn state_name(&self) -> &'static str {
        match *self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Circuit {
        Circuit::new("p", CircuitConfig { failures: 3, open_for: Duration::from_secs(5), probes: 2 })
    }

    /// Fail `n` admitted calls in a row.
    fn fail(c: &Circuit, n: usize) {
        for _ in 0..n {
            c.admit().unwrap();
            c.record(Outcome::Failure);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_fails_fast_with_a_retry_time() {
        let c = circuit();
        fail(&c, 2);
        // A success in between resets the count.
        c.admit().unwrap();
        c.record(Outcome::Success);
        fail(&c, 2);
        assert_eq!(c.state_name(), "closed");
        c.admit().unwrap();
        c.record(Outcome::Neutral);
        assert_eq!(c.state_name(), "closed", "client errors say nothing about the pool");
        c.record(Outcome::Failure);
        assert_eq!(c.state_name(), "open");
        let err = c.admit().unwrap_err();
        assert!(matches!(err, GatewayError::CircuitOpen { .. }));
        assert_eq!(err.retry_after(), Some(5));
        assert_eq!(err.http_status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_the_probes_through_and_closes_when_they_succeed() {
        let c = circuit();
        fail(&c, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        c.admit().unwrap();
        c.admit().unwrap();
        assert_eq!(c.state_name(), "half-open");
        assert!(c.admit().is_err(), "only the probes go through");
        c.record(Outcome::Success);
        assert_eq!(c.state_name(), "half-open");
        c.record(Outcome::Success);
        assert_eq!(c.state_name(), "closed");
        c.admit().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn probes_that_never_report_are_replaced() {
        let c = circuit();
        fail(&c, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        c.admit().unwrap();
        c.admit().unwrap();
        assert!(c.admit().is_err());
        // Both probes were dropped before reaching a worker: no record.
        tokio::time::advance(Duration::from_secs(5)).await;
        c.admit().unwrap();
        assert_eq!(c.state_name(), "half-open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let c = circuit();
        fail(&c, 3);
        tokio::time::advance(Duration::from_secs(6)).await;
        c.admit().unwrap();
        c.record(Outcome::Failure);
        assert_eq!(c.state_name(), "open");
        assert!(c.admit().is_err());
    }
}
