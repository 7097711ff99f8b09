"""PrefixCache / ApproxPrefixTree over SGLang's RadixCache, driven directly (no Ray, no model)."""
from __future__ import annotations

import importlib
import os
import random
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

from expertmesh.cluster.engine import sglang_import

pytest.importorskip("sglang", reason="sglang is installed by scripts/setup.sh")

from expertmesh.cluster.router.approx_tree import ApproxPrefixTree  # noqa: E402
from expertmesh.cluster.engine.prefix_cache import PrefixCache, PrefixHandle  # noqa: E402


def _seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def _run(cache: PrefixCache, tokens: list[int]) -> None:
    """Admit, 'compute' and finish one request, caching its KV."""
    m = cache.match(tokens[:-1])
    cache.lock(m.handle)
    new = cache.alloc_for(m.slots, len(tokens) - m.length)
    assert new is not None
    cache.cache_request(tokens, torch.cat((m.slots, new)), m.handle, finished=True)


# ---- the import shim ---------------------------------------------------------------------------

def test_import_is_cached_and_leaves_no_torchvision_behind() -> None:
    env = dict(os.environ)
    sg = sglang_import.import_radix_cache()
    assert sglang_import.import_radix_cache() is sg
    assert sg.version == sglang_import.SGLANG_VERSION
    if sg.used_torchvision_standin:
        assert not [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]
        assert not any(isinstance(f, sglang_import._TorchvisionStandInFinder) for f in sys.meta_path)
        from transformers.utils import import_utils
        assert import_utils.is_torchvision_available() is False
    assert dict(os.environ) == env


def test_standin_serves_inert_modules_only_inside(tmp_path, monkeypatch) -> None:
    (tmp_path / "uses_tv.py").write_text(textwrap.dedent("""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF
        import torchvision.transforms as T
        MODE = InterpolationMode.BICUBIC
        class Sub(T.Compose):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    if sglang_import.real_torchvision_usable():
        pytest.skip("a real torchvision is installed")
    with sglang_import.torchvision_standin():
        mod = importlib.import_module("uses_tv")
    with pytest.raises(RuntimeError, match="stand-in"):
        mod.TF.resize(None)
    assert not [n for n in sys.modules if n.startswith("torchvision")]
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("torchvision")
    sys.modules.pop("uses_tv", None)


def test_broken_torchvision_counts_as_absent(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import ops\n")
    (pkg / "ops.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert sglang_import.real_torchvision_usable() is False
    assert not [n for n in sys.modules if n.startswith("torchvision")]
    # transformers sees the broken package and would cache True; the stand-in must flip that
    from transformers.utils import import_utils
    probe = import_utils.is_torchvision_available
    try:
        probe.cache_clear()
        seen = probe()
        with sglang_import.torchvision_standin():
            assert probe() is False
            assert importlib.import_module("torchvision.ops").__name__ == "torchvision.ops"
        assert seen is import_utils.is_vision_available()  # True when PIL is installed
    finally:
        monkeypatch.undo()
        probe.cache_clear()
        import_utils.is_torchvision_v2_available.cache_clear()
        assert probe() is False
    assert not [n for n in sys.modules if n.startswith("torchvision")]


# ---- PrefixCache -------------------------------------------------------------------------------

@pytest.mark.parametrize("ps", [1, 4])
def test_match_after_insert_returns_same_slots(ps: int) -> None:
    cache = PrefixCache(num_slots=64, page_size=ps)
    tokens = _seq(100, 12)
    m = cache.match(tokens)
    assert m.length == 0 and len(m.slots) == 0
    cache.lock(m.handle)
    slots = cache.alloc_for(m.slots, 12)
    assert slots is not None and slots.dtype == torch.int64 and len(set(slots.tolist())) == 12
    assert 0 not in slots.tolist()  # slot 0 is SGLang's padding slot
    res = cache.cache_request(tokens, slots, m.handle, finished=False)
    assert res.inserted == 12 and res.deduplicated == 0 and torch.equal(res.slots, slots)
    assert res.handle is not None and res.handle.locked and res.handle.length == 12
    m2 = cache.match(tokens + [1, 2, 3])
    assert m2.length == 12 and torch.equal(m2.slots, slots)
    assert m2.slots.dtype == torch.int64
    cache.cache_request(tokens, res.slots, res.handle, finished=True)
    assert cache.cached_tokens == 12 and cache.evictable_tokens == 12


def test_partial_pages_rounded_down() -> None:
    cache = PrefixCache(num_slots=64, page_size=4)
    tokens = _seq(0, 10)
    slots = cache.alloc(10)
    assert slots is not None and len(slots) == 10
    assert cache.available_slots == 64 - 12  # 3 pages: the last one's tail is reserved
    # page structure: token i sits at offset i % 4 of its page
    assert [int(s) % 4 for s in slots] == [i % 4 for i in range(10)]
    more = cache.alloc_for(slots, 3)  # fills 2 reserved slots, then a new page
    assert more is not None and int(more[0]) == int(slots[-1]) + 1
    cache.free(more[2:])
    h = PrefixHandle(node=None, length=0)
    cache.cache_request(tokens, slots, h, finished=True)
    assert cache.cached_tokens == 8
    assert cache.available_slots == 64 - 8  # the partial third page came back
    m = cache.match(tokens)
    assert m.length == 8 and torch.equal(m.slots, slots[:8])
    assert cache.match(tokens[:7]).length == 4


def test_running_request_dedups_against_concurrent_insert() -> None:
    cache = PrefixCache(num_slots=64, page_size=4)
    tokens = _seq(0, 9)
    a, b = cache.alloc(9), cache.alloc(9)
    ha, hb = PrefixHandle(None, 0), PrefixHandle(None, 0)
    cache.cache_request(tokens, a, ha, finished=True)  # A caches 8 tokens first
    res = cache.cache_request(tokens + [50, 51, 52], torch.cat((b, cache.alloc_for(b, 3))), hb,
                              finished=False)
    assert res.deduplicated == 8 and res.inserted == 4
    assert torch.equal(res.slots[:8], a[:8])  # B now points at A's copies
    assert res.handle.length == 12 and cache.cached_tokens == 12
    cache.cache_request(tokens + [50, 51, 52], res.slots, res.handle, finished=True)
    cache.flush()
    assert cache.available_slots == cache.total_slots


def test_lock_prevents_eviction_and_eviction_is_lru() -> None:
    cache = PrefixCache(num_slots=64, page_size=1)
    seqs = [_seq(1000 * k, 8) for k in range(4)]
    for s in seqs:
        _run(cache, s)
    cache.match(seqs[0])  # touch: seqs[1] is now the least recently used
    m2 = cache.match(seqs[2])
    cache.lock(m2.handle)
    assert cache.evictable_tokens == 24
    assert cache.evict(8) == 8
    assert cache.match(seqs[1]).length == 0 and cache.match(seqs[0]).length == 8
    assert cache.evict(100) == 16  # 0 and 3 go; the locked 2 stays
    assert cache.match(seqs[2]).length == 8 and cache.cached_tokens == 8
    cache.unlock(m2.handle)
    cache.unlock(m2.handle)  # idempotent for abort paths
    assert cache.evict(100) == 8 and cache.cached_tokens == 0


def test_alloc_evicts_when_short_and_none_only_when_impossible() -> None:
    cache = PrefixCache(num_slots=32, page_size=4)
    _run(cache, _seq(0, 16))
    _run(cache, _seq(100, 16))
    assert cache.available_slots == 0 and cache.evictable_tokens == 32
    keep = cache.match(_seq(100, 16))
    cache.lock(keep.handle)
    got = cache.alloc(10)  # needs 3 pages: evicts the unlocked 16 tokens
    assert got is not None and cache.match(_seq(0, 16)).length == 0
    assert cache.alloc(8) is None  # 1 page free, the rest locked
    assert cache.available_slots == 4  # a failed alloc changes nothing
    cache.free(got)
    cache.unlock(keep.handle)
    assert cache.alloc(32) is not None


def test_disabled_cache_never_matches_but_allocates() -> None:
    cache = PrefixCache(num_slots=16, page_size=1, enabled=False)
    tokens = _seq(0, 8)
    _run(cache, tokens)
    assert cache.match(tokens).length == 0 and cache.cached_tokens == 0
    assert cache.available_slots == 16
    m = cache.match(tokens)
    cache.lock(m.handle)
    s = cache.alloc_for(m.slots, 8)
    res = cache.cache_request(tokens, s, m.handle, finished=False)
    assert torch.equal(res.slots, s) and cache.available_slots == 8
    cache.cache_request(tokens, res.slots, res.handle, finished=True)
    assert cache.available_slots == 16


# ---- randomized: a scheduler's life, checked against a model of the KV contents ------------------

@dataclass
class _Req:
    tokens: list[int]  # tokens whose KV is in slots[:len(tokens)]
    slots: torch.Tensor
    handle: PrefixHandle
    to_generate: int
    chunks: list[int] = field(default_factory=list)


@pytest.mark.parametrize("ps", [1, 4])
def test_randomized_no_leak_no_stale_slot(ps: int) -> None:
    rng = random.Random(1234 + ps)
    cache = PrefixCache(num_slots=512, page_size=ps)
    kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose KV it holds
    stems = [[rng.randrange(1, 50) for _ in range(rng.randrange(3, 30))] for _ in range(6)]
    running: list[_Req] = []

    def write(slots: torch.Tensor, tokens: list[int], start: int) -> None:
        for i, s in enumerate(slots.tolist()):
            kv[s] = tuple(tokens[: start + i + 1])

    def check(slots: torch.Tensor, tokens: list[int]) -> None:
        for i, s in enumerate(slots.tolist()):
            assert kv.get(s) == tuple(tokens[: i + 1]), f"slot {s} holds stale KV"

    def own_slots() -> int:
        pages = 0
        for r in running:
            own = len(r.slots) - r.handle.length
            pages += -(-own // ps)
        return pages * ps

    for step in range(1500):
        op = rng.random()
        if op < 0.35 or not running:  # admit
            prompt = rng.choice(stems)[: rng.randrange(1, 30)] + [rng.randrange(50, 60) for _ in range(rng.randrange(0, 12))]
            if len(prompt) < 2:
                continue
            m = cache.match(prompt[:-1])
            assert m.length % ps == 0 and m.length <= len(prompt) - 1
            check(m.slots, prompt)
            cache.lock(m.handle)
            new = cache.alloc_for(m.slots, len(prompt) - m.length)
            if new is None:
                cache.unlock(m.handle)
                continue
            slots = torch.cat((m.slots, new))
            write(new, prompt, m.length)
            running.append(_Req(prompt, slots, m.handle, rng.randrange(1, 20)))
        elif op < 0.75:  # one decode step for a request
            r = rng.choice(running)
            new = cache.alloc_for(r.slots, 1)
            if new is None:
                continue
            r.tokens = r.tokens + [rng.randrange(60, 64)]
            r.slots = torch.cat((r.slots, new))
            write(new, r.tokens, len(r.tokens) - 1)
            r.to_generate -= 1
            if rng.random() < 0.15:  # long request: cache what it has so far
                res = cache.cache_request(r.tokens, r.slots, r.handle, finished=False)
                r.slots, r.handle = res.slots, res.handle
                check(r.slots, r.tokens)
            if r.to_generate <= 0:
                running.remove(r)
                cache.cache_request(r.tokens, r.slots, r.handle, finished=True)
        elif op < 0.85:  # abort without caching
            r = running.pop(rng.randrange(len(running)))
            cache.release(r.slots, r.handle)
        elif op < 0.95:  # abort, caching what was computed
            r = running.pop(rng.randrange(len(running)))
            cache.cache_request(r.tokens, r.slots, r.handle, finished=True)
        elif op < 0.97:
            cache.flush()
        else:
            cache.evict(rng.randrange(1, 64))
        # conservation: every usable slot is free, in the tree, or some request's own
        assert cache.available_slots + cache.cached_tokens + own_slots() == cache.total_slots, step

    for r in running:
        cache.cache_request(r.tokens, r.slots, r.handle, finished=True)
    assert cache.evictable_tokens == cache.cached_tokens  # nothing left locked
    cache.flush()
    assert cache.cached_tokens == 0
    assert cache.available_slots == cache.total_slots
    everything = cache.alloc(cache.total_slots)
    assert everything is not None and len(set(everything.tolist())) == cache.total_slots


# ---- ApproxPrefixTree --------------------------------------------------------------------------

def test_approx_tree_match_insert_evict() -> None:
    t = ApproxPrefixTree()
    assert t.insert(_seq(0, 10)) == 0
    assert t.insert(_seq(0, 6) + [99, 98]) == 6
    assert t.size == 12
    assert t.match_len(_seq(0, 20)) == 10 and t.match_len([5]) == 0
    assert t.match_len(_seq(0, 6) + [99]) == 7
    t.insert(_seq(500, 10))
    t.match_len(_seq(0, 10))  # refresh: the 500-sequence is now the LRU one
    assert t.evict_to(15) >= 7
    assert t.match_len(_seq(500, 10)) == 0 and t.match_len(_seq(0, 10)) == 10
    assert t.size <= 15


def test_approx_tree_bounded() -> None:
    t = ApproxPrefixTree(max_tokens=50)
    for k in range(20):
        t.insert(_seq(1000 * k, 10))
    assert t.size <= 50
    assert t.match_len(_seq(19000, 10)) == 10 and t.match_len(_seq(0, 10)) == 0
    t.clear()
    assert t.size == 0
