"""Issue 14: the data plane's fast paths compute what the plain paths compute.

oneDNN-packed bf16 weights must give the plain bf16 model's logits bit for bit, in prefill and in
batched decode; fp32 (the token-exact mode) and non-CPU devices are left unpacked."""
from __future__ import annotations

import pytest
import torch

from _reference import PROMPTS
from expertmesh.actors.forward_batch import ForwardBatch
from expertmesh.actors.model.packed import PackedLinear, can_pack
from expertmesh.actors.worker import ModelWorker, WorkerSpec

torch.set_num_threads(1)

needs_packing = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                   reason="this torch has no oneDNN packed bf16 linear")


def _prefill_then_decode(worker: ModelWorker, prompts: list[list[int]], steps: int = 3) -> list[torch.Tensor]:
    """Logits of each prompt's prefill (one sequence at a time), then `steps` batched decode steps."""
    out, ctx, nxt, slot = [], [], [], 1
    model = worker.model
    for p in prompts:
        slots = torch.arange(slot, slot + len(p))
        slot += len(p)
        batch = ForwardBatch(torch.tensor(p), torch.arange(len(p)), slots, [len(p)], [slots])
        logits = model.logits(model(batch, worker.kv)[-1:])
        out.append(logits)
        ctx.append(slots)
        nxt.append(int(logits.float().argmax()))
    for _ in range(steps):
        new = torch.arange(slot, slot + len(prompts))
        slot += len(prompts)
        ctx = [torch.cat([c, new[i : i + 1]]) for i, c in enumerate(ctx)]
        positions = torch.tensor([c.numel() - 1 for c in ctx])
        batch = ForwardBatch(torch.tensor(nxt), positions, new, [1] * len(prompts), ctx)
        logits = model.logits(model(batch, worker.kv))
        out.append(logits)
        nxt = logits.float().argmax(-1).tolist()
    return out


@needs_packing
def test_packed_bf16_logits_equal_unpacked_bitwise(tiny_ckpt):
    plain = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024, prepack=False))
    packed = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024, prepack=True))
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert all(m.experts.packed is not None for m in packed.model.moe_layers())
    assert packed.routed_expert_param_count() == plain.routed_expert_param_count()
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[7]]
    for a, b in zip(_prefill_then_decode(plain, prompts), _prefill_then_decode(packed, prompts)):
        assert torch.equal(a, b)


def test_fp32_is_not_packed(tiny_ckpt):
    worker = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="float32", kv_slots=64, prepack=True))
    assert not any(isinstance(m, PackedLinear) for m in worker.model.modules())
    assert all(m.experts.packed is None for m in worker.model.moe_layers())
