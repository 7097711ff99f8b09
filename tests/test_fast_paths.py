"""Issue 14: the data plane's fast paths compute what the plain paths compute.

oneDNN-packed bf16 weights must give the plain bf16 model's logits bit for bit, in prefill and in
batched decode; fp32 (the token-exact mode) and non-CPU devices are left unpacked. Decode over a
prefix every row shares equals per-row attention."""
from __future__ import annotations

import pytest
import torch

from _engine_runs import prefill_then_decode
from _reference import PROMPTS, hf_greedy
from expertmesh.actors import forward_batch
from expertmesh.actors.forward_batch import ForwardBatch, shared_prefix_len
from expertmesh.actors.model.packed import PackedLinear, can_pack
from expertmesh.actors.sampling_params import SamplingParams
from expertmesh.actors.worker import ModelWorker, WorkerSpec
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig
from expertmesh.cluster.engine.types import EngineRequest

torch.set_num_threads(1)

needs_packing = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                   reason="this torch has no oneDNN packed bf16 linear")


def test_can_pack_says_whether_onednn_packs_on_this_cpu(tiny_ckpt):
    """On an AVX2-only CPU oneDNN refuses to pack bf16 at run time: can_pack must say so, and a
    bf16 engine must still load (unpacked) instead of failing in prepack."""
    from expertmesh.actors.model.packed import pack_weight

    weight = torch.zeros(16, 16, dtype=torch.bfloat16)
    try:
        pack_weight(weight)
        runs = True
    except RuntimeError:
        runs = False
    assert can_pack(weight) == runs
    worker = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=256, prepack=True, cpu_kernels=False))
    assert any(isinstance(m, PackedLinear) for m in worker.model.modules()) == runs


@needs_packing
def test_packed_bf16_logits_equal_unpacked_bitwise(tiny_ckpt):
    """The MoE kernel is off here: it reads the dense expert stacks, which packing frees."""
    plain = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024, prepack=False, cpu_kernels=False))
    packed = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024, prepack=True, cpu_kernels=False))
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert all(m.experts.packed is not None for m in packed.model.moe_layers())
    assert packed.routed_expert_param_count() == plain.routed_expert_param_count()
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[7]]
    for a, b in zip(prefill_then_decode(plain, prompts), prefill_then_decode(packed, prompts)):
        assert torch.equal(a, b)


def test_fp32_is_not_packed(tiny_ckpt):
    worker = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="float32", kv_slots=64, prepack=True))
    assert not any(isinstance(m, PackedLinear) for m in worker.model.modules())
    assert all(m.experts.packed is None for m in worker.model.moe_layers())


def test_shared_prefix_len():
    a, b = torch.arange(1, 101), torch.cat([torch.arange(1, 81), torch.arange(500, 530)])
    assert shared_prefix_len([a, b], minimum=64) == 80
    assert shared_prefix_len([a, b], minimum=81) == 0
    assert shared_prefix_len([a], minimum=1) == 0
    assert shared_prefix_len([a, a.clone()], minimum=1) == 99  # each row keeps its last slot


def test_decode_over_a_shared_prefix_equals_per_row_attention(tiny_ckpt, monkeypatch):
    """fp32: the batch's common prefix attended once gives the per-row logits (to rounding), and
    the engine's greedy tokens for requests sharing a radix-cached prefix stay transformers'."""
    worker = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="float32", kv_slots=1024))
    prefix = [0] + [700 + 11 * i for i in range(99)]
    prompts = [prefix + [40 + i, 41 + i] for i in range(3)]
    model, kv = worker.model, worker.kv
    slots = torch.arange(1, 101)
    model(ForwardBatch(torch.tensor(prefix), torch.arange(100), slots, [100], [slots]), kv)
    ctx = []
    for i, p in enumerate(prompts):
        own = torch.tensor([200 + 10 * i, 201 + 10 * i])
        model(ForwardBatch(torch.tensor(p[100:]), torch.arange(100, 102), own, [2], [torch.cat([slots, own])]), kv)
        ctx.append(torch.cat([slots, own, torch.tensor([202 + 10 * i])]))

    def decode() -> torch.Tensor:
        batch = ForwardBatch(torch.tensor([5, 6, 7]), torch.full((3,), 102), torch.stack([c[-1] for c in ctx]),
                             [1, 1, 1], ctx).prepare()
        return batch, model.logits(model(batch, kv))

    shared_batch, shared = decode()
    monkeypatch.setattr(forward_batch, "MIN_SHARED_PREFIX", 10**9)
    plain_batch, plain = decode()
    assert shared_batch.decode_shared.numel() == 100 and plain_batch.decode_shared.numel() == 0
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    engine = Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    reqs = [EngineRequest(f"s{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    out = engine.run_to_completion(reqs)
    engine.shutdown()
    assert sorted(o.cached_tokens for o in out.values())[1:] == [100, 100]
    assert [out[r.request_id].token_ids for r in reqs] == hf_greedy(tiny_ckpt, prompts, 12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_past_a_shared_prefix_expands_it_once_and_matches_per_sequence(tiny_ckpt, monkeypatch, dtype):
    """Several sequences prefilled in one step past one cached prefix: its keys and values are
    expanded once for all of them (batch.extend_shared), and the logits equal each sequence
    expanding its whole context (fp32 to rounding; bf16 to the bf16 tolerance)."""
    worker = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype=dtype, kv_slots=1024, cpu_kernels=False))
    model, kv = worker.model, worker.kv
    prefix = [0] + [700 + 11 * i for i in range(99)]
    slots = torch.arange(1, 101)
    model(ForwardBatch(torch.tensor(prefix), torch.arange(100), slots, [100], [slots]), kv)
    own = [torch.arange(200 + 10 * i, 200 + 10 * i + n) for i, n in enumerate((5, 3, 7))]
    ids = torch.cat([torch.arange(40 + i, 40 + i + o.numel()) for i, o in enumerate(own)])
    pos = torch.cat([torch.arange(100, 100 + o.numel()) for o in own])

    def prefill() -> tuple[ForwardBatch, torch.Tensor]:
        batch = ForwardBatch(ids, pos, torch.cat(own), [o.numel() for o in own],
                             [torch.cat([slots, o]) for o in own]).prepare()
        return batch, model.logits(model(batch, kv)).float()

    shared_batch, shared = prefill()
    monkeypatch.setattr(forward_batch, "MIN_SHARED_PREFIX", 10**9)
    plain_batch, plain = prefill()
    assert shared_batch.extend_shared.tolist() == slots.tolist() and plain_batch.extend_shared.numel() == 0
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(shared, plain, rtol=tol, atol=tol)


@needs_packing
def test_expert_parallel_path_computes_packed_experts_like_local(tmp_path):
    """The EP backend's grouped FFN on packed bf16 experts (a 1-rank gloo group) equals the local
    backend on the same experts unpacked, bit for bit."""
    from _engine_runs import ep_and_local_outputs
    from expertmesh.actors.model.experts import ExpertWeights

    gen = torch.Generator().manual_seed(3)
    plain, packed = ExpertWeights(0, 8, 64, 32), ExpertWeights(0, 8, 64, 32)
    with torch.no_grad():
        for w in (plain, packed):
            w.to(torch.bfloat16)
        for name in ("w13", "w2"):
            data = torch.randn(getattr(plain, name).shape, generator=gen).to(torch.bfloat16)
            getattr(plain, name).copy_(data)
            getattr(packed, name).copy_(data)
    assert packed.prepack() and not plain.packed
    ep, local = ep_and_local_outputs(packed, plain, tmp_path / "store", gen)
    assert torch.equal(ep, local)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_equal_the_per_expert_loop_bitwise(dtype):
    """Dense CPU expert stacks run as two grouped GEMMs; each expert's rows must come out as its
    own F.linear pair gives them, experts with no rows and an empty batch included."""
    from expertmesh.actors.model.experts import ExpertWeights, _grouped_mm_runs

    torch.manual_seed(0)
    weights = ExpertWeights(0, 8, 64, 32)
    with torch.no_grad():
        weights.w13.copy_(torch.randn_like(weights.w13) * 0.1)
        weights.w2.copy_(torch.randn_like(weights.w2) * 0.1)
    weights = weights.to(dtype)
    counts = [3, 0, 5, 1, 0, 0, 7, 2]
    xs = torch.randn(sum(counts), 64).to(dtype)
    if not _grouped_mm_runs(xs, weights.w13):
        pytest.skip("this torch has no CPU grouped GEMM")
    out = weights.grouped_ffn(xs, counts)
    start, rows = 0, []
    for e, n in enumerate(counts):
        rows.append(weights._ffn(e, xs[start:start + n]))
        start += n
    assert out.dtype == dtype and torch.equal(out, torch.cat(rows))
    assert weights.grouped_ffn(xs[:0], [0] * 8).shape == (0, 64)
