"""Expert parallelism: the routed-experts step spread over the ranks of a process group.

gate output → sort (token, expert) pairs by destination rank (then expert) → exchange per-expert
counts → all_to_all_single dispatch of hidden states → grouped FFN on the received rows →
all_to_all_single combine → weighted sum in fp32, in token order. One collective for the counts,
one each way for the activations; nothing goes through Ray inside a step.

Under a placement with redundant experts (placement.py) each (token, expert) pair is first mapped
to one physical slot: copy (token index + this rank + calls so far) mod copies, so a replicated
expert's tokens spread evenly and deterministically over its copies, small batches included. Every
copy holds the same weights, and the weighted sum still adds a token's experts in ascending logical
order, so outputs do not depend on which copy computed them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..profiling import NULL_PROFILER
from .experts import ExpertWeights, combine, gather_rows, permute_by_expert
from .placement import LayerPlacement

# gloo's all_to_all has no bfloat16/float16 kernels; activations travel as fp32 there
_GLOO_WIRE_DTYPES = (torch.float32, torch.float64)


class ExpertParallelExperts:
    def __init__(self, weights: ExpertWeights, group, ep_size: int, n_experts: int,
                 placement: LayerPlacement | None = None, rank: int | None = None):
        self.weights = weights
        self.group = group
        self.ep_size = ep_size
        self.n_experts = n_experts
        self.rank = dist.get_rank(group) if rank is None else rank
        self.profiler = NULL_PROFILER
        self.wire_cast = dist.get_backend(group) == "gloo"
        self.computed = 0  # (token, expert) rows this rank's slots computed, cumulative
        self.calls = 0
        self.set_placement(placement or LayerPlacement(tuple(range(n_experts)), ep_size, n_experts),
                           weights, device=weights.w13.device)

    def set_placement(self, placement: LayerPlacement, weights: ExpertWeights,
                      device: torch.device | None = None) -> None:
        """Switches to a new slot layout and the weights that match it (between steps)."""
        if weights.slot_experts != placement.rank_experts(self.rank):
            raise ValueError(f"rank {self.rank}: weights hold experts {weights.slot_experts}, the placement "
                             f"says {placement.rank_experts(self.rank)}")
        device = device or weights.w13.device
        self.placement, self.weights = placement, weights
        self.per_rank = placement.per_rank
        self.identity = placement.is_identity
        copies = placement.copies()
        table = torch.full((self.n_experts, max(copies)), -1, dtype=torch.long)
        seen = [0] * self.n_experts
        for slot, e in enumerate(placement.slot_to_expert):
            table[e, seen[e]] = slot
            seen[e] += 1
        self.slot_table = table.to(device)
        self.copies = torch.tensor(copies, dtype=torch.long, device=device)

    def to_slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Physical slot of each (token, expert) pair: copy (token + rank + calls) mod copies, the
        call count rotating the copies so that small batches spread over them too."""
        if self.identity:
            return topk_ids
        t = topk_ids.shape[0]
        self.calls += 1
        token = torch.arange(t, device=topk_ids.device).unsqueeze(1) + (self.rank + self.calls)
        return self.slot_table[topk_ids, token % self.copies[topk_ids]]

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        hidden = x.shape[-1]
        wire = torch.float32 if self.wire_cast and x.dtype not in _GLOO_WIRE_DTYPES else x.dtype
        with self.profiler.span("dispatch"):
            slots = self.to_slots(topk_ids)
            order, _ = permute_by_expert(slots, self.ep_size, bucket_of=lambda e: e // self.per_rank)
            send_x = gather_rows(x, order // k).to(wire)
            per_expert = torch.bincount(slots.flatten(), minlength=self.ep_size * self.per_rank)
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
            self.computed += recv_x.shape[0]
            outs = torch.empty_like(recv_x)
            outs[by_expert] = self.weights.grouped_ffn(recv_x[by_expert].to(x.dtype), counts).to(wire)
        with self.profiler.span("combine"):
            back = send_x.new_empty(send_x.shape)
            dist.all_to_all_single(back, outs, send_splits, recv_splits, group=self.group)
            if self.identity:  # slots sorted by rank are already in ascending expert order
                return combine(back.to(x.dtype), order, topk_weights, t, k, self.weights.kernel)
            logical = torch.sort(topk_ids.flatten(), stable=True)[1]
            row_of = torch.empty_like(order)
            row_of[order] = torch.arange(order.numel(), device=order.device)  # flat pair → row of `back`
            return combine(gather_rows(back, row_of[logical]).to(x.dtype), logical, topk_weights, t, k,
                           self.weights.kernel)
