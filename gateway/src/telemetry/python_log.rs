//! Log records from Python model code, logged as the gateway's own with
//! their fields: a worker process writes one JSON object per record
//! (`infergate-worker serve --log-format json`), the embedded interpreter
//! hands them over through pyo3. A traceback stays in its record's
//! `traceback` field instead of becoming a record per line.

use serde::Deserialize;

/// One Python log record.
#[derive(Debug, Default, Deserialize)]
pub struct PythonRecord {
    /// Python's level name (`DEBUG` … `CRITICAL`).
    pub level: String,
    #[serde(default)]
    pub logger: String,
    pub message: String,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub model: Option<String>,
    pub traceback: Option<String>,
    /// What the record tells the supervisor: `loaded` (every model of the
    /// worker loaded) or `load_failed` (the worker exits with
    /// [`EXIT_LOAD_FAILED`] next).
    pub event: Option<String>,
}

/// A worker's exit status when its model's `load()` raised.
pub const EXIT_LOAD_FAILED: i32 = 3;

impl PythonRecord {
    /// A JSON record line, or `None` for anything else a worker printed.
    pub fn parse(line: &str) -> Option<Self> {
        line.starts_with('{').then(|| serde_json::from_str(line).ok()).flatten()
    }

    /// Python's level number (`logging.ERROR` = 40) as its name.
    pub fn level_name(levelno: i32) -> &'static str {
        match levelno {
            50.. => "CRITICAL",
            40..50 => "ERROR",
            30..40 => "WARNING",
            20..30 => "INFO",
            _ => "DEBUG",
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self.level.as_str(), "ERROR" | "CRITICAL")
    }

    /// Log it as a record of `worker`'s.
    pub fn log(&self, worker: &str) {
        macro_rules! at {
            ($level:ident) => {
                tracing::$level!(
                    target: "worker",
                    worker,
                    logger = %self.logger,
                    request_id = self.request_id.as_deref(),
                    trace_id = self.trace_id.as_deref(),
                    model = self.model.as_deref(),
                    traceback = self.traceback.as_deref(),
                    "{}",
                    self.message
                )
            };
        }
        match self.level.as_str() {
            "CRITICAL" | "ERROR" => at!(error),
            "WARNING" => at!(warn),
            "INFO" => at!(info),
            _ => at!(debug),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PythonRecord;

    #[test]
    fn json_lines_are_records_and_anything_else_is_not() {
        let r = PythonRecord::parse(
            r#"{"level": "ERROR", "logger": "infergate_worker", "message": "clf failed to load: ValueError: x", "model": "clf", "traceback": "Traceback (most recent call last):\n  File \"m.py\"\nValueError: x"}"#,
        )
        .unwrap();
        assert!(r.is_error());
        assert_eq!(r.model.as_deref(), Some("clf"));
        assert!(r.traceback.unwrap().lines().count() == 3);
        assert!(PythonRecord::parse("Traceback (most recent call last):").is_none());
        assert!(PythonRecord::parse("{not json").is_none());
        assert_eq!(PythonRecord::level_name(40), "ERROR");
        assert_eq!(PythonRecord::level_name(5), "DEBUG");
    }
}
