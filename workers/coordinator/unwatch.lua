-- Remove a job from the running set only if it is not RUNNING at this moment: a read-then-remove from
-- the timer could otherwise drop an attempt that a scheduling pass placed in between.
-- KEYS: running set, job hash.  ARGV: job_id.  Returns 1 when removed.
if redis.call('HGET', KEYS[2], 'state') == 'RUNNING' then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
