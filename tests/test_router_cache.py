"""Cache-aware routing vs round-robin on a multi-tenant workload, with two REAL engine replicas.

8 tenants, each with its own long system prompt (~230 tokens); 12 rounds, in each of which every
tenant asks one new question, in a shuffled order. Each replica's KV pool holds about half the
tenants' prefixes: the regime where routing decides the hit rate (if one replica could hold every
tenant, any policy would hit). Hit rate = cached prompt tokens / prompt tokens, as the replicas
themselves report them (usage.cached_tokens per request, and GetLoad's lifetime counters).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from _router_env import LoopThread, real_engine, start_replica, start_router
from expertmesh.cluster.router.client import GenerationClient

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest cloud stone "
         "copper silver garden window bridge tower harbor meadow").split()
TENANTS, ROUNDS, KV_TOKENS = 8, 12, 1152


def tenant_prompts(tag: str, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"[{tag}] You are the assistant of tenant {t}. " + " ".join(rng.choice(WORDS) for _ in range(200))
            for t in range(TENANTS)]


def workload(seed: int = 0) -> list[tuple[int, int]]:
    """(tenant, round) pairs: every tenant once per round, rounds shuffled independently."""
    rng, order = random.Random(seed), []
    for i in range(ROUNDS):
        round_ = [(t, i) for t in range(TENANTS)]
        rng.shuffle(round_)
        order += round_
    return order


def run_workload(address: str, prompts: list[str], order: list[tuple[int, int]]) -> float:
    """Sends the requests one at a time; returns the hit rate from the replicas' usage reports."""
    cached = prompt = 0
    with GenerationClient(address, timeout=60) as client:
        for tenant, i in order:
            messages = [{"role": "system", "content": prompts[tenant]},
                        {"role": "user", "content": f"Question {i}: tell me about {WORDS[(tenant * 7 + i) % len(WORDS)]}."}]
            out = client.chat_complete(messages, max_tokens=2, temperature=0.0)
            cached += out.usage["cached_tokens"]
            prompt += out.usage["prompt_tokens"]
    return cached / prompt


@pytest.fixture(scope="module")
def two_replicas(tiny_ckpt: Path):
    lt = LoopThread()
    engines = [real_engine(tiny_ckpt, kv_tokens=KV_TOKENS, page_size=16) for _ in range(2)]
    servers = [start_replica(lt, e, tiny_ckpt, replica_id=f"r{i}") for i, e in enumerate(engines)]
    yield lt, engines, [f"r{i}={s.address}" for i, s in enumerate(servers)]
    for s in servers:
        lt.run(s.stop(0))
    for e in engines:
        e.shutdown()
    lt.close()


def _lifetime(engines) -> tuple[int, int]:
    loads = [e.load() for e in engines]
    return sum(x.cached_tokens_total for x in loads), sum(x.prompt_tokens_total for x in loads)


def test_cache_aware_hit_rate_at_least_twice_round_robin(two_replicas):
    lt, engines, addresses = two_replicas
    order = workload(seed=0)
    rates, counters = {}, {}
    for policy in ("round_robin", "cache_aware"):
        router = start_router(lt, addresses, policy=policy)
        before = _lifetime(engines)
        # A fresh set of tenants per policy: what the other policy left in the caches is stale
        # and gets evicted first (LRU), so neither starts warm.
        rates[policy] = run_workload(router.grpc_address, tenant_prompts(policy), order)
        after = _lifetime(engines)
        counters[policy] = (after[0] - before[0]) / (after[1] - before[1])
        if policy == "cache_aware":
            stats = router.policy.stats()
        lt.run(router.stop(0))
    # The replicas' lifetime counters agree with the per-request usage they reported.
    for policy in rates:
        assert counters[policy] == pytest.approx(rates[policy], abs=1e-9)
    logging.getLogger(__name__).info("prefix-cache hit rates: %s", rates)
    assert rates["cache_aware"] >= 2 * rates["round_robin"], rates
    # Every tenant after its first request followed its prefix; the first ones spread over both.
    assert stats["decisions_cache"] == TENANTS * (ROUNDS - 1) and stats["decisions_emptiest"] == TENANTS
