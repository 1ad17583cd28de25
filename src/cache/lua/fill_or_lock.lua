-- A cache lookup that may take the fill lease, in one step, so no replica can miss the entry,
-- lose the race to a filler that has just finished, and fetch again (replicas.md §3.7).
-- With the lease it may reserve the upstream turn the fill needs (`turn.lua`, prepended): a miss
-- on a replica whose budget queue is idle makes one round trip before its upstream call.
-- KEYS: generation, entry (hash), lease, outcome   (the last three under the caller's generation)
--       [, budget tat, backoff_until, paused_until   (when a turn is asked)]
-- ARGV: the caller's generation, lease token, lease ms, fresh ms the entry must have left,
--       1 when the caller already waited for a fill (a failed fill's answer is for it),
--       1 when the caller found the entry or answer here without a valid MAC (then they are
--       ignored: a miss, which the caller's fill overwrites),
--       the budget's pace µs (0: no turn asked), its longest wait µs
-- The generation never goes backwards: one lower than the caller's (Redis restarted, failed
-- over, or restored an older snapshot) is set back to the caller's, so a purge stays done.
-- Returns, times in Redis ms:
--   {-9, generation}                               a purge happened: flush, retry with it
--   {1, now, stored, fresh, stale, x, body, mac}   a fresh entry (x = 1: a stale answer re-served)
--   {3, outcome}                                   the answer of the fill it waited for, which failed
--   {2, now, turn, t[, stored, fresh, stale, x, body, mac]}
--                                                  the caller fills (with the old copy, if any);
--                                                  turn, t as `reserve_turn` returns, or 1, 0:
--                                                  none asked
--   {0, lease ms left}                             another replica fills: wait for it
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gen = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local mine = tonumber(ARGV[1])
if gen > mine then return {-9, gen} end
if gen < mine then redis.call('SET', KEYS[1], ARGV[1]) end
local trusted = ARGV[6] ~= '1'
-- Keys and fields anyone could have written: never an error (that would take this replica off
-- Redis), a miss at worst.
local function typed(key, type) return redis.call('TYPE', key).ok == type end
local e = {}
if trusted and typed(KEYS[2], 'hash') then
  e = redis.call('HMGET', KEYS[2], 'a', 'f', 's', 'x', 'b', 'm')
end
local held = e[5] and e[6]
local fresh, stale = tonumber(e[2]) or 0, tonumber(e[3]) or 0
if held and fresh - now > tonumber(ARGV[4]) then
  return {1, now, e[1], e[2], e[3], e[4], e[5], e[6]}
end
if trusted and ARGV[5] == '1' and typed(KEYS[4], 'string') then
  local outcome = redis.call('GET', KEYS[4])
  if outcome then return {3, outcome} end
end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then
  local turn = {1, 0}
  if ARGV[7] ~= '0' then
    turn = reserve_turn(KEYS[5], KEYS[6], KEYS[7], tonumber(ARGV[7]), tonumber(ARGV[8]),
      t[1] * 1000000 + t[2])
  end
  if held and stale > now then
    return {2, now, turn[1], turn[2], e[1], e[2], e[3], e[4], e[5], e[6]}
  end
  return {2, now, turn[1], turn[2]}
end
return {0, redis.call('PTTL', KEYS[3])}
