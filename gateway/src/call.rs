//! The one typed value that crosses layers: a model call with its deadline
//! and its caller.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitSpec;

/// A request for `model` carrying `payload`, bounded by `deadline`.
#[derive(Debug, Clone)]
pub struct Call<P> {
    pub model: String,
    pub payload: P,
    pub deadline: Deadline,
    /// Travels to the worker as `x-request-id` metadata.
    pub request_id: String,
    /// Who asked (never their secret).
    pub caller: Arc<Caller>,
    /// The pool a route variant chose; `None`: the pool serving `model`.
    pub pool: Option<Arc<str>>,
    /// Whether a client waits for it, or it came from the queue.
    pub class: Class,
}

/// Who waits for a call: a client now, or nobody (queued work, which a
/// pool runs only in the room interactive calls leave).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Class {
    #[default]
    Interactive,
    Queued,
}

impl<P> Call<P> {
    /// The same call (model, deadline, caller, pool) carrying another payload.
    pub fn with_payload<Q>(&self, payload: Q) -> Call<Q> {
        Call {
            model: self.model.clone(),
            payload,
            deadline: self.deadline,
            request_id: self.request_id.clone(),
            caller: self.caller.clone(),
            pool: self.pool.clone(),
            class: self.class,
        }
    }
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An API key, by its id.
    Key(Arc<str>),
    /// A JWT subject.
    User(Arc<str>),
    /// No credentials (auth off): limited by client address.
    Anonymous,
}

/// The resolved caller; travels with the request (never the secret).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub tenant: Arc<str>,
    pub tier: Arc<str>,
    /// The client address (the peer, or `X-Forwarded-For` from a trusted proxy).
    pub client: IpAddr,
    /// Models this caller may use; `None`: all.
    pub models: Option<Arc<HashSet<String>>>,
    /// The key's own limits, replacing `[limits.per_key]`.
    pub limits: Option<LimitSpec>,
}

/// Tenant of callers without credentials.
pub const ANONYMOUS_TENANT: &str = "anonymous";

impl Caller {
    pub fn anonymous(client: IpAddr) -> Self {
        Self {
            principal: Principal::Anonymous,
            tenant: ANONYMOUS_TENANT.into(),
            tier: crate::config::policy::DEFAULT_TIER.into(),
            client,
            models: None,
            limits: None,
        }
    }

    /// The per-key limit state key: the key id, the JWT subject, or the address.
    pub fn limit_key(&self) -> String {
        match &self.principal {
            Principal::Key(id) => format!("key:{id}"),
            Principal::User(sub) => format!("user:{}:{sub}", self.tenant),
            Principal::Anonymous => format!("addr:{}", self.client),
        }
    }

    /// For logs: the key id, `user:<sub>`, or `anonymous`.
    pub fn id(&self) -> String {
        match &self.principal {
            Principal::Key(id) => id.to_string(),
            Principal::User(sub) => format!("user:{sub}"),
            Principal::Anonymous => "anonymous".to_owned(),
        }
    }
}

/// When a call must be answered by, and the budget it was given.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    /// The default budget, lowered (never raised) by what the client asked for.
    pub fn from_request(default: Duration, requested: Option<Duration>) -> Self {
        Self::after(requested.map_or(default, |r| r.min(default)))
    }

    /// Time left, zero when past.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// Parse a gRPC `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Parse an `X-Request-Timeout` header: `2.5` (seconds) or a duration like
/// `500ms`, the syntax of the config file; the error says what was wrong.
pub fn parse_request_timeout(value: &str) -> Result<Duration, String> {
    crate::config::parse_duration(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }

    #[test]
    fn request_timeouts_parse() {
        assert_eq!(parse_request_timeout("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_request_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_request_timeout(" 2 "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_request_timeout("0").unwrap_err(), "\"0\": must be above zero");
        assert_eq!(parse_request_timeout("0ms").unwrap_err(), "\"0ms\": must be above zero");
        assert_eq!(parse_request_timeout("-1").unwrap_err(), "\"-1\": must be above zero");
        assert!(parse_request_timeout("soon").unwrap_err().contains("seconds (2.5) or with a unit (250ms, 30s, 1m)"));
    }

    #[test]
    fn a_client_may_only_lower_the_deadline() {
        let d = Deadline::from_request(Duration::from_secs(30), Some(Duration::from_secs(90)));
        assert_eq!(d.budget, Duration::from_secs(30));
        let d = Deadline::from_request(Duration::from_secs(30), Some(Duration::from_secs(2)));
        assert_eq!(d.budget, Duration::from_secs(2));
    }
}
