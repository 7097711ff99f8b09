"""Prefix cache of one data-parallel rank: SGLang's RadixCache plus its KV slot allocator.

The scheduler keeps this bookkeeping (token ids → KV slot indices); the KV tensors live in the
rank workers, addressed by the int64 slot indices handed out here. All SGLang calls of the engine
go through this module (and approx_tree.py), so SGLang's API churn stays in one place.

Ownership rule (page_size P; P == 1 is the unpaged case):
- Every page is owned by exactly one of: the free list, the tree, one request.
- A request's slots are page-structured: the slot of its token i sits at offset i % P of its page,
  so its slots[:handle.length] are the tree's (locked, never the request's to free) and every page
  touched by slots[handle.length:] is the request's own. `free(slots)` frees whole pages.
- The tree holds whole pages only; a request's partial last page stays with the request.
"""
from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertmesh.cluster.engine.sglang_import import import_radix_cache

logger = logging.getLogger(__name__)

_EMPTY = torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class PrefixHandle:
    """A request's claim on the tree: its first `length` slots are the tree's copies, under `node`.

    While locked, SGLang will not evict that path. Opaque to the scheduler apart from `length`.
    """

    node: Any
    length: int
    tree_lock: Any = None  # SGLang TreeLock while locked

    @property
    def locked(self) -> bool:
        return self.tree_lock is not None


@dataclass
class PrefixMatch:
    slots: torch.Tensor  # int64, len == length; the tree's slots, valid while handle is locked
    length: int  # matched tokens, a multiple of page_size
    handle: PrefixHandle


@dataclass
class CacheResult:
    """What cache_request did. For a running request, slots replace the request's slot list."""

    handle: PrefixHandle | None  # the new locked handle (running request), None when finished
    slots: torch.Tensor  # running request: its full slot list, tree copies first; finished: empty
    deduplicated: int  # tokens already cached by someone else: the request's copies were freed
    inserted: int  # tokens newly added to the tree from this request's slots


def _key_ids(token_ids: Sequence[int] | torch.Tensor) -> array:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    return array("q", token_ids)


def _as_slots(slots: torch.Tensor) -> torch.Tensor:
    if slots.dtype != torch.int64 or slots.device.type != "cpu":
        slots = slots.to(device="cpu", dtype=torch.int64)
    return slots


class PrefixCache:
    """RadixCache + (paged) slot allocator for one rank's KV pool. Thread-safe (one lock)."""

    def __init__(self, num_slots: int, page_size: int = 1, enabled: bool = True,
                 evict_chunk: int | None = None) -> None:
        """evict_chunk: tokens evicted at least when an alloc runs short (default 1/128 of the
        pool). SGLang's evict heapifies every evictable leaf (~2 ms at 2k leaves), so evicting one
        page per decode step would cost that on every step once the pool is full."""
        if page_size < 1 or num_slots < page_size:
            raise ValueError(f"need page_size >= 1 and num_slots >= page_size, got {num_slots=}, {page_size=}")
        sg = import_radix_cache()
        self._sg = sg
        self.page_size = page_size
        self.enabled = enabled
        self._num_pages = num_slots // page_size
        if page_size == 1:
            self._allocator = sg.TokenToKVPoolAllocator(
                size=num_slots, dtype=torch.int64, device="cpu", kvcache=None, need_sort=True)
        else:
            self._allocator = sg.PagedTokenToKVPoolAllocator(
                size=self._num_pages * page_size, page_size=page_size, dtype=torch.int64,
                device="cpu", kvcache=None, need_sort=True)
        self._tree = sg.RadixCache(sg.CacheInitParams(
            disable=not enabled, req_to_token_pool=None,
            token_to_kv_pool_allocator=self._allocator, page_size=page_size,
            eviction_policy="lru"))
        self._lock = threading.RLock()
        self.evict_chunk = max(page_size, self.total_slots // 128) if evict_chunk is None else evict_chunk
        if num_slots % page_size:
            logger.warning("num_slots %d is not a multiple of page_size %d; using %d slots",
                           num_slots, page_size, self.total_slots)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def total_slots(self) -> int:
        """Usable slots (slot/page 0 is reserved, as in SGLang: padded tokens write there)."""
        return self._num_pages * self.page_size

    @property
    def buffer_slots(self) -> int:
        """Rows the ranks' KV buffers need: indices run up to total_slots + page_size - 1."""
        return self.total_slots + self.page_size

    @property
    def available_slots(self) -> int:
        with self._lock:
            return int(self._allocator.available_size())

    @property
    def used_slots(self) -> int:
        """Slots held by requests or the tree (cached prefixes count as used until evicted)."""
        return self.total_slots - self.available_slots

    @property
    def evictable_tokens(self) -> int:
        with self._lock:
            return int(self._tree.evictable_size())

    @property
    def cached_tokens(self) -> int:
        """Tokens in the tree, locked or not."""
        with self._lock:
            return int(self._tree.evictable_size() + self._tree.protected_size())

    # ---- matching and locking ----------------------------------------------------------------
    def match(self, token_ids: Sequence[int] | torch.Tensor) -> PrefixMatch:
        """Longest cached prefix, in whole pages. Pass prompt[:-1]: the last token must be computed.

        Refreshes the LRU time of the path. Lock the handle before any alloc, or the alloc's
        eviction may take the matched prefix.
        """
        key = self._sg.RadixKey(_key_ids(token_ids))
        with self._lock:
            res = self._tree.match_prefix(self._sg.MatchPrefixParams(key=key))
            length = int(res.device_prefix_len)
            node = res.last_device_node
            slots = self._tree.path_device_indices(node)[:length] if length else _EMPTY.clone()
        return PrefixMatch(slots=slots, length=length, handle=PrefixHandle(node=node, length=length))

    def lock(self, handle: PrefixHandle) -> None:
        with self._lock:
            if handle.locked:
                raise RuntimeError("prefix handle is already locked")
            handle.tree_lock = self._tree.lock(handle.node)

    def unlock(self, handle: PrefixHandle) -> None:
        """Release the handle's lock (no-op if it holds none, so abort paths can call it freely)."""
        with self._lock:
            if not handle.locked:
                return
            self._tree.unlock(handle.tree_lock)
            handle.tree_lock = None

    # ---- allocation --------------------------------------------------------------------------
    def alloc(self, n: int) -> torch.Tensor | None:
        """Slots for the first n tokens of a request with no slots yet (see alloc_for)."""
        return self.alloc_for(_EMPTY, n)

    def alloc_for(self, slots_so_far: torch.Tensor, n: int) -> torch.Tensor | None:
        """Slots for the next n tokens of a request whose slots so far are `slots_so_far`.

        With page_size > 1 the request first fills the free tail of its own last page, then gets
        whole new pages (their unused tail is reserved for its later tokens). Evicts LRU unlocked
        prefixes when short; None (nothing changed) only when even eviction cannot make room.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return _EMPTY.clone()
        ps = self.page_size
        have = len(slots_so_far)
        fill = torch.empty(0, dtype=torch.int64)
        if ps > 1 and have % ps:
            last = int(slots_so_far[-1])
            if (last + 1) % ps != have % ps:
                raise ValueError(f"slots are not page-structured: token {have - 1} is in slot {last} "
                                 f"with page_size {ps}")
            k = min(n, ps - have % ps)
            fill = torch.arange(last + 1, last + 1 + k, dtype=torch.int64)
        rest = n - len(fill)
        if rest == 0:
            return fill
        need = -(-rest // ps) * ps
        with self._lock:
            short = need - self._allocator.available_size()
            if short > 0:
                self._tree.evict(self._sg.EvictParams(num_tokens=max(short, self.evict_chunk)))
                if self._allocator.available_size() < need:
                    return None
            new = self._allocator.alloc(need)
        if new is None:  # cannot happen after the size check; keep SGLang's contract visible
            return None
        new = new[:rest]
        return torch.cat((fill, new)) if len(fill) else new

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages these slots touch. Only ever pass slots the caller owns."""
        if len(slots) == 0:
            return
        with self._lock:
            self._allocator.free(_as_slots(slots))

    def release(self, slots: torch.Tensor, handle: PrefixHandle) -> None:
        """Drop a request without caching its KV (errors, KV not computed): free its own slots, unlock."""
        with self._lock:
            self.free(slots[handle.length:])
            self.unlock(handle)

    # ---- caching -----------------------------------------------------------------------------
    def cache_request(self, token_ids: Sequence[int] | torch.Tensor, slots: torch.Tensor,
                      handle: PrefixHandle, finished: bool) -> CacheResult:
        """Insert a request's computed KV into the tree.

        `token_ids` are the tokens whose KV is in `slots[:len(token_ids)]` (prompt + generated,
        without the last sampled token, which has no KV yet); `slots` may be longer (reserved
        slots without KV). Duplicates of prefixes someone else cached meanwhile are freed.
        finished: frees everything the tree did not take (partial last page, extra slots) and
        unlocks; the caller must forget `slots` and `handle`.
        not finished: the tree now owns the page-aligned part; returns the locked new handle and
        the request's new slot list (tree copies + its own tail) to use from now on.
        """
        slots = _as_slots(slots)
        n = len(token_ids)
        if len(slots) < n:
            raise ValueError(f"{len(slots)} slots for {n} tokens")
        if handle.length and not handle.locked:
            raise RuntimeError("cache_request needs the request's handle locked")
        with self._lock:
            if not self.enabled:
                if finished:
                    self.release(slots, handle)
                    return CacheResult(handle=None, slots=_EMPTY.clone(), deduplicated=0, inserted=0)
                return CacheResult(handle=handle, slots=slots, deduplicated=0, inserted=0)

            aligned = n // self.page_size * self.page_size
            key = self._sg.RadixKey(_key_ids(token_ids[:aligned]))
            res = self._tree.insert(self._sg.InsertParams(key=key, value=slots[:aligned]))
            prefix_len = int(res.prefix_len)
            if prefix_len < handle.length:
                raise RuntimeError(f"tree lost a locked prefix ({prefix_len} < {handle.length}): "
                                   "token_ids do not extend the matched prompt?")
            self.free(slots[handle.length:prefix_len])  # our copies of what was cached meanwhile
            dedup, inserted = prefix_len - handle.length, aligned - prefix_len
            if finished:
                self.free(slots[aligned:])
                self.unlock(handle)
                return CacheResult(handle=None, slots=_EMPTY.clone(), deduplicated=dedup,
                                   inserted=inserted)

            node = res.last_device_node
            tree_slots = self._tree.path_device_indices(node)
            if len(tree_slots) != aligned:
                raise RuntimeError(f"SGLang insert ended at {len(tree_slots)} tokens, expected {aligned}")
            new_handle = PrefixHandle(node=node, length=aligned)
            self.lock(new_handle)
            self.unlock(handle)
            return CacheResult(handle=new_handle, slots=torch.cat((tree_slots, slots[aligned:])),
                               deduplicated=dedup, inserted=inserted)

    # ---- eviction ----------------------------------------------------------------------------
    def evict(self, n_tokens: int) -> int:
        """Evict at least n_tokens of LRU unlocked prefixes (whole nodes) if there are that many."""
        with self._lock:
            return int(self._tree.evict(self._sg.EvictParams(num_tokens=n_tokens)).num_tokens_evicted)

    def flush(self) -> int:
        """Drop every unlocked cached prefix (frees its slots); locked paths stay. Returns tokens freed."""
        with self._lock:
            freed = self.evict(self._tree.evictable_size())
        logger.info("prefix cache flushed: %d tokens freed, %d still locked", freed,
                    self.cached_tokens)
        return freed
