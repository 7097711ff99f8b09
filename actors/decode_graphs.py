"""Decode steps captured once and replayed: CUDA graphs on a GPU.

At decode sizes a GPU step is bound by launches, not arithmetic: each layer issues dozens of small
kernels and Python pays for every one. A captured graph replays the whole step's kernels in one
call. Capture fixes shapes, pointers and every decision Python made, so the step runs in fixed
shapes (DeepseekV3Model.decode_static: no host sync, no data-dependent shape) over buffers this
module owns, padded to buckets: batch sizes 1, 2, 4, 8, then multiples of 8, and context widths
powers of two from `min_width`. One graph per (batch, width) bucket, captured the first time a
step needs it, all in one memory pool: a graph's scratch memory may hold another's output, so
what `run` returns is valid until the next `run` (the worker samples from it first), and graphs
run one at a time on one stream. A graph holds the weights' and the KV cache's memory as they were
at capture: weights that move (none do at ep_size 1 after loading; EPLB needs expert parallelism,
where steps run eagerly) would need the graphs dropped.

Backends: "cuda" captures torch.cuda.CUDAGraph. "fx" records the same step with torch.fx's make_fx
-- the aten ops over the same buffers, Python's decisions fixed at capture as a CUDA graph fixes
them -- and replays the recorded graph on any device: how a machine without a GPU checks that the
step replays correctly (a value Python read at capture would be replayed stale there too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .forward_batch import DecodeRows, ForwardBatch
from .kv_cache import MLAKVCache
from .model.deepseek_v3 import DeepseekV3Model

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "fx")


class CaptureError(RuntimeError):
    """A step could not be captured (nothing of it ran but the warm-up's padding rows)."""


@dataclass(frozen=True)
class GraphConfig:
    max_batch: int = 64  # decode steps with more sequences run eagerly
    max_context: int = 8192  # ... and steps where a context is longer
    min_width: int = 128  # the narrowest context bucket

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.min_width < 1 or self.max_context < self.min_width:
            raise ValueError(f"bad decode graph sizes: {self}")

    def batch_bucket(self, n: int) -> int:
        """The captured batch size a step of n sequences runs at."""
        if n <= 8:
            return min(1 << (n - 1).bit_length(), max(n, self.max_batch))
        return min(-(-n // 8) * 8, self.max_batch) if n <= self.max_batch else n

    def width_bucket(self, length: int) -> int:
        """The captured context width a longest context of `length` slots runs at."""
        return min(max(self.min_width, 1 << (length - 1).bit_length()), self.max_context)


@dataclass
class _Graph:
    replay: Callable[[], torch.Tensor | None]
    output: torch.Tensor | None  # the CUDA graph's static output; None: replay returns it (fx)


class DecodeGraphs:
    """Pure-decode steps of one model and KV cache as replayed graphs (see the module docstring)."""

    def __init__(self, model: DeepseekV3Model, kv: MLAKVCache, config: GraphConfig | None = None,
                 backend: str = "cuda"):
        if backend not in BACKENDS:
            raise ValueError(f"decode graph backend {backend!r}: choose one of {BACKENDS}")
        reason = model.static_unsupported()
        if reason:
            raise ValueError(f"this model's decode step cannot be captured: {reason}")
        device = kv.joint.device
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a GPU, not {device}")
        self.model, self.kv, self.backend = model, kv, backend
        self.config = config or GraphConfig()
        if self.config.max_context > kv.num_slots:
            self.config = replace(self.config, max_context=max(kv.num_slots, self.config.min_width))
        b, w = self.config.max_batch, self.config.max_context
        long = dict(dtype=torch.long, device=device)
        self._ids, self._positions, self._out_slots = (torch.zeros(b, **long) for _ in range(3))
        self._lens = torch.ones(b, **long)
        self._valid = torch.zeros(b, dtype=torch.bool, device=device)
        self._slots = torch.zeros(b * w, **long)  # each bucket's [B, W] table is a view of its start
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if backend == "cuda" else None
        self.replays = 0

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, width) buckets captured so far."""
        return sorted(self._graphs)

    def serves(self, batch: ForwardBatch) -> bool:
        """Whether `batch` is a decode step these graphs run: one new token for every sequence, no
        more sequences than max_batch, no context longer than max_context."""
        n = batch.num_seqs
        return (0 < n <= self.config.max_batch and batch.num_tokens == n
                and max(c.numel() for c in batch.ctx_slots) <= self.config.max_context)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states [n, H] of a decode step (serves(batch) must hold)."""
        n = batch.num_seqs
        lens = [c.numel() for c in batch.ctx_slots]
        key = (self.config.batch_bucket(n), self.config.width_bucket(max(lens)))
        rows = self._rows(*key)
        graph = self._graphs.get(key)
        if graph is None:  # (rows and key are in range: serves() held)
            try:
                graph = self._capture(rows)
            except Exception as exc:
                raise CaptureError(f"capturing the decode step at batch {key[0]}, width {key[1]} ({self.backend}) "
                                   f"failed: {exc!r}") from exc
            self._graphs[key] = graph
            log.info("decode graph captured (%s): batch %d, context width %d; %d graphs", self.backend, *key,
                     len(self._graphs))
        self._fill(rows, batch, lens)
        out = graph.replay()
        self.replays += 1
        return (graph.output if out is None else out)[:n]

    def _rows(self, b: int, w: int) -> DecodeRows:
        return DecodeRows(self._ids[:b], self._positions[:b], self._out_slots[:b], self._slots[: b * w].view(b, w),
                          self._lens[:b], self._valid[:b])

    def _fill(self, rows: DecodeRows, batch: ForwardBatch, lens: list[int]) -> None:
        """The step's inputs copied into the graph's buffers; rows past the batch are padding."""
        n = batch.num_seqs
        self._padding(rows, n)
        rows.input_ids[:n].copy_(batch.input_ids)
        rows.positions[:n].copy_(batch.positions)
        rows.out_slots[:n].copy_(batch.out_slots)
        rows.lens[:n].copy_(torch.tensor(lens, dtype=torch.long))
        rows.valid[:n] = True
        table = torch.nn.utils.rnn.pad_sequence(batch.host_ctx(), batch_first=True)  # one copy to the device
        rows.slots[:n, : table.shape[1]].copy_(table)

    @staticmethod
    def _padding(rows: DecodeRows, start: int = 0) -> None:
        """Rows from `start` on padding: token 0 at position 0, written to slot 0 (never handed out),
        its context that one slot, not counted in the expert load."""
        rows.slots[start:, 0] = 0
        rows.input_ids[start:] = 0
        rows.positions[start:] = 0
        rows.out_slots[start:] = 0
        rows.lens[start:] = 1
        rows.valid[start:] = False

    def _capture(self, rows: DecodeRows) -> _Graph:
        """A graph of one step over `rows`' buffers. Every row is padding while it is made, so what
        the warm-up runs (and make_fx's tracing, which executes) write goes to slot 0 and no load is
        counted; the warm-up builds the model's lazy caches (absorbed kv_b_proj, load counters)
        before capture, outside the graph (a cache built while tracing would be rebuilt, empty, at
        every replay)."""
        self._padding(rows)
        step = lambda: self.model.decode_static(rows, self.kv)  # noqa: E731
        if self.backend == "fx":
            from torch.fx.experimental.proxy_tensor import make_fx

            step()
            with torch.inference_mode():
                traced = make_fx(step)()

            def replay() -> torch.Tensor:
                with torch.inference_mode():  # (the recorded ops read inference tensors)
                    return traced()

            return _Graph(replay, None)
        device = self._ids.device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a CUDA call from another thread (Ray's) cannot invalidate the capture
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = step()
            finally:  # a capture that failed at its end can leave its stream current
                torch.cuda.set_stream(current)

        def replay_cuda() -> None:
            with torch.cuda.device(device):
                graph.replay()

        return _Graph(replay_cuda, output)
