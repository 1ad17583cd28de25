#!/usr/bin/env bash
# Writes each rule file's Prometheus Operator PrometheusRule: the rule group of alerts.yaml in
# prometheusrule.yaml, and of costs.yaml in costs-prometheusrule.yaml, byte for byte (check.sh
# checks that they are current, tests/observability.rs that alerts.yaml's agrees).
set -euo pipefail
cd "$(dirname "$0")"
render() { # rules wrapper name
  {
    cat <<HEADER
# Generated from $1 by render.sh: edit $1, then run deploy/prometheus/render.sh.
# For the Prometheus Operator; a plain Prometheus loads $1 as a rule file instead.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: $3
  labels:
    app.kubernetes.io/name: billing-gateway
    # Add the label your Prometheus selects rules by (kube-prometheus-stack: release: NAME).
spec:
HEADER
    sed -n '/^groups:/,$p' "$1" | sed 's/^/  /'
  } > "$2"
}
render alerts.yaml prometheusrule.yaml billing-gateway
render costs.yaml costs-prometheusrule.yaml billing-gateway-costs
