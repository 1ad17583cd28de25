#!/usr/bin/env bash
# The typed API, proven: takes the OpenAPI document from a running `billing-gateway demo`,
# generates TypeScript types from it with the pinned openapi-typescript, and type-checks
# client.ts against them with the pinned tsc (both from package-lock.json, `npm ci`). Exits
# non-zero when anything fails; a document that describes an answer only as `type: object`
# fails here, since client.ts reads the answers' fields.
#
# Environment: BILLING_GATEWAY_BIN (use this binary, skip the build).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$root/target/typescript-example"
mkdir -p "$work" "$here/generated"

(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

bin="${BILLING_GATEWAY_BIN:-}"
if [[ -z "$bin" ]]; then
  (cd "$root" && cargo build --locked --quiet)
  bin="${CARGO_TARGET_DIR:-$root/target}/debug/billing-gateway"
fi

# The document exactly as the gateway serves it: `demo` on a free port, from the repository root.
out="$work/demo.out"
: >"$out"
(cd "$root" && exec "$bin" demo --listen 127.0.0.1:0 >"$out" 2>"$work/demo.log") &
demo=$!
trap 'kill "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 150); do
  if ! kill -0 "$demo" 2>/dev/null; then
    echo "typescript example: billing-gateway demo exited early; its log:" >&2
    tail -n 30 "$work/demo.log" >&2
    exit 1
  fi
  url="$(sed -n '1s/^billing-gateway demo: \(http[^ ]*\).*/\1/p' "$out")"
  [[ -n "$url" ]] && curl -fsS -o "$work/openapi.json" "$url/gateway/v1/openapi.json" 2>/dev/null && break
  url=""
  sleep 0.2
done
if [[ -z "$url" ]]; then
  echo "typescript example: billing-gateway demo did not serve its document in 30 s" >&2
  exit 1
fi

cd "$here"
npx --no-install openapi-typescript "$work/openapi.json" --output generated/gateway.d.ts
npx --no-install tsc --project tsconfig.json
echo "typescript example: client.ts type-checks against the gateway's document"
