"""The router's approximate view of one replica's prefix cache.

A key-only SGLang radix tree (`RadixCache.create_simulated()`, no KV pool) of the token prefixes
the router sent to that replica, bounded by LRU eviction. It only estimates what the replica's
real cache holds: the replica evicts on its own schedule and caches whole pages only.
"""
from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence
from typing import Any

import torch

from expertmesh.cluster.engine.sglang_import import import_radix_cache

_ZERO = torch.zeros(1, dtype=torch.uint8)


class _NoPool:
    """Stands in for SGLang's allocator: the simulated tree has no slots to free."""

    device = "cpu"

    def free(self, free_index: torch.Tensor) -> None:
        return None

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        return None


class ApproxPrefixTree:
    """Token prefixes sent to one replica; `max_tokens` bounds it (LRU) after every insert."""

    def __init__(self, max_tokens: int | None = None, page_size: int = 1) -> None:
        self._sg = import_radix_cache()
        self._tree: Any = self._sg.RadixCache.create_simulated(
            mock_allocator=_NoPool(), page_size=page_size)
        self.max_tokens = max_tokens
        self._lock = threading.Lock()

    def _key(self, token_ids: Sequence[int]) -> Any:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self._sg.RadixKey(array("q", token_ids))

    def insert(self, token_ids: Sequence[int]) -> int:
        """Record a prefix sent to the replica; returns how many of its tokens were already there."""
        key = self._key(token_ids)
        # Values are 1-byte placeholders: the tree needs a value per token, not real slots.
        value = _ZERO.expand(len(key))
        with self._lock:
            prefix_len = int(self._tree.insert(self._sg.InsertParams(key=key, value=value)).prefix_len)
            if self.max_tokens is not None and self._tree.evictable_size() > self.max_tokens:
                self._tree.evict(self._sg.EvictParams(
                    num_tokens=self._tree.evictable_size() - self.max_tokens))
        return prefix_len

    def match_len(self, token_ids: Sequence[int]) -> int:
        """Length of the longest recorded prefix of token_ids (also refreshes that path's LRU time)."""
        key = self._key(token_ids)
        with self._lock:
            return int(self._tree.match_prefix(self._sg.MatchPrefixParams(key=key)).device_prefix_len)

    def evict_to(self, max_tokens: int) -> int:
        """Evict least recently used prefixes until at most max_tokens remain; returns tokens evicted."""
        with self._lock:
            excess = self._tree.evictable_size() - max_tokens
            if excess <= 0:
                return 0
            return int(self._tree.evict(self._sg.EvictParams(num_tokens=excess)).num_tokens_evicted)

    def clear(self) -> None:
        with self._lock:
            self._tree.reset()

    @property
    def size(self) -> int:
        """Tokens held (the tree's node keys, shared prefixes counted once)."""
        with self._lock:
            return int(self._tree.evictable_size())
