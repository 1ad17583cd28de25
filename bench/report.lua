-- wrk script for bench/suite.sh: prints one machine-readable line at the end of a run.
-- No per-response callback: defining `response` makes wrk hand every answer to Lua, which
-- would make wrk itself the bottleneck.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f rps=%.1f p50_us=%d p99_us=%d max_us=%d errors=%d non_2xx_3xx=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
