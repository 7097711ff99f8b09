"""Greedy tokens at batch 1-2 without reading the whole bf16 lm_head (kernels/head_cpu.cpp).

At a few rows the head is bound by reading its weights: `small`'s 129280 x 512 bf16 head is 132 MB
per step, 4.4 ms of a ~10 ms token on a 30 GB/s CPU. Greedy rows need only the argmax, so an int8
copy of the head (half the bytes, kept beside the bf16 one) bounds every logit, and only the few
logits whose bound reaches the best lower bound are recomputed from the bf16 weights. The token is
the bf16 head's argmax; rows the screen cannot decide (a flat distribution, non-finite input) take
the full head. Costs 1 byte per head weight more memory (`model.greedy_head_screen: false` saves it).
"""
from __future__ import annotations

import torch
from torch import nn

from .packed import PairPackedLinear

# Above this many rows the screen costs as much as the bf16 head (measured here, `small`, 2 threads:
# 2.3 vs 3.9 ms at 1 row, 3.1 vs 3.4 at 2, 4.1 vs 3.8 at 3: its int8 widening makes it compute-bound);
# the full head and argmax_rows serve more rows.
SCREEN_MAX_ROWS = 2
# A row with more candidates than this (a near-flat distribution) is cheaper through the full head.
MAX_CANDIDATES = 1024
_CHUNK_ROWS = 8192  # rows quantized at a time: the fp32 copy of a 926M-weight head would be 3.7 GB


class ScreenedHead(nn.Module):
    """The int8 screen of a PairPackedLinear head: w8 [NB, K, 16] (16 outputs' k side by side, as
    the kernel streams them), per-row scale and error bound."""

    def __init__(self, weight: torch.Tensor, head: PairPackedLinear, ops):
        super().__init__()
        n, k = weight.shape
        blocks = head.packed.shape[0]
        w8 = torch.zeros(blocks * 16, k, dtype=torch.int8)
        scale = torch.ones(blocks * 16)
        err = torch.zeros(blocks * 16)
        slack = (2 * k + 16) * 2.0 ** -24  # both fp32 sums' rounding, relative to max |W[n]| sum |x|
        with torch.no_grad():
            for a in range(0, n, _CHUNK_ROWS):
                w = weight[a : a + _CHUNK_ROWS].float()
                amax = w.abs().amax(dim=1)
                s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
                q = torch.round(w / s[:, None]).clamp_(-127, 127)
                w8[a : a + w.shape[0]] = q.to(torch.int8)
                scale[a : a + w.shape[0]] = s
                err[a : a + w.shape[0]] = (w - q * s[:, None]).abs().amax(dim=1) + slack * amax
        self.w8 = nn.Parameter(w8.view(blocks, 16, k).transpose(1, 2).contiguous(), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.err = nn.Parameter(err, requires_grad=False)
        self.ops = ops

    @property
    def weight_bytes(self) -> int:
        return self.w8.numel() + 4 * (self.scale.numel() + self.err.numel())

    def greedy(self, hidden: torch.Tensor, head: PairPackedLinear) -> torch.Tensor:
        """argmax of head(hidden) per row, [R] int64; `head` is the packed head this screens."""
        ids = self.ops.head_screen_argmax(hidden, head.packed, head.out_features, self.w8, self.scale, self.err,
                                          MAX_CANDIDATES)
        undecided = (ids < 0).nonzero().flatten()
        if undecided.numel():
            ids[undecided] = self.ops.argmax_rows(head(hidden[undecided]))
        return ids


def can_screen(head: nn.Module, hidden: torch.Tensor) -> bool:
    return (isinstance(head, PairPackedLinear) and hidden.dim() == 2 and hidden.dtype == torch.bfloat16
            and 0 < hidden.shape[0] <= SCREEN_MAX_ROWS)
