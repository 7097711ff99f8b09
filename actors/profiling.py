"""Per-step time accounting for a rank (attention, gate, dispatch, experts, combine, sample).

On CUDA, spans synchronize so the figures mean time on the device, at a small cost; call sites
are per layer, never per token."""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from .step import StepTimings


class StepProfiler:
    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self._acc: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self._acc.clear()

    def span(self, name: str) -> "_Span":
        """`with profiler.span("experts"):` adds the block's seconds to that part of the step."""
        return _Span(self, name)

    def timings(self) -> StepTimings:
        return StepTimings(**{k: v for k, v in self._acc.items() if k in StepTimings.__dataclass_fields__})


NULL_PROFILER = StepProfiler()


class _Span:
    """One timed block of a StepProfiler (a class, not a generator context manager: ~15 spans a
    step at one token, each ~1 us cheaper this way)."""

    __slots__ = ("profiler", "name", "t0")

    def __init__(self, profiler: StepProfiler, name: str):
        self.profiler, self.name = profiler, name

    def __enter__(self) -> None:
        if self.profiler.sync_cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.profiler.sync_cuda:
            torch.cuda.synchronize()
        self.profiler._acc[self.name] += time.perf_counter() - self.t0
