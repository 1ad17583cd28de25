-- The fill lease's holder renews it (ARGV[2] ms) or, with 0, gives it up; only the holder can
-- (redis.io "Distributed Locks with Redis": compare the token, then act).
-- KEYS: lease   ARGV: token, lease ms or 0
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
