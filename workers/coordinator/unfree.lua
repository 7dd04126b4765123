-- Drop from the free-worker index every worker whose heartbeat key is gone, so a pass that cannot place its
-- head job counts only live workers as free (the worker's next heartbeat, free.lua, puts it back).
-- KEYS: free-worker set.  ARGV: worker key prefix (common/keys.py builds the same names).
-- Returns the ids dropped.
local dropped = {}
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. wid .. ':alive') == 0 then
    redis.call('SREM', KEYS[1], wid)
    dropped[#dropped + 1] = wid
  end
end
return dropped
