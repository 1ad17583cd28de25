-- A cache lookup that may take the fill lease, in one step, so no replica can miss the entry,
-- lose the race to a filler that has just finished, and fetch again (replicas.md §3.7).
-- KEYS: generation, entry (hash), lease, outcome   (the last three under the caller's generation)
-- ARGV: the caller's generation, lease token, lease ms, fresh ms the entry must have left,
--       1 when the caller already waited for a fill (a failed fill's answer is for it)
-- Returns, times in Redis ms:
--   {-9, generation}                            a purge happened: flush, retry with it
--   {1, now, stored, fresh, stale, x, body}     a fresh entry (x = 1: a stale answer re-served)
--   {3, outcome}                                the answer of the fill it waited for, which failed
--   {2, now[, stored, fresh, stale, x, body]}   the caller fills (with the old copy, if any)
--   {0, lease ms left}                          another replica fills: wait for it
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gen = redis.call('GET', KEYS[1]) or '0'
if gen ~= ARGV[1] then return {-9, gen} end
local e = redis.call('HMGET', KEYS[2], 'a', 'f', 's', 'x', 'b')
if e[5] and tonumber(e[2]) - now > tonumber(ARGV[4]) then
  return {1, now, tonumber(e[1]), tonumber(e[2]), tonumber(e[3]), tonumber(e[4]), e[5]}
end
if ARGV[5] == '1' then
  local outcome = redis.call('GET', KEYS[4])
  if outcome then return {3, outcome} end
end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then
  if e[5] and tonumber(e[3]) > now then
    return {2, now, tonumber(e[1]), tonumber(e[2]), tonumber(e[3]), tonumber(e[4]), e[5]}
  end
  return {2, now}
end
return {0, redis.call('PTTL', KEYS[3])}
