-- The upstream answered 429: every replica stops calling it until `until`, for its Retry-After
-- or a backoff doubling from the initial one (the doubling state shared too), and the budget's
-- turns resume after it, paced, not in a burst.
-- KEYS: backoff_until, backoff_next, tat   ARGV: Retry-After µs (0: none), initial µs, max µs
-- Returns how long the backoff lasts from now, µs.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local max = tonumber(ARGV[3])
local next_ = tonumber(redis.call('GET', KEYS[2]) or ARGV[2])
local delay = tonumber(ARGV[1])
if delay <= 0 then delay = next_ end
delay = math.min(delay, max)
redis.call('SET', KEYS[2], string.format('%.0f', math.min(next_ * 2, max)),
  'PX', string.format('%.0f', 2 * max / 1000))
local until_ = math.max(now + delay, tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], string.format('%.0f', until_),
  'PXAT', string.format('%.0f', math.ceil(until_ / 1000)))
local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
if tat < until_ then redis.call('SET', KEYS[3], string.format('%.0f', until_)) end
return until_ - now
