//! Room for queued work in a pool: queued calls use what interactive
//! calls leave, the way a scavenger transport (LEDBAT) uses a link.
//!
//! With no interactive call in the last [`QUIET`], queued work may take
//! every free slot: a burst left for later drains at the pool's full rate.
//! While interactive calls come, queued work holds at most `max_share` of
//! the slots, never while an interactive call waits for one, and fewer as
//! interactive latency rises. Every [`TICK`] the interactive calls that
//! ended are compared with their baseline — the same figures in ticks when
//! no queued call ran: their mean past [`TOLERANCE`] times the baseline's,
//! or their slowest past [`TAIL_TOLERANCE`] times the baseline's slowest,
//! halves the limit on queued calls (to none at all: a pool whose
//! interactive calls have no room to spare gives none); a tick within both
//! raises it by one (additive increase, multiplicative decrease, as TCP's).
//! A limit halved to none stays there for a hold that doubles each time
//! (from two ticks to [`MAX_HOLD`]) and is forgotten after good ticks,
//! then one queued call is tried again. The baseline is measured again
//! every [`REFRESH`], pausing queued work for two ticks if it must (as
//! LEDBAT and BBR refresh their base delay).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::call::Class;

/// How often the limit moves.
pub const TICK: Duration = Duration::from_millis(250);
/// No interactive call for this long: queued work may use every slot.
pub const QUIET: Duration = Duration::from_secs(1);
/// Interactive mean latency this many times its baseline halves the limit.
pub const TOLERANCE: f64 = 1.25;
/// The slowest interactive call of a tick this many times the baseline's
/// slowest halves it too: a tail that grows while the mean holds is queued
/// work in the way of a few calls.
pub const TAIL_TOLERANCE: f64 = 1.5;
/// A baseline older than this is measured again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Longest a limit halved to none is held there, in ticks.
pub const MAX_HOLD: u32 = 32;
/// Good ticks in a row after which the hold starts short again.
const FORGIVE_AFTER: u32 = 8;

pub(super) struct Background {
    /// Queued calls in the pool now.
    in_flight: AtomicUsize,
    /// When the last interactive call entered, in µs from `epoch`.
    last_interactive: AtomicU64,
    epoch: Instant,
    /// Interactive calls that ended this tick, their latencies' sum and the
    /// slowest (µs).
    ended: AtomicU64,
    latency_sum: AtomicU64,
    slowest: AtomicU64,
    /// A queued call ran at some time this tick.
    ran: AtomicBool,
    control: Mutex<Control>,
}

/// Mean and slowest interactive latency (µs) in ticks with no queued work.
#[derive(Clone, Copy)]
struct Baseline {
    mean: f64,
    slowest: f64,
    at: Instant,
}

struct Control {
    tick: Instant,
    baseline: Option<Baseline>,
    /// Queued calls allowed at once while interactive calls come.
    limit: usize,
    /// A limit of none is held until then.
    held_until: Option<Instant>,
    /// The next hold, in ticks.
    hold: u32,
    /// Good ticks in a row.
    good: u32,
    /// Queued work is paused until then to measure the baseline.
    probe_until: Option<Instant>,
}

/// A pool's load, for [`Background::allowance`].
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
            slowest: AtomicU64::new(0),
            ran: AtomicBool::new(false),
            control: Mutex::new(Control {
                tick: epoch,
                baseline: None,
                limit: 1,
                held_until: None,
                hold: 2,
                good: 0,
                probe_until: None,
            }),
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
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX / 2);
                self.latency_sum.fetch_add(micros, Ordering::Relaxed);
                self.slowest.fetch_max(micros, Ordering::Relaxed);
                self.ended.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queued calls in the pool now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How many queued calls the pool may hold at once now (those it holds
    /// included).
    pub(super) fn allowance(&self, load: &Load, max_share: f64) -> usize {
        let now = Instant::now();
        let in_flight = self.in_flight();
        // Slots interactive calls do not hold.
        let spare = load.slots.saturating_sub(load.active.saturating_sub(in_flight));
        let mut control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cap = ((load.slots as f64 * max_share).ceil() as usize).clamp(1, load.slots.max(1));
        if now.saturating_duration_since(control.tick) >= TICK {
            self.close_tick(&mut control, now, in_flight, cap);
        }
        let last = self.last_interactive.load(Ordering::Relaxed);
        let contended = last != 0 && self.micros_since_epoch(now).saturating_sub(last - 1) < QUIET.as_micros() as u64;
        if !contended {
            return spare;
        }
        if load.waiting > 0 {
            return 0;
        }
        let stale = control.baseline.is_none_or(|b| now.saturating_duration_since(b.at) > REFRESH);
        match control.probe_until {
            Some(until) if now < until => return 0,
            Some(_) => control.probe_until = None,
            None if stale => {
                control.probe_until = Some(now + 2 * TICK);
                return 0;
            }
            None => {}
        }
        if control.limit == 0 && control.held_until.is_some_and(|until| now >= until) {
            control.held_until = None;
            control.limit = 1;
        }
        control.limit.min(cap).min(spare)
    }

    fn close_tick(&self, control: &mut Control, now: Instant, in_flight: usize, cap: usize) {
        control.tick = now;
        let ended = self.ended.swap(0, Ordering::Relaxed);
        let sum = self.latency_sum.swap(0, Ordering::Relaxed);
        let slowest = self.slowest.swap(0, Ordering::Relaxed) as f64;
        // Calls still running count for the next tick too.
        let ran = self.ran.swap(in_flight > 0, Ordering::Relaxed);
        if ended == 0 {
            return;
        }
        let mean = sum as f64 / ended as f64;
        if !ran {
            let blend = |old: f64, new: f64| 0.7 * old + 0.3 * new;
            control.baseline = Some(match control.baseline {
                None => Baseline { mean, slowest, at: now },
                Some(b) => Baseline { mean: blend(b.mean, mean), slowest: blend(b.slowest, slowest), at: now },
            });
            return;
        }
        let Some(base) = control.baseline else { return };
        if mean > base.mean * TOLERANCE || slowest > base.slowest * TAIL_TOLERANCE {
            control.good = 0;
            control.limit /= 2;
            if control.limit == 0 && control.held_until.is_none() {
                control.held_until = Some(now + TICK * control.hold);
                control.hold = (control.hold * 2).min(MAX_HOLD);
            }
        } else if control.held_until.is_none() {
            control.good += 1;
            if control.good >= FORGIVE_AFTER {
                control.hold = 2;
            }
            control.limit = (control.limit + 1).min(cap);
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

    /// Close the tick with `n` interactive calls of `latency` in it; the
    /// allowance then.
    async fn tick(b: &Background, n: usize, latency: Duration, active: usize) -> usize {
        interactive(b, n, latency);
        tokio::time::advance(TICK).await;
        b.allowance(&load(active), 0.5)
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_interactive_calls_queued_work_takes_every_slot_they_leave() {
        let b = Background::new();
        assert_eq!(b.allowance(&load(0), 0.5), 8);
        b.enter(Class::Queued);
        b.enter(Class::Queued);
        // Two queued and three interactive calls in the pool: five of eight
        // slots are not the interactive calls'.
        assert_eq!(b.allowance(&load(5), 0.5), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_calls_waiting_leave_no_room() {
        let b = Background::new();
        interactive(&b, 1, Duration::from_millis(2));
        assert_eq!(b.allowance(&Load { slots: 8, active: 8, waiting: 2 }, 0.5), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_follows_interactive_latency_within_the_share() {
        let b = Background::new();
        let ms = Duration::from_millis;
        // No baseline yet: queued work pauses while it is measured.
        interactive(&b, 1, ms(2));
        assert_eq!(b.allowance(&load(0), 0.5), 0, "paused to measure the baseline");
        assert_eq!(tick(&b, 10, ms(2), 0).await, 0);
        // The probe ended; its clean tick set the baseline (2 ms).
        assert_eq!(tick(&b, 10, ms(2), 0).await, 1, "one queued call at first");
        b.enter(Class::Queued);
        // Within tolerance: one more each tick, up to half of 8 slots.
        for want in [2, 3, 4, 4] {
            assert_eq!(tick(&b, 10, ms(2), 1).await, want);
        }
        // A mean past 1.25x the baseline halves it.
        assert_eq!(tick(&b, 10, ms(3), 1).await, 2);
        // So does one call past 1.5x the baseline's slowest, the mean within.
        interactive(&b, 9, ms(2));
        assert_eq!(tick(&b, 1, ms(4), 1).await, 1);
        // Interactive calls stop: every slot after QUIET.
        tokio::time::advance(QUIET).await;
        assert_eq!(b.allowance(&load(1), 0.5), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_with_no_room_to_spare_gives_none_for_a_hold_that_grows() {
        let b = Background::new();
        let ms = Duration::from_millis;
        interactive(&b, 1, ms(2));
        b.allowance(&load(0), 0.5);
        tick(&b, 10, ms(2), 0).await;
        assert_eq!(tick(&b, 10, ms(2), 0).await, 1);
        b.enter(Class::Queued);
        // Every call slower beside queued work: halved to none…
        assert_eq!(tick(&b, 10, ms(4), 1).await, 0);
        b.leave(Class::Queued, ms(2));
        // …held for two ticks (clean ones: the baseline holds), then one
        // queued call is tried again.
        assert_eq!(tick(&b, 10, ms(2), 0).await, 0);
        assert_eq!(tick(&b, 10, ms(2), 0).await, 1);
        b.enter(Class::Queued);
        // Bad again: held twice as long.
        assert_eq!(tick(&b, 10, ms(4), 1).await, 0);
        b.leave(Class::Queued, ms(2));
        for _ in 0..3 {
            assert_eq!(tick(&b, 10, ms(2), 0).await, 0);
        }
        assert_eq!(tick(&b, 10, ms(2), 0).await, 1);
    }
}
