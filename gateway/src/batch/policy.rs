//! When a batch goes and how big it may grow.
//!
//! `max_delay = "auto"` (the default) learns the model's cost per batch
//! size from the batches sent — t(n) = a + b·n, least squares weighted
//! towards recent batches, like BentoML's adaptive batching — and plans
//! each batch with it:
//!
//! - **How much:** at most the largest n whose cost fits half of
//!   `target_latency` (the other half is for waiting behind the batch
//!   ahead) — unless batches that small cannot keep up with the arrivals —
//!   and whose cost still ends before the earliest queued deadline.
//! - **How long, every worker busy:** a batch sent now would wait in the
//!   worker behind the one running there, so it is held (taking more
//!   items) until just before that one is expected to end: the same
//!   latency, a bigger batch, and no small batch that makes the next one
//!   wait.
//! - **How long, a worker idle:** waiting for one more item costs each of
//!   the n queued items the expected gap between arrivals; it saves the
//!   fixed cost a of the batch that item would otherwise need. So the batch
//!   is held while n·gap < a, never past a from its oldest item, nor two
//!   gaps past the last arrival (a request's many items come at once, then
//!   no more), nor past the point where the target would be missed. Under
//!   light load the gap is long and nothing waits.
//!
//! A fixed `max_delay` overrides all this (the oldest item waits that long
//! for the batch to fill); `max_batch_size` is always the upper bound.
//! Pure: no clock or I/O of its own, unit-tested without a runtime.

use std::time::Duration;

use tokio::time::Instant;

/// How batches are held: learned, or a fixed delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Fixed(Duration),
    Adaptive { target: Option<Duration> },
}

/// A recent batch's weight falls by this factor with each later batch (it
/// halves after ~23).
const DECAY: f64 = 0.97;
/// Batches measured before the cost is used.
const MIN_SAMPLES: u32 = 3;
/// A held batch is sent this long before the worker is expected to be free
/// (it has to reach the worker and be decoded).
const LEAD: Duration = Duration::from_millis(1);

/// A batch's cost by its size, learned: t(n) = a + b·n.
#[derive(Debug, Default, Clone)]
pub struct Cost {
    /// Decayed sums of weights, sizes, seconds, sizes², sizes × seconds.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    samples: u32,
}

impl Cost {
    /// A batch of `n` items took `took` on its worker.
    pub fn observe(&mut self, n: usize, took: Duration) {
        let (x, y) = (n as f64, took.as_secs_f64());
        for s in [&mut self.w, &mut self.x, &mut self.y, &mut self.xx, &mut self.xy] {
            *s *= DECAY;
        }
        self.w += 1.0;
        self.x += x;
        self.y += y;
        self.xx += x * x;
        self.xy += x * y;
        self.samples = self.samples.saturating_add(1);
    }

    /// (a, b) in seconds, once enough batches were measured. Sizes that
    /// barely varied say nothing of b: half the cost is then taken as fixed,
    /// half as per item (exact at the sizes seen, growing past them).
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.samples < MIN_SAMPLES {
            return None;
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let (a, b) = if var < 0.25 {
            (my / 2.0, my / (2.0 * mx))
        } else {
            let b = (self.xy / self.w - mx * my) / var;
            (my - b * mx, b)
        };
        // A negative slope or intercept is noise: keep the mean exact.
        Some(if b < 0.0 {
            (my, 0.0)
        } else if a < 0.0 {
            (0.0, my / mx)
        } else {
            (a, b)
        })
    }

    /// The expected cost of a batch of `n`.
    pub fn estimate(&self, n: usize) -> Option<Duration> {
        let (a, b) = self.fit()?;
        Some(secs(a + b * n as f64))
    }

    /// The largest batch (1 at least, `max` at most) whose expected cost is
    /// within `limit`.
    pub fn largest_within(&self, limit: Duration, max: usize) -> usize {
        let Some((a, b)) = self.fit() else { return max };
        let room = limit.as_secs_f64() - a;
        if b <= 0.0 {
            return if room >= 0.0 { max } else { 1 };
        }
        let n = (room / b).floor();
        if n < 1.0 {
            1
        } else if n >= max as f64 {
            max
        } else {
            n as usize
        }
    }

    /// The smallest batch that keeps up with an item every `gap` (a batch
    /// of n takes no longer than n items take to arrive), with a quarter to
    /// spare; `max` when none does.
    pub fn keeping_up(&self, gap: Duration, max: usize) -> usize {
        let Some((a, b)) = self.fit() else { return max };
        let rate = 1.0 / gap.as_secs_f64().max(1e-9);
        if rate * b >= 1.0 {
            return max;
        }
        let n = (1.25 * rate * a / (1.0 - rate * b) - 1e-9).ceil();
        if n >= max as f64 { max } else { (n as usize).max(1) }
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// The expected gap between arrivals, smoothed.
#[derive(Debug, Default, Clone)]
pub struct Arrivals {
    last: Option<Instant>,
    gap: Option<f64>,
}

impl Arrivals {
    pub fn arrived(&mut self, at: Instant) {
        if let Some(last) = self.last {
            let dt = at.saturating_duration_since(last).as_secs_f64();
            self.gap = Some(self.gap.map_or(dt, |g| 0.9 * g + 0.1 * dt));
        }
        self.last = Some(at);
    }

    pub fn gap(&self) -> Option<Duration> {
        self.gap.map(secs)
    }

    /// When the last item arrived.
    pub fn last(&self) -> Option<Instant> {
        self.last
    }
}

/// A batch on its way to or running on a worker.
#[derive(Debug, Clone, Copy)]
struct Flight {
    id: u64,
    n: usize,
    sent: Instant,
    /// When a worker began on it: when sent if one was free, else when the
    /// batch ahead of it ended.
    started: Option<Instant>,
}

/// The batches in flight, as far as the batcher can tell which run and
/// which wait in a worker.
#[derive(Debug, Default)]
pub struct InFlight {
    flights: Vec<Flight>,
    next: u64,
}

impl InFlight {
    fn running(&self) -> usize {
        self.flights.iter().filter(|f| f.started.is_some()).count()
    }

    /// A batch of `n` was sent to one of `workers`; its id for [`Self::landed`].
    pub fn sent(&mut self, n: usize, now: Instant, workers: usize) -> u64 {
        self.next += 1;
        let started = (self.running() < workers).then_some(now);
        self.flights.push(Flight { id: self.next, n, sent: now, started });
        self.next
    }

    /// Batch `id` ended; its size and how long its worker spent on it. The
    /// oldest waiting batch starts on the freed worker.
    pub fn landed(&mut self, id: u64, now: Instant) -> Option<(usize, Duration)> {
        let at = self.flights.iter().position(|f| f.id == id)?;
        let f = self.flights.remove(at);
        if let Some(next) = self.flights.iter_mut().find(|f| f.started.is_none()) {
            next.started = Some(now);
        }
        Some((f.n, now.saturating_duration_since(f.started.unwrap_or(f.sent))))
    }

    /// When the first running batch is expected to end.
    fn first_free(&self, cost: &Cost) -> Option<Instant> {
        self.flights.iter().filter_map(|f| Some(f.started? + cost.estimate(f.n)?)).min()
    }
}

/// What the queue looks like when a batch is planned.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    pub len: usize,
    /// Its bytes fill a worker message.
    pub full_bytes: bool,
    pub oldest: Instant,
    /// The earliest deadline among the queued (each caller's oldest item).
    pub earliest_deadline: Instant,
}

/// A plan for the next batch: send at `at` (now or earlier: at once) at most
/// `cap` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub at: Instant,
    pub cap: usize,
}

/// Everything the adaptive policy learns, and the plan it makes from it.
#[derive(Debug)]
pub struct Policy {
    pub hold: Hold,
    pub max_items: usize,
    pub cost: Cost,
    pub arrivals: Arrivals,
    pub flights: InFlight,
}

impl Policy {
    pub fn new(hold: Hold, max_items: usize) -> Self {
        Self {
            hold,
            max_items: max_items.max(1),
            cost: Cost::default(),
            arrivals: Arrivals::default(),
            flights: InFlight::default(),
        }
    }

    /// The next batch's plan, with a free dispatch slot and `workers` workers.
    pub fn plan(&self, q: Queue, now: Instant, workers: usize) -> Plan {
        let target = match self.hold {
            Hold::Fixed(delay) => {
                let at = if q.len >= self.max_items || q.full_bytes { now } else { q.oldest + delay };
                return Plan { at, cap: self.max_items };
            }
            Hold::Adaptive { target } => target,
        };
        let mut cap = self.max_items;
        if let Some(target) = target {
            // Not below what keeps up with the arrivals: a queue that grows
            // would make every item late, not only the next.
            let keep_up = self.arrivals.gap().map_or(1, |gap| self.cost.keeping_up(gap, self.max_items));
            cap = cap.min(self.cost.largest_within(target / 2, self.max_items).max(keep_up));
        }
        let left = q.earliest_deadline.saturating_duration_since(now);
        cap = cap.min(self.cost.largest_within(left, self.max_items));
        let now_plan = Plan { at: now, cap };
        let (Some((a, _)), Some(this)) = (self.cost.fit(), self.cost.estimate(q.len.min(cap))) else {
            return now_plan;
        };
        if q.len >= cap || q.full_bytes {
            return now_plan;
        }
        // Never hold an item past the point where its deadline is missed.
        let latest = q.earliest_deadline.checked_sub(this).unwrap_or(now);
        let at = if self.flights.running() >= workers {
            match self.flights.first_free(&self.cost) {
                Some(free) => free.checked_sub(LEAD).unwrap_or(now),
                None => now,
            }
        } else {
            let Some(gap) = self.arrivals.gap() else { return now_plan };
            let fixed = secs(a);
            if gap.as_secs_f64() * q.len as f64 >= a {
                return now_plan;
            }
            // Not past two gaps of silence either: the items that came at
            // once (one request's many) have all come.
            let mut at = (q.oldest + fixed).min(self.arrivals.last().map_or(now, |last| last + gap * 2));
            if let (Some(target), Some(next)) = (target, self.cost.estimate(q.len + 1)) {
                let by = (q.oldest + target).checked_sub(next + gap).unwrap_or(now);
                at = at.min(by);
            }
            at
        };
        Plan { at: at.min(latest), cap }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A cost learned from exact batches of t(n) = 20 ms + 5 ms·n.
    fn learned() -> Cost {
        let mut c = Cost::default();
        for n in [1, 4, 8, 16, 2, 32] {
            c.observe(n, MS * (20 + 5 * n as u32));
        }
        c
    }

    #[test]
    fn the_cost_line_is_learned_from_batches_of_several_sizes() {
        let (a, b) = learned().fit().unwrap();
        assert!((a - 0.020).abs() < 1e-9 && (b - 0.005).abs() < 1e-9, "a {a} b {b}");
        assert_eq!(learned().estimate(10), Some(MS * 70));
        // Not before three batches.
        let mut c = Cost::default();
        c.observe(4, MS * 40);
        c.observe(8, MS * 60);
        assert_eq!(c.fit(), None);
    }

    #[test]
    fn batches_of_one_size_are_read_as_half_fixed_half_per_item() {
        let mut c = Cost::default();
        (0..5).for_each(|_| c.observe(4, MS * 40));
        assert_eq!(c.estimate(4), Some(MS * 40), "exact where it was measured");
        assert_eq!(c.estimate(8), Some(MS * 60), "and growing past it");
    }

    #[test]
    fn a_model_that_got_slower_is_relearned_within_some_dozens_of_batches() {
        let mut c = learned();
        for i in 0..100 {
            let n = 1 + i % 16;
            c.observe(n, MS * (40 + 10 * n as u32));
        }
        let t = c.estimate(10).unwrap();
        assert!(t > MS * 135 && t < MS * 145, "{t:?}");
    }

    #[test]
    fn the_largest_batch_within_a_limit_follows_the_line() {
        let c = learned();
        assert_eq!(c.largest_within(MS * 100, 64), 16, "20 + 5·16 = 100 ms");
        assert_eq!(c.largest_within(MS * 10, 64), 1, "never below one");
        assert_eq!(c.largest_within(Duration::from_secs(10), 64), 64, "never above the most");
        assert_eq!(Cost::default().largest_within(MS, 64), 64, "nothing learned: the most");
    }

    #[test]
    fn the_batch_that_keeps_up_with_arrivals() {
        let c = learned();
        // One item per 10 ms: n·10 ms ≥ 20 + 5n ms from n = 4; 5 with a quarter to spare.
        assert_eq!(c.keeping_up(MS * 10, 64), 5);
        assert_eq!(c.keeping_up(MS * 5, 64), 64, "5 ms an item is all the model can do: none keeps up");
        assert_eq!(c.keeping_up(Duration::from_secs(1), 64), 1);
    }

    #[test]
    fn arrivals_give_a_smoothed_gap() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        assert_eq!(a.gap(), None);
        for i in 0..50 {
            a.arrived(t0 + MS * 2 * i);
        }
        assert_eq!(a.gap(), Some(MS * 2));
    }

    #[test]
    fn batches_beyond_the_workers_wait_and_start_as_one_ends() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        let first = f.sent(8, t0, 1);
        let second = f.sent(4, t0 + MS, 1);
        assert_eq!(f.running(), 1, "one worker: the second waits in it");
        assert_eq!(f.landed(first, t0 + MS * 60), Some((8, MS * 60)));
        assert_eq!(f.running(), 1);
        // Its cost is counted from when the first ended, not from when it was sent.
        assert_eq!(f.landed(second, t0 + MS * 100), Some((4, MS * 40)));
        assert_eq!(f.landed(second, t0 + MS * 100), None);
    }

    fn queue(len: usize, oldest: Instant) -> Queue {
        Queue { len, full_bytes: false, oldest, earliest_deadline: oldest + Duration::from_secs(30) }
    }

    fn adaptive(target_ms: Option<u64>) -> Policy {
        let mut p = Policy::new(Hold::Adaptive { target: target_ms.map(Duration::from_millis) }, 64);
        p.cost = learned();
        p
    }

    #[test]
    fn a_fixed_delay_overrides_the_learned_plan() {
        let t0 = Instant::now();
        let mut p = adaptive(Some(100));
        p.hold = Hold::Fixed(MS * 2);
        assert_eq!(p.plan(queue(3, t0), t0, 1), Plan { at: t0 + MS * 2, cap: 64 });
        assert_eq!(p.plan(queue(64, t0), t0, 1).at, t0, "full: at once");
    }

    #[test]
    fn the_target_caps_a_batch_at_what_costs_half_of_it() {
        let t0 = Instant::now();
        assert_eq!(adaptive(Some(200)).plan(queue(100, t0), t0, 1), Plan { at: t0, cap: 16 });
        // Unless arrivals need bigger batches: one per 6 ms needs 20 + 5n ≤ 6n.
        let mut busy = adaptive(Some(200));
        (0..30).for_each(|i| busy.arrivals.arrived(t0 + MS * 6 * i));
        assert_eq!(busy.plan(queue(100, t0), t0, 1).cap, 25);
        assert_eq!(adaptive(None).plan(queue(100, t0), t0, 1).cap, 64, "no target: the most");
        // A deadline 60 ms away: at most 8 items (20 + 5·8 = 60 ms).
        let mut q = queue(100, t0);
        q.earliest_deadline = t0 + MS * 60;
        assert_eq!(adaptive(None).plan(q, t0, 1).cap, 8);
    }

    #[test]
    fn under_light_load_nothing_waits() {
        let t0 = Instant::now();
        let mut p = adaptive(Some(200));
        p.arrivals.arrived(t0);
        p.arrivals.arrived(t0 + MS * 100); // one item per 100 ms, far above a = 20 ms
        assert_eq!(p.plan(queue(1, t0), t0, 1).at, t0);
        assert_eq!(adaptive(Some(200)).plan(queue(1, t0), t0, 1).at, t0, "no gap known: at once");
    }

    #[test]
    fn under_load_an_idle_worker_waits_while_more_items_pay_for_it() {
        let t0 = Instant::now();
        let mut p = adaptive(Some(200));
        for i in 0..20 {
            p.arrivals.arrived(t0 + MS * i); // one per ms
        }
        // 3 queued × 1 ms < a = 20 ms: hold, at most a after the oldest.
        assert_eq!(p.plan(queue(3, t0), t0 + MS * 2, 1).at, t0 + MS * 20);
        // 20 queued × 1 ms = a: go.
        assert_eq!(p.plan(queue(20, t0), t0 + MS * 2, 1).at, t0 + MS * 2);
    }

    #[test]
    fn a_burst_that_ended_is_not_held() {
        let t0 = Instant::now();
        let mut p = adaptive(None);
        (0..10).for_each(|_| p.arrivals.arrived(t0)); // one request of 10 texts
        assert_eq!(p.plan(queue(10, t0), t0 + MS, 1).at, t0, "nothing came for two gaps");
    }

    #[test]
    fn with_every_worker_busy_a_batch_is_held_until_just_before_one_is_free() {
        let t0 = Instant::now();
        let mut p = adaptive(Some(1000));
        p.flights.sent(16, t0, 1); // 20 + 80 = 100 ms
        let plan = p.plan(queue(5, t0 + MS * 10), t0 + MS * 10, 1);
        assert_eq!(plan.at, t0 + MS * 99);
        // Two workers, one idle: not held for the busy one.
        p.arrivals.arrived(t0);
        p.arrivals.arrived(t0 + MS * 500);
        assert_eq!(p.plan(queue(5, t0 + MS * 10), t0 + MS * 10, 2).at, t0 + MS * 10);
        // Never past what the earliest deadline allows: 5 items take 45 ms.
        let mut q = queue(5, t0 + MS * 10);
        q.earliest_deadline = t0 + MS * 80;
        assert_eq!(p.plan(q, t0 + MS * 10, 1).at, t0 + MS * 35);
    }
}
