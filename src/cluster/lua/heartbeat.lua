-- This replica is alive: note it in the replicas set, forget replicas silent for 15 s, and
-- count those seen in the last 6 s (N, the share each takes of the budget when degraded).
-- KEYS: replicas zset   ARGV: replica id
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 15000)
redis.call('PEXPIRE', KEYS[1], 60000)
return redis.call('ZCOUNT', KEYS[1], now - 6000, '+inf')
