//! Queued inference on Redis Streams: what async requests and batches
//! leave for later, shared by every replica that names the same Redis.
//!
//! One stream per model named (`<prefix><stream>:<model>`), read by every
//! replica in one consumer group, so a consumer asks only for the models
//! its pools have room for. An entry carries everything its request needs
//! to run anywhere: tenant, caller, target, path, headers, body, expiry and
//! its idempotency key. Delivery is at least once: an entry is
//! acknowledged (and deleted) in the same script that stores its result
//! under its idempotency key, once; an entry pending on a consumer that
//! died is claimed by another after `queue.claim_after`.
//!
//! This module is the store (streams, results, async jobs, files,
//! batches); the edge's consumer (`edge::queued`) runs the entries.

pub mod batches;
mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deadpool_redis::redis::{self, FromRedisValue, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::call::{Caller, Principal};
use crate::config::LimitSpec;
use crate::config::queue::QueueConfig;
use crate::error::{GatewayError, QueuedKind};
use crate::redis_pool::RedisSetupError;

/// The queue: its settings and a pool of connections to its Redis.
pub struct Queue {
    config: QueueConfig,
    pool: deadpool_redis::Pool,
    /// Told when this replica queues something, so its consumer looks now.
    submitted: tokio::sync::Notify,
    /// Set with it, for a consumer that was not waiting.
    fresh: std::sync::atomic::AtomicBool,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A new unguessable id: `prefix` and 24 hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).unwrap_or_else(|_| bytes.iter_mut().for_each(|b| *b = fastrand::u8(..)));
    format!("{prefix}{}", hex::encode(bytes))
}

/// A tenant's part of a key: its name hashed, so any name is a safe key and
/// another tenant's ids, once learnt, still name nothing of theirs.
pub fn tenant_key(tenant: &str) -> String {
    hex::encode(&Sha256::digest(tenant.as_bytes())[..12])
}

/// The caller an entry runs as: who submitted it, as the policy resolved
/// them then (never their secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueuedCaller {
    /// `key:<id>`, `user:<sub>` or `anonymous`.
    pub principal: String,
    pub tenant: String,
    pub tier: String,
    pub client: std::net::IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitSpec>,
}

impl From<&Caller> for QueuedCaller {
    fn from(c: &Caller) -> Self {
        let principal = match &c.principal {
            Principal::Key(id) => format!("key:{id}"),
            Principal::User(sub) => format!("user:{sub}"),
            Principal::Anonymous => "anonymous".to_owned(),
        };
        let mut models = c.models.as_ref().map(|m| m.iter().cloned().collect::<Vec<_>>());
        if let Some(m) = models.as_mut() {
            m.sort();
        }
        Self {
            principal,
            tenant: c.tenant.to_string(),
            tier: c.tier.to_string(),
            client: c.client,
            models,
            limits: c.limits,
        }
    }
}

impl QueuedCaller {
    pub fn caller(&self) -> Caller {
        let principal = if let Some(id) = self.principal.strip_prefix("key:") {
            Principal::Key(id.into())
        } else if let Some(sub) = self.principal.strip_prefix("user:") {
            Principal::User(sub.into())
        } else {
            Principal::Anonymous
        };
        Caller {
            principal,
            tenant: self.tenant.as_str().into(),
            tier: self.tier.as_str().into(),
            client: self.client,
            models: self.models.as_ref().map(|m| Arc::new(m.iter().cloned().collect())),
            limits: self.limits,
        }
    }
}

/// What an entry belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Owner {
    /// An async request (`Prefer: respond-async`); its id is the job's.
    Async,
    /// Line `line` (from 0) of batch `batch`, with the line's `custom_id`.
    Batch { batch: String, line: usize, custom_id: String },
}

/// One queued request, as its stream entry carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The job id (async) or `<batch>:<line>`: its idempotency key, under
    /// which its result is stored once.
    pub id: String,
    pub owner: Owner,
    pub caller: QueuedCaller,
    /// The model named, whose stream it is in.
    pub target: String,
    /// The route it calls, e.g. `/v1/embeddings`.
    pub path: String,
    /// The request headers that shape its answer (type, version pin, cache).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Unix ms after which it is not run.
    pub expires: u64,
}

impl Entry {
    fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            ("id", self.id.clone().into_bytes()),
            ("caller", serde_json::to_vec(&self.caller).unwrap_or_default()),
            ("target", self.target.clone().into_bytes()),
            ("path", self.path.clone().into_bytes()),
            ("headers", serde_json::to_vec(&self.headers).unwrap_or_default()),
            ("body", self.body.to_vec()),
            ("expires", self.expires.to_string().into_bytes()),
        ];
        if let Owner::Batch { batch, line, custom_id } = &self.owner {
            f.push(("batch", batch.clone().into_bytes()));
            f.push(("line", line.to_string().into_bytes()));
            f.push(("custom_id", custom_id.clone().into_bytes()));
        }
        f
    }

    fn parse(map: &HashMap<String, Value>) -> Result<Self, String> {
        fn text(map: &HashMap<String, Value>, k: &str) -> Result<String, String> {
            map.get(k)
                .map_or(Ok(String::new()), |v| String::from_redis_value(v.clone()).map_err(|e| format!("{k}: {e}")))
        }
        let body: Vec<u8> = map
            .get("body")
            .map_or(Ok(Vec::new()), |v| Vec::<u8>::from_redis_value(v.clone()).map_err(|e| format!("body: {e}")))?;
        let batch = text(map, "batch")?;
        let owner = if batch.is_empty() {
            Owner::Async
        } else {
            Owner::Batch {
                batch,
                line: text(map, "line")?.parse().map_err(|_| "line: not a number")?,
                custom_id: text(map, "custom_id")?,
            }
        };
        Ok(Self {
            id: text(map, "id")?,
            owner,
            caller: serde_json::from_str(&text(map, "caller")?).map_err(|e| format!("caller: {e}"))?,
            target: text(map, "target")?,
            path: text(map, "path")?,
            headers: serde_json::from_str(&text(map, "headers")?).map_err(|e| format!("headers: {e}"))?,
            body: body.into(),
            expires: text(map, "expires")?.parse().map_err(|_| "expires: not a number")?,
        })
    }
}

/// An entry given to this consumer: where it lies, and what it is.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub stream: String,
    /// The stream entry id (`<ms>-<seq>`).
    pub entry_id: String,
    /// `Err`: an entry that does not read back (settled as failed).
    pub entry: Result<Entry, String>,
}

/// How a queued request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a 2xx.
    Done,
    /// Answered with an error (its status and body are the result).
    Failed,
    /// Not run: its time ran out in the queue.
    Expired,
    /// Not run: cancelled (or its batch was).
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A queued request's answer, as the synchronous call gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Bytes,
}

/// What settling an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// This settle stored the result (not a second delivery's duplicate).
    pub stored: bool,
    /// It settled its batch's last entry: the batch is to be finalized.
    pub finalize: bool,
}

/// The state of an async request, as `GET /v1/async/{id}` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// queued, running, done, failed, expired or cancelled.
    pub state: String,
    pub target: String,
    pub created_at: u64,
    pub expires_at: u64,
    /// The answer, once done or failed.
    pub answer: Option<Answered>,
}

/// A new async request for [`Queue::submit_async`].
pub struct NewJob {
    /// The tenant's idempotency key (`Idempotency-Key`), if it sent one.
    pub idempotency_key: Option<String>,
    pub caller: QueuedCaller,
    pub target: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> GatewayError {
    GatewayError::QueueUnavailable { detail: format!("redis {what}: {e}") }
}

impl Queue {
    pub fn new(config: QueueConfig) -> Result<Arc<Self>, RedisSetupError> {
        let pool = crate::redis_pool::connect(&config.redis())?;
        Ok(Arc::new(Self {
            config,
            pool,
            submitted: tokio::sync::Notify::new(),
            fresh: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Wait until this replica queues something.
    pub async fn until_submitted(&self) {
        self.submitted.notified().await;
    }

    /// Whether this replica queued something since last asked.
    pub fn take_submitted(&self) -> bool {
        self.fresh.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    pub(super) fn note_submitted(&self) {
        self.fresh.store(true, std::sync::atomic::Ordering::Release);
        self.submitted.notify_one();
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.config.prefix)
    }

    /// The stream of requests for `target`.
    pub fn stream_key(&self, target: &str) -> String {
        self.key(&format!("{}:{target}", self.config.stream))
    }

    fn targets_key(&self) -> String {
        self.key("targets")
    }

    fn quota_key(&self, tenant: &str) -> String {
        self.key(&format!("tenant:{}:queued", tenant_key(tenant)))
    }

    fn job_key(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }

    fn result_key(&self, id: &str) -> String {
        self.key(&format!("result:{id}"))
    }

    /// A connection, or 503 `queue-unavailable`.
    async fn conn(&self) -> Result<deadpool_redis::Connection, GatewayError> {
        self.pool.get().await.map_err(|e| unavailable("connect", e))
    }

    /// `op`, bounded by `queue.timeout`.
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, GatewayError> {
        self.bounded_by(self.config.timeout, what, op).await
    }

    async fn bounded_by<T>(
        &self,
        timeout: Duration,
        what: &str,
        op: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, GatewayError> {
        match tokio::time::timeout(timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(what, format!("no answer within {:?}", self.config.timeout))),
        }
    }

    /// Queue an async request; its job (id, state) either way. The same
    /// tenant's `idempotency_key` names the same job: sent again, nothing
    /// is queued twice.
    pub async fn submit_async(&self, new: NewJob) -> Result<Job, GatewayError> {
        let tenant = new.caller.tenant.clone();
        let id = match &new.idempotency_key {
            Some(k) => format!("async_{}", hex::encode(&Sha256::digest(format!("{tenant}\n{k}").as_bytes())[..12])),
            None => new_id("async_"),
        };
        let now = now_ms();
        let expires = now + ms(self.config.async_expiry);
        let entry = Entry {
            id: id.clone(),
            owner: Owner::Async,
            caller: new.caller,
            target: new.target.clone(),
            path: new.path,
            headers: new.headers,
            body: new.body,
            expires,
        };
        let job: Vec<(&str, Vec<u8>)> = vec![
            ("tenant", tenant_key(&tenant).into_bytes()),
            ("state", b"queued".to_vec()),
            ("target", new.target.clone().into_bytes()),
            ("created_at", now.to_string().into_bytes()),
            ("expires_at", expires.to_string().into_bytes()),
        ];
        let mut invocation = scripts::SUBMIT_ASYNC.key(self.quota_key(&tenant));
        invocation
            .key(self.job_key(&id))
            .key(self.stream_key(&new.target))
            .key(self.targets_key())
            .arg(self.config.max_queued_per_tenant)
            .arg(&self.config.group)
            .arg(ms(self.config.async_expiry + self.config.result_ttl))
            .arg(&new.target)
            .arg(job.len() * 2);
        for (k, v) in job.iter().map(|(k, v)| (*k, v.clone())).chain(entry.fields()) {
            invocation.arg(k).arg(v);
        }
        let mut conn = self.conn().await?;
        let (code, detail): (i64, String) = self.bounded("submit", invocation.invoke_async(&mut conn)).await?;
        if code < 0 {
            return Err(GatewayError::QueueQuota {
                queued: detail.parse().unwrap_or(0),
                adding: 1,
                limit: self.config.max_queued_per_tenant,
            });
        }
        metrics::counter!(crate::telemetry::metrics::QUEUE_SUBMITTED, "kind" => "async")
            .increment(u64::from(code == 1));
        self.note_submitted();
        self.job(&tenant, &id).await
    }

    /// `tenant`'s async request `id`, with its answer once it has one.
    pub async fn job(&self, tenant: &str, id: &str) -> Result<Job, GatewayError> {
        let not_found = || GatewayError::QueuedNotFound { kind: QueuedKind::Async, id: id.to_owned() };
        if !id.starts_with("async_") {
            return Err(not_found());
        }
        let mut conn = self.conn().await?;
        let fields: HashMap<String, String> =
            self.bounded("HGETALL", redis::cmd("HGETALL").arg(self.job_key(id)).query_async(&mut conn)).await?;
        if fields.get("tenant").is_none_or(|t| *t != tenant_key(tenant)) {
            return Err(not_found());
        }
        let num = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        let mut state = fields.get("state").cloned().unwrap_or_default();
        let expires_at = num("expires_at");
        if state == "queued" && now_ms() > expires_at {
            state = "expired".to_owned();
        }
        let answer = if matches!(state.as_str(), "done" | "failed") { self.answer(&mut conn, id).await? } else { None };
        Ok(Job {
            id: id.to_owned(),
            state,
            target: fields.get("target").cloned().unwrap_or_default(),
            created_at: num("created_at"),
            expires_at,
            answer,
        })
    }

    async fn answer(&self, conn: &mut deadpool_redis::Connection, id: &str) -> Result<Option<Answered>, GatewayError> {
        let fields: HashMap<String, Vec<u8>> =
            self.bounded("HGETALL", redis::cmd("HGETALL").arg(self.result_key(id)).query_async(conn)).await?;
        Ok(answered(&fields))
    }

    /// Cancel `tenant`'s async request `id` unless it has finished; the
    /// job as it is after.
    pub async fn cancel_async(&self, tenant: &str, id: &str) -> Result<Job, GatewayError> {
        let job = self.job(tenant, id).await?;
        if !matches!(job.state.as_str(), "queued" | "running") {
            return Err(GatewayError::QueuedConflict {
                detail: format!("async request {id:?} is {}: only a queued or running one can be cancelled", job.state),
            });
        }
        let mut conn = self.conn().await?;
        let _: String = self
            .bounded("cancel", scripts::CANCEL_ASYNC.key(self.job_key(id)).arg(now_ms()).invoke_async(&mut conn))
            .await?;
        self.job(tenant, id).await
    }

    /// Every model something was ever queued for.
    pub async fn targets(&self) -> Result<Vec<String>, GatewayError> {
        let mut conn = self.conn().await?;
        self.bounded("SMEMBERS", redis::cmd("SMEMBERS").arg(self.targets_key()).query_async(&mut conn)).await
    }

    /// Up to `count` new entries for `target` given to `consumer`;
    /// waiting at most `block` for one when there are none.
    pub async fn read(
        &self,
        targets: &[(&str, usize)],
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>, GatewayError> {
        let mut out = Vec::new();
        let mut conn = self.conn().await?;
        for (target, count) in targets {
            let stream = self.stream_key(target);
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(&self.config.group).arg(&self.config.consumer).arg("COUNT").arg(*count);
            if let Some(b) = block {
                cmd.arg("BLOCK").arg(ms(b));
            }
            cmd.arg("STREAMS").arg(&stream).arg(">");
            let wait = self.config.timeout + block.unwrap_or_default();
            let reply: Result<Option<redis::streams::StreamReadReply>, _> =
                self.bounded_by(wait, "XREADGROUP", cmd.query_async(&mut conn)).await;
            let reply = match reply {
                Err(GatewayError::QueueUnavailable { detail }) if detail.contains("NOGROUP") => {
                    self.create_group(&mut conn, &stream).await?;
                    continue;
                }
                other => other?,
            };
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                out.extend(key.ids.into_iter().map(|id| Delivery {
                    stream: key.key.clone(),
                    entry_id: id.id,
                    entry: Entry::parse(&id.map),
                }));
            }
        }
        Ok(out)
    }

    async fn create_group(&self, conn: &mut deadpool_redis::Connection, stream: &str) -> Result<(), GatewayError> {
        let created: Result<(), _> = self
            .bounded(
                "XGROUP",
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(&self.config.group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(conn),
            )
            .await;
        match created {
            Err(GatewayError::QueueUnavailable { detail }) if detail.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Entries of `target` pending on any consumer for longer than
    /// `queue.claim_after`, taken over by this one (at most `count`).
    pub async fn claim(&self, target: &str, count: usize) -> Result<Vec<Delivery>, GatewayError> {
        let stream = self.stream_key(target);
        let mut conn = self.conn().await?;
        let reply: Result<redis::streams::StreamAutoClaimReply, _> = self
            .bounded(
                "XAUTOCLAIM",
                redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(&self.config.group)
                    .arg(&self.config.consumer)
                    .arg(ms(self.config.claim_after))
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn),
            )
            .await;
        let reply = match reply {
            Err(GatewayError::QueueUnavailable { detail }) if detail.contains("NOGROUP") => return Ok(Vec::new()),
            other => other?,
        };
        let claimed: Vec<Delivery> = reply
            .claimed
            .into_iter()
            .map(|id| Delivery { stream: stream.clone(), entry_id: id.id, entry: Entry::parse(&id.map) })
            .collect();
        if !claimed.is_empty() {
            metrics::counter!(crate::telemetry::metrics::QUEUE_RECLAIMS, "target" => target.to_owned())
                .increment(claimed.len() as u64);
        }
        Ok(claimed)
    }

    /// Tell the group that this consumer is still at `entries` (their idle
    /// time starts again), so no other consumer claims work in progress.
    pub async fn touch(&self, stream: &str, entries: &[String]) -> Result<(), GatewayError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: Value = self
            .bounded(
                "XCLAIM",
                redis::cmd("XCLAIM")
                    .arg(stream)
                    .arg(&self.config.group)
                    .arg(&self.config.consumer)
                    .arg(0)
                    .arg(entries)
                    .arg("JUSTID")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Mark an async request running; the state it was in (`cancelled`: do
    /// not run it).
    pub async fn start_async(&self, id: &str) -> Result<String, GatewayError> {
        let mut conn = self.conn().await?;
        self.bounded("start", scripts::START.key(self.job_key(id)).arg(now_ms()).invoke_async(&mut conn)).await
    }

    /// Settle `delivery`: store its answer once, count it, acknowledge and
    /// delete the entry and give its quota back, in one step.
    pub async fn finish(
        &self,
        delivery: &Delivery,
        outcome: Outcome,
        answer: Option<&Answered>,
    ) -> Result<Settled, GatewayError> {
        let (id, owner_key, kind, custom_id, tenant) = match &delivery.entry {
            Ok(e) => {
                let (owner_key, kind, custom_id) = match &e.owner {
                    Owner::Async => (self.job_key(&e.id), "async", String::new()),
                    Owner::Batch { batch, custom_id, .. } => (self.batch_key(batch), "batch", custom_id.clone()),
                };
                (e.id.clone(), owner_key, kind, custom_id, e.caller.tenant.clone())
            }
            // An entry that does not read back is acknowledged and dropped.
            Err(_) => (
                format!("unreadable:{}", delivery.entry_id),
                self.key("unreadable"),
                "async",
                String::new(),
                String::new(),
            ),
        };
        let mut invocation = scripts::FINISH.key(&delivery.stream);
        invocation
            .key(self.result_key(&id))
            .key(self.quota_key(&tenant))
            .key(owner_key)
            .arg(&self.config.group)
            .arg(&delivery.entry_id)
            .arg(kind)
            .arg(outcome.as_str())
            .arg(ms(self.config.result_ttl))
            .arg(now_ms());
        if let Some(a) = answer {
            invocation
                .arg("status")
                .arg(a.status)
                .arg("headers")
                .arg(serde_json::to_vec(&a.headers).unwrap_or_default())
                .arg("body")
                .arg(a.body.as_ref())
                .arg("custom_id")
                .arg(custom_id);
        } else if !custom_id.is_empty() {
            invocation.arg("custom_id").arg(custom_id);
        }
        let mut conn = self.conn().await?;
        let (stored, finalize, counted): (i64, i64, String) =
            self.bounded("finish", invocation.invoke_async(&mut conn)).await?;
        if stored == 1 {
            let counted = [Outcome::Done, Outcome::Failed, Outcome::Expired, Outcome::Cancelled]
                .into_iter()
                .find(|o| o.as_str() == counted)
                .unwrap_or(outcome);
            metrics::counter!(crate::telemetry::metrics::QUEUE_ENTRIES, "outcome" => counted.as_str()).increment(1);
            if answer.is_some() && counted != Outcome::Cancelled {
                metrics::counter!(crate::telemetry::metrics::QUEUE_RESULTS_STORED).increment(1);
            }
        }
        Ok(Settled { stored: stored == 1, finalize: finalize == 1 })
    }

    /// Depth of each target's stream and the age of its oldest entry.
    pub async fn depths(&self) -> Result<Vec<(String, u64, Duration)>, GatewayError> {
        let targets = self.targets().await?;
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for t in &targets {
            let s = self.stream_key(t);
            pipe.cmd("XLEN").arg(&s).cmd("XRANGE").arg(&s).arg("-").arg("+").arg("COUNT").arg(1);
        }
        let replies: Vec<Value> = self.bounded("XLEN", pipe.query_async(&mut conn)).await?;
        let now = now_ms();
        Ok(targets
            .into_iter()
            .zip(replies.chunks(2))
            .map(|(t, r)| {
                let depth = u64::from_redis_value(r[0].clone()).unwrap_or(0);
                let oldest = redis::streams::StreamRangeReply::from_redis_value(r[1].clone())
                    .ok()
                    .and_then(|r| r.ids.first().and_then(|id| id.id.split('-').next()?.parse::<u64>().ok()))
                    .map_or(Duration::ZERO, |at| Duration::from_millis(now.saturating_sub(at)));
                (t, depth, oldest)
            })
            .collect())
    }
}

/// A stored answer from its hash's fields.
fn answered(fields: &HashMap<String, Vec<u8>>) -> Option<Answered> {
    let status = std::str::from_utf8(fields.get("status")?).ok()?.parse().ok()?;
    Some(Answered {
        status,
        headers: fields.get("headers").and_then(|h| serde_json::from_slice(h).ok()).unwrap_or_default(),
        body: fields.get("body").cloned().unwrap_or_default().into(),
    })
}
