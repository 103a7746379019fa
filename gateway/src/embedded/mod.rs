//! The `embedded` pool kind: Python model classes served inside the gateway
//! process through pyo3, behind the same Worker contract as worker
//! processes, so routing, limits, batching, caching, health and deadlines
//! work unchanged. Each embedded pool is one in-process worker
//! (`<pool>-0`) reached over in-memory connections ([`transport`]); its
//! calls run on blocking threads, `threads` at a time, holding the GIL only
//! while Python runs (PyTorch releases it while it computes).
//!
//! Built with the `embedded` cargo feature (default); without it the kind
//! is refused at start with a message saying so.

pub mod transport;

#[cfg(feature = "embedded")]
mod python;
#[cfg(feature = "embedded")]
mod service;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, PoolKind};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot start the embedded Python interpreter: {0}")]
    Python(String),
    #[error("pools.{pool}.class: cannot import the embedded model class:\n{detail}")]
    Import { pool: String, detail: String },
    #[error(
        "pool {0:?} is `kind = \"embedded\"`, but this gateway was built without the embedded pool kind (cargo feature `embedded`)"
    )]
    NotBuilt(String),
}

/// The in-process address of embedded pool `pool`'s worker.
pub fn endpoint(pool: &str) -> String {
    format!("{pool}-0")
}

/// Start every embedded pool of `config`: the interpreter (once), the model
/// classes imported (an import error refuses the start), each served
/// in-process; models load in the background and report SERVING when done,
/// as a worker process does.
pub async fn start(config: &Config, stop: &CancellationToken) -> Result<(), EmbedError> {
    for pool in &config.pools {
        if let PoolKind::Embedded { class, threads } = &pool.kind {
            serve(config, &pool.name, class, threads.get() as usize, stop).await?;
        }
    }
    Ok(())
}

#[cfg(not(feature = "embedded"))]
async fn serve(_: &Config, pool: &str, _: &str, _: usize, _: &CancellationToken) -> Result<(), EmbedError> {
    Err(EmbedError::NotBuilt(pool.to_owned()))
}

#[cfg(feature = "embedded")]
async fn serve(
    config: &Config,
    pool: &str,
    class: &str,
    threads: usize,
    stop: &CancellationToken,
) -> Result<(), EmbedError> {
    use std::sync::Arc;

    use tonic_health::ServingStatus;

    let python = config.workers.python.clone();
    let (spec, name) = (class.to_owned(), pool.to_owned());
    let host = tokio::task::spawn_blocking(move || -> Result<python::Host, EmbedError> {
        python::start(&python).map_err(EmbedError::Python)?;
        python::Host::new(&spec).map_err(|detail| EmbedError::Import { pool: name, detail })
    })
    .await
    .map_err(|e| EmbedError::Python(e.to_string()))??;
    let host = Arc::new(host);
    let id = endpoint(pool);
    let (health, health_service) = tonic_health::server::health_reporter();
    let model = model_name(&host).await.unwrap_or_default();
    for service in [model.as_str(), ""] {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    let worker = service::EmbeddedWorker {
        host: host.clone(),
        threads: Arc::new(tokio::sync::Semaphore::new(threads.max(1))),
        id: id.clone(),
    };
    let incoming = transport::listen(&id);
    let server = tonic::transport::Server::builder()
        .add_service(
            crate::proto::worker_server::WorkerServer::new(worker)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "embedded worker server failed");
        }
    });
    tracing::info!(worker = %id, %class, threads, "embedded worker started; loading");
    tokio::spawn(async move {
        match tokio::task::spawn_blocking(move || host.load()).await {
            Ok(Ok(())) => {
                for service in [model.as_str(), ""] {
                    health.set_service_status(service, ServingStatus::Serving).await;
                }
            }
            Ok(Err(text)) => {
                tracing::error!(worker = %id, "embedded model failed to load; it stays NOT_SERVING:\n{text}")
            }
            Err(e) => tracing::error!(worker = %id, error = %e, "embedded model load panicked"),
        }
    });
    Ok(())
}

/// Largest message between the pool and an embedded worker (as for worker processes).
#[cfg(feature = "embedded")]
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The model an embedded host serves, for its health service name.
#[cfg(feature = "embedded")]
async fn model_name(host: &std::sync::Arc<python::Host>) -> Option<String> {
    use prost::Message;
    let host = host.clone();
    let bytes = tokio::task::spawn_blocking(move || host.describe()).await.ok()?.ok()?;
    let described = crate::proto::DescribeResponse::decode(bytes.as_slice()).ok()?;
    described.models.first().map(|m| m.name.clone())
}
