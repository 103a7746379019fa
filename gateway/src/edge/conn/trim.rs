//! Freed memory given back to the system once many connections have parked.
//!
//! A burst of clients (ten thousand each sending a request, then idling)
//! holds hyper's buffers and each request's state at once. Parked, the
//! connections free all of it, but glibc keeps freed memory in its heap
//! wherever live allocations (the parked connections' own small state) sit
//! between the free ranges, so the process stayed near the burst's peak:
//! 60-66 MiB with 10,000 idle connections where 45-49 MiB is what they hold
//! (`make bench SCENARIO=connections`, with and without). `malloc_trim`
//! returns the free pages inside the heap too. It runs on a thread of its
//! own, at most once a [`EVERY`], and only after [`AFTER_PARKS`] parks.

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Parks since the last trim.
static PARKS: AtomicUsize = AtomicUsize::new(0);
static START: Once = Once::new();

/// Parks that make a trim worth its cost (a walk of the heap, and page
/// faults when the pages are used again).
const AFTER_PARKS: usize = 256;
/// The most often the heap is trimmed.
const EVERY: Duration = Duration::from_secs(1);

/// A connection parked, its buffers freed.
pub fn parked() {
    PARKS.fetch_add(1, Ordering::Relaxed);
    START.call_once(|| {
        let spawned = std::thread::Builder::new().name("infergate-trim".into()).spawn(|| {
            loop {
                std::thread::sleep(EVERY);
                if due(&PARKS) {
                    release();
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to give freed memory back; RSS stays at its peaks");
        }
    });
}

/// Whether enough connections parked since the last trim (counting anew if so).
fn due(parks: &AtomicUsize) -> bool {
    parks.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n >= AFTER_PARKS).then_some(0)).is_ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code, reason = "malloc_trim has no safe wrapper; see the SAFETY note")]
fn release() {
    // SAFETY: malloc_trim takes an integer and works under glibc's own
    // arena locks, like any malloc call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_only_after_enough_parks_and_counts_anew() {
        let parks = AtomicUsize::new(AFTER_PARKS - 1);
        assert!(!due(&parks));
        assert_eq!(parks.load(Ordering::Relaxed), AFTER_PARKS - 1, "not yet: nothing is forgotten");
        parks.fetch_add(1, Ordering::Relaxed);
        assert!(due(&parks));
        assert!(!due(&parks), "counted anew");
    }
}
