#!/usr/bin/env bash
# Sustained mixed load against `billing-gateway demo`: consumption queries, invoice reads and
# PDF downloads for DURATION, paced to RATE requests per second in total. Reports the error
# count (goal: 0) and the gateway's resident memory before and after (goal: flat).
# With HOSTILE=1 the measured load runs twice, quiet and then beside a hostile mix (zero-window
# HTTP/2 streams with and without a credential, HTTP/1.1 readers that never read, cache
# busting, connection floods: idle HTTP/2 prefaces, silent TCP and idle keep-alive connections
# by the thousand against a gateway limited to OPEN_FILES descriptors), and both runs' errors
# and p99 are reported (goal: the same), the p99 beside the mix as a ratio to the quiet one.
# With REPLICAS=N (N >= 2) the same load is spread evenly over N `serve` replicas sharing one
# Redis (GATEWAY_REDIS_URL), in front of `billing-gateway simulate`, and the upstream calls of
# all replicas together are reported against the one budget they share.
# See bench/README.md for how the demo's rate limits shape the numbers.
set -euo pipefail

DURATION=${DURATION:-60s}
RATE=${RATE:-16}            # requests per second, all connections together
CONNECTIONS=${CONNECTIONS:-4}
PORT=${PORT:-18080}
WARMUP=${WARMUP:-5s}
HOSTILE=${HOSTILE:-0}       # 1: also measure beside the hostile mix
BUST=${BUST:-1}             # with HOSTILE=1: include cache busting (it spends the upstream budget)
FLOOD=${FLOOD:-1200}        # with HOSTILE=1: idle connections of each kind held (0: no flood)
OPEN_FILES=${OPEN_FILES:-1024}  # with HOSTILE=1: the demo's open-files limit, soft and hard
REPLICAS=${REPLICAS:-1}     # N >= 2: N replicas sharing a Redis (ports PORT..PORT+N-1)

cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    echo "wrk not found: installing it from the Debian packages" >&2
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
if [ "$REPLICAS" != 1 ] && [ "$HOSTILE" = 1 ]; then
    echo "HOSTILE=1 runs against one gateway: leave REPLICAS at 1" >&2
    exit 1
fi
if [ "$REPLICAS" != 1 ] && ! command -v redis-server >/dev/null; then
    echo "redis-server not found: installing it from the Debian packages (its service is not started)" >&2
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install -y redis-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
if [ "$HOSTILE" = 1 ] && ! command -v h2load >/dev/null; then
    echo "h2load not found: installing it from the Debian packages (nghttp2-client)" >&2
    apt-get install -y nghttp2-client >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nghttp2-client >/dev/null; }
fi

cargo build --release --quiet
BIN=./target/release/billing-gateway
work=$(mktemp -d)
servers=()
hostile_pids=()
stop_hostile() {
    for p in "${hostile_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${hostile_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    hostile_pids=()
}
stop_servers() {
    for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${servers[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap 'stop_hostile; stop_servers; rm -rf "$work"' EXIT

wait_for() { # pid log url [curl args...]
    local pid=$1 log=$2 url=$3
    shift 3
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$@" "$url" && return
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "nothing answered $url" >&2
    exit 1
}

pids=()   # the gateways measured
urls=()
if [ "$REPLICAS" = 1 ]; then
    # Beside the hostile mix, the demo gets the limit systemd and containers start services
    # with (soft and hard alike: it cannot raise it), so the floods reach its connection bound.
    limit=()
    if [ "$HOSTILE" = 1 ]; then limit=(prlimit "--nofile=$OPEN_FILES:$OPEN_FILES" --); fi
    "${limit[@]}" "$BIN" demo --listen "127.0.0.1:$PORT" >"$work/demo.out" 2>"$work/demo.log" &
    servers+=($!)
    pids+=($!)
    urls+=("http://127.0.0.1:$PORT")
    for _ in $(seq 100); do
        grep -q '^MANAGER=' "$work/demo.out" && grep -q '/download' "$work/demo.out" && break
        kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/demo.log" >&2; exit 1; }
        sleep 0.1
    done
    READ_ONLY=$(sed -n 's/^READ_ONLY=//p' "$work/demo.out")
    MANAGER=$(sed -n 's/^MANAGER=//p' "$work/demo.out")
    GATEWAY_KEY=$(sed -n 's/^GATEWAY_KEY=//p' "$work/demo.out")
    INVOICE=$(grep -o 'invoices/[0-9a-f-]*/download' "$work/demo.out" | head -1 | cut -d/ -f2)
    [ -n "$READ_ONLY" ] && [ -n "$MANAGER" ] && [ -n "$GATEWAY_KEY" ] && [ -n "$INVOICE" ] || { echo "could not read the demo's tokens" >&2; exit 1; }
else
    # `demo` never uses Redis: replicas are `serve`, with the demo's limits (the defaults), in
    # front of the simulator, with tokens minted for the default policy's two roles.
    KEY=$(cat /proc/sys/kernel/random/uuid)
    ORG=11111111-2222-3333-4444-555555555555
    SIM_PORT=$((PORT + REPLICAS)) REDIS_PORT=$((PORT + REPLICAS + 1))
    SCW_SECRET_KEY="$KEY" "$BIN" simulate --listen "127.0.0.1:$SIM_PORT" >"$work/sim.out" 2>"$work/sim.log" &
    servers+=($!)
    wait_for "$!" "$work/sim.log" "http://127.0.0.1:$SIM_PORT/billing/v2beta1/invoices" -H "X-Auth-Token: $KEY"
    mkdir -p "$work/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --maxmemory 256mb \
        --maxmemory-policy volatile-lru --dir "$work/redis" >"$work/redis.log" 2>&1 &
    servers+=($!)
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
        sleep 0.1
    done
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || { cat "$work/redis.log" >&2; exit 1; }
    HS256_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    for i in $(seq 0 $((REPLICAS - 1))); do
        SCW_SECRET_KEY="$KEY" SCW_DEFAULT_ORGANIZATION_ID="$ORG" SCW_API_URL="http://127.0.0.1:$SIM_PORT" \
            GATEWAY_JWT_HS256_SECRET="$HS256_SECRET" GATEWAY_POLICY_DIR=policies GATEWAY_LOG_FORMAT=json \
            GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" GATEWAY_LISTEN="127.0.0.1:$((PORT + i))" \
            "$BIN" serve >"$work/gw$i.out" 2>"$work/gw$i.log" &
        servers+=($!)
        pids+=($!)
        urls+=("http://127.0.0.1:$((PORT + i))")
        wait_for "$!" "$work/gw$i.log" "http://127.0.0.1:$((PORT + i))/readyz"
    done
    token() { GATEWAY_JWT_HS256_SECRET="$HS256_SECRET" "$BIN" token --ttl 2h "$@"; }
    READ_ONLY=$(token --roles billing-read-only --sub load-read-only)
    MANAGER=$(token --roles billing-manager --sub load-manager)
    INVOICE=$(curl -sf -H "X-Auth-Token: $KEY" \
        "http://127.0.0.1:$SIM_PORT/billing/v2beta1/invoices?organization_id=$ORG&page_size=1" |
        grep -o '"id":"[0-9a-f-]*"' | head -1 | cut -d'"' -f4)
    [ -n "$INVOICE" ] || { echo "could not read an invoice from the simulator" >&2; exit 1; }
fi
export READ_ONLY MANAGER INVOICE
# Each replica gets its share of the connections and of the rate.
PER_REPLICA=$(( CONNECTIONS / REPLICAS > 0 ? CONNECTIONS / REPLICAS : 1 ))
export DELAY_MS=$(( PER_REPLICA * REPLICAS * 1000 / RATE ))

rss_kib() { # the gateways' RSS, in KiB
    local out=() p
    for p in "${pids[@]}"; do out+=("$(awk '/^VmRSS/ {print $2}' "/proc/$p/status")"); done
    local IFS=/
    echo "${out[*]}"
}
url=${urls[0]}
rss_start=$(rss_kib)

# One wrk per replica, in parallel; prints the RESULT lines summed over them.
load() { # name wrk-args...
    local name=$1 i clients=()
    shift
    for i in "${!urls[@]}"; do
        wrk "$@" -s bench/mixed.lua "${urls[$i]}" >"$work/$name.$i.txt" &
        clients+=($!)
    done
    for i in "${clients[@]}"; do wait "$i"; done
    if [ "$REPLICAS" = 1 ]; then
        cat "$work/$name.0.txt"
        return
    fi
    for i in "${!urls[@]}"; do
        sed "s/^RESULT /replica $i: /" "$work/$name.$i.txt" | grep "^replica $i: "
    done
    cat "$work/$name".*.txt | awk '
        /^RESULT requests/ {
            for (f = 2; f <= NF; f++) { split($f, kv, "="); if (kv[1] != "statuses:") n[kv[1]] += kv[2] }
        }
        END { printf "RESULT requests=%d socket_errors=%d non_2xx=%d (all replicas)\n", n["requests"], n["socket_errors"], n["non_2xx"] }'
}
upstream_calls() { # all replicas together
    local u
    for u in "${urls[@]}"; do curl -s "$u/metrics"; done |
        awk '/^billing_gateway_upstream_calls_total[{ ]/ { s += $NF } END { print s + 0 }'
}
seconds() { # a wrk duration (45s, 2m) in seconds
    case "$1" in
        *m) echo $(( ${1%m} * 60 )) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

# Warm-up: connection pools, allocator arenas and the like reach their working size.
load warmup -t1 -c"$PER_REPLICA" -d"$WARMUP" >/dev/null
sleep 2
rss_before=$(rss_kib)
calls_before=$(upstream_calls)

load run -t2 -c"$PER_REPLICA" -d"$DURATION" --timeout 10s | tee "$work/run.txt"
calls_after=$(upstream_calls)
sleep 2
rss_after=$(rss_kib)

errors_of() {
    sed -E 's/.*socket_errors=([0-9]+) non_2xx=([0-9]+).*/\1 \2/' <<<"$1" | awk '{print $1 + $2}'
}
result=$(grep '^RESULT requests' "$work/run.txt" | tail -1)
errors=$(errors_of "$result")

if [ "$HOSTILE" = 1 ]; then
    # Seconds for the hostile clients: the measured run and a margin on both sides.
    secs=$(( $(seconds "$DURATION") + 15 ))
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
    # 5. Connection floods: FLOOD idle connections of each kind, opened again as they close.
    if [ "$FLOOD" -gt 0 ]; then
        python3 bench/flood.py 127.0.0.1 "$PORT" "$FLOOD" "$secs" >"$work/flood.txt" 2>&1 &
        hostile_pids+=($!)
        flood_pid=$!
    fi
    # The gateway's descriptors, sampled every 100 ms: the most it held.
    (
        most=0
        while :; do
            n=$(ls "/proc/${pids[0]}/fd" 2>/dev/null | wc -l)
            (( n > most )) && { most=$n; echo "$most" >"$work/fds.txt"; }
            sleep 0.1
        done
    ) &
    hostile_pids+=($!)
    sleep 3
    wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s -s bench/mixed.lua "$url" | tee "$work/hostile.txt"
    during=$(curl -s "$url/metrics")
    ready=$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")
    if [ "$FLOOD" -gt 0 ]; then
        # The flood reports when its time is up (a margin after the measured run).
        wait "$flood_pid" 2>/dev/null || true
    fi
    stop_hostile
    hostile_result=$(grep '^RESULT requests' "$work/hostile.txt")
    hostile_errors=$(errors_of "$hostile_result")
fi

echo
echo "load: $RATE req/s for $DURATION over $CONNECTIONS connections (principal rate and upstream budget: the demo's defaults)"
if [ "$REPLICAS" != 1 ]; then
    echo "spread over $REPLICAS replicas sharing one Redis ($PER_REPLICA connections each)"
    calls=$((calls_after - calls_before))
    echo "upstream calls, all replicas: $calls in $DURATION," \
        "$(awk -v c="$calls" -v s="$(seconds "$DURATION")" 'BEGIN { printf "%.1f", c / s }')/s" \
        "(budget 20/s for all of them when they share; $((REPLICAS * 20))/s if each kept its own)"
    for u in "${urls[@]}"; do
        echo "  $u: $(curl -s "$u/metrics" | sed -nE 's/^billing_gateway_(redis|sharing)_mode\{mode="([a-z]+)"\} 1$/mode \2/p' | head -1)"
    done
fi
echo "$result"
grep '^RESULT latency' "$work/run.txt" || grep ' latency_ms ' "$work/run.txt"
echo "errors: $errors (goal 0)"
echo "RSS: ${rss_start} KiB at start, ${rss_before} KiB after warm-up, ${rss_after} KiB after the run (goal: flat)"
if [ "$HOSTILE" = 1 ]; then
    echo
    echo "the same load beside the hostile mix (bust=$BUST, flood=$FLOOD per kind, open files $OPEN_FILES):"
    echo "$hostile_result"
    grep '^RESULT latency' "$work/hostile.txt"
    echo "errors: $hostile_errors (goal 0)"
    p99() { sed -nE 's/^RESULT latency_ms .*p99=([0-9.]+).*/\1/p' "$1"; }
    echo "normal traffic's p99 beside the mix / quiet: $(p99 "$work/hostile.txt") / $(p99 "$work/run.txt") ms =" \
        "$(awk -v h="$(p99 "$work/hostile.txt")" -v q="$(p99 "$work/run.txt")" 'BEGIN { printf "%.2fx", h / q }')"
    if [ "$FLOOD" -gt 0 ]; then
        echo "connection floods: $(cat "$work/flood.txt")"
        echo "  the gateway's descriptors: at most $(cat "$work/fds.txt" 2>/dev/null || echo '?') of $OPEN_FILES"
        grep -E '^billing_gateway_connections_(open|closed_total)' <<<"$during" | sed 's/^/  /' || true
    fi
    echo "during the attack: /readyz $ready, RSS $(rss_kib) KiB after it,"
    grep -E '^billing_gateway_(requests_in_flight|stalled_answers_total) ' <<<"$during" | sed 's/^/  /' || true
    echo "  rejections during the attack, by reason (the attackers'):"
    diff <(grep -E '^billing_gateway_rejections_total' <<<"$metrics_before") \
         <(grep -E '^billing_gateway_rejections_total' <<<"$during") | sed -n 's/^> /    /p' || true
fi
for u in "${urls[@]}"; do
    echo "429s by reason, from the metrics of $u:"
    curl -s "$u/metrics" | grep -E '^billing_gateway_rejections_total' || echo "  none"
    curl -s "$u/metrics" | grep -E '^billing_gateway_upstream_budget_wait_seconds_(sum|count)'
done
