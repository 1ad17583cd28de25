-- Reserves the next upstream turn, exactly one pace after the last one reserved by any replica
-- (GCRA virtual scheduling; the time arithmetic follows rwz/redis-gcra, MIT). Redis TIME is the
-- only clock, in µs: exact in doubles until the year 2255.
-- KEYS: tat (no TTL: never evicted), backoff_until, paused_until
-- ARGV: pace µs, longest wait µs
-- Returns {0, wait µs}: the turn is the caller's after that wait; {-1, left µs}: no turn within
-- the longest wait for that long (a pause after a replica resumed sharing, or turns booked too
-- far ahead); {-2, left µs}: backing off after an upstream 429.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local backoff = tonumber(redis.call('GET', KEYS[2]) or '0')
if backoff > now then return {-2, backoff - now} end
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > now then return {-1, paused - now} end
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local max_wait = tonumber(ARGV[2])
if tat - now > max_wait then return {-1, tat - now - max_wait} end
redis.call('SET', KEYS[1], string.format('%.0f', tat + tonumber(ARGV[1])))
return {0, tat - now}
