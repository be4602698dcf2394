#!/usr/bin/env bash
# The compose trace stack without Docker: the built Jaeger v2 (in-memory) and Collector on loopback.
#
#   deploy/run-stack.sh                              # Jaeger + Collector until Ctrl-C
#   deploy/run-stack.sh funnel-tracer demo -n 3      # ... and run a command that sends to them
#
# Ports: OTLP 4317/4318 and Prometheus 8889 (Collector), query API/UI 16686 (Jaeger; its own OTLP
# receiver on 14317). Binaries come from deploy/build-binaries.sh (built on first use, cached).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t bins < <("$here/build-binaries.sh")
jaeger=${bins[0]} otelcol=${bins[1]}
logs=$(mktemp -d)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$jaeger" --config "$here/jaeger.yaml" >"$logs/jaeger.log" 2>&1 &
pids+=($!)
OTELCOL_OTLP_GRPC_ENDPOINT=127.0.0.1:4317 OTELCOL_OTLP_HTTP_ENDPOINT=127.0.0.1:4318 \
OTELCOL_JAEGER_ENDPOINT=127.0.0.1:14317 OTELCOL_PROMETHEUS_ENDPOINT=127.0.0.1:8889 \
OTELCOL_TELEMETRY_HOST=127.0.0.1 FUNNEL_OK_SAMPLING_PERCENT="${FUNNEL_OK_SAMPLING_PERCENT:-100}" \
  "$otelcol" --config "$here/../otel-collector.yaml" >"$logs/otelcol.log" 2>&1 &
pids+=($!)

for port in 16686 4318; do  # both listening, or say which did not and show its log
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "run-stack: nothing on :$port; logs in $logs" >&2; tail -n 5 "$logs"/*.log >&2; exit 1; }
done
echo "run-stack: Jaeger query API http://127.0.0.1:16686/api/traces/<trace id>, Collector OTLP http://127.0.0.1:4318, span metrics http://127.0.0.1:8889/metrics (logs: $logs)" >&2

export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
if [ $# -gt 0 ]; then "$@" || echo "run-stack: '$*' exited $?" >&2; fi
echo "run-stack: stack up; Ctrl-C stops Jaeger and the Collector" >&2
wait
