"""Moves routed-expert weights between the ranks of an EP group when the expert placement changes.

Runs inside a rank's step, before the forward, on the group's own process group (gloo on CPU,
NCCL on GPU): no checkpoint re-read and no Ray object store. Staged: `stage` builds a layer's new
slots beside the serving ones (an expert this rank already holds is reused as is, packed or not;
the rest arrive in one `all_to_all_single` as raw bytes, exact on gloo and NCCL alike), so steps
keep running on the old layout while layers are staged a few per step; `commit` swaps every
staged layer at once, so the switch-over is one step. Which rank sends which expert is a pure
function of the old and new layouts, so every rank computes the same sends and receives without
talking about it.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .model.experts import ExpertWeights
from .model.moe import MoE
from .model.placement import LayerPlacement
from .step import PlacementUpdate

log = logging.getLogger(__name__)

def source_rank(old: LayerPlacement, expert: int, dest: int) -> int:
    """The rank that gives `dest` its copy of `expert`: itself if it has one, else one of the holders,
    spread by (dest + expert) so one popular expert is not sent by a single rank to everyone."""
    holders = old.holders(expert)
    if dest in holders:
        return dest
    return holders[(dest + expert) % len(holders)]


def transfers(old: LayerPlacement, new: LayerPlacement, src: int, dest: int) -> list[int]:
    """Experts `src` sends `dest` (one per slot of dest's that needs it from src, in slot order)."""
    if src == dest:
        return []
    return [e for e in new.rank_experts(dest) if source_rank(old, e, dest) == src]


class ExpertMover:
    def __init__(self, moes: list[MoE], rank: int, ep_size: int):
        self.moes = moes
        self.rank = rank
        self.ep_size = ep_size
        self.version: int | None = None
        self.staged: dict[int, tuple[LayerPlacement, ExpertWeights]] = {}
        self.sent_bytes = 0

    def apply(self, update: PlacementUpdate) -> None:
        if update.version != self.version:  # a new plan: whatever an abandoned one staged goes
            self.staged.clear()
            self.version = update.version
        if update.commit:  # first: a switch must not hinge on this step's collectives succeeding
            self.commit()
        for layer in sorted(update.stage):
            self.stage(layer, update.stage[layer])

    def stage(self, layer: int, slot_to_expert: list[int]) -> None:
        routed = self.moes[layer].routed
        old: LayerPlacement = routed.placement
        new = LayerPlacement(tuple(slot_to_expert), self.ep_size, old.n_experts)
        weights: ExpertWeights = routed.weights
        mine = new.rank_experts(self.rank)
        sends = [transfers(old, new, self.rank, d) for d in range(self.ep_size)]
        recvs = [transfers(old, new, s, self.rank) for s in range(self.ep_size)]
        anyone_moves = any(transfers(old, new, s, d) for s in range(self.ep_size) for d in range(self.ep_size))
        device = weights.w13.device
        dtype = weights.slot_dtype  # FP8 slots travel as their raw bytes (e4m3 + scales)
        width = weights.slot_nbytes  # bytes: exact on any backend
        old_mine = old.rank_experts(self.rank)
        received: dict[int, list[torch.Tensor]] = {}
        if anyone_moves:  # every rank computes the same answer: all join the collective or none do
            send_list = [weights.dense_slot(old_mine.index(e)).view(torch.uint8)
                         for d in range(self.ep_size) for e in sends[d]]
            send = torch.stack(send_list) if send_list else torch.empty(0, width, dtype=torch.uint8, device=device)
            recv = torch.empty(sum(map(len, recvs)), width, dtype=torch.uint8, device=device)
            dist.all_to_all_single(recv, send, [len(r) for r in recvs], [len(s) for s in sends], group=routed.group)
            self.sent_bytes += send.numel()
            start = 0
            for s in range(self.ep_size):
                received[s] = [row.view(dtype) for row in recv[start:start + len(recvs[s])]]
                start += len(recvs[s])
        parts: list[int | torch.Tensor] = []
        for e in mine:
            src = source_rank(old, e, self.rank)
            parts.append(old_mine.index(e) if src == self.rank else received[src].pop(0))
        staged = ExpertWeights.assemble(weights, mine, parts)
        self.staged[layer] = (new, staged)

    def commit(self) -> None:
        """Switch every staged layer to its new slots (before this step's forward)."""
        for layer, (placement, weights) in self.staged.items():
            moe = self.moes[layer]
            moe.experts = weights
            moe.routed.set_placement(placement, weights)
        log.info("rank %d: switched %d MoE layer(s) to placement v%s", self.rank, len(self.staged), self.version)
        self.staged.clear()
