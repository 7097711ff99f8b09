"""Physical expert slots: which logical expert each slot of an MoE layer holds, and on which rank.

A layer has `E + R` slots (R redundant), `(E + R) / ep_size` per rank, rank r holding slots
[r·P, (r+1)·P). `slot_to_expert[s]` is the logical expert in slot s; every expert has at least one
slot, a replicated one several. With R = 0 the default is the identity (rank r holds experts
[r·E/ep, (r+1)·E/ep)), which is exactly the layout expert parallelism had before slots existed.
"""
from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """A slot layout that cannot serve: a missing expert, or slots that do not split over the ranks."""


def check_slots(n_experts: int, redundant: int, ep_size: int) -> None:
    """The rule for R: E + R slots must split evenly over the ranks (R = 0: E % ep_size == 0)."""
    if redundant < 0:
        raise PlacementError(f"redundant experts must be >= 0, got {redundant}")
    slots = n_experts + redundant
    if slots % ep_size:
        fits = [r for r in range(redundant, redundant + ep_size) if (n_experts + r) % ep_size == 0]
        raise PlacementError(
            f"n_routed_experts ({n_experts}) + redundant experts ({redundant}) = {slots} slots do not split "
            f"over ep_size={ep_size} ranks; use redundant experts = {fits[0]} (or any value with "
            f"(n_routed_experts + R) % ep_size == 0)")


def default_slots(n_experts: int, redundant: int) -> list[int]:
    """Before any load is seen: each expert once in order, then copies of experts 0, 1, ... in the
    redundant slots (the balancer replaces this at its first rebalance)."""
    return list(range(n_experts)) + [i % n_experts for i in range(redundant)]


@dataclass(frozen=True)
class LayerPlacement:
    slot_to_expert: tuple[int, ...]
    ep_size: int
    n_experts: int

    def __post_init__(self) -> None:
        s = len(self.slot_to_expert)
        if s % self.ep_size:
            raise PlacementError(f"{s} slots do not split over {self.ep_size} ranks")
        if any(not 0 <= e < self.n_experts for e in self.slot_to_expert):
            raise PlacementError(f"slot holds an expert outside [0, {self.n_experts})")
        missing = set(range(self.n_experts)) - set(self.slot_to_expert)
        if missing:
            raise PlacementError(f"experts {sorted(missing)[:8]} have no slot")

    @property
    def num_slots(self) -> int:
        return len(self.slot_to_expert)

    @property
    def per_rank(self) -> int:
        return self.num_slots // self.ep_size

    def rank_experts(self, rank: int) -> list[int]:
        """The logical expert of each of `rank`'s slots, in slot order."""
        p = self.per_rank
        return list(self.slot_to_expert[rank * p:(rank + 1) * p])

    def copies(self) -> list[int]:
        out = [0] * self.n_experts
        for e in self.slot_to_expert:
            out[e] += 1
        return out

    @property
    def is_identity(self) -> bool:
        return self.slot_to_expert == tuple(range(self.n_experts))

    def holders(self, expert: int) -> list[int]:
        """Ranks holding a copy of `expert`, ascending."""
        p = self.per_rank
        return sorted({s // p for s, e in enumerate(self.slot_to_expert) if e == expert})


def layer_placements(n_layers: int, n_experts: int, redundant: int, ep_size: int,
                     given: list[list[int]] | None = None) -> list[LayerPlacement]:
    """One LayerPlacement per MoE layer: `given` (a rebalanced layout, e.g. for a replaced rank)
    or the default."""
    check_slots(n_experts, redundant, ep_size)
    if given is not None:
        if len(given) != n_layers:
            raise PlacementError(f"placement has {len(given)} layers, the model {n_layers} MoE layers")
        return [LayerPlacement(tuple(s), ep_size, n_experts) for s in given]
    slots = tuple(default_slots(n_experts, redundant))
    return [LayerPlacement(slots, ep_size, n_experts) for _ in range(n_layers)]
