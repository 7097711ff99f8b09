#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from protos/expertmesh/v1/*.proto.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: protos/, i.e. in place)
# The -I root is protos/, so generated imports read `from expertmesh.v1 import ..._pb2`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/protos}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
cd "$ROOT/protos"
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  expertmesh/v1/*.proto
