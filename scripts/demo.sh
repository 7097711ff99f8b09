#!/usr/bin/env bash
# The main job on an embedded default: a tiny generated checkpoint and a local Ray cluster on
# 127.0.0.1, expert parallelism over 2 rank actors.
set -euo pipefail
cd "$(dirname "$0")/.."
EM=.venv/bin/expertmesh
[ -f checkpoints/tiny/config.json ] || $EM make-checkpoint checkpoints/tiny --preset tiny
$EM generate --checkpoint checkpoints/tiny --ep-size 2 --chat --prompt "Why is the sky blue?" --max-tokens 32 --json
