-- The next upstream turn, exactly one pace after the last one reserved by any replica (GCRA
-- virtual scheduling; the time arithmetic follows rwz/redis-gcra, MIT). Prepended to the scripts
-- that reserve one: the budget's own, and the cache lookup that takes a fill lease (a miss makes
-- one round trip for both). Redis TIME is the only clock, in µs: exact in doubles until 2255.
-- tat (no TTL: never evicted), backoff_until, paused_until: keys; pace, longest wait: µs.
-- Returns {0, wait µs}: the turn is the caller's after that wait; {-1, left µs}: no turn within
-- the longest wait for that long (a pause after a replica resumed sharing, or turns booked too
-- far ahead); {-2, left µs}: backing off after an upstream 429.
local function reserve_turn(tat_key, backoff_key, paused_key, pace, max_wait, now)
  local backoff = tonumber(redis.call('GET', backoff_key) or '0')
  if backoff > now then return {-2, backoff - now} end
  local paused = tonumber(redis.call('GET', paused_key) or '0')
  if paused > now then return {-1, paused - now} end
  local tat = math.max(tonumber(redis.call('GET', tat_key) or '0'), now)
  if tat - now > max_wait then return {-1, tat - now - max_wait} end
  redis.call('SET', tat_key, string.format('%.0f', tat + pace))
  return {0, tat - now}
end
