#!/usr/bin/env bash
# The official Scaleway SDKs, proven: installs the pinned Python SDK (python/requirements.txt,
# into a venv under target/) and JS SDK (js/package-lock.json, `npm ci`), builds
# billing-gateway once, starts `billing-gateway demo` on a free port, runs both suites against
# it and stops it. Exits non-zero when anything fails. See sdk-tests/README.md.
#
# Environment: BILLING_GATEWAY_BIN (use this binary, skip the build), SDK_TESTS_WORK (where the
# venv and the demo's output go; default target/sdk-tests).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
work="${SDK_TESTS_WORK:-$root/target/sdk-tests}"
mkdir -p "$work"

for tool in python3 node npm curl; do
  if ! command -v "$tool" >/dev/null; then
    echo "sdk-tests: $tool is missing; the SDK stage needs python3 (with venv), node >= 20.19.4, npm and curl" >&2
    exit 1
  fi
done

echo "== sdk-tests: installing the pinned SDKs"
# Rebuilt only when requirements.txt changes.
venv="$work/venv"
want="$(sha256sum "$here/python/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/python/requirements.txt"
  echo "$want" >"$venv/.requirements.sha256"
fi
(cd "$here/js" && npm ci --no-audit --no-fund --loglevel=error)

bin="${BILLING_GATEWAY_BIN:-}"
if [[ -z "$bin" ]]; then
  echo "== sdk-tests: building billing-gateway"
  (cd "$root" && cargo build --locked --quiet)
  bin="${CARGO_TARGET_DIR:-$root/target}/debug/billing-gateway"
fi

out="$work/demo.out"
log="$work/demo.log"
: >"$out"
# From the repository root, so the demo reads policies/ as a newcomer's would.
(cd "$root" && RUST_LOG="${RUST_LOG:-info}" exec "$bin" demo --listen 127.0.0.1:0 >"$out" 2>"$log") &
demo=$!
stop_demo() {
  kill "$demo" 2>/dev/null || true
  wait "$demo" 2>/dev/null || true
}
trap stop_demo EXIT

# `NAME=value` lines; anything after the value (a comment) is dropped.
value() { sed -n "s/^$1=\([^[:space:]]*\).*/\1/p" "$out" | head -n 1; }
url=""
for _ in $(seq 1 150); do
  if ! kill -0 "$demo" 2>/dev/null; then
    echo "sdk-tests: billing-gateway demo exited early; its log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  url="$(sed -n '1s/^billing-gateway demo: \(http[^ ]*\).*/\1/p' "$out")"
  if [[ -n "$url" && -n "$(value MANAGER)" && -n "$(value READ_ONLY)" ]] &&
    curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; then
    break
  fi
  url=""
  sleep 0.2
done
if [[ -z "$url" ]]; then
  echo "sdk-tests: billing-gateway demo did not get ready in 30 s; its output and log:" >&2
  cat "$out" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
# The demo's banner ends with its Ctrl-C line; a GATEWAY_KEY= line may come anywhere before it.
for _ in $(seq 1 10); do
  grep -q '^Ctrl-C' "$out" && break
  sleep 0.2
done

# The suites configure the SDKs themselves; nothing of the caller's Scaleway profile leaks in.
for name in $(compgen -e | grep '^SCW_' || true); do unset "$name"; done
export BILLING_GATEWAY_URL="$url"
export BILLING_GATEWAY_MANAGER="$(value MANAGER)"
export BILLING_GATEWAY_READ_ONLY="$(value READ_ONLY)"
export BILLING_GATEWAY_KEY="$(value GATEWAY_KEY)"
echo "== sdk-tests: billing-gateway demo at $url (log: $log)"
if [[ -z "$BILLING_GATEWAY_KEY" ]]; then
  echo "NOTICE: the demo printed no GATEWAY_KEY= line: gateway-key mode (the key as an unmodified SCW_SECRET_KEY) is skipped; JWT mode runs"
fi

failed=()
echo "== sdk-tests: Python SDK (scaleway $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("scaleway"))'))"
(cd "$here/python" && PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider) ||
  failed+=(python)
js_version="$(cd "$here/js" && node -p 'require("./node_modules/@scaleway/sdk-billing/package.json").version')"
echo "== sdk-tests: JS SDK (@scaleway/sdk-billing $js_version)"
(cd "$here/js" && node --test --test-reporter=tap test.mjs) || failed+=(js)

if ((${#failed[@]})); then
  echo "sdk-tests: FAILED: ${failed[*]}; the demo's log is $log, its last lines:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
# Nothing printed after this point: the stage ends on the test runners' own summary lines.
