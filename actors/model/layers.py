"""Small building blocks: RMSNorm and the dense SwiGLU MLP (dense layers and shared experts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back, then scales (the reference's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = None  # the CPU kernels' ops (kernels/norm_cpu.cpp): one pass for bf16 rows

    def on_kernel(self, x: torch.Tensor) -> bool:
        """Whether x's rows are normed by the CPU kernels' rms_norm (bf16 rows and weight)."""
        return (self.kernel is not None and x.dtype == torch.bfloat16 and x.dim() == 2 and x.device.type == "cpu"
                and self.weight.dtype == torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_kernel(x):
            return self.kernel.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
