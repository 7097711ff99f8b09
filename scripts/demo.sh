#!/usr/bin/env bash
# The main job on an embedded default: `expertmesh up` with configs/demo.yaml starts a local Ray
# cluster on 127.0.0.1, generates the tiny checkpoint, deploys the Serve application (router +
# autoscaled engine replicas, each an expert-parallel group of 2 rank actors), then a gRPC client
# streams an answer, `expertmesh status` shows replicas/ranks/expert load, and `expertmesh down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
EM=.venv/bin/expertmesh
trap '$EM down >/dev/null 2>&1 || true' EXIT
$EM up configs/demo.yaml
echo "--- streamed answer (gRPC, 127.0.0.1:50051) ---"
$EM client generate --address 127.0.0.1:50051 --chat --prompt "Why is the sky blue?" --max-tokens 48
echo "--- status ---"
$EM status
