"""Rotary position embedding for the rope dims of MLA, with DeepSeek's YaRN scaling.

The frequencies follow transformers' `_compute_yarn_parameters` so positions rotate exactly as the
reference does; `attention_factor` scales cos/sin, and the softmax scale's mscale² lives in
attention.py (`softmax_scale`).
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


def softmax_scale(config: ModelConfig) -> float:
    scale = config.qk_head_dim ** (-0.5)
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Rotates the rope part of q and the shared k_pe. With `interleave` (DeepSeek's layout), pairs
    (2i, 2i+1) rotate together and come out de-interleaved, as the reference writes them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(config.rope, config.qk_rope_head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave
        self.kernel = None  # the CPU kernels' ops (rope_rows), set by use_cpu_kernels

    def reset_frequencies(self) -> None:
        """Recomputes the frequencies in fp32 (after a model-wide .to(bfloat16) rounded them)."""
        inv_freq, _ = inv_freq_and_attention_factor(self.config.rope, self.config.qk_rope_head_dim)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos, sin

    def rotate_tail(self, x: torch.Tensor, offset: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, offset + rope_dim] with its last rope_dim dims rotated (the query's nope
        part, or nothing for k_pe, kept): one CPU kernel call where there is one, bitwise the same."""
        if (self.kernel is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and cos.dtype == x.dtype):
            return self.kernel.rope_rows(x, cos, sin, offset, self.interleave)
        if offset == 0:
            return self.rotate(x, cos, sin)
        return torch.cat([x[..., :offset], self.rotate(x[..., offset:], cos, sin)], dim=-1)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, rope_dim]; cos/sin: [T, rope_dim // 2]."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
