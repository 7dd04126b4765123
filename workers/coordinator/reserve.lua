-- All-or-nothing gang reservation.
-- KEYS: job hash, pending zset, then for each of N workers: worker hash, worker alive key; last: running set
-- ARGV: job_id, token, lease_deadline, gang_json, rendezvous_json, now, N
-- Returns {1, ""} on success, {0, reason} when any worker is dead or busy or the job is not pending.
local n = tonumber(ARGV[7])
if redis.call('HGET', KEYS[1], 'state') ~= 'PENDING' then
  return {0, 'job not pending'}
end
for i = 1, n do
  local wkey = KEYS[2 + 2 * i - 1]
  local akey = KEYS[2 + 2 * i]
  if redis.call('EXISTS', akey) == 0 then
    return {0, 'dead:' .. wkey}
  end
  if redis.call('HGET', wkey, 'draining') == '1' then
    return {0, 'draining:' .. wkey}
  end
  local holder = redis.call('HGET', wkey, 'job')
  if holder and holder ~= '' then
    return {0, 'busy:' .. wkey}
  end
end
for i = 1, n do
  local wkey = KEYS[2 + 2 * i - 1]
  redis.call('HSET', wkey, 'job', ARGV[1], 'token', ARGV[2], 'lease', ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'token', ARGV[2], 'gang', ARGV[4],
           'rendezvous', ARGV[5], 'started_at', ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[2 + 2 * n + 1], ARGV[1])
return {1, ''}
