-- Compare-and-set a job's state; leaving RUNNING also releases that attempt's gang, in the same step.
-- KEYS: job hash, pending zset, running set, free-worker set, then keys that expire with an ended job (ranks, log).
-- ARGV: allowed_from (comma list), new_state, token ('' = any), worker key prefix,
--       seconds an ended job stays readable ('' = no expiry), field/value pairs...
-- Moving to PENDING (a retry) re-queues the job at its own 'score'; any other state leaves the queue.
-- Leaving RUNNING frees every worker of the job's gang still held by the attempt that ends and leaves the
-- running set: a coordinator that dies right after this script leaves no gang reserved and no job unwatched.
-- A freed worker that is registered and not draining re-enters the free-worker index in the same step.
-- Returns the previous state on success, or false when the state or token did not match.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then ok = true end
end
if not ok then return false end
local token = redis.call('HGET', KEYS[1], 'token') or ''
if ARGV[3] ~= '' and token ~= ARGV[3] then return false end
local job_id = string.match(KEYS[1], 'job:(.+)$')
if state == 'RUNNING' and ARGV[2] ~= 'RUNNING' then
  local gang = redis.call('HGET', KEYS[1], 'gang')
  if gang and gang ~= '' then
    for _, wid in ipairs(cjson.decode(gang)['workers'] or {}) do
      local wkey = ARGV[4] .. wid
      if redis.call('HGET', wkey, 'job') == job_id and redis.call('HGET', wkey, 'token') == token then
        redis.call('HSET', wkey, 'job', '', 'token', '', 'lease', '')
        if redis.call('HEXISTS', wkey, 'info') == 1 and redis.call('HGET', wkey, 'draining') ~= '1' then
          redis.call('SADD', KEYS[4], wid)
        end
      end
    end
  end
  redis.call('SREM', KEYS[3], job_id)
end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[2] == 'PENDING' then
  redis.call('ZADD', KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'score') or '0'), job_id)
else
  redis.call('ZREM', KEYS[2], job_id)
end
if ARGV[5] ~= '' and (ARGV[2] == 'SUCCEEDED' or ARGV[2] == 'FAILED' or ARGV[2] == 'CANCELLED') then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  for i = 5, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return state
