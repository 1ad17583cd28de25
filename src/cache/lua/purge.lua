-- Purges the shared cache in O(1): every key names its generation, so a new one leaves the
-- old entries unreachable (they expire by their TTLs); the announcement makes every replica
-- flush its own memory. The generation has no TTL: evicting it would make purged entries
-- reachable again. Nothing else is touched (no FLUSHDB: the limits live here too).
-- KEYS: generation   ARGV: channel   Returns {generation, replicas notified}.
local g = redis.call('INCR', KEYS[1])
return {g, redis.call('PUBLISH', ARGV[1], 'purge ' .. g)}
