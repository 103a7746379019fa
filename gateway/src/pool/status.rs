//! What a worker's answer means for the caller: its gRPC statuses and
//! per-item errors as the gateway's errors.

use crate::call::Deadline;
use crate::error::GatewayError;
use crate::proto::{ItemError, item_error};

/// Map a worker's gRPC status to the gateway's error.
pub(super) fn from_status(worker: &str, status: tonic::Status, deadline: &Deadline) -> GatewayError {
    use tonic::Code as C;
    let detail = status.message().to_owned();
    let worker = worker.to_owned();

    // Over the message limit, on either side: the call's size is at fault,
    // not the worker (never counted against it, never retried).
    if is_message_size(&detail) {
        return GatewayError::MessageTooLarge { detail };
    }
    if never_started(&status) {
        return GatewayError::WorkerRefused { worker, detail };
    }
    // A status the worker sent has no source; one with a source was made
    // here from a failed connection or stream (a worker killed mid-stream
    // reads as an h2 error with code INTERNAL): the worker went away.
    if std::error::Error::source(&status).is_some() {
        return GatewayError::WorkerUnavailable { worker, detail };
    }
    match status.code() {
        C::DeadlineExceeded => GatewayError::DeadlineExceeded { after: deadline.budget },
        C::InvalidArgument | C::OutOfRange => GatewayError::ModelRejected { detail },
        // CANCELLED from the worker (our deadline had not passed, see
        // `bounded`) means the worker gave the call up: overload, or a drain
        // that ran out of grace. Transient, so 503 and worth a retry.
        C::Unavailable | C::ResourceExhausted | C::Aborted | C::Cancelled => {
            GatewayError::WorkerUnavailable { worker, detail }
        }
        _ => GatewayError::WorkerFailed { worker, detail },
    }
}

/// The words tonic (`encoded`/`decoded message length too large`) and gRPC
/// core (`Received`/`Sent message larger than max`) use for a message over
/// the limit.
fn is_message_size(detail: &str) -> bool {
    detail.contains("message length too large") || detail.contains("message larger than max")
}

/// True when the call provably never started on the worker: the connection
/// or the stream was refused, or the worker's admission was full.
fn never_started(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::ResourceExhausted {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
        {
            return true;
        }
        if e.to_string().contains("refused stream") {
            return true;
        }
        source = e.source();
    }
    false
}

/// Map a per-item error from a worker to the gateway's error.
pub(super) fn from_item_error(worker: &str, model: &str, err: ItemError, deadline: &Deadline) -> GatewayError {
    use item_error::Code;
    match Code::try_from(err.code).unwrap_or(Code::Unspecified) {
        Code::InvalidInput => GatewayError::ModelRejected { detail: err.message },
        Code::DeadlineExceeded => GatewayError::DeadlineExceeded { after: deadline.budget },
        Code::Cancelled => GatewayError::Cancelled,
        Code::Unimplemented => GatewayError::UnsupportedOperation { model: model.to_owned(), operation: "this call" },
        Code::Unspecified | Code::ModelError => {
            GatewayError::WorkerFailed { worker: worker.to_owned(), detail: err.message }
        }
    }
}

pub(super) fn missing_result(worker: &str) -> GatewayError {
    GatewayError::WorkerFailed { worker: worker.to_owned(), detail: "worker returned fewer results than items".into() }
}
