#!/usr/bin/env bash
# Writes prometheusrule.yaml: the rule group of alerts.yaml wrapped in a Prometheus Operator
# PrometheusRule, byte for byte (tests/observability.rs checks that they agree).
set -euo pipefail
cd "$(dirname "$0")"
{
  cat <<'HEADER'
# Generated from alerts.yaml by render.sh: edit alerts.yaml, then run deploy/prometheus/render.sh.
# For the Prometheus Operator; a plain Prometheus loads alerts.yaml as a rule file instead.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: billing-gateway
  labels:
    app.kubernetes.io/name: billing-gateway
    # Add the label your Prometheus selects rules by (kube-prometheus-stack: release: NAME).
spec:
HEADER
  sed -n '/^groups:/,$p' alerts.yaml | sed 's/^/  /'
} > prometheusrule.yaml
