"""Greedy tokens without reading the whole bf16 lm_head (kernels/head_cpu.cpp).

At a few rows the head is bound by reading its weights: `small`'s 129280 x 512 bf16 head is 132 MB
per step, 4.4 ms of a ~10 ms token on a 30 GB/s CPU. Greedy rows need only the argmax, so an int8
copy of the head (half the bytes, kept beside the bf16 one) bounds every logit, and only the few
logits whose bound reaches the best lower bound are recomputed from the bf16 weights. The token is
the bf16 head's argmax; rows the screen cannot decide (a flat distribution, non-finite input) take
the full head. Where the CPU has AVX512-VNNI (and no AMX) the rows are quantized too and the
screen runs on int8 dot products, twice the bf16 head's arithmetic rate: it then serves every
greedy batch, not only batches of 1-2. Costs 1 byte per head weight more memory
(`model.greedy_head_screen: false` saves it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .packed import PairPackedLinear

# Without VNNI (or where AMX tiles run the bf16 head) above this many rows the screen costs as much
# as the bf16 head (an AVX2 EPYC, `small`, 2 threads: 2.3 vs 3.9 ms at 1 row, 3.1 vs 3.4 at 2, 4.1
# vs 3.8 at 3: widening int8 to fp32 makes it compute-bound); the full head and argmax_rows serve
# more rows.
SCREEN_MAX_ROWS = 2
# With VNNI and no AMX: the bf16 head is compute-bound from a few rows and the screen does twice its
# multiply-adds per instruction (an AVX512-VNNI EPYC, `small`, 2 threads: see greedy_rows_limit).
VNNI_SCREEN_MAX_ROWS = 4096
# A row with more candidates than this (a near-flat distribution) is cheaper through the full head.
MAX_CANDIDATES = 1024
# Rows quantized at a time: the fp32 copy of a 926M-weight head would be 3.7 GB; 2048 of its 7168-wide
# rows are 59 MB in fp32 and 117 MB for each float64 temporary of the norms
_CHUNK_ROWS = 2048


def greedy_rows_limit(ops) -> int:
    """Most rows the screen serves on this CPU (the kernels' `head_screen_vnni`, `has_amx`)."""
    return VNNI_SCREEN_MAX_ROWS if ops.head_screen_vnni() and not ops.has_amx() else SCREEN_MAX_ROWS


class ScreenedHead(nn.Module):
    """The int8 screen of a PairPackedLinear head: w8 (head_screen_pack's layout for this CPU), per
    row stats [4, rows] = (scale, |W - scale q|_2, scale |q|_2, fp32 rounding slack) and
    rowsum128 = 128 sum_k q (the VNNI path's unsigned offset)."""

    def __init__(self, weight: torch.Tensor, head: PairPackedLinear, ops):
        super().__init__()
        n, k = weight.shape
        rows = head.packed.shape[0] * 16
        q8 = torch.zeros(rows, k, dtype=torch.int8)
        stats = torch.zeros(4, rows)
        stats[0] = 1.0
        rowsum = torch.zeros(rows, dtype=torch.int32)
        slack = (2 * k + 16) * 2.0 ** -24  # both fp32 sums' rounding, relative to max |W[n]| sum |x|
        with torch.no_grad():
            for a in range(0, n, _CHUNK_ROWS):
                w = weight[a : a + _CHUNK_ROWS].float()
                amax = w.abs().amax(dim=1)
                s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
                q = torch.round(w / s[:, None]).clamp_(-127, 127)
                b = slice(a, a + w.shape[0])
                q8[b] = q.to(torch.int8)
                rowsum[b] = q.sum(dim=1).to(torch.int32) * 128
                stats[0, b] = s
                # Cauchy-Schwarz terms in float64, rounded up: |W - s q|_2 and s |q|_2
                resid = (w.double() - q.double() * s.double()[:, None]).norm(dim=1)
                stats[1, b] = _round_up(resid)
                stats[2, b] = _round_up(s.double() * q.double().norm(dim=1))
                stats[3, b] = _round_up(slack * amax.double())
        self.w8 = nn.Parameter(ops.head_screen_pack(q8), requires_grad=False)
        self.stats = nn.Parameter(stats, requires_grad=False)
        self.rowsum128 = nn.Parameter(rowsum, requires_grad=False)
        self.ops = ops
        self.max_rows = greedy_rows_limit(ops)

    @property
    def weight_bytes(self) -> int:
        return self.w8.numel() + 4 * (self.stats.numel() + self.rowsum128.numel())

    def greedy(self, hidden: torch.Tensor, head: PairPackedLinear) -> torch.Tensor:
        """argmax of head(hidden) per row, [R] int64; `head` is the packed head this screens."""
        ids = self.ops.head_screen_argmax(hidden, head.packed, head.out_features, self.w8, self.stats, self.rowsum128,
                                          MAX_CANDIDATES)
        undecided = (ids < 0).nonzero().flatten()
        if undecided.numel():
            ids[undecided] = self.ops.argmax_rows(head(hidden[undecided]))
        return ids

    def serves(self, head: nn.Module, hidden: torch.Tensor) -> bool:
        """Whether `hidden`'s rows go through the screen (else the full head)."""
        return (isinstance(head, PairPackedLinear) and hidden.dim() == 2 and hidden.dtype == torch.bfloat16
                and 0 < hidden.shape[0] <= self.max_rows)


def _round_up(v: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below v (the bounds must not shrink in the conversion)."""
    f = v.float()
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, math.inf)), f)
