-- Compare-and-set a job's state.
-- KEYS: job hash, pending zset.  ARGV: allowed_from (comma list), new_state, token ('' = any), field/value pairs...
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
if ARGV[2] ~= 'PENDING' then redis.call('ZREM', KEYS[2], string.match(KEYS[1], 'job:(.+)$')) end
return state
