-- A rank's write, accepted only while its attempt's fencing token is current and the job is RUNNING.
-- KEYS: job hash, ranks hash, log list, this rank's lease key.
-- ARGV: token, rank, status_json ('' = none), log lines...
-- An accepted write renews the rank's lease for the job's 'lease_ms' (Redis' own clock keeps the time).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
local lease_ms = tonumber(redis.call('HGET', KEYS[1], 'lease_ms') or '0')
if lease_ms and lease_ms > 0 then redis.call('SET', KEYS[4], '1', 'PX', lease_ms) end
return 1
