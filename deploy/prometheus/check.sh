#!/usr/bin/env bash
# The alert rules and the dashboard's queries through promtool (Debian's `prometheus` package):
# the rules parse, every alert's unit tests pass, the PrometheusRule wrapper is current, and
# every query of the Grafana dashboard parses as PromQL.
set -euo pipefail
cd "$(dirname "$0")"

promtool check rules alerts.yaml
promtool test rules alerts.test.yaml

fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
cp alerts.yaml render.sh "$fresh/"
bash "$fresh/render.sh"
if ! cmp -s "$fresh/prometheusrule.yaml" prometheusrule.yaml; then
  echo "deploy/prometheus/prometheusrule.yaml is not alerts.yaml's: run deploy/prometheus/render.sh" >&2
  exit 1
fi

# Each dashboard query becomes a recording rule, with Grafana's variables given plain values,
# so that `promtool check rules` parses it.
python3 - ../grafana/billing-gateway.json > "$fresh/dashboard-rules.yaml" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
print("groups:\n  - name: dashboard\n    rules:")
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = (target["expr"].replace("$__rate_interval", "5m")
                .replace("$job", "billing-gateway").replace("$instance", ".*"))
        print("      - record: dashboard:%s:%s" % (panel["id"], target["refId"]))
        print("        expr: " + json.dumps(expr))
PY
promtool check rules "$fresh/dashboard-rules.yaml"
