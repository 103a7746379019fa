//! The queue's consumer: one per replica. It takes entries only for the
//! models whose pools have room for queued work now (the pools decide, see
//! `pool::background`), runs each through the same REST routes a client
//! calls — as its submitter, marked queued — and settles it with the
//! answer. Entries left pending by a consumer that stopped are claimed
//! after `queue.claim_after`; this consumer's own running entries are
//! touched well before that, so no live one loses its work.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::Request;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::call::Class;
use crate::error::GatewayError;
use crate::queue::{Answered, Delivery, Entry, Outcome, Owner, Queue, now_ms};
use crate::service::Core;

/// How often targets, depths and finished batches are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// Wait for a new entry at most this long in one read.
const BLOCK: Duration = Duration::from_millis(200);
/// Wait this long for room when every target with entries is full.
const NO_ROOM: Duration = Duration::from_millis(2);
/// A model the gateway does not know takes this many at once (each is
/// answered 404 at once).
const UNKNOWN_MODEL_ROOM: usize = 4;
/// Answers of queued requests larger than this are stored as a 502.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Tries of a request the pools could not take (5xx that may pass).
const TRIES: u32 = 3;
/// How long a batch's status is believed.
const STATUS_FOR: Duration = Duration::from_millis(500);

/// What the consumer shares with the entries it runs.
struct Shared {
    queue: Arc<Queue>,
    core: Arc<Core>,
    /// The model routes, without the client-facing layers.
    routes: Router,
    /// Entries running, by stream, for the heartbeat.
    running: Mutex<HashMap<String, HashSet<String>>>,
    /// Entries running, by the pool they go to.
    by_pool: Mutex<HashMap<String, usize>>,
    /// Batch statuses seen lately.
    statuses: Mutex<HashMap<String, (String, tokio::time::Instant)>>,
    permits: Arc<Semaphore>,
}

/// Run the consumer until `stop`; entries it has not settled then stay
/// pending, for another consumer to claim.
pub fn spawn(
    queue: Arc<Queue>,
    core: Arc<Core>,
    routes: Router,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let max_running = queue.config().max_running;
    // Counted from 0, so the series exist before the first event.
    use crate::telemetry::metrics::{QUEUE_ENTRIES, QUEUE_RESULTS_STORED, QUEUE_SUBMITTED};
    for outcome in [Outcome::Done, Outcome::Failed, Outcome::Expired, Outcome::Cancelled] {
        metrics::counter!(QUEUE_ENTRIES, "outcome" => outcome.as_str()).increment(0);
    }
    for kind in ["async", "batch"] {
        metrics::counter!(QUEUE_SUBMITTED, "kind" => kind).increment(0);
    }
    metrics::counter!(QUEUE_RESULTS_STORED).increment(0);
    let shared = Arc::new(Shared {
        queue,
        core,
        routes,
        running: Mutex::new(HashMap::new()),
        by_pool: Mutex::new(HashMap::new()),
        statuses: Mutex::new(HashMap::new()),
        permits: Arc::new(Semaphore::new(max_running)),
    });
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = consume(shared.clone()) => {}
        }
    })
}

async fn consume(shared: Arc<Shared>) {
    let config = shared.queue.config().clone();
    let claim_every = config.claim_after / 2;
    let touch_every = config.claim_after / 3;
    let mut targets: Vec<String> = Vec::new();
    let mut looked = None::<tokio::time::Instant>;
    let mut claimed = tokio::time::Instant::now();
    let mut touched = tokio::time::Instant::now();
    let mut down = false;
    loop {
        let now = tokio::time::Instant::now();
        // Something queued here, perhaps for a model not seen yet.
        if shared.queue.take_submitted() {
            looked = None;
        }
        if looked.is_none_or(|at| now.duration_since(at) >= LOOK_EVERY) {
            looked = Some(now);
            match look(&shared).await {
                Ok(t) => {
                    if down {
                        tracing::info!("the queue's Redis answers again");
                    }
                    down = false;
                    targets = t;
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(error = %e, "the queue's Redis does not answer; the consumer waits");
                    }
                    down = true;
                    tokio::time::sleep(LOOK_EVERY).await;
                    continue;
                }
            }
        }
        if now.duration_since(touched) >= touch_every {
            touched = now;
            touch(&shared).await;
        }
        if targets.is_empty() {
            // Nothing was ever queued: wait for this replica to queue
            // something (or another's, seen at the next look).
            tokio::select! {
                () = shared.queue.until_submitted() => looked = None,
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
            continue;
        }
        let room: Vec<(&str, usize)> =
            targets.iter().map(|t| (t.as_str(), room(&shared, t))).filter(|(_, r)| *r > 0).collect();
        if room.is_empty() {
            tokio::time::sleep(NO_ROOM).await;
            continue;
        }
        let mut deliveries = Vec::new();
        if now.duration_since(claimed) >= claim_every {
            claimed = now;
            for (target, n) in &room {
                match shared.queue.claim(target, *n).await {
                    Ok(d) => deliveries.extend(d),
                    Err(e) => tracing::warn!(error = %e, "cannot claim stalled entries"),
                }
            }
        }
        if deliveries.is_empty() {
            match shared.queue.read(&room, None).await {
                Ok(d) => deliveries = d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the queue");
                    looked = None;
                    continue;
                }
            }
        }
        if deliveries.is_empty() {
            // Nothing waiting: block on the first target with room until
            // something comes or a while passes.
            // (Not cancelled: a read given up on the wire would still take
            // its entries.)
            deliveries = shared.queue.read(&room[..1], Some(BLOCK)).await.unwrap_or_default();
            if deliveries.is_empty() {
                continue;
            }
        }
        for delivery in deliveries {
            let Ok(permit) = shared.permits.clone().acquire_owned().await else { return };
            let shared = shared.clone();
            let pool = delivery.entry.as_ref().ok().and_then(|e| pool_of(&shared, &e.target));
            shared.begin(&delivery, pool.as_deref());
            tokio::spawn(async move {
                run(&shared, &delivery).await;
                shared.end(&delivery, pool.as_deref());
                drop(permit);
            });
        }
    }
}

impl Shared {
    fn begin(&self, d: &Delivery, pool: Option<&str>) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(d.stream.clone())
            .or_default()
            .insert(d.entry_id.clone());
        if let Some(p) = pool {
            *self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).entry(p.to_owned()).or_default() += 1;
        }
    }

    fn end(&self, d: &Delivery, pool: Option<&str>) {
        if let Some(set) = self.running.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&d.stream) {
            set.remove(&d.entry_id);
        }
        if let Some(p) = pool
            && let Some(n) = self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).get_mut(p)
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// The pool `target` goes to; `None` for a model the gateway does not know.
fn pool_of(shared: &Shared, target: &str) -> Option<String> {
    shared.core.entry(target).ok().map(|e| e.pool)
}

/// How many more of `target`'s entries this consumer takes now: what the
/// pool allows at once, less what this consumer runs there already.
fn room(shared: &Shared, target: &str) -> usize {
    let free = shared.permits.available_permits();
    let Some(pool) = pool_of(shared, target) else {
        return match shared.core.entry(target) {
            Err(GatewayError::Starting { .. }) => 0,
            _ => UNKNOWN_MODEL_ROOM.min(free),
        };
    };
    let allowed = shared.core.upstream.room(&pool, shared.queue.config().max_share).unwrap_or(0);
    let mine = shared.by_pool.lock().unwrap_or_else(PoisonError::into_inner).get(&pool).copied().unwrap_or(0);
    allowed.saturating_sub(mine).min(free)
}

/// Targets, the depth metrics, and batches whose finalizer stopped.
async fn look(shared: &Shared) -> Result<Vec<String>, GatewayError> {
    let depths = shared.queue.depths().await?;
    for (target, depth, oldest) in &depths {
        metrics::counter!(crate::telemetry::metrics::QUEUE_RECLAIMS, "target" => target.clone()).increment(0);
        metrics::gauge!(crate::telemetry::metrics::QUEUED, "target" => target.clone()).set(*depth as f64);
        metrics::gauge!(crate::telemetry::metrics::QUEUED_OLDEST, "target" => target.clone()).set(oldest.as_secs_f64());
    }
    if let Err(e) = shared.queue.sweep().await {
        tracing::warn!(error = %e, "cannot sweep finished batches");
    }
    Ok(depths.into_iter().map(|(t, _, _)| t).collect())
}

/// Keep this consumer's running entries from being claimed.
async fn touch(shared: &Shared) {
    let running: Vec<(String, Vec<String>)> = shared
        .running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(s, ids)| (s.clone(), ids.iter().cloned().collect()))
        .collect();
    for (stream, ids) in running {
        if let Err(e) = shared.queue.touch(&stream, &ids).await {
            tracing::warn!(error = %e, "cannot touch running entries");
        }
    }
}

/// Run one entry and settle it; a settle Redis refuses is tried again until
/// it lands (the answer is kept meanwhile), so nothing answered is lost.
async fn run(shared: &Shared, delivery: &Delivery) {
    let (outcome, answer) = match &delivery.entry {
        Err(why) => {
            tracing::warn!(entry = %delivery.entry_id, why, "a queued entry does not read back; dropped");
            (Outcome::Failed, None)
        }
        Ok(entry) => match should_run(shared, entry).await {
            Some(outcome) => (outcome, None),
            None => {
                let answer = call(shared, entry).await;
                let outcome = if (200..300).contains(&answer.status) { Outcome::Done } else { Outcome::Failed };
                (outcome, Some(answer))
            }
        },
    };
    let mut wait = Duration::from_millis(100);
    loop {
        match shared.queue.finish(delivery, outcome, answer.as_ref()).await {
            Ok(settled) => {
                if settled.finalize
                    && let Ok(Entry { owner: Owner::Batch { batch, .. }, .. }) = &delivery.entry
                    && let Err(e) = shared.queue.finalize(batch).await
                {
                    tracing::warn!(batch, error = %e, "cannot finalize a batch now; the sweep will");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(entry = %delivery.entry_id, error = %e, "cannot settle a queued entry; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// `Some(outcome)` for an entry not to run: expired, or cancelled.
async fn should_run(shared: &Shared, entry: &Entry) -> Option<Outcome> {
    if now_ms() > entry.expires {
        return Some(Outcome::Expired);
    }
    match &entry.owner {
        Owner::Async => match shared.queue.start_async(&entry.id).await {
            Ok(state) if state == "queued" || state == "running" => None,
            Ok(_) => Some(Outcome::Cancelled),
            // Redis down: run it; the settle waits for Redis.
            Err(_) => None,
        },
        Owner::Batch { batch, .. } => {
            let status = batch_status(shared, batch).await;
            match status.as_deref() {
                Some("validating" | "in_progress") | None => None,
                Some(_) => Some(Outcome::Cancelled),
            }
        }
    }
}

async fn batch_status(shared: &Shared, batch: &str) -> Option<String> {
    let now = tokio::time::Instant::now();
    if let Some((status, at)) = shared.statuses.lock().unwrap_or_else(PoisonError::into_inner).get(batch)
        && now.duration_since(*at) < STATUS_FOR
    {
        return Some(status.clone());
    }
    let status = shared.queue.batch_status(batch).await.ok()?;
    let mut statuses = shared.statuses.lock().unwrap_or_else(PoisonError::into_inner);
    statuses.retain(|_, (_, at)| now.duration_since(*at) < STATUS_FOR);
    statuses.insert(batch.to_owned(), (status.clone(), now));
    Some(status)
}

/// The answer the model routes give `entry`, as its submitter. A refusal
/// by the caller's limits waits as long as they say and tries again (queued
/// work counts against them as it runs); a pool that could not take it is
/// tried again [`TRIES`] times.
async fn call(shared: &Shared, entry: &Entry) -> Answered {
    let caller = Arc::new(entry.caller.caller());
    let mut tries = 0;
    loop {
        tries += 1;
        let answer = once(shared, entry, &caller).await;
        let retry_after = answer
            .headers
            .iter()
            .find(|(k, _)| k == "retry-after")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let again = match answer.status {
            // A limit says when it will let the call in; one that cannot
            // ever (a call larger than the limit) says nothing.
            429 => retry_after.is_some(),
            502..=504 => tries < TRIES,
            _ => false,
        };
        let retry_after = retry_after.unwrap_or(Duration::from_secs(1));
        let deadline = entry.expires.saturating_sub(now_ms());
        if !again || retry_after.as_millis() as u64 >= deadline {
            return answer;
        }
        tokio::time::sleep(retry_after).await;
    }
}

async fn once(shared: &Shared, entry: &Entry, caller: &Arc<crate::call::Caller>) -> Answered {
    let mut req = Request::post(entry.path.as_str());
    for (k, v) in &entry.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let request_id = entry.id.replace(':', "-");
    let mut req = match req.header("x-request-id", &request_id).body(Body::from(entry.body.clone())) {
        Ok(r) => r,
        Err(e) => return failed(500, &format!("the queued request does not rebuild: {e}")),
    };
    req.extensions_mut().insert(caller.clone());
    req.extensions_mut().insert(Class::Queued);
    let resp = match shared.routes.clone().oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = super::ANSWER_HEADERS
        .iter()
        .filter_map(|h| Some(((*h).to_owned(), resp.headers().get(*h)?.to_str().ok()?.to_owned())))
        .collect();
    if let Some(v) = resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()) {
        headers.push(("retry-after".into(), v.to_owned()));
    }
    if !headers.iter().any(|(k, _)| k == "x-request-id") {
        headers.push(("x-request-id".into(), request_id));
    }
    match axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES).await {
        Ok(body) => Answered { status, headers, body },
        Err(_) => failed(502, &format!("the answer is larger than {MAX_ANSWER_BYTES} bytes; not stored")),
    }
}

fn failed(status: u16, detail: &str) -> Answered {
    let body = serde_json::json!({"type": "urn:infergate:error:queued-request-failed", "title": "Queued request failed", "status": status, "detail": detail});
    Answered {
        status,
        headers: vec![("content-type".into(), "application/problem+json".into())],
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
    }
}
