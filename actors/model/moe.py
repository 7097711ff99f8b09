"""The MoE layer: gate → routed experts (local or expert-parallel) → + shared experts."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .experts import ExpertWeights, LocalExperts, RoutedExperts
from .gate import NoAuxTCGate
from .layers import DenseMLP
from ..profiling import NULL_PROFILER, StepProfiler


class ExpertLoad:
    """Tokens routed to each expert of one layer, as seen by this rank (cumulative; the engine
    takes differences over its sliding window)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._counts: torch.Tensor | None = None  # on the activations' device: no sync per layer

    def record(self, topk_ids: torch.Tensor) -> None:
        if topk_ids.numel():
            add = torch.bincount(topk_ids.flatten(), minlength=self.num_experts)
            self._counts = add if self._counts is None else self._counts + add

    @property
    def counts(self) -> torch.Tensor:
        if self._counts is None:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return self._counts.cpu()


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, first_expert: int = 0, num_local_experts: int | None = None,
                 slot_experts: list[int] | None = None):
        super().__init__()
        count = config.n_routed_experts if num_local_experts is None else num_local_experts
        if slot_experts is not None:
            count = len(slot_experts)
        self.gate = NoAuxTCGate(config)
        self.experts = ExpertWeights(first_expert, count, config.hidden_size, config.moe_intermediate_size,
                                     slot_experts)
        self.shared_experts = (
            DenseMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.routed: RoutedExperts = LocalExperts(self.experts)
        self.load = ExpertLoad(config.n_routed_experts)
        self.profiler = NULL_PROFILER

    def set_profiler(self, profiler: StepProfiler) -> None:
        self.profiler = profiler
        if hasattr(self.routed, "profiler"):
            self.routed.profiler = profiler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.profiler.span("gate"):
            topk_ids, topk_weights = self.gate(x)
            self.load.record(topk_ids)
        out = self.routed(x, topk_ids, topk_weights).to(x.dtype)
        if self.shared_experts is not None:
            with self.profiler.span("experts"):
                out = out + self.shared_experts(x)
        return out
