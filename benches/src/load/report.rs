//! Results of a run: latency percentiles from an HDR histogram, offered vs
//! achieved rate, outcomes by kind; as JSON and as a Markdown table.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// Summarise a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    /// `open` (constant arrival rate) or `closed` (fixed concurrency).
    pub mode: String,
    /// Requests per second scheduled (open loop only).
    pub offered_rps: Option<f64>,
    /// Concurrent clients (closed loop only).
    pub concurrency: Option<usize>,
    /// Successful answers per second in the measured window.
    pub achieved_rps: f64,
    /// Seconds measured (after warm-up).
    pub measured_s: f64,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Outcomes in the measured window: `ok`, HTTP status, `grpc:Code`, `timeout`, `transport`.
    pub outcomes: BTreeMap<String, u64>,
    /// Open loop: sends skipped because the generator already had
    /// `max_in_flight` requests outstanding (the target could not keep up).
    pub dropped: u64,
    /// Latency of successful requests; open loop measures from the scheduled
    /// send time, so queueing in the generator or target is included.
    pub latency_ms: Latency,
}

impl Report {
    /// Share of measured requests that did not succeed (dropped included).
    pub fn error_rate(&self) -> f64 {
        let ok = self.outcomes.get("ok").copied().unwrap_or(0) as f64;
        let total = (self.sent + self.dropped) as f64;
        if total == 0.0 { 0.0 } else { 1.0 - ok / total }
    }
}

/// A Markdown table of reports, one row each.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::from(
        "| label | mode | offered rps | achieved rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in reports {
        let mode = match (r.offered_rps, r.concurrency) {
            (Some(_), _) => "open".to_owned(),
            (None, Some(c)) => format!("closed c={c}"),
            (None, None) => r.mode.clone(),
        };
        let offered = r.offered_rps.map_or("—".to_owned(), |o| format!("{o:.0}"));
        let mut errors: Vec<String> =
            r.outcomes.iter().filter(|(k, _)| *k != "ok").map(|(k, v)| format!("{k}: {v}")).collect();
        if r.dropped > 0 {
            errors.push(format!("dropped: {}", r.dropped));
        }
        let l = &r.latency_ms;
        out.push_str(&format!(
            "| {} | {mode} | {offered} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            r.label,
            r.achieved_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            if errors.is_empty() { "0".to_owned() } else { errors.join(", ") }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }

    #[test]
    fn markdown_lists_errors_and_drops() {
        let r = Report {
            label: "x".into(),
            mode: "open".into(),
            offered_rps: Some(100.0),
            concurrency: None,
            achieved_rps: 90.0,
            measured_s: 1.0,
            sent: 95,
            outcomes: [("ok".to_owned(), 90), ("503".to_owned(), 5)].into(),
            dropped: 5,
            latency_ms: Latency { p50: 1.0, p90: 2.0, p99: 3.0, p999: 4.0, max: 5.0, mean: 1.5 },
        };
        let md = markdown(std::slice::from_ref(&r));
        assert!(md.contains("| x | open | 100 | 90 |"), "{md}");
        assert!(md.contains("503: 5, dropped: 5"), "{md}");
        assert!((r.error_rate() - 0.1).abs() < 1e-9);
    }
}
