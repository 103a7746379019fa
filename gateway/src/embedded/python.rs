//! The interpreter inside the gateway: started once, pointed at the
//! configured Python environment, its logging sent to the gateway's log;
//! and one [`Host`] per embedded pool (`infergate_worker.embedded.Host`).
//!
//! Every call into Python holds the GIL only for its own duration and runs
//! on a blocking thread, never on the async runtime's workers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::proto::{EmbedResult, Embedding, ItemError, embed_result};

static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

/// The site-packages of the environment whose interpreter is `python`
/// (`.venv/bin/python` → `.venv/lib/python3.X/site-packages`), for the
/// embedded interpreter's version.
fn site_packages(python: &Path, version: (u8, u8)) -> Result<PathBuf, String> {
    let env = python
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in an environment", python.display()))?;
    let dir = env.join("lib").join(format!("python{}.{}", version.0, version.1)).join("site-packages");
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!(
            "{} has no site-packages for Python {}.{} ({} missing): the gateway embeds Python {}.{}; \
             point workers.python at an environment of that version",
            env.display(),
            version.0,
            version.1,
            dir.display(),
            version.0,
            version.1
        ))
    }
}

/// Start the interpreter (once) with `python`'s environment on its path and
/// its log records forwarded to the gateway's log.
pub fn start(python: &Path) -> Result<(), String> {
    STARTED
        .get_or_init(|| {
            Python::attach(|py| -> Result<(), String> {
                let version = py.version_info();
                let dir = site_packages(python, (version.major, version.minor))?;
                let site = py.import("site").map_err(|e| e.to_string())?;
                // addsitedir also reads the .pth files editable installs use.
                site.call_method1("addsitedir", (dir.display().to_string(),)).map_err(|e| e.to_string())?;
                let embedded = py.import("infergate_worker.embedded").map_err(|e| describe(py, &e))?;
                let sink = wrap_pyfunction!(emit, py).map_err(|e| e.to_string())?;
                embedded.call_method1("install", (sink,)).map_err(|e| describe(py, &e))?;
                tracing::info!(python = %Python::version_str().lines().next().unwrap_or_default(), site_packages = %dir.display(), "embedded Python started");
                Ok(())
            })
        })
        .clone()
}

/// A Python log record, logged as a worker process's are, with its fields.
#[pyfunction]
#[pyo3(signature = (level, logger, message, request_id=None, trace_id=None, model=None, traceback=None))]
fn emit(
    level: i32,
    logger: String,
    message: String,
    request_id: Option<String>,
    trace_id: Option<String>,
    model: Option<String>,
    traceback: Option<String>,
) {
    let level = crate::telemetry::python_log::PythonRecord::level_name(level).to_owned();
    let record = crate::telemetry::python_log::PythonRecord {
        level,
        logger,
        message,
        request_id,
        trace_id,
        model,
        traceback,
        event: None,
    };
    record.log("embedded");
}

/// An exception as text, with its traceback when it has one.
pub fn describe(py: Python<'_>, err: &PyErr) -> String {
    let traceback = err.traceback(py).and_then(|tb| tb.format().ok()).unwrap_or_default();
    format!("{traceback}{err}")
}

/// How a call into the model ended, short of a result.
pub enum Failure {
    /// The servicer ended the call with a gRPC status (deadline, cancelled,
    /// overloaded, not found ...).
    Status(tonic::Code, String),
    /// Python raised; the text has the traceback.
    Raised(String),
}

impl Failure {
    fn of(py: Python<'_>, err: &PyErr) -> Self {
        let value = err.value(py);
        if let (Ok(code), Ok(details)) = (value.getattr("code"), value.getattr("details"))
            && let (Ok(code), Ok(details)) = (code.extract::<i32>(), details.extract::<String>())
            && value.get_type().name().is_ok_and(|n| n == "Aborted")
        {
            return Self::Status(tonic::Code::from(code), details);
        }
        Self::Raised(describe(py, err))
    }
}

/// A serialized reply and the trailing metadata the servicer set.
pub type Reply = (Vec<u8>, Vec<(String, String)>);

/// Embedding results and the trailing metadata the servicer set.
pub type Embedded = (Vec<EmbedResult>, Vec<(String, String)>);

/// One embedded model (`infergate_worker.embedded.Host`).
pub struct Host {
    obj: Py<PyAny>,
}

/// One call's context on the Python side (`infergate_worker.embedded.Call`).
pub struct CallCtx {
    obj: Py<PyAny>,
}

impl Host {
    /// Import `spec` (`module:Class`) and instantiate it; not loaded yet.
    pub fn new(spec: &str) -> Result<Self, String> {
        Python::attach(|py| {
            let embedded = py.import("infergate_worker.embedded").map_err(|e| describe(py, &e))?;
            let obj = embedded.getattr("Host").and_then(|h| h.call1((spec,))).map_err(|e| describe(py, &e))?;
            Ok(Self { obj: obj.unbind() })
        })
    }

    /// Run the model's `load()` (blocking: call from a blocking thread).
    pub fn load(&self) -> Result<(), String> {
        Python::attach(|py| self.obj.bind(py).call_method0("load").map(drop).map_err(|e| describe(py, &e)))
    }

    /// The serialized `DescribeResponse`.
    pub fn describe(&self) -> Result<Vec<u8>, Failure> {
        Python::attach(|py| {
            let out = self.obj.bind(py).call_method0("describe").map_err(|e| Failure::of(py, &e))?;
            out.extract::<Vec<u8>>().map_err(|e| Failure::of(py, &e))
        })
    }

    /// A context for one call.
    pub fn context(&self, request_id: &str, traceparent: &str, timeout: Option<f64>) -> Result<CallCtx, Failure> {
        Python::attach(|py| {
            let embedded = py.import("infergate_worker.embedded").map_err(|e| Failure::of(py, &e))?;
            let obj = embedded
                .getattr("Call")
                .and_then(|c| c.call1((request_id, traceparent, timeout)))
                .map_err(|e| Failure::of(py, &e))?;
            Ok(CallCtx { obj: obj.unbind() })
        })
    }

    /// Run `Infer` on a serialized request; the serialized reply and the
    /// trailers the servicer set (blocking).
    pub fn infer(&self, request: &[u8], ctx: &CallCtx) -> Result<Reply, Failure> {
        Python::attach(|py| {
            let request = PyBytes::new(py, request);
            let reply = self
                .obj
                .bind(py)
                .call_method1("infer", (request, ctx.obj.bind(py)))
                .map_err(|e| Failure::of(py, &e))?;
            let reply = reply.extract::<Vec<u8>>().map_err(|e| Failure::of(py, &e))?;
            Ok((reply, ctx.trailers_in(py)))
        })
    }

    /// Embed `texts` with `model` without serializing: the texts go in as a
    /// Python list, each vector comes back through the buffer protocol (one
    /// copy, into the result) — plus the trailers the servicer set (blocking).
    pub fn embed(&self, model: &str, texts: &[String], ctx: &CallCtx) -> Result<Embedded, Failure> {
        Python::attach(|py| {
            let fail = |e: PyErr| Failure::of(py, &e);
            let texts = PyList::new(py, texts).map_err(fail)?;
            let rows = self.obj.bind(py).call_method1("embed", (model, texts, ctx.obj.bind(py))).map_err(fail)?;
            let mut results = Vec::new();
            for row in rows.try_iter().map_err(fail)? {
                let (item, tokens): (Bound<'_, PyAny>, u32) = row.and_then(|r| r.extract()).map_err(fail)?;
                let result = if let Ok((code, message)) = item.extract::<(i32, String)>() {
                    embed_result::Result::Error(ItemError { code, message })
                } else if let Ok(buffer) = PyBuffer::<f32>::get(&item) {
                    embed_result::Result::Embedding(Embedding { values: buffer.to_vec(py).map_err(fail)? })
                } else {
                    embed_result::Result::Embedding(Embedding { values: item.extract::<Vec<f32>>().map_err(fail)? })
                };
                results.push(EmbedResult { tokens, result: Some(result) });
            }
            Ok((results, ctx.trailers_in(py)))
        })
    }

    /// Start `Generate`: an iterator of serialized chunks.
    pub fn generate(&self, request: &[u8], ctx: &CallCtx) -> Result<Chunks, Failure> {
        Python::attach(|py| {
            let request = PyBytes::new(py, request);
            let it = self
                .obj
                .bind(py)
                .call_method1("generate", (request, ctx.obj.bind(py)))
                .map_err(|e| Failure::of(py, &e))?;
            Ok(Chunks { it: it.unbind() })
        })
    }
}

impl CallCtx {
    /// The caller left or its deadline passed: model code sees it.
    pub fn cancel(&self) {
        Python::attach(|py| {
            let _ = self.obj.bind(py).call_method0("cancel");
        });
    }

    /// The trailing metadata the servicer set (blocking).
    pub fn trailers(&self) -> Vec<(String, String)> {
        Python::attach(|py| self.trailers_in(py))
    }

    fn trailers_in(&self, py: Python<'_>) -> Vec<(String, String)> {
        self.obj.bind(py).getattr("trailers").and_then(|t| t.extract()).unwrap_or_default()
    }
}

/// A generation in progress.
pub struct Chunks {
    it: Py<PyAny>,
}

impl Chunks {
    /// The next serialized chunk; `None` at the end (blocking).
    pub fn next(&self) -> Result<Option<Vec<u8>>, Failure> {
        Python::attach(|py| match self.it.bind(py).call_method0("__next__") {
            Ok(chunk) => chunk.extract::<Vec<u8>>().map(Some).map_err(|e| Failure::of(py, &e)),
            Err(e) if e.is_instance_of::<PyStopIteration>(py) => Ok(None),
            Err(e) => Err(Failure::of(py, &e)),
        })
    }

    /// Stop the generation early (the generator's cleanup runs).
    pub fn close(&self) {
        Python::attach(|py| {
            let _ = self.it.bind(py).call_method0("close");
        });
    }
}
