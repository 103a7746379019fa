//! Files and batches of the OpenAI Batch API, kept in the queue's Redis:
//! a file is its metadata (a hash) and its bytes (a string, appended in
//! pieces when the gateway writes one); a batch is a hash whose counters
//! the entries' settle script moves. Both belong to a tenant: another
//! tenant's ids name nothing.

use std::collections::HashMap;

use bytes::Bytes;
use deadpool_redis::redis;
use serde::Serialize;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use super::{Entry, Owner, Queue, QueuedCaller, answered, ms, new_id, now_ms, scripts, tenant_key};
use crate::error::{GatewayError, QueuedKind};

/// Lines read or written per Redis round trip.
const CHUNK: usize = 500;
/// Bytes of an output file gathered before they are appended in Redis.
const APPEND_EVERY: usize = 1 << 20;

/// A file as `GET /v1/files/{id}` shows it (OpenAI's file object).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub expires_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
}

/// One request of a batch, as its input file's line gives it.
pub struct Line {
    pub custom_id: String,
    /// The model its body names (the stream it goes to).
    pub model: String,
    pub body: Bytes,
}

/// What `POST /v1/batches` asks for.
pub struct NewBatch {
    pub caller: QueuedCaller,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Json>,
    /// Each line's request, or (line number from 1, why) for a line whose
    /// `url` is not the batch's endpoint: the batch then fails validation.
    pub lines: Result<Vec<Line>, Vec<(usize, String)>>,
}

impl Queue {
    fn file_key(&self, id: &str) -> String {
        self.key(&format!("file:{id}"))
    }

    fn file_data_key(&self, id: &str) -> String {
        self.key(&format!("filedata:{id}"))
    }

    pub(super) fn batch_key(&self, id: &str) -> String {
        self.key(&format!("batch:{id}"))
    }

    fn tenant_index(&self, tenant: &str, what: &str) -> String {
        self.key(&format!("tenant:{}:{what}", tenant_key(tenant)))
    }

    fn active_batches_key(&self) -> String {
        self.key("batches:active")
    }

    /// Keep `content` as `tenant`'s file.
    pub async fn create_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: Bytes,
    ) -> Result<FileObject, GatewayError> {
        let id = new_id("file-");
        let now = now_ms();
        let file = FileObject {
            id: id.clone(),
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: now / 1000,
            expires_at: (now + ms(self.config.file_ttl)) / 1000,
            filename: filename.to_owned(),
            purpose: purpose.to_owned(),
            status: "processed".into(),
        };
        let ttl = ms(self.config.file_ttl);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("SET").arg(self.file_data_key(&id)).arg(content.as_ref()).arg("PX").arg(ttl).ignore();
        self.file_meta(&mut pipe, tenant, &file, ttl);
        let mut conn = self.conn().await?;
        let () = self.bounded("file", pipe.query_async(&mut conn)).await?;
        Ok(file)
    }

    fn file_meta(&self, pipe: &mut redis::Pipeline, tenant: &str, file: &FileObject, ttl: u64) {
        pipe.cmd("HSET")
            .arg(self.file_key(&file.id))
            .arg("tenant")
            .arg(tenant_key(tenant))
            .arg("object")
            .arg(serde_json::to_vec(file).unwrap_or_default())
            .ignore()
            .cmd("PEXPIRE")
            .arg(self.file_key(&file.id))
            .arg(ttl)
            .ignore()
            .cmd("ZADD")
            .arg(self.tenant_index(tenant, "files"))
            .arg(file.created_at)
            .arg(&file.id)
            .ignore();
    }

    /// `tenant`'s file `id`.
    pub async fn file(&self, tenant: &str, id: &str) -> Result<FileObject, GatewayError> {
        let mut conn = self.conn().await?;
        let fields: HashMap<String, Vec<u8>> =
            self.bounded("HGETALL", redis::cmd("HGETALL").arg(self.file_key(id)).query_async(&mut conn)).await?;
        if fields.get("tenant").is_none_or(|t| *t != tenant_key(tenant).as_bytes()) {
            return Err(GatewayError::QueuedNotFound { kind: QueuedKind::File, id: id.to_owned() });
        }
        fields
            .get("object")
            .and_then(|o| serde_json::from_slice(o).ok())
            .ok_or_else(|| GatewayError::QueuedNotFound { kind: QueuedKind::File, id: id.to_owned() })
    }

    /// The bytes of `tenant`'s file `id`.
    pub async fn file_content(&self, tenant: &str, id: &str) -> Result<Bytes, GatewayError> {
        self.file(tenant, id).await?;
        let mut conn = self.conn().await?;
        let bytes: Option<Vec<u8>> =
            self.bounded("GET", redis::cmd("GET").arg(self.file_data_key(id)).query_async(&mut conn)).await?;
        bytes.map(Bytes::from).ok_or_else(|| GatewayError::QueuedNotFound { kind: QueuedKind::File, id: id.to_owned() })
    }

    /// The bytes of `tenant`'s file `id` as a stream of pieces of at most
    /// [`APPEND_EVERY`] bytes, read as they are sent: a download holds one
    /// piece in memory, however large the file.
    pub async fn file_pieces(
        self: &std::sync::Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<(u64, impl futures::Stream<Item = Result<Bytes, GatewayError>> + use<>), GatewayError> {
        let file = self.file(tenant, id).await?;
        let key = self.file_data_key(id);
        let mut conn = self.conn().await?;
        let len: u64 = self.bounded("STRLEN", redis::cmd("STRLEN").arg(&key).query_async(&mut conn)).await?;
        if len == 0 && file.bytes > 0 {
            return Err(GatewayError::QueuedNotFound { kind: QueuedKind::File, id: id.to_owned() });
        }
        let queue = self.clone();
        let pieces = futures::stream::try_unfold(0u64, move |at| {
            let (queue, key) = (queue.clone(), key.clone());
            async move {
                if at >= len {
                    return Ok(None);
                }
                let end = (at + APPEND_EVERY as u64).min(len) - 1;
                let mut conn = queue.conn().await?;
                let piece: Vec<u8> = queue
                    .bounded("GETRANGE", redis::cmd("GETRANGE").arg(&key).arg(at).arg(end).query_async(&mut conn))
                    .await?;
                if piece.is_empty() {
                    return Err(GatewayError::QueueUnavailable { detail: "the file was deleted while read".into() });
                }
                let next = at + piece.len() as u64;
                Ok(Some((Bytes::from(piece), next)))
            }
        });
        Ok((len, pieces))
    }

    /// Forget `tenant`'s file `id`.
    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<(), GatewayError> {
        self.file(tenant, id).await?;
        let mut conn = self.conn().await?;
        let () = self
            .bounded(
                "DEL",
                redis::pipe()
                    .cmd("DEL")
                    .arg(self.file_key(id))
                    .arg(self.file_data_key(id))
                    .ignore()
                    .cmd("ZREM")
                    .arg(self.tenant_index(tenant, "files"))
                    .arg(id)
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// `tenant`'s files, newest first.
    pub async fn files(&self, tenant: &str, limit: usize) -> Result<Vec<FileObject>, GatewayError> {
        let ids = self.index(tenant, "files", None, limit).await?;
        let mut out = Vec::new();
        for id in ids {
            match self.file(tenant, &id).await {
                Ok(f) => out.push(f),
                Err(GatewayError::QueuedNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Ids in `tenant`'s `what` index, newest first, after `after`.
    async fn index(
        &self,
        tenant: &str,
        what: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, GatewayError> {
        let key = self.tenant_index(tenant, what);
        let mut conn = self.conn().await?;
        let start = match after {
            None => 0,
            Some(after) => {
                let rank: Option<i64> = self
                    .bounded("ZREVRANK", redis::cmd("ZREVRANK").arg(&key).arg(after).query_async(&mut conn))
                    .await?;
                rank.map_or(0, |r| r + 1)
            }
        };
        let stop = start + i64::try_from(limit).unwrap_or(i64::MAX / 2) - 1;
        self.bounded("ZREVRANGE", redis::cmd("ZREVRANGE").arg(&key).arg(start).arg(stop).query_async(&mut conn)).await
    }

    /// Create a batch and queue its lines; refused with 429 when they would
    /// pass the tenant's quota. A batch whose lines do not all call its
    /// endpoint is created `failed`, with the lines named, as OpenAI's is.
    pub async fn create_batch(&self, new: NewBatch) -> Result<Json, GatewayError> {
        let tenant = new.caller.tenant.clone();
        let id = new_id("batch_");
        let now = now_ms();
        let window = ms(parse_window(&new.completion_window)?);
        let expires = now + window;
        let key = self.batch_key(&id);
        let (lines, errors) = match new.lines {
            Ok(lines) => (lines, None),
            Err(errors) => (Vec::new(), Some(errors)),
        };
        let mut conn = self.conn().await?;
        if errors.is_none() {
            let reserved: i64 = self
                .bounded(
                    "reserve",
                    scripts::RESERVE
                        .key(self.quota_key(&tenant))
                        .arg(lines.len())
                        .arg(self.config.max_queued_per_tenant)
                        .invoke_async(&mut conn),
                )
                .await?;
            if reserved >= 0 {
                return Err(GatewayError::QueueQuota {
                    queued: reserved.unsigned_abs(),
                    adding: lines.len() as u64,
                    limit: self.config.max_queued_per_tenant,
                });
            }
        }
        let secs = (now / 1000).to_string();
        let mut fields: Vec<(&str, String)> = vec![
            ("tenant", tenant_key(&tenant)),
            ("endpoint", new.endpoint.clone()),
            ("input_file_id", new.input_file_id.clone()),
            ("completion_window", new.completion_window.clone()),
            ("metadata", new.metadata.as_ref().map_or_else(String::new, Json::to_string)),
            ("created_at", secs.clone()),
            ("expires_at", (expires / 1000).to_string()),
            ("total", lines.len().to_string()),
            ("status", "validating".into()),
        ];
        if let Some(errors) = &errors {
            let data: Vec<Json> = errors
                .iter()
                .map(|(line, message)| json!({"code": "invalid_request", "message": message, "param": "url", "line": line}))
                .collect();
            fields.push(("errors", json!({"object": "list", "data": data}).to_string()));
            fields.push(("status", "failed".into()));
            fields.push(("failed_at", secs.clone()));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(&key);
        for (k, v) in &fields {
            pipe.arg(*k).arg(v);
        }
        pipe.ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window + ms(self.config.result_ttl))
            .ignore()
            .cmd("ZADD")
            .arg(self.tenant_index(&tenant, "batches"))
            .arg(now)
            .arg(&id)
            .ignore();
        if errors.is_none() {
            pipe.cmd("SADD").arg(self.active_batches_key()).arg(&id).ignore();
        }
        let () = self.bounded("batch", pipe.query_async(&mut conn)).await?;
        if errors.is_some() {
            return self.batch(&tenant, &id).await;
        }
        let total = lines.len();
        let queued = self.queue_lines(&mut conn, &id, &new.caller, &new.endpoint, lines, expires).await;
        match queued {
            Ok(n) => {
                metrics::counter!(crate::telemetry::metrics::QUEUE_SUBMITTED, "kind" => "batch").increment(n as u64);
                self.note_submitted();
                let _: String = self
                    .bounded(
                        "batch",
                        scripts::TRANSITION
                            .key(&key)
                            .arg("in_progress")
                            .arg(&secs)
                            .arg("validating")
                            .invoke_async(&mut conn),
                    )
                    .await?;
                if n == 0 {
                    self.settle_empty(&key).await?;
                }
            }
            Err((n, e)) => {
                // What was queued runs; the rest is given back and the batch
                // counts only what was queued.
                tracing::warn!(batch = %id, queued = n, error = %e, "a batch was queued in part; it fails");
                let _: Result<(), _> = self
                    .bounded(
                        "batch",
                        redis::pipe()
                            .cmd("HSET")
                            .arg(&key)
                            .arg("total")
                            .arg(n)
                            .arg("status")
                            .arg("in_progress")
                            .ignore()
                            .cmd("DECRBY")
                            .arg(self.quota_key(&tenant))
                            .arg(total - n)
                            .ignore()
                            .query_async(&mut conn),
                    )
                    .await;
                return Err(e);
            }
        }
        self.batch(&tenant, &id).await
    }

    /// XADD every line, `CHUNK` at a time (each chunk all or nothing); how
    /// many were queued, or how many before it failed and why.
    async fn queue_lines(
        &self,
        conn: &mut deadpool_redis::Connection,
        batch: &str,
        caller: &QueuedCaller,
        endpoint: &str,
        lines: Vec<Line>,
        expires: u64,
    ) -> Result<usize, (usize, GatewayError)> {
        let total = lines.len();
        let mut streams = std::collections::BTreeSet::new();
        for l in &lines {
            streams.insert(l.model.clone());
        }
        let mut pipe = redis::pipe();
        for model in &streams {
            pipe.cmd("SADD").arg(self.targets_key()).arg(model).ignore();
        }
        let () = self.bounded("SADD", pipe.query_async(conn)).await.map_err(|e| (0, e))?;
        for model in &streams {
            self.create_group(conn, &self.stream_key(model)).await.map_err(|e| (0, e))?;
        }
        let mut queued = 0;
        let mut lines = lines.into_iter().enumerate().peekable();
        while lines.peek().is_some() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let mut n = 0;
            for (line, l) in lines.by_ref().take(CHUNK) {
                let entry = Entry {
                    id: format!("{batch}:{line}"),
                    owner: Owner::Batch { batch: batch.to_owned(), line, custom_id: l.custom_id },
                    caller: caller.clone(),
                    target: l.model.clone(),
                    path: endpoint.to_owned(),
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: l.body,
                    expires,
                };
                pipe.cmd("XADD").arg(self.stream_key(&l.model)).arg("*");
                for (k, v) in entry.fields() {
                    pipe.arg(k).arg(v);
                }
                pipe.ignore();
                n += 1;
            }
            let () = self.bounded("XADD", pipe.query_async(conn)).await.map_err(|e| (queued, e))?;
            queued += n;
        }
        debug_assert_eq!(queued, total);
        Ok(queued)
    }

    /// A batch of no lines is settled at once.
    async fn settle_empty(&self, key: &str) -> Result<(), GatewayError> {
        let mut conn = self.conn().await?;
        let _: String = self
            .bounded(
                "batch",
                scripts::TRANSITION
                    .key(key)
                    .arg("finalizing")
                    .arg(now_ms() / 1000)
                    .arg("in_progress")
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// `tenant`'s batch `id`, as OpenAI's batch object.
    pub async fn batch(&self, tenant: &str, id: &str) -> Result<Json, GatewayError> {
        let fields = self.batch_fields(id).await?;
        if fields.get("tenant").is_none_or(|t| *t != tenant_key(tenant)) {
            return Err(GatewayError::QueuedNotFound { kind: QueuedKind::Batch, id: id.to_owned() });
        }
        Ok(batch_object(id, &fields))
    }

    async fn batch_fields(&self, id: &str) -> Result<HashMap<String, String>, GatewayError> {
        if !id.starts_with("batch_") {
            return Ok(HashMap::new());
        }
        let mut conn = self.conn().await?;
        self.bounded("HGETALL", redis::cmd("HGETALL").arg(self.batch_key(id)).query_async(&mut conn)).await
    }

    /// The status of batch `id` (empty when it is gone), for the consumer.
    pub async fn batch_status(&self, id: &str) -> Result<String, GatewayError> {
        let mut conn = self.conn().await?;
        let status: Option<String> = self
            .bounded("HGET", redis::cmd("HGET").arg(self.batch_key(id)).arg("status").query_async(&mut conn))
            .await?;
        Ok(status.unwrap_or_default())
    }

    /// `tenant`'s batches, newest first, after `after`; and whether more follow.
    pub async fn batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Json>, bool), GatewayError> {
        let ids = self.index(tenant, "batches", after, limit + 1).await?;
        let more = ids.len() > limit;
        let mut out = Vec::new();
        for id in ids.into_iter().take(limit) {
            match self.batch(tenant, &id).await {
                Ok(b) => out.push(b),
                Err(GatewayError::QueuedNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((out, more))
    }

    /// Cancel `tenant`'s batch `id`: `cancelling` until the lines not yet
    /// run are settled as cancelled, then `cancelled`.
    pub async fn cancel_batch(&self, tenant: &str, id: &str) -> Result<Json, GatewayError> {
        let before = self.batch(tenant, id).await?;
        let mut conn = self.conn().await?;
        let was: String = self
            .bounded(
                "cancel",
                scripts::TRANSITION
                    .key(self.batch_key(id))
                    .arg("cancelling")
                    .arg(now_ms() / 1000)
                    .arg("validating")
                    .arg("in_progress")
                    .invoke_async(&mut conn),
            )
            .await?;
        if !matches!(was.as_str(), "validating" | "in_progress" | "cancelling") {
            return Err(GatewayError::QueuedConflict {
                detail: format!(
                    "batch {id:?} is {}: only a validating or in-progress batch can be cancelled",
                    before["status"].as_str().unwrap_or(&was)
                ),
            });
        }
        self.batch(tenant, id).await
    }

    /// Write batch `id`'s output and error files from its lines' results
    /// and give it its final status. Idempotent: a finalizer that died is
    /// replaced by the sweep, which writes the same files again.
    pub async fn finalize(&self, id: &str) -> Result<(), GatewayError> {
        let fields = self.batch_fields(id).await?;
        if fields.get("status").map(String::as_str) != Some("finalizing") {
            return Ok(());
        }
        let tenant_hash = fields.get("tenant").cloned().unwrap_or_default();
        let total: usize = fields.get("total").and_then(|t| t.parse().ok()).unwrap_or(0);
        let output_id = derived_id(id, "output");
        let error_id = derived_id(id, "error");
        let mut conn = self.conn().await?;
        let () = self
            .bounded(
                "DEL",
                redis::cmd("DEL")
                    .arg(self.file_data_key(&output_id))
                    .arg(self.file_data_key(&error_id))
                    .query_async(&mut conn),
            )
            .await?;
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let (mut output_bytes, mut error_bytes) = (0u64, 0u64);
        for start in (0..total).step_by(CHUNK) {
            let mut pipe = redis::pipe();
            for line in start..(start + CHUNK).min(total) {
                pipe.cmd("HGETALL").arg(self.result_key(&format!("{id}:{line}")));
            }
            let results: Vec<HashMap<String, Vec<u8>>> = self.bounded("HGETALL", pipe.query_async(&mut conn)).await?;
            for (offset, result) in results.iter().enumerate() {
                let Some((ok, line)) = output_line(id, start + offset, result) else { continue };
                let into = if ok { &mut output } else { &mut errors };
                serde_json::to_writer(&mut *into, &line).unwrap_or_default();
                into.push(b'\n');
            }
            output_bytes += self.append(&mut conn, &output_id, &mut output, false).await?;
            error_bytes += self.append(&mut conn, &error_id, &mut errors, false).await?;
        }
        output_bytes += self.append(&mut conn, &output_id, &mut output, true).await?;
        error_bytes += self.append(&mut conn, &error_id, &mut errors, true).await?;
        let now = now_ms();
        let ttl = ms(self.config.result_ttl);
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let status = if fields.contains_key("cancelling_at") {
            "cancelled"
        } else if num("expired") > 0 {
            "expired"
        } else {
            "completed"
        };
        let mut pipe = redis::pipe();
        let file = |pipe: &mut redis::Pipeline, fid: &str, bytes: u64| {
            let object = FileObject {
                id: fid.to_owned(),
                object: "file".into(),
                bytes,
                created_at: now / 1000,
                expires_at: (now + ttl) / 1000,
                filename: format!("{id}_{}.jsonl", if fid == output_id { "output" } else { "error" }),
                purpose: "batch_output".into(),
                status: "processed".into(),
            };
            pipe.cmd("HSET")
                .arg(self.file_key(fid))
                .arg("tenant")
                .arg(&tenant_hash)
                .arg("object")
                .arg(serde_json::to_vec(&object).unwrap_or_default())
                .ignore()
                .cmd("PEXPIRE")
                .arg(self.file_key(fid))
                .arg(ttl)
                .ignore()
                .cmd("PEXPIRE")
                .arg(self.file_data_key(fid))
                .arg(ttl)
                .ignore()
                .cmd("ZADD")
                .arg(self.key(&format!("tenant:{tenant_hash}:files")))
                .arg(now / 1000)
                .arg(fid)
                .ignore();
        };
        pipe.atomic();
        let batch = self.batch_key(id);
        if output_bytes > 0 {
            file(&mut pipe, &output_id, output_bytes);
            pipe.cmd("HSET").arg(&batch).arg("output_file_id").arg(&output_id).ignore();
        }
        if error_bytes > 0 {
            file(&mut pipe, &error_id, error_bytes);
            pipe.cmd("HSET").arg(&batch).arg("error_file_id").arg(&error_id).ignore();
        }
        pipe.cmd("HSET")
            .arg(&batch)
            .arg("status")
            .arg(status)
            .arg(format!("{status}_at"))
            .arg(now / 1000)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&batch)
            .arg(ttl)
            .ignore()
            .cmd("SREM")
            .arg(self.active_batches_key())
            .arg(id)
            .ignore();
        let () = self.bounded("finalize", pipe.query_async(&mut conn)).await?;
        // The lines' results are in the files now.
        for start in (0..total).step_by(CHUNK) {
            let mut del = redis::cmd("UNLINK");
            for line in start..(start + CHUNK).min(total) {
                del.arg(self.result_key(&format!("{id}:{line}")));
            }
            let _: Result<i64, _> = self.bounded("UNLINK", del.query_async(&mut conn)).await;
        }
        tracing::info!(batch = %id, status, output_bytes, error_bytes, "batch finalized");
        Ok(())
    }

    /// Append `buf` to file `id`'s bytes once it is large (or `flush`).
    async fn append(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
        buf: &mut Vec<u8>,
        flush: bool,
    ) -> Result<u64, GatewayError> {
        if buf.is_empty() || (!flush && buf.len() < APPEND_EVERY) {
            return Ok(0);
        }
        let n = buf.len() as u64;
        let _: i64 = self
            .bounded("APPEND", redis::cmd("APPEND").arg(self.file_data_key(id)).arg(buf.as_slice()).query_async(conn))
            .await?;
        buf.clear();
        Ok(n)
    }

    /// Batches whose finalizer stopped (a replica died), finalized again;
    /// run now and then by every replica.
    pub async fn sweep(&self) -> Result<(), GatewayError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = self
            .bounded("SMEMBERS", redis::cmd("SMEMBERS").arg(self.active_batches_key()).query_async(&mut conn))
            .await?;
        let stale = self.config.claim_after.as_secs().max(1);
        let now = now_ms() / 1000;
        for id in ids {
            let fields = self.batch_fields(&id).await?;
            if fields.is_empty() {
                let _: i64 = self
                    .bounded("SREM", redis::cmd("SREM").arg(self.active_batches_key()).arg(&id).query_async(&mut conn))
                    .await?;
                continue;
            }
            let since: u64 = fields.get("finalizing_at").and_then(|v| v.parse().ok()).unwrap_or(now);
            if fields.get("status").map(String::as_str) == Some("finalizing") && now.saturating_sub(since) >= stale {
                tracing::warn!(batch = %id, "finalizing a batch whose finalizer stopped");
                self.finalize(&id).await?;
            }
        }
        Ok(())
    }
}

/// `completion_window`: only `24h`, as OpenAI's.
fn parse_window(window: &str) -> Result<std::time::Duration, GatewayError> {
    match window {
        "24h" => Ok(std::time::Duration::from_secs(24 * 3600)),
        _ => Err(GatewayError::invalid("completion_window", "must be \"24h\"")),
    }
}

/// The id of a file a batch writes: the same every time it is finalized.
fn derived_id(batch: &str, what: &str) -> String {
    format!("file-{}", hex::encode(&Sha256::digest(format!("{batch}\n{what}").as_bytes())[..12]))
}

/// Line `line` of a batch's output (`true`) or error file, in OpenAI's
/// format; `None` for a line with no result (cancelled before it ran).
fn output_line(batch: &str, line: usize, result: &HashMap<String, Vec<u8>>) -> Option<(bool, Json)> {
    let custom_id = String::from_utf8_lossy(result.get("custom_id")?).into_owned();
    let id = format!("batch_req_{}", &derived_id(batch, &line.to_string())[5..]);
    let outcome = result.get("outcome").map(|o| String::from_utf8_lossy(o).into_owned()).unwrap_or_default();
    if outcome == "expired" {
        let error = json!({"code": "batch_expired", "message": "This request could not be executed before the completion window expired."});
        return Some((false, json!({"id": id, "custom_id": custom_id, "response": null, "error": error})));
    }
    let answer = answered(result)?;
    let request_id = answer.headers.iter().find(|(k, _)| k == "x-request-id").map(|(_, v)| v.clone());
    let body: Json = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&answer.body).into_owned()));
    let ok = (200..300).contains(&answer.status);
    let response = json!({"status_code": answer.status, "request_id": request_id, "body": body});
    Some((ok, json!({"id": id, "custom_id": custom_id, "response": response, "error": null})))
}

/// OpenAI's batch object from a batch's hash.
fn batch_object(id: &str, f: &HashMap<String, String>) -> Json {
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    let at = |k: &str| num(k).map_or(Json::Null, Json::from);
    let text = |k: &str| f.get(k).filter(|v| !v.is_empty()).map_or(Json::Null, |v| Json::from(v.as_str()));
    let parsed = |k: &str| f.get(k).and_then(|v| serde_json::from_str::<Json>(v).ok()).unwrap_or(Json::Null);
    let failed = num("failed").unwrap_or(0) + num("expired").unwrap_or(0);
    json!({
        "id": id,
        "object": "batch",
        "endpoint": text("endpoint"),
        "errors": parsed("errors"),
        "input_file_id": text("input_file_id"),
        "completion_window": text("completion_window"),
        "status": text("status"),
        "output_file_id": text("output_file_id"),
        "error_file_id": text("error_file_id"),
        "created_at": at("created_at"),
        "in_progress_at": at("in_progress_at"),
        "expires_at": at("expires_at"),
        "finalizing_at": at("finalizing_at"),
        "completed_at": at("completed_at"),
        "failed_at": at("failed_at"),
        "expired_at": at("expired_at"),
        "cancelling_at": at("cancelling_at"),
        "cancelled_at": at("cancelled_at"),
        "request_counts": {
            "total": num("total").unwrap_or(0),
            "completed": num("done").unwrap_or(0),
            "failed": failed,
        },
        "metadata": parsed("metadata"),
    })
}
