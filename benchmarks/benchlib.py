"""Shared helpers of the benchmark scripts: environment, checkpoints, prompts, statistics, plots.

Not a test and not part of the package: the scripts beside this file put benchmarks/ on sys.path
(running `python benchmarks/x.py` does that) and import it as `benchlib`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

log = logging.getLogger("bench")


def setup_env(threads: int = 1) -> None:
    """Loopback-only Ray/gloo and single-threaded torch (stable timings on 2 shared cores)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def ensure_checkpoint(preset: str, folder: Path | None = None, seed: int = 0, fp8: bool = False) -> Path:
    """The seeded random checkpoint of `preset` (FP8 e4m3 weights with `fp8`), generated once
    into a cache folder."""
    folder = Path(folder or RESULTS / f"ckpt-{preset}{'-fp8' if fp8 else ''}")
    marker = folder / ".complete"
    if marker.exists():
        return folder
    from expertmesh.cluster.devtools.checkpoints import make_checkpoint

    t0 = time.perf_counter()
    make_checkpoint(folder, preset=preset, seed=seed, fp8=fp8)
    marker.write_text(json.dumps({"preset": preset, "seed": seed, "fp8": fp8}) + "\n")
    log.info("generated %s checkpoint in %s (%.1fs)", preset, folder, time.perf_counter() - t0)
    return folder


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: int = 120_000) -> list[list[int]]:
    """n prompts of uniform random length in [lo, hi] over ordinary token ids (no BOS/EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def quantile(xs, q: float):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_devices"] = torch.cuda.device_count()
    return info


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(o):
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
