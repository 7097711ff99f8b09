"""The MoE layer: gate → routed experts (local or expert-parallel) → + shared experts."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .experts import ExpertWeights, LocalExperts, RoutedExperts
from .gate import NoAuxTCGate
from .layers import DenseMLP, RMSNorm
from .packed import PackedSwiGLU
from ..profiling import NULL_PROFILER, StepProfiler


class ExpertLoad:
    """Tokens routed to each expert of one layer, as seen by this rank (cumulative; the engine
    takes differences over its sliding window). Counted in place on the activations' device with
    index_add_ (bincount would size its output on the host: a sync per layer on CUDA, and no graph
    capture); the fused CPU layer (`moe_layer`) adds into the same tensor."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._counts: torch.Tensor | None = None

    def accumulator(self, device: torch.device) -> torch.Tensor:
        """The int64 [num_experts] tensor the counts are added into."""
        if self._counts is None:
            self._counts = torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        return self._counts

    def record(self, topk_ids: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Counts topk_ids [T, k]; `valid` [T] bool: only those rows (a captured step's padding is not)."""
        if topk_ids.numel():
            ones = (torch.ones_like(topk_ids) if valid is None
                    else valid.to(torch.int64).unsqueeze(1).expand_as(topk_ids))
            self.accumulator(topk_ids.device).index_add_(0, topk_ids.flatten(), ones.flatten())

    @property
    def counts(self) -> torch.Tensor:
        """A CPU copy of the counts so far."""
        if self._counts is None:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return self._counts.to("cpu", copy=True)


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
        self._layer: tuple | None = None  # moe_layer's gate and shared-expert arguments (_layer_args)
        self.profiler = NULL_PROFILER

    def set_profiler(self, profiler: StepProfiler) -> None:
        self.profiler = profiler
        if hasattr(self.routed, "profiler"):
            self.routed.profiler = profiler

    def _layer_args(self, x: torch.Tensor) -> tuple | None:
        """The gate's and shared experts' arguments of moe_layer where this layer can be one call
        (bf16 CPU rows, the gate and the dense experts on the CPU kernels, every routed expert here
        in order, shared experts, if any, pair-packed), else None. The module lookups are taken
        once and kept (~1 us each at one token); the routed weights are read every call (EPLB
        swaps them)."""
        w = self.routed.weights if isinstance(self.routed, LocalExperts) else None
        if (w is None or w.kernel is None or not w.slots_contiguous or w.fp8_block is not None
                or not x.dtype == torch.bfloat16 == w.w13.dtype or x.device.type != "cpu"):
            return None
        if self._layer is None:
            gate, shared = self.gate, self.shared_experts
            if not (gate.kernel is not None and gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
                    and (shared is None or type(shared) is PackedSwiGLU)):
                return None  # (not kept: use_cpu_kernels may make it ready later)
            self._layer = (gate.weight, gate.e_score_correction_bias, gate.n_group, gate.topk_group, gate.top_k,
                           bool(gate.norm_topk_prob), float(gate.scaling),
                           shared.gate_up if shared is not None else None, shared.down if shared is not None else None)
        return self._layer

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """The layer over x's rows; with `norm` (the decoder layer's post-attention RMSNorm) the
        residual block x + moe(norm(x)). One kernel call where the layer takes one (_layer_args)."""
        args = self._layer_args(x)
        if args is not None and (norm is None or norm.on_kernel(x)):
            gate_w, bias, n_group, topk_group, top_k, normalize, scaling, shared_gate_up, shared_down = args
            w = self.routed.weights
            with self.profiler.span("experts"):  # the gate's time included
                return w.kernel.moe_layer(x, gate_w, bias, n_group, topk_group, top_k, normalize, scaling, w.w13, w.w2,
                                          w.first, w.kernel_max_rows, shared_gate_up, shared_down,
                                          self.load.accumulator(x.device), None if norm is None else norm.weight,
                                          1e-6 if norm is None else norm.eps)
        if norm is not None:
            return x + self._op_by_op(norm(x))
        return self._op_by_op(x)

    def decode_static(self, x: torch.Tensor, valid: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + moe(norm(x)) with every shape fixed by x's and no host sync, so a decode step can be
        captured as a graph (actors/decode_graphs.py); `valid` [T] bool: rows that are real (a
        captured batch is padded to its size), the only ones counted in the expert load. Needs
        `experts.static_unsupported()` to be None."""
        h = norm(x)
        topk_ids, topk_weights = self.gate(h)
        self.load.record(topk_ids, valid)
        out = self.experts.routed_static(h, topk_ids, topk_weights).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)
        return x + out

    def _op_by_op(self, x: torch.Tensor) -> torch.Tensor:
        """gate, routed experts (here or expert-parallel), shared experts: op by op."""
        with self.profiler.span("gate"):
            topk_ids, topk_weights = self.gate(x)
            self.load.record(topk_ids)
        out = self.routed(x, topk_ids, topk_weights).to(x.dtype)
        if self.shared_experts is not None:
            with self.profiler.span("experts"):
                out = out + self.shared_experts(x)
        return out
