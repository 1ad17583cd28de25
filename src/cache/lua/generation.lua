-- The cache generation (0 before the first purge), read by the poll that catches a lost purge
-- announcement. It never goes backwards: one lower than the caller's (Redis restarted, failed
-- over, or restored an older snapshot) is set back to the caller's, so a purge stays done and
-- no replica takes the restart for a purge.
-- KEYS: generation   ARGV: the caller's generation
local gen = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local mine = tonumber(ARGV[1])
if gen < mine then
  redis.call('SET', KEYS[1], ARGV[1])
  return mine
end
return gen
