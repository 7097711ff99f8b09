"""MLA KV storage: per token and layer, the compressed latent (kv_lora_rank) and the shared,
already-rotated k_pe (qk_rope_head_dim), as DeepSeek stores them — not per-head K/V.

Addressed by slot index; slot 0 is never handed out by the allocator (SGLang's convention), so
padding can point at it harmlessly. Which slots belong to whom is the scheduler's business.
"""
from __future__ import annotations

import torch


class MLAKVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_slots = num_slots
        self.kv_lora_rank = kv_lora_rank
        self.latent = torch.zeros(num_layers, num_slots, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, num_slots, rope_dim, dtype=dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.latent[layer, slots] = latent
        self.k_pe[layer, slots] = k_pe

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent[layer, slots], self.k_pe[layer, slots]

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_pe.nbytes

    @staticmethod
    def bytes_per_token(num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> int:
        return num_layers * (kv_lora_rank + rope_dim) * torch.empty((), dtype=dtype).element_size()
