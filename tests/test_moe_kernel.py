"""Issue 14: the hand-written CPU MoE kernel (actors/model/kernels/moe_cpu.cpp) computes what the
per-expert F.linear loop computes, on shapes with vector and tile tails, experts with no rows,
experts past the kernel's row limit (its at::linear branch), under the EP backend, and inside a
served engine whose greedy tokens stay transformers'."""
from __future__ import annotations

import shutil

import pytest
import torch

from _reference import PROMPTS, hf_greedy
from expertmesh.actors.model.experts import ExpertWeights, LocalExperts
from expertmesh.actors.model.kernels import moe_cpu

torch.set_num_threads(2)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine: the kernel cannot be built")


def _weights(count: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    w = ExpertWeights(0, count, hidden, inter)
    with torch.no_grad():
        w.w13.copy_(torch.randn(w.w13.shape, generator=gen) * 0.1)
        w.w2.copy_(torch.randn(w.w2.shape, generator=gen) * 0.1)
    return w.to(dtype)


def _loop(w: ExpertWeights, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    start, rows = 0, []
    for e, n in enumerate(counts):
        rows.append(w._ffn(e, xs[start:start + n]))
        start += n
    return torch.cat(rows)


def test_the_kernel_builds_here():
    """setup.sh builds it; a test session on a machine with a compiler must find it."""
    ops = moe_cpu()
    assert ops is not None
    assert ops.vector_width() in (1, 8, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(64, 32), (40, 24), (72, 50)])
def test_kernel_equals_the_per_expert_loop(dtype, hidden, inter):
    """fp32: equal to rounding (only the order of each dot product's additions differs); bf16:
    within one bf16 step of the output's scale (each intermediate is rounded as F.linear, silu
    and the product round it)."""
    w = _weights(8, hidden, inter, dtype)
    counts = [3, 0, 5, 1, 0, 9, 7, 2]  # 9 > max_rows=8 below: that expert takes at::linear
    xs = (torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(1))).to(dtype)
    want = _loop(w, xs, counts).float()
    for max_rows in (8, 64):
        got = moe_cpu().grouped_ffn(xs, w.w13, w.w2, counts, max_rows)
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
        else:
            assert (got.float() - want).abs().max().item() <= 2 ** -7 * scale
            assert (got.float() - want).abs().mean().item() <= 2 ** -10 * scale
    assert moe_cpu().grouped_ffn(xs[:0], w.w13, w.w2, [0] * 8, 64).shape == (0, hidden)


def test_grouped_ffn_uses_the_kernel_once_enabled():
    w = _weights(8, 64, 32, torch.float32)
    counts = [2, 0, 1, 4, 0, 0, 3, 1]
    xs = torch.randn(sum(counts), 64)
    before = w.grouped_ffn(xs, counts)
    assert w.use_kernel() and w.kernel is not None
    assert not w.prepack()  # the kernel reads the dense stacks: they stay
    torch.testing.assert_close(w.grouped_ffn(xs, counts), before, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_a_clear_error():
    ops = moe_cpu()
    w = _weights(4, 64, 32, torch.float32)
    xs = torch.randn(5, 64)
    with pytest.raises(RuntimeError, match="counts sum to xs.size"):
        ops.grouped_ffn(xs, w.w13, w.w2, [1, 1, 1, 1], 64)
    with pytest.raises(RuntimeError, match="one count per expert"):
        ops.grouped_ffn(xs, w.w13, w.w2, [5], 64)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.grouped_ffn(xs.bfloat16(), w.w13, w.w2, [5, 0, 0, 0], 64)
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.grouped_ffn(xs, w.w13, w.w2, [6, -1, 0, 0], 64)


def test_expert_parallel_backend_with_the_kernel_equals_local(tmp_path):
    """The EP backend's grouped FFN (a 1-rank gloo group) runs the same kernel as the local one."""
    import torch.distributed as dist

    from expertmesh.actors.model.ep import ExpertParallelExperts

    w = _weights(8, 64, 32, torch.bfloat16, seed=3)
    assert w.use_kernel()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 64, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(10)])
    weights = torch.rand(10, 3, generator=gen)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ep = ExpertParallelExperts(w, dist.group.WORLD, 1, 8)
        assert torch.equal(ep(x, ids, weights), LocalExperts(w)(x, ids, weights))
    finally:
        dist.destroy_process_group()


def test_fp32_engine_on_the_kernel_keeps_transformers_greedy_tokens(tiny_ckpt):
    """Batched prefill and decode through the kernel: the greedy tokens stay transformers'."""
    from _engine_runs import greedy_reqs, run
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    engine = Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    try:
        worker = engine.executor.worker
        assert all(m.experts.kernel is not None for m in worker.model.moe_layers())
        prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[6], PROMPTS[7]]
        assert run(engine, greedy_reqs(prompts, "k")) == hf_greedy(tiny_ckpt, prompts, 12)
    finally:
        engine.shutdown()
