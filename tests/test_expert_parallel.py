"""Issue 4: expert parallelism over Ray rank actors (gloo all-to-all), token-exact with transformers."""
from __future__ import annotations

import time

import pytest
import torch

from _engine_runs import N, greedy_reqs, run
from _reference import PROMPTS, hf_greedy
from expertmesh.actors.loader import expert_of
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.executor import GroupFailure, PlacementSpec
from expertmesh.cluster.engine.scheduler import SchedulerConfig

torch.set_num_threads(1)


def ep_engine(ckpt, ep: int, placement: PlacementSpec | None = None, timeout: float = 60.0,
              rebuild_in_place: bool = True) -> Engine:
    sched = SchedulerConfig(kv_tokens_per_rank=1024, page_size=4)
    return Engine(EngineConfig(str(ckpt), ep_size=ep, scheduler=sched, rebuild_in_place=rebuild_in_place),
                  placement=placement or PlacementSpec(cpus_per_rank=0.25), collective_timeout_s=timeout)


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_ep_group_matches_transformers(ray_cluster, tiny_ckpt, ep):
    engine = ep_engine(tiny_ckpt, ep)
    try:
        info = engine.executor.describe()
        total = sum(i["routed_expert_params"] for i in info)
        for i in info:  # each rank holds exactly its 1/ep of the routed experts, and read only those
            assert i["routed_expert_params"] * ep == total
            lo, hi = i["expert_range"]
            read = {expert_of(n)[1] for n in i["read_tensor_names"] if expert_of(n)}
            assert read == set(range(lo, hi))
            assert i["actor_name"].endswith(f"/rank-{i['rank']}")
        # 2 requests over up to 4 ranks: some ranks run empty batches in lockstep
        small = PROMPTS[1:3]
        assert run(engine, greedy_reqs(small, "a")) == hf_greedy(tiny_ckpt, small, N)
        # mixed lengths, then the same prompts again from the radix cache
        assert run(engine, greedy_reqs(PROMPTS, "b")) == hf_greedy(tiny_ckpt, PROMPTS, N)
        before = engine.stats.cached_tokens
        assert run(engine, greedy_reqs(PROMPTS, "c")) == hf_greedy(tiny_ckpt, PROMPTS, N)
        assert engine.stats.cached_tokens - before > 100
        loads = engine.executor.expert_load()
        assert len(loads) == ep and sum(sum(map(sum, l)) for l in loads) > 0
    finally:
        engine.shutdown()


def test_ep_unbalanced_gate(ray_cluster, tiny_skewed_ckpt):
    engine = ep_engine(tiny_skewed_ckpt, 2)
    try:
        assert run(engine, greedy_reqs(PROMPTS, "s")) == hf_greedy(tiny_skewed_ckpt, PROMPTS, N)
        # tokens routed by each rank's requests, per expert: rank 0's experts 0-2 get the lion's share
        counts = torch.tensor(engine.executor.expert_load()).sum(dim=(0, 1))
        assert counts[:3].sum() > 0.6 * counts.sum()
    finally:
        engine.shutdown()


def test_ep_group_spans_two_nodes(ray_cluster, tiny_ckpt):
    placement = PlacementSpec(strategy="STRICT_SPREAD", cpus_per_rank=0.25, custom_resources={"A100": 1})
    engine = ep_engine(tiny_ckpt, 2, placement)
    try:
        nodes = {i["node_id"] for i in engine.executor.describe()}
        assert len(nodes) == 2
        assert run(engine, greedy_reqs(PROMPTS[:4], "n")) == hf_greedy(tiny_ckpt, PROMPTS[:4], N)
    finally:
        engine.shutdown()


def test_failing_rank_fails_the_step_with_its_name(ray_cluster, tiny_ckpt):
    """Without in-place rebuild (tests/test_rebuild.py has it), a failing rank fails the group."""
    engine = ep_engine(tiny_ckpt, 2, timeout=5.0, rebuild_in_place=False)
    try:
        engine.run_to_completion(greedy_reqs(PROMPTS[:2], "w", 2))
        engine.executor.inject_fault(1, "boom")
        for r in greedy_reqs(PROMPTS[:3], "f"):
            engine.add_request(r)
        t0 = time.monotonic()
        outs = engine.step()
        assert time.monotonic() - t0 < 30
        assert outs and all(o.finished and o.finish_reason == "error" for o in outs)
        assert "rank 1 failed" in outs[0].error and "boom" in outs[0].error
        with pytest.raises(GroupFailure, match="rank 1"):
            engine.executor.step([])
    finally:
        engine.shutdown()
