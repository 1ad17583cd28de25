#!/usr/bin/env bash
# Sustained mixed load against `billing-gateway demo`: consumption queries, invoice reads and
# PDF downloads for DURATION, paced to RATE requests per second in total. Reports the error
# count (goal: 0) and the gateway's resident memory before and after (goal: flat).
# See bench/README.md for how the demo's rate limits shape the numbers.
set -euo pipefail

DURATION=${DURATION:-60s}
RATE=${RATE:-16}            # requests per second, all connections together
CONNECTIONS=${CONNECTIONS:-4}
PORT=${PORT:-18080}
WARMUP=${WARMUP:-5s}

cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    echo "wrk not found: installing it from the Debian packages" >&2
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

cargo build --release --quiet
work=$(mktemp -d)
./target/release/billing-gateway demo --listen "127.0.0.1:$PORT" >"$work/demo.out" 2>"$work/demo.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 100); do
    grep -q '^MANAGER=' "$work/demo.out" && grep -q '/download' "$work/demo.out" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/demo.log" >&2; exit 1; }
    sleep 0.1
done
READ_ONLY=$(sed -n 's/^READ_ONLY=//p' "$work/demo.out")
MANAGER=$(sed -n 's/^MANAGER=//p' "$work/demo.out")
INVOICE=$(grep -o 'invoices/[0-9a-f-]*/download' "$work/demo.out" | head -1 | cut -d/ -f2)
[ -n "$READ_ONLY" ] && [ -n "$MANAGER" ] && [ -n "$INVOICE" ] || { echo "could not read the demo's tokens" >&2; exit 1; }
export READ_ONLY MANAGER INVOICE
export DELAY_MS=$(( CONNECTIONS * 1000 / RATE ))

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
url="http://127.0.0.1:$PORT"
rss_start=$(rss_kib)

# Warm-up: connection pools, allocator arenas and the like reach their working size.
wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" -s bench/mixed.lua "$url" >"$work/warmup.txt"
sleep 2
rss_before=$(rss_kib)

wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s -s bench/mixed.lua "$url" | tee "$work/run.txt"
sleep 2
rss_after=$(rss_kib)

result=$(grep '^RESULT requests' "$work/run.txt")
errors=$(sed -E 's/.*socket_errors=([0-9]+) non_2xx=([0-9]+).*/\1 \2/' <<<"$result" | awk '{print $1 + $2}')
echo
echo "load: $RATE req/s for $DURATION over $CONNECTIONS connections (principal rate and upstream budget: the demo's defaults)"
echo "$result"
grep '^RESULT latency' "$work/run.txt"
echo "errors: $errors (goal 0)"
echo "RSS: ${rss_start} KiB at start, ${rss_before} KiB after warm-up, ${rss_after} KiB after the run (goal: flat)"
echo "429s by reason, from the gateway's metrics:"
curl -s "$url/metrics" | grep -E '^billing_gateway_rejections_total' || echo "  none"
curl -s "$url/metrics" | grep -E '^billing_gateway_upstream_budget_wait_seconds_(sum|count)'
