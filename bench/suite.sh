#!/usr/bin/env bash
# The gateway against real baselines, on loopback, in one run (see bench/README.md):
#   1. a bare hyper server answering the same body (examples/bench_upstream.rs): the ceiling;
#   2. nginx with proxy_cache in front of the simulated Billing API, cache warm;
#   3. the gateway, cache hit, HS256 token;
#   4. the gateway, cache hit, RS256 token (JWKS served by the bench binary);
#   5. the gateway's miss path (get invoice, not cacheable) vs the simulator called directly;
#   6. rows 2 and 3 over HTTP/2 (h2c with prior knowledge, h2load);
#   7. latency at a fixed offered load, half of row 2's throughput, open loop (h2load --rps over
#      HTTP/2, so a slow answer never holds back the next request): nginx and the gateway;
#   8. row 3 with the gateway sharing through a Redis of its own (GATEWAY_REDIS_URL);
# then the gateway's idle RSS and its peak RSS while it relays a 100 MiB download.
# Prints one table. Every load run is bounded in time; every server stops at the end.
# ROWS=redis measures rows 3 and 8 only (Redis against its local baseline, same rounds) and
# prints their ratios: no nginx, no fixed load, no download.
set -euo pipefail

DURATION=${DURATION:-5s}         # each measured row, in each round
WARMUP=${WARMUP:-1s}             # each row, before it is measured (fills caches and pools)
ROUNDS=${ROUNDS:-5}              # every row is measured once per round; its best round counts
CONNECTIONS=${CONNECTIONS:-32}   # rows 1-4 and 8; the miss path uses one connection
H2_CONNECTIONS=${H2_CONNECTIONS:-4}   # row 6: connections...
H2_STREAMS=${H2_STREAMS:-8}           # ...and streams in flight on each (4 x 8 = rows 1-4's 32)
LATENCY_CONNECTIONS=${LATENCY_CONNECTIONS:-4}   # row 7: connections, the offered rate split
LATENCY_STREAMS=${LATENCY_STREAMS:-256}         # evenly; streams allowed in flight on each
PORT_BASE=${PORT_BASE:-18100}
ROWS=${ROWS:-all}                # all, or redis (rows 3 and 8 only)
DOWNLOAD_RATE=${DOWNLOAD_RATE:-50M}   # the downloading client's pace (curl --limit-rate)

cd "$(dirname "$0")/.."
ORG=11111111-2222-3333-4444-555555555555
BILLING=/billing/v2beta1

install_missing() { # command package
    command -v "$1" >/dev/null && return
    echo "$1 not found: installing $2 from the Debian packages" >&2
    # The package's own service (nginx, redis-server) must not start: a policy-rc.d refuses it.
    local made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install -y "$2" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$2" >/dev/null; }
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
install_missing wrk wrk
install_missing h2load nghttp2-client
[ "$ROWS" = redis ] || install_missing nginx nginx
install_missing redis-server redis-server
install_missing redis-cli redis-tools
install_missing curl curl

echo "building (release)..." >&2
# Two invocations: building the example with the binary would unify the dev-dependencies'
# features into the gateway binary.
cargo build --release --quiet
cargo build --release --quiet --example bench_upstream
GATEWAY=$PWD/target/release/billing-gateway
UPSTREAM=$PWD/target/release/examples/bench_upstream

# Two cores shared by client and servers: servers on one, wrk or h2load (one thread) on the
# other, each server with one worker, so no row gets more CPU than another. Row 8's Redis runs
# on the servers' core too: the gateway and its Redis share the CPU the other rows' servers have.
if [ "$(nproc)" -ge 2 ]; then
    SERVER=(taskset -c 0 env TOKIO_WORKER_THREADS=1)
    CLIENT=(taskset -c 1)
else
    SERVER=(env TOKIO_WORKER_THREADS=1)
    CLIENT=()
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

start() { # name command...: runs in the background, output in $work/name.{out,log}
    local name=$1
    shift
    "$@" >"$work/$name.out" 2>"$work/$name.log" &
    pids+=("$!")
    eval "${name}_pid=$!"
}

wait_for() { # name url [curl args...]
    local name=$1 url=$2 pid_var="${1}_pid"
    shift 2
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$@" "$url" && return
        kill -0 "${!pid_var}" 2>/dev/null || { echo "$name died:" >&2; cat "$work/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "$name did not answer $url" >&2
    exit 1
}

rss_kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

KEY=$(cat /proc/sys/kernel/random/uuid)
HS256_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
SIM_PORT=$((PORT_BASE + 1)) BARE_PORT=$((PORT_BASE + 2)) NGINX_PORT=$((PORT_BASE + 3))
GW_PORT=$((PORT_BASE + 4)) GW2_PORT=$((PORT_BASE + 5)) NGINX_H2_PORT=$((PORT_BASE + 6))
GWR_PORT=$((PORT_BASE + 7)) REDIS_PORT=$((PORT_BASE + 8))
SIM=http://127.0.0.1:$SIM_PORT BARE=http://127.0.0.1:$BARE_PORT NGINX=http://127.0.0.1:$NGINX_PORT
GW=http://127.0.0.1:$GW_PORT GW2=http://127.0.0.1:$GW2_PORT NGINX_H2=http://127.0.0.1:$NGINX_H2_PORT
GWR=http://127.0.0.1:$GWR_PORT

# The simulated Billing API, as upstream of nginx and the gateway.
start sim "${SERVER[@]}" SCW_SECRET_KEY="$KEY" "$GATEWAY" simulate --listen "127.0.0.1:$SIM_PORT"
wait_for sim "$SIM$BILLING/invoices" -H "X-Auth-Token: $KEY"

# The one body every row answers: all the organization's consumptions, as an SDK asks for them.
QUERY="$BILLING/consumptions?organization_id=$ORG"
curl -sf -H "X-Auth-Token: $KEY" "$SIM$QUERY" >"$work/body.json"
INVOICE=$(curl -sf -H "X-Auth-Token: $KEY" "$SIM$BILLING/invoices?organization_id=$ORG&page_size=1" |
    grep -o '"id":"[0-9a-f-]*"' | head -1 | cut -d'"' -f4)

# The bench binary: bare server, JWKS, 100 MiB downloads; it prints an RS256 token.
start bare "${SERVER[@]}" "$UPSTREAM" --listen "127.0.0.1:$BARE_PORT" --body "$work/body.json"
wait_for bare "$BARE/jwks"
RS256=$(sed -n 's/^RS256=//p' "$work/bare.out")

# nginx with proxy_cache, holding the key itself.
if [ "$ROWS" != redis ]; then
    mkdir -p "$work/nginx-cache"
    sed -e "s|@WORK@|$work|g" -e "s|@UPSTREAM@|127.0.0.1:$SIM_PORT|" -e "s|@LISTEN@|127.0.0.1:$NGINX_PORT|" \
        -e "s|@LISTEN_H2@|127.0.0.1:$NGINX_H2_PORT|" -e "s|@SECRET_KEY@|$KEY|" bench/nginx.conf >"$work/nginx.conf"
    start nginx "${SERVER[@]}" nginx -e "$work/nginx-error.log" -c "$work/nginx.conf"
    wait_for nginx "$NGINX$QUERY"
fi

gateway_env=(
    SCW_SECRET_KEY="$KEY" SCW_DEFAULT_ORGANIZATION_ID="$ORG"
    GATEWAY_JWT_HS256_SECRET="$HS256_SECRET" GATEWAY_POLICY_DIR=policies GATEWAY_LOG_FORMAT=json
    # Far above what one core can serve, so the limits never shape the numbers.
    GATEWAY_PRINCIPAL_RATE=1000000/s GATEWAY_UPSTREAM_RATE=1000000/s
)
start gw "${SERVER[@]}" "${gateway_env[@]}" SCW_API_URL="$SIM" GATEWAY_JWKS_URL="$BARE/jwks" \
    GATEWAY_LISTEN="127.0.0.1:$GW_PORT" "$GATEWAY" serve
wait_for gw "$GW/readyz"
RSS_IDLE=$(rss_kib "$gw_pid" VmRSS)

# Row 8: a Redis of its own on the servers' core (no persistence, as deploy/kubernetes runs it),
# and a gateway sharing through it, otherwise configured as row 3's.
mkdir -p "$work/redis"
start redis "${SERVER[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --maxmemory 256mb --maxmemory-policy volatile-lru --dir "$work/redis"
for _ in $(seq 100); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
    kill -0 "$redis_pid" 2>/dev/null || { echo "redis died:" >&2; cat "$work/redis.out" "$work/redis.log" >&2; exit 1; }
    sleep 0.1
done
start gwr "${SERVER[@]}" "${gateway_env[@]}" SCW_API_URL="$SIM" GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    GATEWAY_LISTEN="127.0.0.1:$GWR_PORT" "$GATEWAY" serve
wait_for gwr "$GWR/readyz"
redis_commands() { redis-cli -p "$REDIS_PORT" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }
# How the Redis gateway keeps its limits, from its metrics (`connected` when it shares).
sharing_mode() {
    curl -sf "$GWR/metrics" | sed -nE 's/^billing_gateway_(redis|sharing)_mode\{mode="([a-z]+)"\} 1$/\2/p' | head -1
}

token() { env GATEWAY_JWT_HS256_SECRET="$HS256_SECRET" "$GATEWAY" token --ttl 2h "$@"; }
HS256=$(token --roles billing-read-only --sub bench-hs256)
MANAGER=$(token --roles billing-manager --sub bench-manager)

# Every row answers the same bytes (checked, not assumed).
same_body() { # label url [curl args...]
    local label=$1 url=$2
    shift 2
    curl -sf "$@" "$url" -o "$work/check.json" || { echo "$label: request failed" >&2; exit 1; }
    cmp -s "$work/body.json" "$work/check.json" || { echo "$label: a different body" >&2; exit 1; }
}

measure() { # row connections url [wrk args...]: one run, appended to $work/row.runs
    local row=$1 conns=$2 url=$3
    shift 3
    "${CLIENT[@]}" wrk -t1 -c"$conns" -d"$WARMUP" "$@" "$url" >/dev/null
    local before=
    [ "$row" = redis ] && before=$(redis_commands)
    "${CLIENT[@]}" wrk -t1 -c"$conns" -d"$DURATION" --timeout 5s -s bench/report.lua "$@" "$url" >"$work/$row.txt"
    local result
    result=$(sed -n 's/^RESULT //p' "$work/$row.txt")
    [ -n "$result" ] || { echo "$row: wrk printed no result" >&2; cat "$work/$row.txt" >&2; exit 1; }
    field() { sed -E "s/.*(^| )$1=([^ ]*).*/\2/" <<<"$result"; }
    # The second INFO counts the first.
    [ -n "$before" ] && echo "$(($(redis_commands) - before - 1)) $(field requests)" >>"$work/redis.commands"
    echo "$(field rps) $(field p50_us) $(field p99_us) $(($(field errors) + $(field non_2xx_3xx))) $(field max_us)" >>"$work/$row.runs"
    echo "  $row: $(field rps) req/s, p50 $(field p50_us) us, p99 $(field p99_us) us" >&2
}

# h2load over HTTP/2 (h2c with prior knowledge: the URLs are http://), one thread. Its summary
# has no percentiles: they come from its per-request log (status, then microseconds to the end
# of the answer). Same .runs line as measure's.
measure_h2() { # row url [h2load args...]
    local row=$1 url=$2
    shift 2
    "${CLIENT[@]}" h2load -t1 -D "$WARMUP" "$@" "$url" >/dev/null
    rm -f "$work/$row.log"
    "${CLIENT[@]}" h2load -t1 -D "$DURATION" --log-file="$work/$row.log" "$@" "$url" >"$work/$row.txt" 2>&1 ||
        { echo "$row: h2load failed" >&2; cat "$work/$row.txt" >&2; exit 1; }
    local secs errors line
    secs=$(sed -nE 's/^finished in ([0-9.]+)(m?s),.*/\1 \2/p' "$work/$row.txt" | awk '{ print $2 == "ms" ? $1 / 1000 : $1 }')
    [ -n "$secs" ] || { echo "$row: h2load printed no result" >&2; cat "$work/$row.txt" >&2; exit 1; }
    # Failed, errored and timed-out streams, and 4xx and 5xx answers (as wrk counts them).
    errors=$(awk '/^requests:/ { e += $10 + $12 + $14 } /^status codes:/ { e += $7 + $9 } END { print e + 0 }' "$work/$row.txt")
    line=$(cut -f3 "$work/$row.log" | sort -n | awk -v secs="$secs" -v errors="$errors" '
        { t[NR] = $1 }
        END {
            if (NR == 0) exit 1
            p50 = t[int((NR - 1) * 0.50) + 1]; p99 = t[int((NR - 1) * 0.99) + 1]
            printf "%.1f %d %d %d %d\n", NR / secs, p50, p99, errors, t[NR]
        }') || { echo "$row: h2load logged no request" >&2; cat "$work/$row.txt" >&2; exit 1; }
    echo "$line" >>"$work/$row.runs"
    read -r rps p50 p99 _ <<<"$line"
    echo "  $row: $rps req/s, p50 $p50 us, p99 $p99 us" >&2
}

# The machine is shared, and other work only ever slows a run down: the row's best round (most
# requests per second; its latencies with it) is the closest to what the server can do, and
# interleaving the rows gives each the same chances at a quiet moment. Errors are summed over
# all rounds; the range shows how noisy it was.
declare -A RPS P50 P99 MAX ERRORS SPREAD
settle() { # row
    local row=$1 best
    best=$(sort -n "$work/$row.runs" | tail -1)
    read -r RPS[$row] P50[$row] P99[$row] _ MAX[$row] <<<"$best"
    ERRORS[$row]=$(awk '{ s += $4 } END { print s }' "$work/$row.runs")
    SPREAD[$row]=$(sort -n "$work/$row.runs" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }')
}
# At a fixed load the rate is given: the best round is the one with the lowest p99, and the
# spread is that of the p99s (ms).
settle_latency() { # row
    local row=$1 best
    best=$(sort -n -k3 "$work/$row.runs" | head -1)
    read -r RPS[$row] P50[$row] P99[$row] _ MAX[$row] <<<"$best"
    ERRORS[$row]=$(awk '{ s += $4 } END { print s }' "$work/$row.runs")
    SPREAD[$row]=$(sort -n -k3 "$work/$row.runs" | awk 'NR == 1 { lo = $3 } { hi = $3 } END { printf "p99 %.2f-%.2f ms", lo / 1000, hi / 1000 }')
}

same_body bare "$BARE$QUERY"
if [ "$ROWS" != redis ]; then
    same_body nginx "$NGINX$QUERY"
    curl -sf -D - -o /dev/null "$NGINX$QUERY" | grep -qi '^cache-status: HIT' || { echo "nginx: not a cache hit" >&2; exit 1; }
fi
is_hit() { curl -sf -D - -o /dev/null "$@" | grep -qi '^cache-status: billing-gateway; hit' || { echo "gateway: not a cache hit" >&2; exit 1; }; }
same_body gw-hs256 "$GW$QUERY" -H "Authorization: Bearer $HS256"
is_hit "$GW$QUERY" -H "Authorization: Bearer $HS256"
same_body gw-rs256 "$GW$QUERY" -H "Authorization: Bearer $RS256"
is_hit "$GW$QUERY" -H "Authorization: Bearer $RS256"
same_body gw-redis "$GWR$QUERY" -H "Authorization: Bearer $HS256"
is_hit "$GWR$QUERY" -H "Authorization: Bearer $HS256"
[ "$ROWS" = redis ] || same_body nginx-h2 "$NGINX_H2$QUERY" --http2-prior-knowledge
same_body gw-h2 "$GW$QUERY" --http2-prior-knowledge -H "Authorization: Bearer $HS256"
MODE=$(sharing_mode)
[ "$MODE" = connected ] ||
    echo "warning: the Redis gateway reports mode '${MODE:-none}', not 'connected': row 8 measures it without sharing" >&2
curl -sf -H "X-Auth-Token: $KEY" "$SIM$BILLING/invoices/$INVOICE" >"$work/invoice.json"
curl -sf -H "Authorization: Bearer $MANAGER" "$GW$BILLING/invoices/$INVOICE" >"$work/check.json"
cmp -s "$work/invoice.json" "$work/check.json" || { echo "gateway miss: a different body" >&2; exit 1; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "$ROWS" = redis ]; then
    # Interleaved as in the full suite: each round measures the baseline, then the Redis row.
    for round in $(seq "$ROUNDS"); do
        echo "round $round of $ROUNDS: $DURATION per row after $WARMUP of warm-up, wrk -t1 -c$CONNECTIONS" >&2
        measure hs256 "$CONNECTIONS" "$GW$QUERY" -H "Authorization: Bearer $HS256"
        measure redis "$CONNECTIONS" "$GWR$QUERY" -H "Authorization: Bearer $HS256"
    done
    for row in hs256 redis; do settle "$row"; done
    REDIS_PER_REQUEST=$(awk '{ c += $1; r += $2 } END { printf "%.2f", r ? c / r : 0 }' "$work/redis.commands")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
    ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
    echo
    echo "$(date -u +%F), $(nproc) cores; $ROUNDS rounds of $DURATION per row, $CONNECTIONS connections;" \
        "load average $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after"
    echo
    echo "| row | req/s, best round (all rounds) | p50 ms | p99 ms | errors |"
    echo "|---|---:|---:|---:|---:|"
    for row in hs256 redis; do
        printf '| %s | %.0f (%s) | %s | %s | %s |\n' "$row" "${RPS[$row]}" "${SPREAD[$row]}" \
            "$(ms "${P50[$row]}")" "$(ms "${P99[$row]}")" "${ERRORS[$row]}"
    done
    echo
    echo "Redis against row 3: throughput $(ratio "${RPS[redis]}" "${RPS[hs256]}")×, p50" \
        "$(ratio "${P50[redis]}" "${P50[hs256]}")×, p99 $(ratio "${P99[redis]}" "${P99[hs256]}")×;" \
        "mode $(sharing_mode), $REDIS_PER_REQUEST Redis commands per request"
    exit 0
fi
for round in $(seq "$ROUNDS"); do
    echo "round $round of $ROUNDS: $DURATION per row after $WARMUP of warm-up, wrk -t1 -c$CONNECTIONS," \
        "h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS" >&2
    measure bare "$CONNECTIONS" "$BARE$QUERY" -H "Authorization: Bearer $HS256"
    measure nginx "$CONNECTIONS" "$NGINX$QUERY" -H "Authorization: Bearer $HS256"
    measure hs256 "$CONNECTIONS" "$GW$QUERY" -H "Authorization: Bearer $HS256"
    measure rs256 "$CONNECTIONS" "$GW$QUERY" -H "Authorization: Bearer $RS256"
    # The miss path: one connection, so latency is service time, not queueing.
    measure direct 1 "$SIM$BILLING/invoices/$INVOICE" -H "X-Auth-Token: $KEY"
    measure miss 1 "$GW$BILLING/invoices/$INVOICE" -H "Authorization: Bearer $MANAGER"
    measure_h2 nginx-h2 "$NGINX_H2$QUERY" -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -H "authorization: Bearer $HS256"
    measure_h2 hs256-h2 "$GW$QUERY" -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -H "authorization: Bearer $HS256"
    measure redis "$CONNECTIONS" "$GWR$QUERY" -H "Authorization: Bearer $HS256"
done
for row in bare nginx hs256 rs256 direct miss nginx-h2 hs256-h2 redis; do settle "$row"; done

# Latency at a fixed load: half of what nginx served in row 2, offered at a constant rate
# whatever the answers do. h2load sends each request on its schedule while its connection has
# fewer than LATENCY_STREAMS in flight, so up to that bound a slow answer delays no other
# request and its wait is measured (no coordinated omission); a server that cannot keep up
# shows as an achieved rate under the offered one.
OFFERED=$(awk -v r="${RPS[nginx]}" 'BEGIN { printf "%d", r / 2 }')
PER_CONNECTION=$(awk -v r="$OFFERED" -v c="$LATENCY_CONNECTIONS" 'BEGIN { printf "%d", r / c }')
for round in $(seq "$ROUNDS"); do
    echo "latency round $round of $ROUNDS: $OFFERED req/s offered, h2load -c$LATENCY_CONNECTIONS --rps $PER_CONNECTION" >&2
    for row in nginx-fixed hs256-fixed; do
        case $row in
            nginx-fixed) url="$NGINX_H2$QUERY" ;;
            hs256-fixed) url="$GW$QUERY" ;;
        esac
        measure_h2 "$row" "$url" -c"$LATENCY_CONNECTIONS" -m"$LATENCY_STREAMS" --rps="$PER_CONNECTION" \
            -H "authorization: Bearer $HS256"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for row in nginx-fixed hs256-fixed; do settle_latency "$row"; done
REDIS_PER_REQUEST=$(awk '{ c += $1; r += $2 } END { printf "%.2f", r ? c / r : 0 }' "$work/redis.commands")
MODE_AFTER=$(sharing_mode)
RSS_AFTER=$(rss_kib "$gw_pid" VmRSS)

# Streaming: a second gateway whose upstream is the bench binary's 100 MiB download.
start gw2 "${SERVER[@]}" "${gateway_env[@]}" SCW_API_URL="$BARE" GATEWAY_LISTEN="127.0.0.1:$GW2_PORT" "$GATEWAY" serve
wait_for gw2 "$GW2/readyz"
RSS2_BEFORE=$(rss_kib "$gw2_pid" VmRSS)
downloaded=$("${CLIENT[@]}" curl -sf -o /dev/null -w '%{size_download}' --limit-rate "$DOWNLOAD_RATE" \
    -H "Authorization: Bearer $MANAGER" "$GW2$BILLING/invoices/$INVOICE/download?dl=1")
RSS2_PEAK=$(rss_kib "$gw2_pid" VmHWM)

ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
row() { # label key [ratios]
    local key=$2
    printf '| %s | %.0f (%s) | %s | %s | %s | %s |\n' "$1" "${RPS[$key]}" "${SPREAD[$key]}" \
        "$(ms "${P50[$key]}")" "$(ms "${P99[$key]}")" "${3:-}" "${ERRORS[$key]}"
}
sustained() { # row: the achieved rate against the offered one
    awk -v a="${RPS[$1]}" -v o="$OFFERED" 'BEGIN { printf "%.0f req/s achieved%s", a, a < 0.97 * o ? " (NOT SUSTAINED)" : "" }'
}
vs() { echo "$(ratio "${RPS[$1]}" "${RPS[bare]}")× bare, $(ratio "${RPS[$1]}" "${RPS[nginx]}")× nginx"; }
added_p50=$((P50[miss] - P50[direct]))
added_p99=$((P99[miss] - P99[direct]))
growth=$((RSS2_PEAK - RSS2_BEFORE))
check() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "met" : "MISSED" }'; }

echo
echo "$(date -u +%F), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/^Mem:/ {print $2}') GiB;" \
    "servers on one core with one worker each, wrk -t1 or h2load -t1 on the other; $ROUNDS rounds of $DURATION per row," \
    "$CONNECTIONS connections (miss path: 1; HTTP/2: $H2_CONNECTIONS x $H2_STREAMS streams; fixed load:" \
    "$LATENCY_CONNECTIONS connections, up to $LATENCY_STREAMS streams each); load average $LOAD_BEFORE before, $LOAD_AFTER after"
echo
echo "| row | req/s, best round (all rounds) | p50 ms | p99 ms | throughput ratio | errors |"
echo "|---|---:|---:|---:|---|---:|"
row "1. bare hyper server (ceiling)" bare
row "2. nginx proxy_cache, warm" nginx "$(ratio "${RPS[nginx]}" "${RPS[bare]}")× bare"
row "3. gateway, cache hit, HS256" hs256 "$(vs hs256)"
row "4. gateway, cache hit, RS256" rs256 "$(vs rs256); $(ratio "${RPS[rs256]}" "${RPS[hs256]}")× HS256"
row "5a. simulator direct, get invoice (1 connection)" direct
row "5b. gateway miss, get invoice (1 connection)" miss "added: p50 +$(ms $added_p50) ms, p99 +$(ms $added_p99) ms"
row "6a. nginx proxy_cache, warm, HTTP/2" nginx-h2 "$(ratio "${RPS[nginx-h2]}" "${RPS[nginx]}")× HTTP/1.1"
row "6b. gateway, cache hit, HS256, HTTP/2" hs256-h2 "$(ratio "${RPS[hs256-h2]}" "${RPS[nginx-h2]}")× nginx HTTP/2"
row "7a. nginx proxy_cache, $OFFERED req/s offered (HTTP/2, open loop)" nginx-fixed "$(sustained nginx-fixed); max $(ms "${MAX[nginx-fixed]}") ms"
row "7b. gateway, cache hit, HS256, $OFFERED req/s offered (HTTP/2, open loop)" hs256-fixed \
    "$(sustained hs256-fixed); max $(ms "${MAX[hs256-fixed]}") ms; p99 $(ratio "${P99[hs256-fixed]}" "${P99[nginx-fixed]}")× nginx"
row "8. gateway, cache hit, HS256, sharing through Redis" redis \
    "$(ratio "${RPS[redis]}" "${RPS[hs256]}")× row 3, p99 $(ratio "${P99[redis]}" "${P99[hs256]}")× row 3; mode ${MODE_AFTER:-unknown}, $REDIS_PER_REQUEST Redis commands per request"
echo
echo "| memory | KiB |"
echo "|---|---:|"
echo "| gateway idle RSS (started, no request yet) | $RSS_IDLE |"
echo "| gateway RSS after the rows above | $RSS_AFTER |"
echo "| download gateway RSS before / peak during a $downloaded-byte download ($DOWNLOAD_RATE/s client) | $RSS2_BEFORE / $RSS2_PEAK (+$(mib $growth) MiB) |"
echo
echo "targets:"
echo "  cache hit HS256 >= 0.6x bare:  $(ratio "${RPS[hs256]}" "${RPS[bare]}")  $(check "$(ratio "${RPS[hs256]}" "${RPS[bare]}")" 0.6 '>=')"
echo "  cache hit HS256 >= 1.0x nginx: $(ratio "${RPS[hs256]}" "${RPS[nginx]}")  $(check "$(ratio "${RPS[hs256]}" "${RPS[nginx]}")" 1.0 '>=')"
echo "  RS256 >= 0.9x HS256:           $(ratio "${RPS[rs256]}" "${RPS[hs256]}")  $(check "$(ratio "${RPS[rs256]}" "${RPS[hs256]}")" 0.9 '>=')"
echo "  miss path p50 added <= 0.3 ms: $(ms $added_p50)  $(check "$(ms $added_p50)" 0.3 '<=')"
echo "  download RSS growth <= 16 MiB: $(mib $growth)  $(check "$(mib $growth)" 16 '<=')"
p99_ratio=$(ratio "${P99[hs256-fixed]}" "${P99[nginx-fixed]}")
echo "  p99 at the fixed load <= 1.5x nginx's: $p99_ratio  $(check "$p99_ratio" 1.5 '<=')"
echo "  Redis on >= 0.8x Redis off:    $(ratio "${RPS[redis]}" "${RPS[hs256]}")  $(check "$(ratio "${RPS[redis]}" "${RPS[hs256]}")" 0.8 '>=')" \
    "(mode ${MODE_AFTER:-unknown})"
redis_p99=$(ratio "${P99[redis]}" "${P99[hs256]}")
echo "  Redis on p99 <= 1.5x Redis off: $redis_p99  $(check "$redis_p99" 1.5 '<=')"
