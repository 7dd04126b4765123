-- A rank's write, accepted only while its attempt's fencing token is current and the job is RUNNING.
-- KEYS: job hash, ranks hash, log list.  ARGV: token, rank, status_json ('' = none), log lines...
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return 1
