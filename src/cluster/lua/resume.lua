-- A replica leaves degraded mode: nobody takes an upstream slot for `dead` µs, so the calls
-- replicas made on their own (at most one window's worth) pass out of every window first.
-- KEYS: budget tat (no TTL: never evicted)   ARGV: dead time µs
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local after = now + tonumber(ARGV[1])
if tat < after then redis.call('SET', KEYS[1], after) end
return 1
