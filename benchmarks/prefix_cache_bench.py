"""Costs of the scheduler's prefix-cache calls and the router's approximate tree.

Builds a tree of N sequences (shared system prompts + unique tails, like chat traffic), then
times match / alloc / cache_request / lock / evict. Run:
    python benchmarks/prefix_cache_bench.py --sequences 2000 --length 1024
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable

import torch

from expertmesh.cluster.router.approx_tree import ApproxPrefixTree
from expertmesh.cluster.engine.prefix_cache import PrefixCache

logger = logging.getLogger("prefix_cache_bench")


def _us(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def bench(n_seq: int, length: int, page_size: int, reps: int) -> None:
    rng = random.Random(0)
    stems = [[rng.randrange(129_000) for _ in range(length // 4)] for _ in range(16)]
    seqs = [rng.choice(stems) + [rng.randrange(129_000) for _ in range(length - length // 4)]
            for _ in range(n_seq)]
    cache = PrefixCache(num_slots=(n_seq + 64) * length, page_size=page_size)

    t0 = time.perf_counter()
    for s in seqs:
        m = cache.match(s[:-1])
        cache.lock(m.handle)
        new = cache.alloc_for(m.slots, len(s) - m.length)
        cache.cache_request(s, torch.cat((m.slots, new)), m.handle, finished=True)
    build = (time.perf_counter() - t0) / n_seq * 1e6
    logger.info("page %d: %d seqs x %d tokens, %d cached tokens; admit+cache per request %.0f us",
                page_size, n_seq, length, cache.cached_tokens, build)

    probe = seqs[n_seq // 2]
    fresh = [rng.choice(stems) + [rng.randrange(129_000) for _ in range(length - length // 4)]
             for _ in range(reps)]
    it = iter(fresh)

    def insert_new() -> None:
        s = next(it)
        m = cache.match(s[:-1])
        cache.lock(m.handle)
        new = cache.alloc_for(m.slots, len(s) - m.length)
        cache.cache_request(s, torch.cat((m.slots, new)), m.handle, finished=True)

    hit = cache.match(probe)
    slots = cache.alloc(length)
    timings = {
        "match full hit": _us(lambda: cache.match(probe), reps),
        "match miss": _us(lambda: cache.match([7] * length), reps),
        "lock+unlock": _us(lambda: (cache.lock(hit.handle), cache.unlock(hit.handle)), reps),
        f"alloc {length} + free": _us(lambda: cache.free(cache.alloc(length)), reps),
        "alloc_for 1 (decode)": _us(lambda: cache.alloc_for(slots, 1), reps),
        "match+alloc+cache new req": _us(insert_new, reps),
    }
    cache.free(slots)
    timings["evict 1024"] = _us(lambda: cache.evict(1024), 20)
    for name, us in timings.items():
        logger.info("page %d: %-28s %8.1f us", page_size, name, us)

    # Under pressure: a pool a quarter the size of the traffic, so admissions evict.
    small = PrefixCache(num_slots=n_seq * length // 4, page_size=page_size)
    t0 = time.perf_counter()
    for s in seqs:
        m = small.match(s[:-1])
        small.lock(m.handle)
        new = small.alloc_for(m.slots, len(s) - m.length)
        small.cache_request(s, torch.cat((m.slots, new)), m.handle, finished=True)
    grown = [small.alloc(length)]

    def decode() -> None:  # one running request decoding in a full pool: evicts chunk by chunk
        grown[0] = torch.cat((grown[0], small.alloc_for(grown[0], 1)))

    logger.info("page %d: pool of %d slots, full: admit+cache with eviction %.0f us/request, "
                "decode alloc_for 1 when full %.1f us (amortized)", page_size, small.total_slots,
                (time.perf_counter() - t0) / n_seq * 1e6, _us(decode, reps * 5))

    tree = ApproxPrefixTree()
    t0 = time.perf_counter()
    for s in seqs:
        tree.insert(s)
    logger.info("approx tree: insert %.1f us, match_len hit %.1f us, evict_to half %.1f ms",
                (time.perf_counter() - t0) / n_seq * 1e6,
                _us(lambda: tree.match_len(probe), reps),
                _us(lambda: tree.evict_to(tree.size // 2), 1) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    for ps in args.page_sizes:
        bench(args.sequences, args.length, ps, args.reps)


if __name__ == "__main__":
    main()
