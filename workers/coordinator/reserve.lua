-- All-or-nothing gang reservation.
-- KEYS: job hash, pending zset, then for each of N workers: worker hash, worker alive key; then the running
--       set, the job's ranks hash and the free-worker set.
-- ARGV: job_id, token, lease_deadline, gang_json, rendezvous_json, now, N, lease_ms, first_lease_ms,
--       lease key prefix of this attempt (the rank number is appended)
-- Returns {1, ""} on success, {0, reason} when any worker is dead or busy or the job is not pending.
-- The reserved workers leave the free-worker index; a dead, draining or busy one found there is a stale
-- entry and leaves it too (a heartbeat puts a worker back when it returns).
-- The new attempt starts with no rank status (a previous attempt's would be read as this one's) and each
-- rank holds a lease of first_lease_ms (the rendezvous deadline plus one lease) until its first write.
local n = tonumber(ARGV[7])
local free = KEYS[2 + 2 * n + 3]
local function wid(wkey) return string.match(wkey, 'worker:(.+)$') end
if redis.call('HGET', KEYS[1], 'state') ~= 'PENDING' then
  return {0, 'job not pending'}
end
for i = 1, n do
  local wkey = KEYS[2 + 2 * i - 1]
  local akey = KEYS[2 + 2 * i]
  if redis.call('EXISTS', akey) == 0 then
    redis.call('SREM', free, wid(wkey))
    return {0, 'dead:' .. wkey}
  end
  if redis.call('HGET', wkey, 'draining') == '1' then
    redis.call('SREM', free, wid(wkey))
    return {0, 'draining:' .. wkey}
  end
  local holder = redis.call('HGET', wkey, 'job')
  if holder and holder ~= '' then
    redis.call('SREM', free, wid(wkey))
    return {0, 'busy:' .. wkey}
  end
end
for i = 1, n do
  local wkey = KEYS[2 + 2 * i - 1]
  redis.call('HSET', wkey, 'job', ARGV[1], 'token', ARGV[2], 'lease', ARGV[3])
  redis.call('SET', ARGV[10] .. (i - 1), '1', 'PX', ARGV[9])
  redis.call('SREM', free, wid(wkey))
end
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'token', ARGV[2], 'gang', ARGV[4],
           'rendezvous', ARGV[5], 'started_at', ARGV[6], 'lease_ms', ARGV[8])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[2 + 2 * n + 1], ARGV[1])
redis.call('DEL', KEYS[2 + 2 * n + 2])
return {1, ''}
