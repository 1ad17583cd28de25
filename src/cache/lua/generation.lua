-- The cache generation (0 before the first purge), read by the poll that catches a lost purge
-- announcement.   KEYS: generation
return redis.call('GET', KEYS[1]) or '0'
