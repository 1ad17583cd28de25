#!/usr/bin/env bash
# Instructions per cache hit (HS256 token), the gateway under callgrind (bench/RESULTS.md, issue 13).
# Usage: bench/callgrind-hit.sh BINARY OUT [SECONDS]; needs valgrind, wrk, curl. Prints the
# request count, the process's instructions and their ratio; `callgrind_annotate --inclusive=yes
# OUT.1` then shows where they went. Ports: SIM_PORT (18791), GW_PORT (18792).
set -euo pipefail
BIN=$1 OUT=$2 SECS=${3:-10}
cd "$(dirname "$0")/.."
ORG=11111111-2222-3333-4444-555555555555
KEY=$(cat /proc/sys/kernel/random/uuid)
SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
SIM=127.0.0.1:${SIM_PORT:-18791} GW=127.0.0.1:${GW_PORT:-18792}
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
SCW_SECRET_KEY=$KEY "$BIN" simulate --listen "$SIM" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -sf -o /dev/null -H "X-Auth-Token: $KEY" "http://$SIM/billing/v2beta1/invoices" && break
    sleep 0.1
done
# The access log goes to OUT.log: a file, as in production, not a terminal.
env SCW_SECRET_KEY="$KEY" SCW_DEFAULT_ORGANIZATION_ID=$ORG GATEWAY_JWT_HS256_SECRET="$SECRET" \
    GATEWAY_POLICY_DIR=policies GATEWAY_LOG_FORMAT=json GATEWAY_PRINCIPAL_RATE=1000000/s \
    GATEWAY_UPSTREAM_RATE=1000000/s SCW_API_URL="http://$SIM" GATEWAY_LISTEN="$GW" \
    TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN" serve \
    2>"$OUT.log" &
GATEWAY=$!
pids+=("$GATEWAY")
for _ in $(seq 300); do
    curl -sf -o /dev/null "http://$GW/readyz" && break
    sleep 0.2
done
TOKEN=$(env GATEWAY_JWT_HS256_SECRET="$SECRET" "$BIN" token --ttl 2h --roles billing-read-only --sub bench-hs256)
URL="http://$GW/billing/v2beta1/consumptions?organization_id=$ORG"
curl -sf -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL"
wrk -t1 -c4 -d3s -H "Authorization: Bearer $TOKEN" "$URL" >/dev/null
callgrind_control -z "$GATEWAY" >/dev/null 2>&1
N=$(wrk -t1 -c4 -d"${SECS}s" -H "Authorization: Bearer $TOKEN" "$URL" | awk '/requests in/ {print $1}')
callgrind_control -d "$GATEWAY" >/dev/null 2>&1
TOTAL=$(callgrind_annotate "$OUT.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests=$N instructions=$TOTAL per_request=$((TOTAL / N))"
