#!/usr/bin/env bash
# Sets up expertmesh in ./.venv on a fresh machine: torch (CPU build unless EXPERTMESH_TORCH says
# otherwise), expertmesh with its dev extras, SGLang's radix cache without SGLang's GPU stack.
# Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EXPERTMESH_VENV:-.venv}
TORCH_SPEC=${EXPERTMESH_TORCH:-torch==2.13.0}   # a CUDA machine may set e.g. "torch==2.14.1"
stamp="$VENV/.expertmesh-setup"
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "expertmesh: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
echo "expertmesh: installing $TORCH_SPEC"
pip install -q "$TORCH_SPEC"
constraints=(-c requirements/constraints.txt)
if [ -n "${EXPERTMESH_TORCH:-}" ]; then constraints=(); fi
echo "expertmesh: installing expertmesh and its dependencies"
pip install -q "${constraints[@]}" -e ".[dev]"
echo "expertmesh: installing SGLang's radix cache (sglang --no-deps)"
pip install -q --no-deps sglang==0.5.23
pip install -q "${constraints[@]}" -r requirements/sglang-radix.txt
"$VENV/bin/python" -c "import expertmesh.cluster.engine.sglang_import as s; s.import_radix_cache(); print('expertmesh: sglang radix cache imports')"
echo "expertmesh: building the CPU kernels for this CPU (once; one to two minutes on 2 cores)"
"$VENV/bin/python" -m expertmesh.actors.model.kernels \
  || echo "expertmesh: WARNING: the CPU kernels did not build; experts and attention will use torch's ops"
echo "$want" > "$stamp"
echo "expertmesh: ready ($VENV)"
