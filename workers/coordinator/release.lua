-- Release the workers of one attempt; a worker already holding another attempt is left alone.
-- KEYS: worker hashes.  ARGV: job_id, token.  Returns the number released.
local released = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'job') == ARGV[1] and redis.call('HGET', KEYS[i], 'token') == ARGV[2] then
    redis.call('HSET', KEYS[i], 'job', '', 'token', '', 'lease', '')
    released = released + 1
  end
end
return released
