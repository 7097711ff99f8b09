"""DeepSeek-V3's noaux_tc router: sigmoid scores, bias for selection only, group-limited top-k."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class NoAuxTCGate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(e, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False)
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        # the CPU kernels' ops (kernels/route_cpu.cpp): matmul, sigmoid and selection in one call,
        # for bf16 activations (its ids' order can move a normalisation sum by one fp32 bit)
        self.kernel = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] → (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        if (self.kernel is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and self.weight.dtype == torch.float32):  # matmul, sigmoid and selection in one call
            return self.kernel.moe_gate(x, self.weight, self.e_score_correction_bias.float(), self.n_group,
                                        self.topk_group, self.top_k, bool(self.norm_topk_prob), float(self.scaling))
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        t, e = choice.shape
        group_scores = choice.view(t, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, self.n_group, e // self.n_group).reshape(t, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.scaling
