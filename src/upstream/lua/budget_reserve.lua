-- Reserves the next upstream turn (`turn.lua`, prepended).
-- KEYS: tat, backoff_until, paused_until   ARGV: pace µs, longest wait µs
local t = redis.call('TIME')
return reserve_turn(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]),
  t[1] * 1000000 + t[2])
