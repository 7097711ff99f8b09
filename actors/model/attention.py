"""Multi-head latent attention (MLA) over the paged latent KV cache.

New tokens' latents and rotated k_pe are written to their slots first; each sequence then attends
over its whole context read back from the cache. Prefill chunks (a sequence with several new
tokens, possibly after a cached prefix) run one sequence at a time with a causal mask; decode
tokens of all sequences run together, padded to the longest context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..forward_batch import ForwardBatch
from ..kv_cache import MLAKVCache
from .config import ModelConfig
from .layers import RMSNorm
from .rope import RotaryEmbedding, softmax_scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        h, qk = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk, bias=False)
        self.q_lora = config.q_lora_rank is not None
        self.kv_a_proj_with_mqa = nn.Linear(h, config.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=False)
        self.scale = softmax_scale(config)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache, rope: RotaryEmbedding,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(t, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q = torch.cat([q_nope, rope.rotate(q_rot, cos, sin)], dim=-1)
        k_rot = rope.rotate(k_rot.unsqueeze(1), cos, sin).squeeze(1)
        kv.write(self.layer, batch.out_slots, latent, k_rot)

        out = x.new_empty(t, self.num_heads, self.v_dim)
        starts = [0]
        for n in batch.extend_lens:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(batch.extend_lens) if n == 1]
        if len(decode) > 1:
            rows = torch.tensor([starts[i] for i in decode], dtype=torch.long)
            out[rows] = self._decode(q[rows], [batch.ctx_slots[i] for i in decode], kv)
            done = set(decode)
        else:
            done = set()
        for i, n in enumerate(batch.extend_lens):
            if i not in done and n > 0:
                out[starts[i] : starts[i] + n] = self._extend(q[starts[i] : starts[i] + n], batch.ctx_slots[i], kv)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    def _expand(self, slots: torch.Tensor, kv: MLAKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Context slots [..., L] → keys [..., L, heads, qk] and values [..., L, heads, v]."""
        latent, k_pe = kv.read(self.layer, slots)
        kvb = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1)
        return k, v

    def _extend(self, q: torch.Tensor, slots: torch.Tensor, kv: MLAKVCache) -> torch.Tensor:
        """One sequence: q [n, heads, qk] for its last n context positions, causal."""
        n, ctx = q.shape[0], slots.numel()
        k, v = self._expand(slots, kv)
        scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * self.scale  # [heads, n, ctx]
        if n > 1:
            qpos = torch.arange(ctx - n, ctx).unsqueeze(1)
            mask = torch.arange(ctx).unsqueeze(0) > qpos
            scores = scores.masked_fill(mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [n, heads, v]

    def _decode(self, q: torch.Tensor, ctx_slots: list[torch.Tensor], kv: MLAKVCache) -> torch.Tensor:
        """Many sequences, one new token each: q [B, heads, qk]; contexts padded to the longest."""
        lens = torch.tensor([s.numel() for s in ctx_slots])
        width = int(lens.max())
        slots = torch.zeros(len(ctx_slots), width, dtype=torch.long)
        for i, s in enumerate(ctx_slots):
            slots[i, : s.numel()] = s
        k, v = self._expand(slots, kv)  # [B, L, heads, *]
        scores = torch.matmul(q.unsqueeze(2), k.permute(0, 2, 3, 1)) * self.scale  # [B, heads, 1, L]
        pad = torch.arange(width).unsqueeze(0) >= lens.unsqueeze(1)  # [B, L]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v.transpose(1, 2)).squeeze(2)  # [B, heads, v]
