"""Issue 15: expert load balancing with redundant experts on a live EP group (Ray, gloo):
weights move rank to rank between steps and tokens stay equal to transformers'."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from _engine_runs import N, greedy_reqs, run
from _reference import PROMPTS, hf_greedy
from expertmesh.cluster.engine.async_engine import AsyncEngine
from expertmesh.cluster.engine.balancing import EplbConfig
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.executor import PlacementSpec
from expertmesh.cluster.engine.scheduler import SchedulerConfig

torch.set_num_threads(1)


def eplb_engine(ckpt, ep: int, redundant: int, **eplb) -> Engine:
    cfg = EplbConfig(enabled=True, redundant_experts=redundant, **{
        "interval_steps": 3, "window_steps": 12, "min_gain": -1.0, **eplb})
    sched = SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)
    return Engine(EngineConfig(str(ckpt), ep_size=ep, scheduler=sched, eplb=cfg),
                  placement=PlacementSpec(cpus_per_rank=0.25))


@pytest.mark.parametrize("ep,redundant", [(2, 0), (2, 4), (4, 0), (4, 4)])
def test_rebalancing_during_generation_keeps_tokens(ray_cluster, tiny_skewed_ckpt, ep, redundant):
    """A rebalance every 3 steps (each a real move: min_gain -1), over mixed batches and radix hits."""
    engine = eplb_engine(tiny_skewed_ckpt, ep, redundant)
    try:
        ref = hf_greedy(tiny_skewed_ckpt, PROMPTS, N)
        assert run(engine, greedy_reqs(PROMPTS, "a")) == ref
        before = engine.stats.cached_tokens
        mixed = PROMPTS[::2] + [PROMPTS[1] + [7, 8, 9], PROMPTS[3][:30]]
        assert run(engine, greedy_reqs(PROMPTS, "b") + greedy_reqs(mixed[-2:], "m")) == ref + hf_greedy(
            tiny_skewed_ckpt, mixed[-2:], N)
        assert engine.stats.cached_tokens - before > 100
        stats = engine.executor.eplb_stats()
        assert stats["rebalances"] >= 3 and stats["moved_experts"] > 0
        assert stats["redundant_slots"] == 2 * redundant  # two MoE layers
        slots = [d["slot_experts"] for d in engine.executor.describe()]
        for layer in range(2):  # every expert somewhere, (E + R) / ep slots per rank
            assert {e for rank in slots for e in rank[layer]} == set(range(16))
            assert all(len(rank[layer]) == (16 + redundant) // ep for rank in slots)
    finally:
        engine.shutdown()


def test_balancedness_rises_to_09_with_redundant_experts(ray_cluster, tiny_skewed_ckpt):
    """ep 4, R 4, batch 32 decode: the rows each rank computes, mean/max, before and after."""
    engine = eplb_engine(tiny_skewed_ckpt, 4, 4, interval_steps=12, check_every_steps=4, window_steps=8,
                         min_gain=0.01)
    rng = random.Random(0)
    prompts = [[rng.randrange(129000) for _ in range(16)] for _ in range(32)]
    try:
        for r in greedy_reqs(prompts, "z", 32):
            engine.add_request(r)
        history = []
        while engine.has_work():
            engine.step()
            s = engine.executor.eplb_stats()
            if engine.stats.steps % 4 == 0 and s["balancedness"]:
                history.append((s["rebalances"], min(s["balancedness"])))
        before = [b for n, b in history if n == 0]
        after = [b for n, b in history if n >= 1][1:]  # the first window after straddles the switch
        s = engine.executor.eplb_stats()
        # measured here: 0.57-0.62 on the initial layout (0.31 with no redundant slots), 0.89-0.99 after
        assert before and max(before) < 0.7
        assert after and sum(after) / len(after) >= 0.9 and min(after) >= 0.85
        assert min(s["balancedness_after"]) >= 0.95  # the balancer's own view of the same window
    finally:
        engine.shutdown()


def test_rebalance_under_streaming_load_drops_nothing(ray_cluster, tiny_skewed_ckpt):
    """Streams arrive while others decode; rebalances happen mid-stream; every stream completes."""
    engine = eplb_engine(tiny_skewed_ckpt, 2, 4)
    prompts = PROMPTS + [p[:-1] for p in PROMPTS[1:]]
    ref = hf_greedy(tiny_skewed_ckpt, prompts, N)
    aeng = AsyncEngine(engine)

    async def client(i: int, prompt: list[int]):
        await asyncio.sleep(0.03 * i)
        toks, last = [], None
        async for d in aeng.generate(greedy_reqs([prompt], f"s{i}-")[0]):
            toks += d.token_ids
            last = d
        return toks, last.finish_reason, last.error

    async def main():
        return await asyncio.gather(*(client(i, p) for i, p in enumerate(prompts)))

    try:
        results = asyncio.run(main())
        assert [r[1] for r in results] == ["length"] * len(prompts)
        assert all(r[2] is None for r in results)
        assert [r[0] for r in results] == ref
        stats = engine.executor.eplb_stats()
        assert stats["rebalances"] >= 2
        from expertmesh.cluster.telemetry.metrics import EngineMetrics

        EngineMetrics("eplb-test", "tiny").record_eplb(stats)  # the gauges and histograms take these figures
    finally:
        aeng.shutdown()


def test_a_rank_killed_mid_rebalancing_is_rebuilt_with_the_live_layout(ray_cluster, tiny_skewed_ckpt):
    """kill -9 of a rank while layouts keep changing: the replacement loads the live layout, the
    requests resume token-exact, and later rebalances move weights to and from the new rank."""
    import os
    import signal

    import ray

    engine = eplb_engine(tiny_skewed_ckpt, 2, 4)
    try:
        ref = hf_greedy(tiny_skewed_ckpt, PROMPTS, N)
        assert run(engine, greedy_reqs(PROMPTS, "k")) == ref
        before = engine.executor.eplb_stats()["rebalances"]
        pid = ray.get(engine.executor.actors[1].ping.remote())
        got = {r.request_id: [] for r in greedy_reqs(PROMPTS, "r")}
        for r in greedy_reqs(PROMPTS, "r"):
            engine.add_request(r)
        killed = False
        while engine.has_work():
            nxt = engine.executor.balancer.next_update()
            if not killed and nxt is not None and nxt.commit:  # the switch-over step is the tricky one
                os.kill(pid, signal.SIGKILL)
                killed = True
            for d in engine.step():
                assert d.error is None, d.error
                got[d.request_id] += d.token_ids
        assert killed and engine.stats.rebuilds == 1
        assert [got[f"r{i}"] for i in range(len(PROMPTS))] == ref
        assert run(engine, greedy_reqs(PROMPTS, "q")) == ref
        assert engine.executor.eplb_stats()["rebalances"] > before
    finally:
        engine.shutdown()
