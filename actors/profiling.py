"""Per-step time accounting for a rank (attention, gate, dispatch, experts, combine, sample).

On CUDA, spans synchronize so the figures mean time on the device, at a small cost; call sites
are per layer, never per token."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

from .step import StepTimings


class StepProfiler:
    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self._acc: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self._acc.clear()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self._acc[name] += time.perf_counter() - t0

    def timings(self) -> StepTimings:
        return StepTimings(**{k: v for k, v in self._acc.items() if k in StepTimings.__dataclass_fields__})


NULL_PROFILER = StepProfiler()
