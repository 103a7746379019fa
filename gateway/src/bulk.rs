//! Bulk CPU work of large requests: parsing a large JSON tensor, decoding an
//! image, writing a large answer, converting a large tensor between its
//! typed and raw forms. It runs off the request threads, on
//! threads of its own at a lower CPU priority (nice +[`NICE`]), so that while
//! one client sends megabytes of tensors the small calls of everyone else
//! still find a CPU at once: on a busy core the scheduler gives a nice-10
//! thread about a tenth of the time of a normal one. The large call still
//! progresses, at whatever CPU is left.
//!
//! A large call's I/O runs there too: its worker connection's tasks
//! ([`Exec`]) and the call itself ([`spawn`]), which copy megabytes
//! between sockets and messages.

use std::sync::LazyLock;

use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinError;
use tokio_util::task::AbortOnDropHandle;

/// Work on more bytes than this is bulk work.
pub const BYTES: usize = 1 << 20;

/// How much nicer bulk threads are than the gateway (nice 19 at most).
pub const NICE: i32 = 10;

/// Bulk tasks running at once at most; more wait for a thread. The
/// gateway's in-flight and buffered-bytes bounds admit far fewer large
/// bodies than this in practice.
const MAX_THREADS: usize = 64;

/// A runtime whose one worker thread drives large calls' I/O and whose
/// blocking pool runs bulk CPU work; `None` (bulk work then runs on the
/// main runtime) if it could not be built.
static BULK: LazyLock<Option<Runtime>> = LazyLock::new(|| {
    Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .max_blocking_threads(MAX_THREADS)
        .thread_name("infergate-bulk")
        .on_thread_start(|| {
            // On Linux the nice value is per thread: this one only, NICE
            // below the thread that started it.
            let lower = rustix::process::getpriority_process(None)
                .and_then(|now| rustix::process::setpriority_process(None, (now + NICE).min(19)));
            if let Err(e) = lower {
                tracing::warn!(error = %e, "bulk thread keeps the gateway's CPU priority");
            }
        })
        .build()
        .inspect_err(|e| tracing::warn!(error = %e, "no bulk threads; large bodies use the request runtime's"))
        .ok()
});

/// Run `work` on a bulk thread and wait for it.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, tokio::task::JoinError> {
    match &*BULK {
        Some(rt) => rt.spawn_blocking(work).await,
        None => tokio::task::spawn_blocking(work).await,
    }
}

/// Run the future `call` on the bulk runtime's thread and wait for it;
/// dropping the returned future cancels `call`.
pub async fn spawn<F>(call: F) -> Result<F::Output, JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = match &*BULK {
        Some(rt) => rt.spawn(call),
        None => tokio::spawn(call),
    };
    AbortOnDropHandle::new(task).await
}

/// Spawns a connection's tasks on the bulk runtime's thread (see
/// `tonic::transport::Endpoint::executor`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Exec;

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        match &*BULK {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn bulk_work_runs_at_lower_priority_than_the_caller() {
        let caller = rustix::process::getpriority_process(None).unwrap();
        let bulk = super::run(|| rustix::process::getpriority_process(None).unwrap()).await.unwrap();
        assert_eq!(bulk, (caller + super::NICE).min(19), "caller at {caller}");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), caller, "the caller's thread is unchanged");
    }

    #[tokio::test]
    async fn bulk_calls_run_at_lower_priority_and_stop_when_dropped() {
        let caller = rustix::process::getpriority_process(None).unwrap();
        let nice = super::spawn(async { rustix::process::getpriority_process(None).unwrap() }).await.unwrap();
        assert_eq!(nice, (caller + super::NICE).min(19), "caller at {caller}");

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let call = super::spawn(async move {
            let _tx = tx; // dropped (closing rx) only when this call ends
            std::future::pending::<()>().await;
        });
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), call).await.is_err());
        assert!(rx.await.is_err(), "the call was stopped when its caller left");
    }
}
