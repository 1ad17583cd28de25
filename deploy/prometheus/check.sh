#!/usr/bin/env bash
# The rule files and the dashboards' queries through promtool (Debian's `prometheus` package):
# the operator's alerts (alerts.yaml) and the teams' cost alerts (costs.yaml) parse, every
# alert's unit tests pass, their PrometheusRule wrappers are current, and every query of the
# Grafana dashboards (billing-gateway.json, costs.json) parses as PromQL.
set -euo pipefail
cd "$(dirname "$0")"

for rules in alerts costs; do
  promtool check rules "$rules.yaml"
  promtool test rules "$rules.test.yaml"
  # promtool passes a test file that never mentions an alert: each needs a case where it fires
  # and one where it stays quiet.
  python3 - "$rules.yaml" "$rules.test.yaml" <<'PY'
import re, sys
rules, tests = (open(path).read() for path in sys.argv[1:])
for name in re.findall(r"- alert: (\w+)", rules):
    case = "alertname: %s\n        exp_alerts:" % name
    assert case + "\n          - " in tests, "%s: no case where %s fires" % (sys.argv[2], name)
    assert case + " []" in tests, "%s: no case where %s stays quiet" % (sys.argv[2], name)
PY
done

fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
cp alerts.yaml costs.yaml render.sh "$fresh/"
bash "$fresh/render.sh"
for wrapper in prometheusrule.yaml costs-prometheusrule.yaml; do
  if ! cmp -s "$fresh/$wrapper" "$wrapper"; then
    echo "deploy/prometheus/$wrapper is not current: run deploy/prometheus/render.sh" >&2
    exit 1
  fi
done

# Each dashboard query becomes a recording rule, with Grafana's variables given plain values,
# so that `promtool check rules` parses it. Every panel must query the dashboard's data source
# variable, not one installation's; the costs dashboard only the series of the costs endpoint
# (contract §12), so a misspelt name shows here rather than as an empty panel.
python3 - ../grafana/billing-gateway.json ../grafana/costs.json > "$fresh/dashboard-rules.yaml" <<'PY'
import json, re, sys
COST_SERIES = {"billing_gateway_cost", "billing_gateway_cost_forecast", "billing_gateway_budget",
               "billing_gateway_cost_updated_timestamp_seconds"}
print("groups:")
for path in sys.argv[1:]:
    dashboard = json.load(open(path))
    print("  - name: %s\n    rules:" % dashboard["uid"])
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        where = "%s panel %s" % (path, panel["id"])
        targets = panel["targets"]
        assert targets, where + ": no query"
        for item in [panel] + targets:
            assert item["datasource"]["uid"] == "${datasource}", where + ": not on ${datasource}"
        for target in targets:
            expr = re.sub(r"\$__\w+", "5m", target["expr"])
            expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
            if path.endswith("costs.json"):
                unknown = set(re.findall(r"billing_gateway_\w+", expr)) - COST_SERIES
                assert not unknown, "%s: not a cost series: %s" % (where, unknown)
            print("      - record: %s:%s:%s" % (dashboard["uid"].replace("-", "_"), panel["id"], target["refId"]))
            print("        expr: " + json.dumps(expr))
PY
promtool check rules "$fresh/dashboard-rules.yaml"
