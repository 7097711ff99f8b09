"""Routed experts: the one replaceable step of the MoE layer.

`RoutedExperts` turns (hidden states, chosen experts, weights) into the weighted sum of expert
outputs. `LocalExperts` holds every expert it computes in this process; the expert-parallel
backend (ep.py) wraps the same grouped FFN with an all-to-all dispatch and combine.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..profiling import NULL_PROFILER
from .fp8 import dequantize_fp8
from .packed import can_pack, pack_weight, packed_linear


class RoutedExperts(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k] (global expert ids), topk_weights [T, k] fp32 → [T, H] fp32."""
        ...


class ExpertWeights(nn.Module):
    """The stacked weights of this process's expert slots: by default a contiguous range of experts
    [first, first + count); under a placement (placement.py) `slot_experts[i]` is the logical expert
    in local slot i (a redundant copy may repeat one)."""

    def __init__(self, first: int, count: int, hidden: int, intermediate: int,
                 slot_experts: list[int] | None = None):
        super().__init__()
        self.first, self.count = first, count
        self.slot_experts = list(slot_experts) if slot_experts is not None else list(range(first, first + count))
        if len(self.slot_experts) != count:
            raise ValueError(f"{count} slots but {len(self.slot_experts)} slot experts")
        # slot i holds expert first + i (no placement): a global id minus `first` is its slot
        self.slots_contiguous = self.slot_experts == list(range(first, first + count))
        self.hidden, self.intermediate = hidden, intermediate
        # gate rows then up rows, as the reference stacks them
        self.w13 = nn.Parameter(torch.empty(count, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(count, hidden, intermediate), requires_grad=False)
        self.packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # FP8 kept resident (to_fp8): block size and compute dtype; None while weights are dense
        self.fp8_block: tuple[int, int] | None = None
        self.compute_dtype: torch.dtype = self.w13.dtype
        # the CPU MoE kernel's ops (kernels/moe_cpu.cpp) once `use_kernel` found them; None: torch's matmuls
        self.kernel = None
        self.kernel_max_rows = KERNEL_MAX_ROWS  # its max_rows for these weights' dtype on this CPU

    def to_fp8(self, block: tuple[int, int], dtype: torch.dtype | None = None) -> None:
        """Holds the weights as e4m3 plus the hub's per-projection block scales (gate and up keep
        their own grids: stacked, a partial edge block would straddle them); each expert is
        dequantized to the compute dtype (`dtype`, else the dense weights') only while its rows
        are multiplied."""
        count, inter, h = self.count, self.intermediate, self.hidden
        self.compute_dtype = dtype or self.w13.dtype
        device = self.w13.device
        self.fp8_block = tuple(block)

        def grid(rows: int, cols: int) -> torch.Tensor:
            shape = (count, -(-rows // block[0]), -(-cols // block[1]))
            return nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device), requires_grad=False)

        e4m3 = torch.float8_e4m3fn
        self.w13 = nn.Parameter(torch.zeros(count, 2 * inter, h, dtype=e4m3, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(count, h, inter, dtype=e4m3, device=device), requires_grad=False)
        self.w1_scale_inv, self.w3_scale_inv, self.w2_scale_inv = grid(inter, h), grid(inter, h), grid(h, inter)

    def dequantized(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local slot e's (w13, w2) in the compute dtype: the dense weights (unpacked where they
        were prepacked), or a transient dequantization of the FP8 ones (the same values
        dequantize-at-load gives)."""
        if self.packed is not None:
            return self.packed[0][e].to_dense(), self.packed[1][e].to_dense()
        if self.fp8_block is None:
            return self.w13[e], self.w2[e]
        inter, block, dtype = self.intermediate, self.fp8_block, self.compute_dtype
        w13 = torch.cat([dequantize_fp8(self.w13[e, :inter], self.w1_scale_inv[e], block),
                         dequantize_fp8(self.w13[e, inter:], self.w3_scale_inv[e], block)]).to(dtype)
        return w13, dequantize_fp8(self.w2[e], self.w2_scale_inv[e], block).to(dtype)

    @property
    def param_count(self) -> int:
        """Routed-expert weights held, counted from the shapes (packing frees the dense stacks)."""
        return self.count * 3 * self.hidden * self.intermediate

    def use_kernel(self) -> bool:
        """Routes the CPU experts through the hand-written MoE kernel (kernels/moe_cpu.cpp, built on
        first use): 3-5x the grouped GEMMs' speed at decode batches; FP8-resident (e4m3) experts
        through its FP8 form, which dequantizes each block of weight rows just before use (1 byte
        a weight streamed, the dense kernel's outputs bitwise). Call before `prepack` (the kernel
        reads the dense stacks, which packing frees). False where it does not apply (CUDA, packed
        weights, other dtypes, or no compiler here)."""
        if self.w13.device.type != "cpu" or self.packed is not None:
            return False
        fp8 = self.fp8_block is not None
        dtype = self.compute_dtype if fp8 else self.w13.dtype  # what the rows are multiplied in
        if (fp8 and self.w13.dtype != torch.float8_e4m3fn) or dtype not in (torch.float32, torch.bfloat16):
            return False
        from .kernels import cpu_kernels

        self.kernel = cpu_kernels()
        if self.kernel is not None:  # asked once: the CPU cannot change
            self.kernel_max_rows = kernel_max_rows(self.kernel, dtype)
        return self.kernel is not None

    def prepack(self) -> bool:
        """Packs each expert's w13 and w2 for oneDNN (CPU bf16) and frees the dense stacks; the
        FFN then computes bitwise the same outputs, faster. False where packing does not apply,
        or where the MoE kernel (`use_kernel`) computes the experts from the dense stacks."""
        if self.kernel is not None:
            return False
        if self.packed is not None or self.count == 0 or not can_pack(self.w13[0]):
            return self.packed is not None
        self.packed = ([pack_weight(w) for w in self.w13], [pack_weight(w) for w in self.w2])
        self.w13 = nn.Parameter(self.w13.new_empty(0, 2 * self.intermediate, self.hidden), requires_grad=False)
        self.w2 = nn.Parameter(self.w2.new_empty(0, self.hidden, self.intermediate), requires_grad=False)
        return True

    @property
    def row_width(self) -> int:
        """Elements of one slot's weights flattened (w13 then w2): the unit a weight move sends."""
        return 3 * self.hidden * self.intermediate

    def _fp8_scales(self) -> list[torch.Tensor]:
        return [self.w1_scale_inv, self.w3_scale_inv, self.w2_scale_inv]

    @property
    def slot_dtype(self) -> torch.dtype:
        """dtype of a `dense_slot` row: the weights' own, or raw bytes for FP8 (e4m3 + scales)."""
        return torch.uint8 if self.fp8_block is not None else self.w13.dtype

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one `dense_slot` row: what a weight move sends per slot."""
        if self.fp8_block is not None:
            return self.row_width + sum(s[0].numel() * 4 for s in self._fp8_scales())
        return self.row_width * torch.empty((), dtype=self.w13.dtype).element_size()

    def dense_slot(self, i: int) -> torch.Tensor:
        """Local slot i's weights as one flat dense row (unpacked where they were prepacked:
        oneDNN's reorder is a permutation, so to_dense gives back the very same values); under
        FP8 the raw bytes of its e4m3 weights and then its fp32 scales."""
        if self.fp8_block is not None:
            parts = [self.w13[i].reshape(-1).view(torch.uint8), self.w2[i].reshape(-1).view(torch.uint8)]
            parts += [s[i].reshape(-1).view(torch.uint8) for s in self._fp8_scales()]
            return torch.cat(parts)
        w13, w2 = self.dequantized(i)
        return torch.cat([w13.reshape(-1), w2.reshape(-1)])

    @classmethod
    def assemble(cls, old: "ExpertWeights", slot_experts: list[int],
                 parts: list[int | torch.Tensor]) -> "ExpertWeights":
        """New slots from `old`'s: parts[j] is an index into old's slots (kept as is, packed or not:
        no copy) or a flat dense row (`dense_slot`'s layout, from another rank), packed here the
        way old's are."""
        h, inter = old.hidden, old.intermediate
        new = cls(0, len(slot_experts), h, inter, slot_experts)
        split = 2 * inter * h
        dtype, device = old.w13.dtype, old.w13.device
        if old.fp8_block is not None:
            return cls._assemble_fp8(old, new, parts)

        def dense(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            row = row.to(device=device, dtype=dtype)
            return row[:split].reshape(2 * inter, h).contiguous(), row[split:].reshape(h, inter).contiguous()

        with torch.no_grad():
            if old.packed is not None:
                w13s, w2s = [], []
                for part in parts:
                    if isinstance(part, int):
                        w13s.append(old.packed[0][part])
                        w2s.append(old.packed[1][part])
                    else:
                        a, b = dense(part)
                        w13s.append(pack_weight(a))
                        w2s.append(pack_weight(b))
                new.packed = (w13s, w2s)
                new.w13 = nn.Parameter(old.w13.new_empty(0, 2 * inter, h), requires_grad=False)
                new.w2 = nn.Parameter(old.w2.new_empty(0, h, inter), requires_grad=False)
                return new
            pairs = [(old.w13[part], old.w2[part]) if isinstance(part, int) else dense(part) for part in parts]
            new.w13 = nn.Parameter(torch.stack([a for a, _ in pairs]) if pairs else old.w13.new_empty(0, 2 * inter, h),
                                   requires_grad=False)
            new.w2 = nn.Parameter(torch.stack([b for _, b in pairs]) if pairs else old.w2.new_empty(0, h, inter),
                                  requires_grad=False)
        new.kernel, new.kernel_max_rows = old.kernel, old.kernel_max_rows
        return new

    @staticmethod
    def _assemble_fp8(old: "ExpertWeights", new: "ExpertWeights", parts: list[int | torch.Tensor]) -> "ExpertWeights":
        new.kernel, new.kernel_max_rows = old.kernel, old.kernel_max_rows
        with torch.no_grad():
            new.to_fp8(old.fp8_block, old.compute_dtype)
            targets = [new.w13, new.w2, *new._fp8_scales()]
            sources = [old.w13, old.w2, *old._fp8_scales()]
            for j, part in enumerate(parts):
                if isinstance(part, int):
                    for dst, src in zip(targets, sources):
                        dst[j].copy_(src[part])
                    continue
                row, start = part.to(old.w13.device), 0
                for dst in targets:
                    n = dst[j].numel() * dst.element_size()
                    dst[j].view(torch.uint8).copy_(row[start:start + n].view(dst[j].view(torch.uint8).shape))
                    start += n
        return new

    def _ffn(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            gate, up = packed_linear(rows, self.packed[0][e]).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self.packed[1][e])
        w13, w2 = self.dequantized(e)
        gate, up = F.linear(rows, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.count

    def grouped_ffn(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs: rows sorted by local expert, counts[e] rows for local expert e → FFN outputs, same order.

        The MoE kernel (`use_kernel`) takes dense CPU weights where it was built: each expert's
        rows read once for all its tokens, fp32 accumulation (the same values as the loop up to
        the order of a dot product's additions). Without it, dense CPU weights go through two
        grouped GEMMs (`torch._grouped_mm`, one matmul per expert inside one call): bitwise the
        per-expert loop's outputs in fp32 and bf16, 0.8-0.9x its time at 32-512 tokens (AVX2
        EPYC, 2 threads, `small`'s 64 experts). oneDNN-packed and FP8-resident weights keep the
        loop: packing has no grouped form and FP8 dequantizes one expert at a time."""
        if self.kernel is not None and self.fp8_block is not None and xs.dtype == self.compute_dtype:
            return self.kernel.grouped_ffn_fp8(xs, self.w13, self.w2, self.w1_scale_inv, self.w3_scale_inv,
                                               self.w2_scale_inv, self.fp8_block[0], self.fp8_block[1], counts,
                                               self.kernel_max_rows)
        if self.kernel is not None and xs.dtype == self.w13.dtype:
            return self.kernel.grouped_ffn(xs, self.w13, self.w2, counts, self.kernel_max_rows)
        if self.packed is None and self.fp8_block is None and _grouped_mm_runs(xs, self.w13):
            offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w2.transpose(1, 2), offs=offsets)
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            out[start : start + n] = self._ffn(e, xs[start : start + n])
            start += n
        return out


    def static_unsupported(self) -> str | None:
        """Why `routed_static` cannot compute these experts (None: it can): it needs the dense
        stacks of every expert in order, and a grouped GEMM that takes its group offsets on the
        device (torch._grouped_mm: on CUDA its CUTLASS path, bf16 on sm90 and sm100; other GPUs fall
        back to a loop that reads the offsets on the host, which a graph cannot capture)."""
        if self.packed is not None or self.fp8_block is not None:
            return "oneDNN-packed or FP8-resident experts (one expert at a time)"
        if not self.slots_contiguous or self.count == 0:
            return "experts placed in slots out of order (expert parallelism)"
        if not hasattr(torch, "_grouped_mm"):
            return "this torch has no _grouped_mm"
        if self.w13.device.type != "cpu":  # CUDA's _grouped_mm (whose checks its meta function repeats)
            if self.w13.dtype != torch.bfloat16:
                return f"_grouped_mm on CUDA takes bf16, not {self.w13.dtype}"
            inter, hidden = self.w2.shape[2], self.w2.shape[1]
            if inter % 8 or hidden % 8:
                return (f"expert sizes {hidden} x {inter}: _grouped_mm on CUDA wants rows in multiples of "
                        f"16 bytes (8 bf16)")
        if self.w13.device.type == "cuda":
            major = torch.cuda.get_device_capability(self.w13.device)[0]
            if major not in (9, 10):
                return f"sm{major}x: _grouped_mm reads its offsets on the host there"
        return None

    def routed_static(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """LocalExperts' sum with every shape fixed by x's and no host sync (capturable; see
        static_unsupported): the pairs sorted by expert, each expert's row count scattered on the
        device, two grouped GEMMs over the group offsets, the weighted combine. [T, H] fp32."""
        t, k = topk_ids.shape
        local = (topk_ids - self.first).flatten()
        order = torch.sort(local, stable=True)[1]
        counts = torch.zeros(self.count, dtype=torch.int64, device=x.device)
        counts.index_add_(0, local, torch.ones_like(local))
        offsets = counts.cumsum(0).to(torch.int32)
        xs = gather_rows(x, order // k)
        gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        ys = torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w2.transpose(1, 2), offs=offsets)
        return combine(ys, order, topk_weights, t, k, self.kernel)


# Experts with more rows than this (a long prefill) go through at::linear inside the kernel, where
# oneDNN's blocking beats streaming each weight row per 4 tokens (bf16, `small`, 2 threads: the
# kernel is 1.6x the grouped GEMMs at ~19 rows per expert, 0.8x at ~63).
KERNEL_MAX_ROWS = 32
# Where the CPU has AMX (kernels/amx.h), experts with more bf16 rows than this take the tile unit
# instead: measured on an AMX Xeon (`small`, 2 threads, weights cold in DRAM as in a real step), a
# MoE layer is 1.35x the vector kernel at 32 tokens, 1.75x at 64 (3.4x at 128 and 1.4x oneDNN at
# 4096, warm); an expert with a single row is faster on the vector kernel (0.10 vs 0.16 ms at 1 token).
AMX_KERNEL_MAX_ROWS = 1
# Where the CPU has AVX512-BF16 without AMX, bf16 experts with more rows than this take the pair
# GEMMs (tokens packed, weights broadcast): an AVX512-BF16 EPYC, `small`, 2 threads, cold weights,
# 24 rows an expert 7.6 ms a MoE layer vs 10.8 on the vector kernel, alike at 3-12 rows.
PAIRS_KERNEL_MAX_ROWS = 16


def kernel_max_rows(kernel, dtype: torch.dtype) -> int:
    """The `max_rows` to pass the MoE kernel for rows of `dtype` on this CPU."""
    if dtype == torch.bfloat16 and kernel.has_amx():
        return AMX_KERNEL_MAX_ROWS
    if dtype == torch.bfloat16 and kernel.has_pair_experts():
        return PAIRS_KERNEL_MAX_ROWS
    return KERNEL_MAX_ROWS


def _grouped_mm_runs(xs: torch.Tensor, w13: torch.Tensor) -> bool:
    """CPU only: on CUDA `_grouped_mm` wants bf16 on sm90+ with aligned strides (the GPU path keeps
    the loop until a fused MoE kernel replaces it)."""
    return (xs.device.type == "cpu" and hasattr(torch, "_grouped_mm") and xs.dtype == w13.dtype
            and w13.shape[0] > 0)


def permute_by_expert(topk_ids: torch.Tensor, num_buckets: int, bucket_of=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the flattened (token, k) pairs by expert (or by `bucket_of(expert)`), and the
    bucket sizes. Stability keeps each token's experts in ascending order, as the reference sums."""
    flat = topk_ids.flatten()
    keys = flat if bucket_of is None else bucket_of(flat)
    order = torch.sort(flat, stable=True)[1]
    if bucket_of is not None:
        order = order[torch.sort(keys[order], stable=True)[1]]
    counts = torch.bincount(keys, minlength=num_buckets)
    return order, counts


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for a 2-D x, as a plain row copy (F.embedding; advanced indexing is several times
    slower on CPU for thousands of rows)."""
    return F.embedding(rows, x)


def combine(outputs: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int, k: int,
            kernel=None) -> torch.Tensor:
    """Weighted sum in fp32 of expert outputs (rows in `order`) back into token order. With the
    CPU kernels' ops (`kernel`) the same sum, bit for bit, without the [T * k, H] temporaries."""
    if kernel is not None and outputs.device.type == "cpu" and outputs.dtype in (torch.float32, torch.bfloat16):
        return kernel.combine(outputs, order, topk_weights.float().reshape(num_tokens, k))
    weighted = outputs.float() * topk_weights.flatten()[order, None]
    out = torch.zeros(num_tokens, outputs.shape[-1], dtype=torch.float32, device=outputs.device)
    return out.index_add_(0, order // k, weighted)


class LocalExperts:
    """All experts in this process: permute → grouped FFN → weighted combine."""

    def __init__(self, weights: ExpertWeights):
        self.weights = weights
        self.profiler = NULL_PROFILER

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        w = self.weights
        with self.profiler.span("experts"):
            if w.kernel is not None and w.slots_contiguous and w.fp8_block is not None and x.dtype == w.compute_dtype:
                return w.kernel.moe_experts_fp8(x, topk_ids, topk_weights.float(), w.w13, w.w2, w.w1_scale_inv,
                                                w.w3_scale_inv, w.w2_scale_inv, w.fp8_block[0], w.fp8_block[1],
                                                w.first, w.kernel_max_rows)
            if w.kernel is not None and w.slots_contiguous and x.dtype == w.w13.dtype:
                # the whole step in one kernel call: permute, gather, grouped FFN, combine
                return w.kernel.moe_experts(x, topk_ids, topk_weights.float(), w.w13, w.w2, w.first, w.kernel_max_rows)
            local = topk_ids - self.weights.first
            order, counts = permute_by_expert(local, self.weights.count)
            outs = self.weights.grouped_ffn(gather_rows(x, order // k), counts.tolist())
            return combine(outs, order, topk_weights, t, k, self.weights.kernel)
