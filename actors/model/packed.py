"""oneDNN-prepacked weights for low-precision linears on CPU.

A plain bf16 `F.linear` on CPU hands oneDNN a row-major weight, which it re-lays out on every call:
the 129,280 x 512 lm_head read at ~15 GB/s at batch 1, and each ~30 µs expert matmul paid that
set-up too. Packing once at load (`mkldnn._reorder_linear_weight`, what Inductor's CPU freezing
does) and calling `mkldnn._linear_pointwise` gives bitwise the same bf16 outputs at about twice
the speed for the lm_head and 1.7x for small matmuls here. fp32 stays on `F.linear`: its packed
path rounds differently and fp32 is the mode whose tokens must equal transformers'.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16,)


def can_pack(weight: torch.Tensor) -> bool:
    """True where a packed oneDNN linear exists for this weight (CPU, bf16, oneDNN built in, and a
    CPU whose instructions oneDNN's bf16 packing needs: AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    return (weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and weight.dim() == 2
            and onednn_packs(weight.dtype))


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs (and natively multiplies) `dtype` linears on this CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and _packing_runs(dtype))


def emulated_bf16(t: torch.Tensor) -> bool:
    """Whether a bf16 matmul on `t` would be emulated: a bf16 CPU tensor on a CPU without bf16
    matmul instructions (AVX2-only), where oneDNN's bf16 matmul runs 4-7x slower than its fp32
    one on the same values; callers multiply in fp32 and round once instead."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not native_bf16()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions oneDNN uses (AVX-512 BF16 or AMX). Without
    them a bf16 matmul is emulated: on an AVX2-only EPYC here 2-4x slower than fp32 for the
    small matmuls (a bf16 lm_head at batch 1 is still faster: it is bound by the bytes read).
    Cached: the CPU cannot change."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


@functools.cache
def _packing_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` on this CPU: it refuses bf16 at run time on AVX2-only CPUs
    (many cloud VMs), so ask it once instead of reading CPU flags. Cached: the CPU cannot change."""
    try:
        packed_linear(torch.zeros(1, 16, dtype=dtype), pack_weight(torch.zeros(16, 16, dtype=dtype)))
    except RuntimeError as err:
        # not a warning: the CPU kernels' pair layout serves bf16 linears there (the worker warns
        # where those are off)
        log.info("oneDNN cannot pack %s linears on this CPU (%s): not prepacked", dtype, str(err).splitlines()[0])
        return False
    return True


def pack_weight(weight: torch.Tensor, batch_hint: int = 1) -> torch.Tensor:
    """An opaque oneDNN tensor holding `weight` [out, in] in the layout its matmul reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ packed.T, same result as F.linear with the unpacked weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free nn.Linear whose weight lives only in packed form (no dense copy kept)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free linears only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PairPackedLinear(nn.Module):
    """A bias-free bf16 linear held in the CPU kernels' vdpbf16ps pair layout (kernels.pack_pairs)
    and run by their `linear_packed`: every bf16 linear's where the CPU has AVX512-BF16 (vdpbf16ps),
    AMX (the same layout is the tile unit's B operand) or only AVX2 (oneDNN emulates bf16 there; the
    kernel widens each pair by a shift and a mask). Same values as F.linear up to the fp32 summation
    order (exact bf16 products, rounded once); on an AVX512-BF16 EPYC 3x oneDNN's packed linear at
    1-2 rows for `small`'s projections (no set-up, no horizontal sums), 1.0-1.7x at 32-1032 rows."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        from .kernels import pack_pairs

        if linear.bias is not None or linear.weight.dtype != torch.bfloat16:
            raise ValueError("PairPackedLinear packs bias-free bf16 linears only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ops = ops
        self.packed = nn.Parameter(pack_pairs(linear.weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.ops.linear_packed(x.reshape(-1, self.in_features), self.packed, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, vdpbf16ps pairs"


class PackedSwiGLU(nn.Module):
    """A DenseMLP (dense layer or shared experts) whose three bf16 linears live in the pair layout,
    gate and up as one weight, run by the kernels' `swiglu_packed` in one call: the same roundings as
    DenseMLP's five torch-level calls (~90 of a shared expert's ~100 us at decode sizes, cold)."""

    def __init__(self, mlp: nn.Module, ops):
        super().__init__()
        from .kernels import pack_pairs

        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.hidden, self.intermediate, self.out_features = gate.in_features, gate.out_features, down.out_features
        self.ops = ops
        self.gate_up = nn.Parameter(pack_pairs(torch.cat([gate.weight, up.weight])), requires_grad=False)
        self.down = nn.Parameter(pack_pairs(down.weight), requires_grad=False)

    @property
    def dense_bytes(self) -> int:
        """The three bf16 weights at their dense size (the packed ones pad rows to 32)."""
        return (2 * self.hidden + self.out_features) * self.intermediate * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.ops.swiglu_packed(x.reshape(-1, self.hidden), self.gate_up, self.down, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, intermediate={self.intermediate}, vdpbf16ps pairs"


def pack_swiglus(model: nn.Module, ops) -> int:
    """Replaces every DenseMLP of bias-free bf16 CPU linears (even widths) by a PackedSwiGLU.
    Returns how many."""
    from .layers import DenseMLP

    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is DenseMLP
               and all(type(lin) is nn.Linear and lin.bias is None and lin.weight.dtype == torch.bfloat16
                       and lin.weight.device.type == "cpu" and lin.in_features % 2 == 0
                       for lin in (mod.gate_proj, mod.up_proj, mod.down_proj))]
    return replace_modules(model, targets, lambda mod: PackedSwiGLU(mod, ops))


def pair_pack_linears(model: nn.Module, ops, keep_dense: tuple[str, ...] = ()) -> int:
    """Replaces every bias-free bf16 nn.Linear with an even input width by a PairPackedLinear,
    except modules whose name ends with one of `keep_dense`: wherever the kernels have linear_packed
    (AVX512-BF16, AMX, AVX2). At decode sizes oneDNN's packed matmul pays ~20 us of set-up per call:
    the pair kernel is 2-4x faster at 1-32 rows for the attention and shared-expert linears of
    `small`, 0.85-1.0x at 512 rows on an AMX Xeon, 1.0-1.7x at 32-1032 on an AVX512-BF16 EPYC (2
    threads). Returns how many."""
    n = _replace_linears(model, lambda mod: mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu"
                         and mod.in_features % 2 == 0, lambda mod: PairPackedLinear(mod, ops), keep_dense)
    if n:
        log.info("packed %d linears in vdpbf16ps / AMX pairs", n)
    return n


def _replace_linears(model: nn.Module, wanted, make, keep_dense: tuple[str, ...]) -> int:
    """Replaces each bias-free nn.Linear for which `wanted(mod)` holds by `make(mod)`, except
    modules whose name ends with one of `keep_dense`. Returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.bias is None and wanted(mod) and not name.endswith(keep_dense)]
    return replace_modules(model, targets, make)


def replace_modules(model: nn.Module, targets: list[tuple[str, nn.Module]], make) -> int:
    """Sets each named submodule in `targets` to `make(module)`. Returns how many."""
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return len(targets)


def prepack_linears(model: nn.Module, keep_dense: tuple[str, ...] = ()) -> int:
    """Replaces every packable bias-free nn.Linear in `model` by a PackedLinear, except modules
    whose name ends with one of `keep_dense` (their dense weight is read directly elsewhere).
    Returns how many were packed."""
    n = _replace_linears(model, lambda mod: can_pack(mod.weight), PackedLinear, keep_dense)
    if n:
        log.info("packed %d linears for oneDNN", n)
    return n


def dense_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the packed weight when there is one."""
    return F.linear(x, weight) if packed is None else packed_linear(x, packed)
