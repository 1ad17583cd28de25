-- The upstream answered something else than 429: the next 429 starts the backoff afresh.
-- KEYS: backoff_next
return redis.call('DEL', KEYS[1])
