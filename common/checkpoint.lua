-- Record a checkpoint a retry may resume from, only while the attempt that wrote it is current.
-- KEYS: job hash, the job's checkpoints hash (rounds -> object key).
-- ARGV: token, rounds, key.
-- A child outliving its attempt may still put an object (under its own attempt's prefix), but it is never
-- recorded here, so no later attempt reads it.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
