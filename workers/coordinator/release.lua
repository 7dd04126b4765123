-- Release the workers of one attempt; a worker already holding another attempt is left alone.
-- KEYS: job hash, running set, free-worker set, then worker hashes.  ARGV: job_id, token, then the worker ids.
-- Returns the number released. The job leaves the running set only while this attempt's token is still the
-- job's (a newer attempt placed in the meantime stays watched). A released worker that is registered and
-- not draining re-enters the free-worker index.
local released = 0
for i = 4, #KEYS do
  if redis.call('HGET', KEYS[i], 'job') == ARGV[1] and redis.call('HGET', KEYS[i], 'token') == ARGV[2] then
    redis.call('HSET', KEYS[i], 'job', '', 'token', '', 'lease', '')
    if redis.call('HEXISTS', KEYS[i], 'info') == 1 and redis.call('HGET', KEYS[i], 'draining') ~= '1' then
      redis.call('SADD', KEYS[3], ARGV[i - 1])
    end
    released = released + 1
  end
end
if redis.call('HGET', KEYS[1], 'token') == ARGV[2] then
  redis.call('SREM', KEYS[2], ARGV[1])
end
return released
