-- Purges the shared cache in O(1): every key names its generation, so a new one leaves the
-- old entries unreachable (they expire by their TTLs); the announcement makes every replica
-- flush its own memory. The generation has no TTL: evicting it would make purged entries
-- reachable again. Nothing else is touched (no FLUSHDB: the limits live here too).
-- The new generation is above the caller's too: after a restart Redis may hold a lower one.
-- KEYS: generation   ARGV: channel, the caller's generation   Returns {generation, replicas notified}.
local g = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') or 0, tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[1], g)
return {g, redis.call('PUBLISH', ARGV[1], 'purge ' .. g)}
