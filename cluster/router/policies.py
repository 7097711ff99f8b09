"""Routing policies: which engine replica gets a request.

A policy sees the candidates (healthy replicas in rotation) and the request's prompt token ids.
`cache_aware` keeps an approximate radix tree of the prefixes it sent to each replica and sends a
request where its prefix most likely sits in the KV cache, unless the replicas are out of balance
(the rule of SGLang's model gateway: imbalanced when max-min load > balance_abs_threshold AND
max > min * balance_rel_threshold; then the least loaded replica wins). `least_load` uses the
replicas' reported running+waiting; `round_robin` ignores everything.
"""
from __future__ import annotations

import itertools
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)


class Candidate(Protocol):
    """What a policy needs to know about a replica (implemented by replicas.Replica)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def load_score(self) -> int: ...

    @property
    def kv_total_tokens(self) -> int: ...


class PrefixTree(Protocol):
    """The approximate per-replica prefix tree (cluster/engine/approx_tree.ApproxPrefixTree)."""

    max_tokens: int | None

    def insert(self, token_ids: Sequence[int]) -> int: ...

    def match_len(self, token_ids: Sequence[int]) -> int: ...

    @property
    def size(self) -> int: ...


class RoutingPolicy(ABC):
    name: str = ""

    @abstractmethod
    def select(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Candidate:
        """Pick one of `candidates` (non-empty) for a prompt; may update the policy's state."""

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica that left the set."""

    def warm(self) -> None:
        """Load what the first `select` would (run at start, off the event loop)."""

    def stats(self) -> dict[str, float]:
        return {}


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoadPolicy(RoutingPolicy):
    """Fewest running+waiting requests (from GetLoad, raised to the router's own in-flight count);
    ties rotate so an idle set is still spread."""

    name = "least_load"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Candidate:
        low = min(c.load_score for c in candidates)
        tied = sorted((c for c in candidates if c.load_score == low), key=lambda c: c.replica_id)
        return tied[next(self._counter) % len(tied)]


@dataclass
class CacheAwareConfig:
    """Defaults follow SGLang's model gateway (sgl-model-gateway cache_aware)."""

    cache_threshold: float = 0.3  # min matched fraction of the prompt to follow the cache
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # Tokens kept per replica's tree (LRU); None: the replica's reported kv_total_tokens.
    max_tree_tokens: int | None = None


def _default_tree_factory() -> PrefixTree:
    import torch

    from expertmesh.cluster.router.approx_tree import ApproxPrefixTree

    # The tree's torch use is tiny bookkeeping tensors; OpenMP workers spinning after each op
    # would take the event loop's core (measured: +0.3-0.9 ms per request on 2 shared cores).
    torch.set_num_threads(1)
    return ApproxPrefixTree()


class CacheAwarePolicy(RoutingPolicy):
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig | None = None,
                 tree_factory: Callable[[], PrefixTree] = _default_tree_factory) -> None:
        self.config = config or CacheAwareConfig()
        self._tree_factory = tree_factory
        self._trees: dict[str, PrefixTree] = {}
        self._lock = threading.Lock()  # the HTTP and gRPC front ends share the trees
        self.decisions = {"cache": 0, "balance": 0, "emptiest": 0}

    def warm(self) -> None:
        # the first tree imports torch and SGLang's radix cache: ~6-8 s here, which on the event
        # loop stalled the router's first request and every other request behind it
        self._tree_factory()

    def _tree(self, replica_id: str) -> PrefixTree:
        tree = self._trees.get(replica_id)
        if tree is None:
            tree = self._trees[replica_id] = self._tree_factory()
        return tree

    def select(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Candidate:
        cfg = self.config
        with self._lock:
            loads = [c.load_score for c in candidates]
            lo, hi = min(loads), max(loads)
            if len(candidates) > 1 and hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
                chosen = min(candidates, key=lambda c: (c.load_score, c.replica_id))
                self.decisions["balance"] += 1
            else:
                matched = [(self._tree(c.replica_id).match_len(token_ids), c) for c in candidates]
                best_len, best = max(matched, key=lambda m: (m[0], -m[1].load_score))
                if token_ids and best_len / len(token_ids) > cfg.cache_threshold:
                    chosen = best
                    self.decisions["cache"] += 1
                else:  # nobody holds it: the replica with the most room in its cache
                    chosen = min(candidates, key=lambda c: (self._tree(c.replica_id).size,
                                                            c.load_score, c.replica_id))
                    self.decisions["emptiest"] += 1
            tree = self._tree(chosen.replica_id)
            budget = cfg.max_tree_tokens or chosen.kv_total_tokens or None
            if budget != tree.max_tokens:
                tree.max_tokens = budget
            tree.insert(token_ids)
            return chosen

    def remove_replica(self, replica_id: str) -> None:
        with self._lock:
            self._trees.pop(replica_id, None)

    def stats(self) -> dict[str, float]:
        return {f"decisions_{k}": float(v) for k, v in self.decisions.items()}


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": RoundRobinPolicy,
    "least_load": LeastLoadPolicy,
    "cache_aware": CacheAwarePolicy,
}


def make_policy(name: str, cache_aware: CacheAwareConfig | None = None) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy: unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "cache_aware":
        return CacheAwarePolicy(cache_aware)
    return POLICIES[name]()
