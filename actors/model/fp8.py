"""FP8 weights that stay FP8: e4m3 tensors with 128x128 block scales, dequantized inside the matmul.

DeepSeek-V3/R1 ship their linear weights as e4m3 with one fp32 `weight_scale_inv` per 128x128
block. Dequantizing them at load doubles the weight memory (R1 on 32 A100s: 37.0 -> 70.1 GiB per
rank, which loads but leaves no room for KV). Here the e4m3 bytes and their scales stay as the
checkpoint has them, and each matmul dequantizes a slab of whole block-rows (at most `SLAB_ELEMS`
weights) to the compute dtype, multiplies, and drops it: resident memory is 1 byte per weight plus
a scale per 16,384 weights; the dequantized slab is transient.

The dequantized values are the dequantize-at-load path's exactly (the same fp32 product, the same
cast), and a weight that fits one slab goes through the very same matmul call, so the outputs are
bitwise equal to that path's. With the CPU kernels in bf16 the projections become
`PairPackedFp8Linear`s instead: e4m3 bytes in the pair kernel's layout, dequantized inside the
matmul (kernels/fp8.h), bitwise what the pair kernel computes on the dequantize-at-load weight. On
CUDA this is weight-only FP8 with bf16 compute, what an A100 (no FP8 tensor cores) needs; a fused
kernel (Marlin-style) can replace `fp8_linear` behind the same signature. Written by hand because
torch has no blockwise-scaled weight-only FP8 linear on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .packed import replace_modules

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Weights dequantized per slab: 16M weights = 32 MB of bf16 scratch. R1's largest expert matrix
# (2 x 2048 x 7168 = 29M) takes two slabs, its o_proj (7168 x 16384) eight.
SLAB_ELEMS = 1 << 24


def _e4m3_scaled_bits(weight: torch.Tensor) -> torch.Tensor | None:
    """The e4m3 weight as bf16 values 2^-120 times its own, on CPU, where torch converts e4m3 one
    element at a time (~4 ns each here); None elsewhere. The e4m3 sign and magnitude bits moved
    into a bf16's (sign << 15 | exponent << 7 | mantissa << 4) give exactly value x 2^-120,
    subnormals included; sign extension from int8 then one shift and one mask place them (NaN,
    0x7f, excepted: checkpoints hold none, their values are clamped to +-448)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float8_e4m3fn:
        return None
    return ((weight.view(torch.int8).to(torch.int16) << 4) & -30736).view(torch.bfloat16)  # 0x87f0


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 `weight * scale_inv` with each scale broadcast over its block (cropped at the edges).
    On CPU the product is taken from the 2^-120-scaled bf16 bits and a 2^120-scaled scale: the
    same exact product, rounded once to fp32, so the same bits as `weight.float() * scale`."""
    rows, cols = weight.shape
    br, bc = block
    s = scale_inv.float()
    w = _e4m3_scaled_bits(weight)
    if w is not None and bool(s.abs().max() < 2.0 ** 7):  # s * 2^120 stays finite and exact
        s = s * 2.0 ** 120
    else:
        w = weight.float()
    if rows % br == 0 and cols % bc == 0:  # whole blocks: a broadcast, no expanded scale grid
        return (w.view(rows // br, br, cols // bc, bc) * s[:, None, :, None]).view(rows, cols)
    scale = s.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    return w * scale


@dataclass(frozen=True)
class Fp8Tensor:
    """A checkpoint's e4m3 weight and its scale_inv grid, as read (not dequantized)."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale_inv, self.block).to(dtype)


def slab_rows(rows: int, cols: int, block_rows: int) -> int:
    """Rows per slab: whole block-rows, as many as fit SLAB_ELEMS (at least one block-row)."""
    per_block = block_rows * cols
    return min(rows, max(1, SLAB_ELEMS // per_block) * block_rows)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in]).T in `dtype`, dequantizing a slab of rows at a time."""
    rows, cols = weight.shape
    step = slab_rows(rows, cols, block[0])
    if step >= rows:
        return F.linear(x, dequantize_fp8(weight, scale_inv, block).to(dtype))
    out = x.new_empty(*x.shape[:-1], rows)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = dequantize_fp8(weight[r0:r1], scale_inv[r0 // block[0]: math.ceil(r1 / block[0])], block).to(dtype)
        out[..., r0:r1] = F.linear(x, w)
    return out


class Fp8Linear(nn.Module):
    """A bias-free linear whose weight stays e4m3 (`weight`) with its block scales
    (`weight_scale_inv`), the hub's names; `dtype` is the compute dtype."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.dtype = tuple(block), dtype
        grid = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(grid, dtype=torch.float32, device=device), requires_grad=False)

        self.kernel = None  # the CPU kernels' ops, for `dequantized` in one call (pair_pack_fp8_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.dtype)

    def dequantized(self) -> torch.Tensor:
        """The whole weight in the compute dtype (a transient copy)."""
        if self.kernel is not None:
            return self.kernel.dequantize_fp8(self.weight, self.weight_scale_inv, self.block[0], self.block[1], self.dtype)
        return dequantize_fp8(self.weight, self.weight_scale_inv, self.block).to(self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks {self.block}"


def pack_e4m3_pairs(weight: torch.Tensor) -> torch.Tensor:
    """An e4m3 [N, K] weight's bytes in the CPU kernels' pair layout (kernels.pack_pairs)."""
    from .kernels import pack_pairs

    return pack_pairs(weight.view(torch.uint8)).view(torch.float8_e4m3fn)


class PairPackedFp8Linear(nn.Module):
    """An Fp8Linear held in the CPU kernels' pair layout (its e4m3 bytes through kernels.pack_pairs,
    rows padded to 32) beside its block scales, run by their `linear_packed_fp8`: the weights stream
    at 1 byte each and are dequantized inside the matmul (a table per scale block), with the values
    the dequantize-at-load path packs, so the outputs are bitwise a PairPackedLinear's on that
    path's weight. Against the slab path (dequantize, F.linear) 13-35x faster at 1 row here; against
    the bf16 pair kernel 1.15-1.25x at 1 row on R1's shapes (half the bytes), 0.6-0.8x on `small`'s
    cache-resident ones."""

    PACKED = ("packed",)

    def __init__(self, linear: Fp8Linear, ops):
        super().__init__()
        self.in_features, self.out_features, self.block = linear.in_features, linear.out_features, linear.block
        self.ops = ops
        self.packed = nn.Parameter(pack_e4m3_pairs(linear.weight), requires_grad=False)
        self.weight_scale_inv = linear.weight_scale_inv

    @staticmethod
    def fits(linear: nn.Module, ops) -> bool:
        """An Fp8Linear on CPU computing in bf16, whose blocks the kernel's layout can take (block rows
        a multiple of 16, even block columns) at an even input width, where the kernels have it."""
        return (type(linear) is Fp8Linear and linear.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
                and linear.weight.dtype == torch.float8_e4m3fn and linear.in_features % 2 == 0
                and linear.block[0] % 16 == 0 and linear.block[1] % 2 == 0 and ops is not None
                and hasattr(ops, "linear_packed_fp8"))

    @property
    def fp8_bytes(self) -> int:
        """The e4m3 weight at its unpadded size: one byte a weight."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.ops.linear_packed_fp8(x.reshape(-1, self.in_features), self.packed, self.weight_scale_inv,
                                       self.block[0], self.block[1], self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks {self.block}, pairs"


class PairPackedFp8SwiGLU(nn.Module):
    """A DenseMLP (dense layer or shared experts) of three Fp8Linears held as e4m3 pairs, gate and up
    as one weight (their rows and scale rows stacked), run by the kernels' `swiglu_packed_fp8` in one
    call: PackedSwiGLU's roundings on the dequantize-at-load values, bitwise."""

    PACKED = ("gate_up", "down")

    def __init__(self, mlp: nn.Module, ops):
        super().__init__()
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.hidden, self.intermediate, self.out_features = gate.in_features, gate.out_features, down.out_features
        self.block, self.ops = gate.block, ops
        self.gate_up = nn.Parameter(pack_e4m3_pairs(torch.cat([gate.weight, up.weight])), requires_grad=False)
        self.gate_up_scale_inv = nn.Parameter(torch.cat([gate.weight_scale_inv, up.weight_scale_inv]),
                                              requires_grad=False)
        self.down = nn.Parameter(pack_e4m3_pairs(down.weight), requires_grad=False)
        self.down_scale_inv = down.weight_scale_inv

    @staticmethod
    def fits(mlp: nn.Module, ops) -> bool:
        """Three pair-packable Fp8Linears with one block shape, the gate's rows whole block-rows (so
        up's scale rows follow gate's)."""
        lins = (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None))
        return (all(PairPackedFp8Linear.fits(lin, ops) for lin in lins) and hasattr(ops, "swiglu_packed_fp8")
                and len({lin.block for lin in lins}) == 1 and lins[0].out_features % lins[0].block[0] == 0)

    @property
    def fp8_bytes(self) -> int:
        """The three e4m3 weights at their unpadded size: one byte a weight."""
        return (2 * self.hidden + self.out_features) * self.intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.ops.swiglu_packed_fp8(x.reshape(-1, self.hidden), self.gate_up, self.gate_up_scale_inv, self.down,
                                       self.down_scale_inv, self.block[0], self.block[1], self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, intermediate={self.intermediate}, fp8 blocks {self.block}, pairs"


def convert_linears(model: nn.Module, is_fp8, block: tuple[int, int], dtype: torch.dtype) -> int:
    """Replaces each bias-free nn.Linear whose module name `is_fp8` accepts by an (empty) Fp8Linear,
    freeing its dense weight before loading fills the e4m3 one. Returns how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.bias is None and is_fp8(name)]
    return replace_modules(model, targets,
                           lambda mod: Fp8Linear(mod.in_features, mod.out_features, block, dtype, mod.weight.device))


def pair_pack_fp8_linears(model: nn.Module, ops, keep: tuple[str, ...] = ()) -> int:
    """After loading: every DenseMLP of FP8 linears becomes a PairPackedFp8SwiGLU and every other
    Fp8Linear the kernels' FP8 pair linear can take a PairPackedFp8Linear, except modules whose
    name ends with one of `keep` (kv_b_proj: absorbed attention reads its dequantized weight each
    step, through the kernels' `dequantize_fp8`). Returns how many modules were packed."""
    from .layers import DenseMLP

    for name, mod in model.named_modules():  # those kept dequantize through the kernels
        if type(mod) is Fp8Linear and mod.weight.device.type == "cpu" and name.endswith(keep):
            mod.kernel = ops
    mlps = [(name, mod) for name, mod in model.named_modules()
            if type(mod) is DenseMLP and PairPackedFp8SwiGLU.fits(mod, ops)]
    n = replace_modules(model, mlps, lambda mod: PairPackedFp8SwiGLU(mod, ops))  # one call an MLP
    targets = [(name, mod) for name, mod in model.named_modules()
               if PairPackedFp8Linear.fits(mod, ops) and not name.endswith(keep)]
    return n + replace_modules(model, targets, lambda mod: PairPackedFp8Linear(mod, ops))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
