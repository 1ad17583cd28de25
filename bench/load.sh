#!/usr/bin/env bash
# Sustained mixed load against `billing-gateway demo`: consumption queries, invoice reads and
# PDF downloads for DURATION, paced to RATE requests per second in total. Reports the error
# count (goal: 0) and the gateway's resident memory before and after (goal: flat).
# With HOSTILE=1 the measured load runs twice, quiet and then beside a hostile mix (zero-window
# HTTP/2 streams with and without a credential, HTTP/1.1 readers that never read, cache
# busting), and both runs' errors and p99 are reported (goal: the same).
# See bench/README.md for how the demo's rate limits shape the numbers.
set -euo pipefail

DURATION=${DURATION:-60s}
RATE=${RATE:-16}            # requests per second, all connections together
CONNECTIONS=${CONNECTIONS:-4}
PORT=${PORT:-18080}
WARMUP=${WARMUP:-5s}
HOSTILE=${HOSTILE:-0}       # 1: also measure beside the hostile mix
BUST=${BUST:-1}             # with HOSTILE=1: include cache busting (it spends the upstream budget)

cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    echo "wrk not found: installing it from the Debian packages" >&2
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
if [ "$HOSTILE" = 1 ] && ! command -v h2load >/dev/null; then
    echo "h2load not found: installing it from the Debian packages (nghttp2-client)" >&2
    apt-get install -y nghttp2-client >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nghttp2-client >/dev/null; }
fi

cargo build --release --quiet
work=$(mktemp -d)
./target/release/billing-gateway demo --listen "127.0.0.1:$PORT" >"$work/demo.out" 2>"$work/demo.log" &
pid=$!
hostile_pids=()
stop_hostile() {
    for p in "${hostile_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${hostile_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    hostile_pids=()
}
trap 'stop_hostile; kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 100); do
    grep -q '^MANAGER=' "$work/demo.out" && grep -q '/download' "$work/demo.out" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/demo.log" >&2; exit 1; }
    sleep 0.1
done
READ_ONLY=$(sed -n 's/^READ_ONLY=//p' "$work/demo.out")
MANAGER=$(sed -n 's/^MANAGER=//p' "$work/demo.out")
GATEWAY_KEY=$(sed -n 's/^GATEWAY_KEY=//p' "$work/demo.out")
INVOICE=$(grep -o 'invoices/[0-9a-f-]*/download' "$work/demo.out" | head -1 | cut -d/ -f2)
[ -n "$READ_ONLY" ] && [ -n "$MANAGER" ] && [ -n "$GATEWAY_KEY" ] && [ -n "$INVOICE" ] || { echo "could not read the demo's tokens" >&2; exit 1; }
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

errors_of() {
    sed -E 's/.*socket_errors=([0-9]+) non_2xx=([0-9]+).*/\1 \2/' <<<"$1" | awk '{print $1 + $2}'
}
result=$(grep '^RESULT requests' "$work/run.txt")
errors=$(errors_of "$result")

if [ "$HOSTILE" = 1 ]; then
    # Seconds for the hostile clients: the measured run and a margin on both sides.
    case "$DURATION" in
        *m) secs=$(( ${DURATION%m} * 60 + 15 )) ;;
        *s) secs=$(( ${DURATION%s} + 15 )) ;;
        *) secs=$(( DURATION + 15 )) ;;
    esac
    metrics_before=$(curl -s "$url/metrics")
    # 1. No credential: six zero-window HTTP/2 connections, 180 streams each, for an unknown
    #    path (the issue's reproduction: it held all 1,024 places).
    h2load -c 6 -m 180 -w 0 -D "$secs" "$url/nowhere" >"$work/h2-nowhere.txt" 2>&1 &
    hostile_pids+=($!)
    # 2. The gateway key (a principal of its own): zero-window streams for a cached answer and
    #    for PDF downloads, never read.
    h2load -c 2 -m 180 -w 0 -D "$secs" -H "x-auth-token: $GATEWAY_KEY" \
        "$url/billing/v2beta1/consumptions?page_size=10&page=1" >"$work/h2-cached.txt" 2>&1 &
    hostile_pids+=($!)
    h2load -c 2 -m 180 -w 0 -D "$secs" -H "x-auth-token: $GATEWAY_KEY" \
        "$url/billing/v2beta1/invoices/$INVOICE/download?dl=1" >"$work/h2-download.txt" 2>&1 &
    hostile_pids+=($!)
    # 3. HTTP/1.1 readers that never read: each connection pipelines downloads and cached
    #    answers and reads nothing (bash's /dev/tcp; `exec sleep` keeps the socket open).
    for i in $(seq 16); do
        (
            exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 0
            if (( i % 2 )); then
                target="/billing/v2beta1/invoices/$INVOICE/download?dl=1"
            else
                target="/billing/v2beta1/consumptions?page_size=10&page=1"
            fi
            for _ in $(seq 400); do
                printf 'GET %s HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: %s\r\n\r\n' "$target" "$GATEWAY_KEY"
            done >&3 || true
            exec sleep "$secs"
        ) &
        hostile_pids+=($!)
    done
    # 4. Cache busting with the gateway key: every query a miss, 50 a second asked.
    if [ "$BUST" = 1 ]; then
        GATEWAY_KEY=$GATEWAY_KEY DELAY_MS=40 wrk -t1 -c2 -d"${secs}s" -s bench/bust.lua "$url" \
            >"$work/bust.txt" 2>&1 &
        hostile_pids+=($!)
    fi
    sleep 3
    wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s -s bench/mixed.lua "$url" | tee "$work/hostile.txt"
    during=$(curl -s "$url/metrics")
    ready=$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")
    stop_hostile
    hostile_result=$(grep '^RESULT requests' "$work/hostile.txt")
    hostile_errors=$(errors_of "$hostile_result")
fi

echo
echo "load: $RATE req/s for $DURATION over $CONNECTIONS connections (principal rate and upstream budget: the demo's defaults)"
echo "$result"
grep '^RESULT latency' "$work/run.txt"
echo "errors: $errors (goal 0)"
echo "RSS: ${rss_start} KiB at start, ${rss_before} KiB after warm-up, ${rss_after} KiB after the run (goal: flat)"
if [ "$HOSTILE" = 1 ]; then
    echo
    echo "the same load beside the hostile mix (bust=$BUST):"
    echo "$hostile_result"
    grep '^RESULT latency' "$work/hostile.txt"
    echo "errors: $hostile_errors (goal 0)"
    echo "during the attack: /readyz $ready, RSS $(rss_kib) KiB after it,"
    grep -E '^billing_gateway_(requests_in_flight|stalled_answers_total) ' <<<"$during" | sed 's/^/  /' || true
    echo "  rejections during the attack, by reason (the attackers'):"
    diff <(grep -E '^billing_gateway_rejections_total' <<<"$metrics_before") \
         <(grep -E '^billing_gateway_rejections_total' <<<"$during") | sed -n 's/^> /    /p' || true
fi
echo "429s by reason, from the gateway's metrics:"
curl -s "$url/metrics" | grep -E '^billing_gateway_rejections_total' || echo "  none"
curl -s "$url/metrics" | grep -E '^billing_gateway_upstream_budget_wait_seconds_(sum|count)'
