"""Expert parallelism: the routed-experts step spread over the ranks of a process group.

gate output → sort (token, expert) pairs by destination rank (then expert) → exchange per-expert
counts → all_to_all_single dispatch of hidden states → grouped FFN on the received rows →
all_to_all_single combine → weighted sum in fp32, in token order. One collective for the counts,
one each way for the activations; nothing goes through Ray inside a step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..profiling import NULL_PROFILER
from .experts import ExpertWeights, combine, gather_rows, permute_by_expert

# gloo's all_to_all has no bfloat16/float16 kernels; activations travel as fp32 there
_GLOO_WIRE_DTYPES = (torch.float32, torch.float64)


class ExpertParallelExperts:
    def __init__(self, weights: ExpertWeights, group, ep_size: int, n_experts: int):
        self.weights = weights
        self.group = group
        self.ep_size = ep_size
        self.per_rank = n_experts // ep_size
        self.profiler = NULL_PROFILER
        self.wire_cast = dist.get_backend(group) == "gloo"

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        hidden = x.shape[-1]
        wire = torch.float32 if self.wire_cast and x.dtype not in _GLOO_WIRE_DTYPES else x.dtype
        with self.profiler.span("dispatch"):
            order, _ = permute_by_expert(topk_ids, self.ep_size, bucket_of=lambda e: e // self.per_rank)
            send_x = gather_rows(x, order // k).to(wire)
            per_expert = torch.bincount(topk_ids.flatten(), minlength=self.ep_size * self.per_rank)
            recv_per_expert = torch.empty_like(per_expert)
            dist.all_to_all_single(recv_per_expert, per_expert, group=self.group)
            send_splits = per_expert.view(self.ep_size, self.per_rank).sum(1).tolist()
            recv_matrix = recv_per_expert.view(self.ep_size, self.per_rank)  # [source rank, local expert]
            recv_splits = recv_matrix.sum(1).tolist()
            recv_x = send_x.new_empty(sum(recv_splits), hidden)
            dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=self.group)
        with self.profiler.span("experts"):
            local_expert = torch.repeat_interleave(
                torch.arange(self.per_rank, device=x.device).repeat(self.ep_size), recv_matrix.flatten()
            )
            by_expert = torch.sort(local_expert, stable=True)[1]
            counts = recv_matrix.sum(0).tolist()
            outs = torch.empty_like(recv_x)
            outs[by_expert] = self.weights.grouped_ffn(recv_x[by_expert].to(x.dtype), counts).to(wire)
        with self.profiler.span("combine"):
            back = send_x.new_empty(send_x.shape)
            dist.all_to_all_single(back, outs, send_splits, recv_splits, group=self.group)
            return combine(back.to(x.dtype), order, topk_weights, t, k)
