//! Request ids and W3C trace context (`traceparent`).
//!
//! Each request is a span of the caller's trace when it sent a valid
//! `traceparent`, else the root of a new trace. Worker calls carry the
//! gateway's span as their parent, so a worker's log lines join the trace.

use std::fmt;

use tokio::task::futures::TaskLocalFuture;

/// Longest request id accepted from a caller.
pub const MAX_REQUEST_ID: usize = 128;

/// True for an id worth keeping: short, and only characters that read
/// safely in logs, headers and gRPC metadata.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'='))
}

/// The trace context of one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, when this one continues the caller's trace.
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
}

impl TraceContext {
    /// A new span: a child of `parent` (a `traceparent` value) when it is
    /// valid, else the root of a new trace, sampled.
    pub fn child_of(parent: Option<&str>) -> Self {
        let span_id = nonzero_u64();
        match parent.and_then(parse) {
            Some(p) => Self { trace_id: p.trace_id, span_id, parent_span_id: Some(p.span_id), sampled: p.sampled },
            None => Self { trace_id: nonzero_u128(), span_id, parent_span_id: None, sampled: true },
        }
    }

    /// The trace id as 32 hex digits (the form log systems index).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// `version-traceid-parentid-flags`, version 00.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

/// Parse a `traceparent` header by the W3C rules: lowercase hex, ids not
/// all zero, version `ff` invalid; a future version may carry more fields.
fn parse(value: &str) -> Option<TraceContext> {
    let value = value.trim();
    let mut parts = value.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let span_id = u64::from_str_radix(parent, 16).ok().filter(|s| *s != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext { trace_id, span_id, parent_span_id: None, sampled: flags & 1 == 1 })
}

fn nonzero_u64() -> u64 {
    loop {
        let n = fastrand::u64(..);
        if n != 0 {
            return n;
        }
    }
}

fn nonzero_u128() -> u128 {
    (u128::from(nonzero_u64()) << 64) | u128::from(fastrand::u64(..))
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Run `fut` as part of the span `trace`. A plain function, not an `async
/// fn`: that would hold `fut` twice (as its argument and inside the scope),
/// and each wrapped layer doubled a request's future.
pub fn scope<F: Future>(trace: TraceContext, fut: F) -> TaskLocalFuture<TraceContext, F> {
    CURRENT.scope(trace, fut)
}

/// The span of the request being served, when inside a [`scope`].
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|t| *t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let t = TraceContext::child_of(Some(EXAMPLE));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(t.sampled);
        let s = t.to_string();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && s.ends_with("-01") && s.len() == 55, "{s}");
        let unsampled = TraceContext::child_of(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        assert!(!unsampled.sampled);
    }

    #[test]
    fn an_invalid_parent_starts_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = TraceContext::child_of(Some(bad));
            assert_ne!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_ne!(t.trace_id, 0);
            assert!(parse(&t.to_string()).is_some(), "what we send is valid");
        }
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }

    #[test]
    fn request_ids_are_kept_only_when_safe() {
        assert!(valid_request_id("7f0c8a2e-1d2b-4c39-9a57-0b1d1c2e3f40"));
        assert!(valid_request_id("job:42/step.3"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id("a,b"), "a comma would split the batch id list");
        assert!(!valid_request_id(&"x".repeat(MAX_REQUEST_ID + 1)));
    }
}
