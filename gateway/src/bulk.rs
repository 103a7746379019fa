//! Bulk CPU work of large requests: parsing a large JSON tensor, decoding an
//! image, writing a large answer, converting a large tensor between its
//! typed and raw forms. It runs off the request threads, on
//! threads of its own at a lower CPU priority (nice +[`NICE`]), so that while
//! one client sends megabytes of tensors the small calls of everyone else
//! still find a CPU at once: on a busy core the scheduler gives a nice-10
//! thread about a tenth of the time of a normal one. The large call still
//! progresses, at whatever CPU is left.

use std::sync::LazyLock;

use tokio::runtime::{Builder, Runtime};

/// Work on more bytes than this is bulk work.
pub const BYTES: usize = 1 << 20;

/// How much nicer bulk threads are than the gateway (nice 19 at most).
pub const NICE: i32 = 10;

/// Bulk tasks running at once at most; more wait for a thread. The
/// gateway's in-flight and buffered-bytes bounds admit far fewer large
/// bodies than this in practice.
const MAX_THREADS: usize = 64;

/// A runtime used only for its blocking pool; `None` (bulk work then runs
/// on the main runtime's blocking pool) if it could not be built.
static BULK: LazyLock<Option<Runtime>> = LazyLock::new(|| {
    Builder::new_multi_thread()
        .worker_threads(1)
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

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn bulk_work_runs_at_lower_priority_than_the_caller() {
        let caller = rustix::process::getpriority_process(None).unwrap();
        let bulk = super::run(|| rustix::process::getpriority_process(None).unwrap()).await.unwrap();
        assert_eq!(bulk, (caller + super::NICE).min(19), "caller at {caller}");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), caller, "the caller's thread is unchanged");
    }
}
