"""The expert-parallel load balancer (EPLB): decides which logical expert each physical slot holds.

DeepSeek's published approach, written afresh here as pure functions of the observed load:
1. (group spans nodes) pack the gate's expert groups onto nodes, equal group counts per node, by
   load: group-limited routing then keeps a token's experts on few nodes;
2. give the redundant slots, one at a time, to the expert whose load per copy is highest;
3. pack the copies onto ranks, the same number of slots per rank, heaviest first onto the
   lightest rank that still has room.
With one node (or groups that do not split over the nodes) steps 2 and 3 run over the whole
group. A final step, not in DeepSeek's, renumbers ranks within a node to keep as many experts
where they already are as a greedy matching finds, so a rebalance moves fewer weights.

A rank's load is the sum over its slots of (expert load / copies): tokens of a replicated expert
split evenly over its copies, as the dispatch does. Balancedness = mean / max rank load (1.0 is
perfect; what vLLM and SGLang log).
"""
from __future__ import annotations

from collections.abc import Sequence


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[int]:
    """Pack of each item: every pack gets len(weights) / num_packs items; items go heaviest first
    to the lightest pack that still has room (ties: lower index)."""
    n = len(weights)
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    room = n // num_packs
    pack_of = [0] * n
    loads = [0.0] * num_packs
    sizes = [0] * num_packs
    for i in sorted(range(n), key=lambda i: (-weights[i], i)):
        p = min((q for q in range(num_packs) if sizes[q] < room), key=lambda q: (loads[q], q))
        pack_of[i] = p
        loads[p] += weights[i]
        sizes[p] += 1
    return pack_of


def replicate(load: Sequence[float], num_slots: int) -> tuple[list[int], list[int]]:
    """(expert of each copy, copies per expert): one copy each, then each extra slot to the expert
    with the highest load per copy (ties: lower id)."""
    n = len(load)
    if num_slots < n:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts")
    copies = [1] * n
    slot_expert = list(range(n))
    for _ in range(num_slots - n):
        e = max(range(n), key=lambda x: (load[x] / copies[x], -x))
        slot_expert.append(e)
        copies[e] += 1
    return slot_expert, copies


def _place_flat(load: Sequence[float], num_slots: int, num_ranks: int) -> list[list[int]]:
    """Replicate then pack: each rank's experts (sorted), for one node's experts."""
    slot_expert, copies = replicate(load, num_slots)
    pack = balanced_packing([load[e] / copies[e] for e in slot_expert], num_ranks)
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    for copy, p in enumerate(pack):
        ranks[p].append(slot_expert[copy])
    return [sorted(r) for r in ranks]


def place_layer(load: Sequence[float], num_slots: int, num_ranks: int, num_nodes: int = 1,
                num_groups: int = 1) -> list[list[int]]:
    """Each rank's logical experts (one per slot) for one MoE layer. Hierarchical when the group
    spans `num_nodes` nodes (ranks node-major: node n holds ranks [n·R/N, (n+1)·R/N)) and the
    gate's `num_groups` expert groups split evenly over them; else over all ranks at once."""
    n = len(load)
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not split over {num_ranks} ranks")
    hierarchical = (num_nodes > 1 and num_ranks % num_nodes == 0 and num_groups % num_nodes == 0
                    and n % num_groups == 0 and num_slots % num_nodes == 0)
    if not hierarchical:
        return _place_flat(load, num_slots, num_ranks)
    size = n // num_groups
    group_load = [sum(load[g * size:(g + 1) * size]) for g in range(num_groups)]
    node_of_group = balanced_packing(group_load, num_nodes)
    out: list[list[int]] = []
    for node in range(num_nodes):
        experts = [e for g in range(num_groups) if node_of_group[g] == node for e in range(g * size, (g + 1) * size)]
        local = _place_flat([load[e] for e in experts], num_slots // num_nodes, num_ranks // num_nodes)
        out += [sorted(experts[i] for i in r) for r in local]
    return out


def keep_in_place(new: list[list[int]], old: list[list[int]], num_nodes: int = 1) -> list[list[int]]:
    """`new` with its ranks renumbered within each node so that ranks keep the experts they hold:
    greedily pair (new pack, old rank) by the most experts in common."""
    num_ranks = len(new)
    per_node = num_ranks // max(1, num_nodes)
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for base in range(0, num_ranks, per_node):
        ids = range(base, base + per_node)
        pairs = sorted(((-len(set(new[p]) & set(old[r])), p, r) for p in ids for r in ids))
        used_p: set[int] = set()
        used_r: set[int] = set()
        for _, p, r in pairs:
            if p in used_p or r in used_r:
                continue
            used_p.add(p)
            used_r.add(r)
            out[r] = new[p]
    return out


def rank_loads(load: Sequence[float], rank_experts: list[list[int]]) -> list[float]:
    copies: dict[int, int] = {}
    for experts in rank_experts:
        for e in experts:
            copies[e] = copies.get(e, 0) + 1
    return [sum(load[e] / copies[e] for e in experts) for experts in rank_experts]


def balancedness_of(rank_load: Sequence[float]) -> float:
    """mean / max over ranks; 1.0 when there is no load at all."""
    top = max(rank_load, default=0.0)
    return sum(rank_load) / len(rank_load) / top if top > 0 else 1.0


def balancedness(load: Sequence[float], rank_experts: list[list[int]]) -> float:
    return balancedness_of(rank_loads(load, rank_experts))


def split_ranks(slot_to_expert: Sequence[int], num_ranks: int) -> list[list[int]]:
    per = len(slot_to_expert) // num_ranks
    return [list(slot_to_expert[r * per:(r + 1) * per]) for r in range(num_ranks)]


def rebalance(loads: Sequence[Sequence[float]], current: Sequence[Sequence[int]], num_ranks: int,
              num_nodes: int = 1, num_groups: int = 1) -> list[list[int]]:
    """New slot_to_expert for every MoE layer from its per-expert load and current layout (a layer
    with no load keeps its layout)."""
    out = []
    for load, slots in zip(loads, current):
        if not any(load):
            out.append(list(slots))
            continue
        new = place_layer(load, len(slots), num_ranks, num_nodes, num_groups)
        new = keep_in_place(new, split_ranks(slots, num_ranks), num_nodes)
        out.append([e for r in new for e in r])
    return out
