-- Keep the free-worker index true for one worker, and renew its heartbeat when asked.
-- KEYS: worker hash, free set, alive key.  ARGV: worker_id, heartbeat ttl in ms ('' = leave the heartbeat).
-- A worker is in the index while it is registered (its hash has 'info'), not draining and holding no job.
-- Liveness is not part of it: the coordinator checks the heartbeat of each worker it picks.
-- Returns 1 when the worker is in the index afterwards.
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3] or '1', 'PX', ARGV[2])
  redis.call('HDEL', KEYS[1], 'dead_since')   -- back from a heartbeat gap: its next gap starts afresh
end
local holder = redis.call('HGET', KEYS[1], 'job')
if redis.call('HEXISTS', KEYS[1], 'info') == 1 and redis.call('HGET', KEYS[1], 'draining') ~= '1'
    and (not holder or holder == '') then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
redis.call('SREM', KEYS[2], ARGV[1])
return 0
