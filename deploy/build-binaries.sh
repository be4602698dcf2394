#!/usr/bin/env bash
# Build the real Jaeger v2 and OpenTelemetry Collector binaries from the Go module proxy, once.
#
# Why here and not `docker compose`: CI and the project's machines have Go and the module proxy
# but no container engine. Binaries are cached outside the repo, keyed by version, and reused:
#   ~/.cache/funnel-tracer/jaeger-<version>/jaeger
#   ~/.cache/funnel-tracer/otelcol-<version>/otelcol
# Go's module and build caches live beside them (~/.cache/funnel-tracer/go/), so a rebuild after a
# version bump reuses every unchanged package. Prints the two binary paths; on a failed build it
# prints one line saying why and exits 1 (the e2e tests then fail under CI=true, never skip).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

JAEGER_MODULE_VERSION=v1.76.0   # the Go module tag of Jaeger v2.13.0
JAEGER_VERSION=v2.13.0
OTELCOL_VERSION=0.161.0         # must equal `version` in deploy/otelcol/main.go and go.mod's pins

cache="${FUNNEL_TRACER_CACHE:-$HOME/.cache/funnel-tracer}"
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}" GOCACHE="${GOCACHE:-$cache/go/build}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

fail() { echo "build-binaries: $1" >&2; exit 1; }
command -v go >/dev/null || fail "no 'go' on PATH: install Go >= 1.24 (the module proxy serves every dependency)"

# build NAME VERSION DIR PACKAGE [LDFLAGS]: go build in DIR's module, atomically into the cache.
build() {
  local name=$1 version=$2 dir=$3 pkg=$4 ldflags=${5:-}
  local out="$cache/$name-$version/$name" log="$cache/$name-$version/build.log"
  if [ -x "$out" ]; then echo "$out"; return; fi
  mkdir -p "$(dirname "$out")"
  local start=$SECONDS
  echo "build-binaries: building $name $version (first time on this machine: ~10-20 min on 2 cores)" >&2
  if ! (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg") >"$log" 2>&1; then
    rm -f "$out.tmp"
    echo "build-binaries: $name $version failed to build: $(grep -v '^go: downloading' "$log" | grep -m1 . || tail -n1 "$log") (full log: $log)" >&2
    return 1
  fi
  mv "$out.tmp" "$out"
  echo "build-binaries: built $name $version in $((SECONDS - start)) s" >&2
  echo "$out"
}

# Each binary on its own: one failing still leaves the other built (and its tests able to run).
status=0
build jaeger "$JAEGER_MODULE_VERSION" "$here/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger \
  "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" || status=1
build otelcol "$OTELCOL_VERSION" "$here/otelcol" . || status=1
exit $status
