-- A replica leaves degraded mode: no replica takes an upstream turn for `dead` µs, so the calls
-- replicas made on their own (at most one window's worth, and the turns they still held) pass
-- out of every window first. A pause rather than a timeline pushed ahead: calls are refused at
-- once meanwhile instead of waiting for a turn far off.
-- KEYS: budget paused_until   ARGV: dead time µs
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local until_ = math.max(now + tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], string.format('%.0f', until_),
  'PXAT', string.format('%.0f', math.ceil(until_ / 1000)))
return 1
