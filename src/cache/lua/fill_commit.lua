-- What a fill came to, stored for every replica; the lease released; the waiters woken.
-- KEYS: entry (hash), lease, outcome
-- ARGV: lease token, mode, fresh ms, stale-if-error ms, payload, channel, message
--   store:   payload is the body: a new entry, fresh for `fresh` ms, kept `stale` ms longer
--   stale:   the upstream failed: the old entry is re-served as stale for `fresh` ms
--   outcome: payload is a failed fill's answer, shared with waiters for `fresh` ms
--   release: nothing to share (an answer too long to store): waiters fetch their own
-- Every key it writes expires. Returns Redis's time, ms.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local fresh = tonumber(ARGV[3])
if ARGV[2] == 'store' then
  local stale = now + fresh + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'a', now, 'f', now + fresh, 's', stale, 'x', 0, 'b', ARGV[5])
  redis.call('PEXPIREAT', KEYS[1], stale)
elseif ARGV[2] == 'stale' then
  local s = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
  if s > now then redis.call('HSET', KEYS[1], 'f', math.min(now + fresh, s), 'x', 1) end
elseif ARGV[2] == 'outcome' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', fresh)
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return now
