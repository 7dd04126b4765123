-- Compare-and-set a job's state.
-- KEYS: job hash, pending zset.  ARGV: allowed_from (comma list), new_state, token ('' = any), field/value pairs...
-- Moving to PENDING (a retry) re-queues the job at its own 'score'; any other state leaves the queue.
-- Returns the previous state on success, or false when the state or token did not match.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then ok = true end
end
if not ok then return false end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[3] then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local job_id = string.match(KEYS[1], 'job:(.+)$')
if ARGV[2] == 'PENDING' then
  redis.call('ZADD', KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'score') or '0'), job_id)
else
  redis.call('ZREM', KEYS[2], job_id)
end
return state
