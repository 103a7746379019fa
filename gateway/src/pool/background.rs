//! Room for queued work in a pool: queued calls use what interactive
//! calls leave, the way a scavenger transport (LEDBAT) uses a link.
//!
//! With no interactive call in the last [`QUIET`], queued work may take
//! every free slot: a burst left for later drains at the pool's full rate.
//! While interactive calls come, queued work holds at most `max_share` of
//! the slots, never while an interactive call waits for one, and fewer as
//! interactive latency rises: every [`TICK`] the mean latency of the
//! interactive calls that ended is compared with its baseline — the same
//! mean in ticks when no queued call ran — and the limit on queued calls
//! is halved past [`TOLERANCE`] times the baseline, or raised by one
//! within it (additive increase, multiplicative decrease, as TCP's). At
//! least one queued call may run, so queued work is never starved. The
//! baseline is measured again every [`REFRESH`], pausing queued work for
//! two ticks if it must (as LEDBAT and BBR refresh their base delay).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::call::Class;

/// How often the limit moves.
pub const TICK: Duration = Duration::from_millis(250);
/// No interactive call for this long: queued work may use every slot.
pub const QUIET: Duration = Duration::from_secs(1);
/// Interactive latency this many times its baseline halves the limit.
pub const TOLERANCE: f64 = 1.25;
/// A baseline older than this is measured again.
pub const REFRESH: Duration = Duration::from_secs(30);

pub(super) struct Background {
    /// Queued calls in the pool now.
    in_flight: AtomicUsize,
    /// When the last interactive call entered, in µs from `epoch`.
    last_interactive: AtomicU64,
    epoch: Instant,
    /// Interactive calls that ended this tick, and their latencies' sum (µs).
    ended: AtomicU64,
    latency_sum: AtomicU64,
    /// A queued call ran at some time this tick.
    ran: AtomicBool,
    control: Mutex<Control>,
}

struct Control {
    tick: Instant,
    /// Mean interactive latency with no queued work, and when measured.
    baseline: Option<(f64, Instant)>,
    /// Queued calls allowed at once while interactive calls come.
    limit: usize,
    /// Queued work is paused until then to measure the baseline.
    probe_until: Option<Instant>,
}

/// A pool's load, for [`Background::room`].
pub(super) struct Load {
    pub slots: usize,
    /// Calls in the pool now (waiting or at a worker), both classes.
    pub active: usize,
    /// Calls waiting for a slot.
    pub waiting: usize,
}

impl Background {
    pub(super) fn new() -> Self {
        let epoch = Instant::now();
        Self {
            in_flight: AtomicUsize::new(0),
            last_interactive: AtomicU64::new(0),
            epoch,
            ended: AtomicU64::new(0),
            latency_sum: AtomicU64::new(0),
            ran: AtomicBool::new(false),
            control: Mutex::new(Control { tick: epoch, baseline: None, limit: 1, probe_until: None }),
        }
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// A call of `class` entered the pool.
    pub(super) fn enter(&self, class: Class) {
        match class {
            Class::Queued => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                self.ran.store(true, Ordering::Relaxed);
            }
            // +1: zero means never.
            Class::Interactive => {
                self.last_interactive.store(self.micros_since_epoch(Instant::now()) + 1, Ordering::Relaxed);
            }
        }
    }

    /// A call of `class` that entered `took` ago ended.
    pub(super) fn leave(&self, class: Class, took: Duration) {
        match class {
            Class::Queued => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            Class::Interactive => {
                self.latency_sum.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX / 2), Ordering::Relaxed);
                self.ended.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queued calls in the pool now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How many more queued calls the pool takes now.
    pub(super) fn room(&self, load: &Load, max_share: f64) -> usize {
        let now = Instant::now();
        let in_flight = self.in_flight();
        let free = load.slots.saturating_sub(load.active);
        let mut control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cap = ((load.slots as f64 * max_share).ceil() as usize).clamp(1, load.slots.max(1));
        if now.saturating_duration_since(control.tick) >= TICK {
            self.close_tick(&mut control, now, in_flight, cap);
        }
        let last = self.last_interactive.load(Ordering::Relaxed);
        let contended = last != 0 && self.micros_since_epoch(now).saturating_sub(last - 1) < QUIET.as_micros() as u64;
        if !contended {
            return free;
        }
        if load.waiting > 0 {
            return 0;
        }
        let stale = control.baseline.is_none_or(|(_, at)| now.saturating_duration_since(at) > REFRESH);
        match control.probe_until {
            Some(until) if now < until => return 0,
            Some(_) => control.probe_until = None,
            None if stale => {
                control.probe_until = Some(now + 2 * TICK);
                return 0;
            }
            None => {}
        }
        control.limit.min(cap).saturating_sub(in_flight).min(free)
    }

    fn close_tick(&self, control: &mut Control, now: Instant, in_flight: usize, cap: usize) {
        control.tick = now;
        let ended = self.ended.swap(0, Ordering::Relaxed);
        let sum = self.latency_sum.swap(0, Ordering::Relaxed);
        // Calls still running count for the next tick too.
        let ran = self.ran.swap(in_flight > 0, Ordering::Relaxed);
        if ended == 0 {
            return;
        }
        let mean = sum as f64 / ended as f64;
        if !ran {
            let base = control.baseline.map_or(mean, |(b, _)| 0.7 * b + 0.3 * mean);
            control.baseline = Some((base, now));
        } else if let Some((base, _)) = control.baseline {
            control.limit =
                if mean > base * TOLERANCE { (control.limit / 2).max(1) } else { (control.limit + 1).min(cap) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(active: usize) -> Load {
        Load { slots: 8, active, waiting: 0 }
    }

    /// `n` interactive calls of `latency` end now.
    fn interactive(b: &Background, n: usize, latency: Duration) {
        for _ in 0..n {
            b.enter(Class::Interactive);
            b.leave(Class::Interactive, latency);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_interactive_calls_queued_work_takes_every_free_slot() {
        let b = Background::new();
        assert_eq!(b.room(&load(0), 0.5), 8);
        assert_eq!(b.room(&load(5), 0.5), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_calls_waiting_leave_no_room() {
        let b = Background::new();
        interactive(&b, 1, Duration::from_millis(2));
        assert_eq!(b.room(&Load { slots: 8, active: 8, waiting: 2 }, 0.5), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_follows_interactive_latency_within_the_share() {
        let b = Background::new();
        let ms = Duration::from_millis;
        // No baseline yet: queued work pauses while it is measured.
        interactive(&b, 1, ms(2));
        assert_eq!(b.room(&load(0), 0.5), 0, "paused to measure the baseline");
        tokio::time::advance(TICK).await;
        interactive(&b, 10, ms(2));
        assert_eq!(b.room(&load(0), 0.5), 0);
        tokio::time::advance(TICK).await;
        interactive(&b, 10, ms(2));
        tokio::time::advance(TICK).await;
        // The probe ended; its clean tick set the baseline (2 ms).
        assert_eq!(b.room(&load(0), 0.5), 1, "one queued call at first");
        b.enter(Class::Queued);
        // Latency within tolerance: one more each tick, up to half of 8 slots.
        for want in [2, 3, 4, 4] {
            tokio::time::advance(TICK).await;
            interactive(&b, 10, ms(2));
            tokio::time::advance(Duration::from_millis(1)).await;
            let room = b.room(&load(1), 0.5);
            assert_eq!(room + 1, want, "limit {want}");
        }
        // Latency past 1.25x the baseline halves it.
        tokio::time::advance(TICK).await;
        interactive(&b, 10, ms(3));
        assert_eq!(b.room(&load(1), 0.5), 1, "4 halved to 2, one running");
        tokio::time::advance(TICK).await;
        interactive(&b, 10, ms(4));
        assert_eq!(b.room(&load(1), 0.5), 0, "2 halved to 1, one running");
        // Interactive calls stop: every free slot again after QUIET.
        tokio::time::advance(QUIET).await;
        assert_eq!(b.room(&load(1), 0.5), 7);
    }
}
