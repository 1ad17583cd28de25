-- Up to k requests of a principal against its rate at once (a lease the replica spends
-- locally): GCRA exactly as governor's `allow_burst(b)` (tolerance (b - 1) paces), the
-- arithmetic after rwz/redis-gcra (MIT), Redis TIME the only clock, in µs. It grants
-- g = min(k, what conforms now) and moves the TAT by g paces, as g of governor's single checks
-- would. The key lives as long as it matters (until the burst is whole again), like governor's
-- `retain_recent`.
-- KEYS: the principal's key (its subject hashed)   ARGV: pace µs, burst, k
-- Returns {g, 0}: g > 0 granted; {0, µs}: refused, allowed again after that long.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local pace = tonumber(ARGV[1])
local tau = pace * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local earliest = tat - tau
if now < earliest then return {0, earliest - now} end
local granted = math.min(tonumber(ARGV[3]), math.floor((now - earliest) / pace) + 1)
local next_ = tat + granted * pace
redis.call('SET', KEYS[1], string.format('%.0f', next_),
  'PX', string.format('%.0f', math.ceil((next_ - now) / 1000)))
return {granted, 0}
