//! The queue's Lua scripts: each changes what must change together
//! (a quota and the entries it counts, a result and the ack of its entry)
//! in one step, so a replica that dies between two commands cannot leave
//! them apart. Redis runs a script whole or not at all.

use std::sync::LazyLock;

use redis::Script;

/// Queue one async request unless its id is queued already (an
/// idempotency key seen before) or its tenant's quota is spent.
///
/// KEYS: quota, job, stream, targets. ARGV: limit, group, job ttl (ms),
/// target, count of job values `n`, then `n` job values (name, value)…,
/// then entry values (name, value)…. Returns `{1, entry id}` queued,
/// `{0, ""}` already queued, `{-1, queued}` over quota.
pub static SUBMIT_ASYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, ''} end
local queued = tonumber(redis.call('GET', KEYS[1]) or '0')
if queued + 1 > tonumber(ARGV[1]) then return {-1, tostring(queued)} end
local n = tonumber(ARGV[5])
local job, entry = {}, {}
for i = 6, 5 + n do table.insert(job, ARGV[i]) end
for i = 6 + n, #ARGV do table.insert(entry, ARGV[i]) end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[3], ARGV[2], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[3], '*', unpack(entry))
redis.call('HSET', KEYS[2], 'entry', id, unpack(job))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('INCR', KEYS[1])
redis.call('SADD', KEYS[4], ARGV[4])
return {1, id}
",
    )
});

/// Reserve room for `n` entries in a tenant's quota.
///
/// KEYS: quota. ARGV: n, limit. Returns -1 when reserved, else the count
/// queued now.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local queued = tonumber(redis.call('GET', KEYS[1]) or '0')
if queued + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return queued end
redis.call('INCRBY', KEYS[1], ARGV[1])
return -1
",
    )
});

/// Mark an async request running, unless it was cancelled.
///
/// KEYS: job. ARGV: now (ms). Returns the state it was in.
pub static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1]) end
return state or 'missing'
",
    )
});

/// Settle one entry: store its result once (under its idempotency key),
/// count it on its job or batch, acknowledge and delete it, and give its
/// place in the tenant's quota back — all or nothing.
///
/// KEYS: stream, result, quota, owner (job or batch hash). ARGV: group,
/// entry id, kind (`async`/`batch`), outcome (`done`, `failed`, `expired`,
/// `cancelled`), ttl (ms), now (ms), then result fields (name, value)….
/// Returns `{stored, finalize, outcome}`: whether this call stored the
/// result, (batches) whether it settled the batch's last entry, and the
/// outcome counted (`cancelled` for an async request cancelled meanwhile).
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local stored, finalize = 0, 0
local outcome = ARGV[4]
if redis.call('EXISTS', KEYS[2]) == 0 then
  local cancelled = ARGV[3] == 'async' and redis.call('HGET', KEYS[4], 'state') == 'cancelled'
  if cancelled then outcome = 'cancelled' end
  -- A cancelled entry keeps no answer, but its result marks it settled,
  -- so that a second delivery of it is not counted twice.
  local fields = {}
  if outcome ~= 'cancelled' then
    for i = 7, #ARGV do table.insert(fields, ARGV[i]) end
  end
  redis.call('HSET', KEYS[2], 'outcome', outcome, 'at', ARGV[6], unpack(fields))
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  stored = 1
  if ARGV[3] == 'async' then
    redis.call('HSET', KEYS[4], 'state', outcome, 'finished_at', ARGV[6])
  elseif redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HINCRBY', KEYS[4], outcome, 1)
    local b = redis.call('HMGET', KEYS[4], 'total', 'done', 'failed', 'expired', 'cancelled', 'status')
    local settled = 0
    for i = 2, 5 do settled = settled + tonumber(b[i] or '0') end
    if settled >= tonumber(b[1] or '0') and (b[6] == 'in_progress' or b[6] == 'cancelling') then
      redis.call('HSET', KEYS[4], 'status', 'finalizing', 'finalizing_at', ARGV[6])
      finalize = 1
    end
  end
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 1 and tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
return {stored, finalize, outcome}
",
    )
});

/// Cancel an async request that has not finished.
///
/// KEYS: job. ARGV: now (ms). Returns the state it was in.
pub static CANCEL_ASYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
end
return state or 'missing'
",
    )
});

/// Move a batch from one status to another, stamping `<to>_at`.
///
/// KEYS: batch. ARGV: to, now (s), from… Returns the status it was in.
pub static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
for i = 3, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return status
  end
end
return status
",
    )
});
