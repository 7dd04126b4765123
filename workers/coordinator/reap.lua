-- The reaper's read of every running attempt, inside Redis, so that only what needs a verdict travels:
-- per running job its state, token, lease_ms and failing-since mark, and the ranks that have not reported
-- (not in the done set nor in the errors hash) and that wrote a final status, sit on a worker whose
-- heartbeat key is gone, or hold no lease key. The caller judges them (a TTL key means nothing until Redis
-- has been up for a whole TTL).
-- KEYS: running set.  ARGV: job key prefix, worker key prefix (common/keys.py builds the same names).
-- Returns {{job_id, state, token, lease_ms, failing_since, {{rank, worker, status_json, alive, lease}, ...}}, ...}.
local FINAL = {SUCCEEDED = true, FAILED = true, ABORTED = true}
local out = {}
for _, jid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local jkey = ARGV[1] .. jid
  local f = redis.call('HMGET', jkey, 'state', 'token', 'gang', 'lease_ms')
  local state, token = f[1] or '', f[2] or ''
  local due = {}
  if state == 'RUNNING' then
    local ok, gang = pcall(cjson.decode, f[3] or '')
    local workers = (ok and type(gang) == 'table' and gang['workers']) or {}
    local done, errors, ranks = jkey .. ':done:' .. token, jkey .. ':errors:' .. token, jkey .. ':ranks'
    for i, wid in ipairs(workers) do
      local rank = tostring(i - 1)
      if redis.call('SISMEMBER', done, rank) == 0 and redis.call('HEXISTS', errors, rank) == 0 then
        local status = redis.call('HGET', ranks, rank) or ''
        local final = false
        if status ~= '' then
          local sok, st = pcall(cjson.decode, status)
          final = sok and type(st) == 'table' and FINAL[st['state']] ~= nil
        end
        local alive = redis.call('EXISTS', ARGV[2] .. wid .. ':alive')
        local lease = redis.call('EXISTS', jkey .. ':lease:' .. token .. ':' .. rank)
        if final or alive == 0 or lease == 0 then
          due[#due + 1] = {i - 1, wid, status, alive, lease}
        end
      end
    end
  end
  out[#out + 1] = {jid, state, token, f[4] or '', redis.call('HGET', jkey, 'failing:' .. token) or '', due}
end
return out
