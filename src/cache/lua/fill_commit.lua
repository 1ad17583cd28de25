-- What a fill came to, stored for every replica; the lease released; the waiters woken.
-- KEYS: entry (hash), lease, outcome
-- ARGV: lease token, mode, channel, message, then by mode:
--   store:   stored, fresh until, stale until (Redis ms), x (1: a stale answer re-served), body,
--            MAC: the entry as this replica serves it, kept until `stale until`
--   outcome: ms, MAC and answer: a failed fill's answer, shared with waiters for that long
--   release: nothing to share (an answer too long to store, or a refusal of the filler's own):
--            whoever waits fetches on its own
-- The replica computes every field (and the MAC over them, which Redis cannot check): the
-- times from this script family's Redis `TIME` plus the durations it measured since.
-- Every key it writes expires.
if ARGV[2] == 'store' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'a', ARGV[5], 'f', ARGV[6], 's', ARGV[7], 'x', ARGV[8],
    'b', ARGV[9], 'm', ARGV[10])
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
elseif ARGV[2] == 'outcome' then
  redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[5])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
