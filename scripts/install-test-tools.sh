#!/usr/bin/env bash
# Tools the tests call besides Python packages: promtool (Debian package prometheus) lints the
# Prometheus exposition; kubectl (kustomize) is expected on the machine image.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "expertmesh: installing promtool (Debian package prometheus)"
    if ! (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends prometheus >/dev/null); then
      echo "expertmesh: could not install prometheus; the promtool check will skip" >&2
    fi
    # the package starts a server on :9090 on some images; the tests need only the binary
    (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || pkill -x prometheus 2>/dev/null || true
  else
    echo "expertmesh: promtool not found and cannot apt-get it; the metrics lint test will skip" >&2
  fi
fi
command -v kubectl >/dev/null 2>&1 || echo "expertmesh: kubectl not found; the kustomize overlay tests will skip" >&2
