-- Free a worker whose reservation names an attempt that no longer runs on it (the job ended, was
-- re-queued or re-placed elsewhere, or its record expired), checked and done in one step.
-- KEYS: worker hash, job hash of the job the caller saw the worker hold, free-worker set.  ARGV: worker_id.
-- Returns 1 when the worker was freed, 0 when it is free or legitimately held.
local jid = redis.call('HGET', KEYS[1], 'job')
if not jid or jid == '' then return 0 end
if string.match(KEYS[2], 'job:(.+)$') ~= jid then return 0 end   -- re-reserved since the caller looked
local wtoken = redis.call('HGET', KEYS[1], 'token')
if redis.call('HGET', KEYS[2], 'state') == 'RUNNING' and redis.call('HGET', KEYS[2], 'token') == wtoken then
  local gang = redis.call('HGET', KEYS[2], 'gang')
  if gang and gang ~= '' then
    for _, wid in ipairs(cjson.decode(gang)['workers'] or {}) do
      if wid == ARGV[1] then return 0 end
    end
  end
end
redis.call('HSET', KEYS[1], 'job', '', 'token', '', 'lease', '')
if redis.call('HEXISTS', KEYS[1], 'info') == 1 and redis.call('HGET', KEYS[1], 'draining') ~= '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
end
return 1
