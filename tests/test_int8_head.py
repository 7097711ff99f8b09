"""Issue 14 item 4: the optional int8 speed mode (`model.int8_lm_head`, off by default).

The lm_head becomes a dynamic int8 linear (actors/model/int8.py). It is a speed mode, so its logits
are only close to the bf16 head's; what must hold exactly: no saturation at full 8-bit range, a
row's logits independent of the other rows in its batch, half the bytes resident, a clear error
where it cannot run, and the engine serving with it."""
from __future__ import annotations

import pytest
import torch

from _engine_runs import greedy_reqs, prefill_then_decode, run
from expertmesh.actors.model.int8 import Int8Linear, int8_available
from expertmesh.actors.worker import ModelWorker, WorkerSpec
from expertmesh.cluster.config import ConfigError, config_from_dict
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.skipif(not int8_available(), reason="no fbgemm dynamic int8 linear in this torch build")
torch.set_num_threads(1)

PROMPTS = [[5, 7, 9, 11, 300, 2], list(range(40, 90)), [1000 + 3 * i for i in range(17)]]


def test_int8_linear_is_close_and_batch_invariant():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 256, generator=g) * 0.02).to(torch.bfloat16)
    x = (torch.randn(16, 256, generator=g) * torch.logspace(-2, 1, 16)[:, None]).to(torch.bfloat16)
    head = Int8Linear(w)
    y = head(x)
    ref = x.float() @ w.float().t()
    assert y.dtype == torch.float32 and y.shape == (16, 4096)
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.03, rel  # rows of very different scale each keep their own precision
    assert torch.equal(torch.cat([head(x[i : i + 1]) for i in range(16)]), y)
    assert torch.equal(head(x[3:9]), y[3:9])


def test_full_range_does_not_saturate():
    """Every product at full range: int16 pair sums would saturate (the reason for reduce_range
    without VNNI); the result must still be the true dot product to within quantization."""
    head = Int8Linear(torch.full((8, 512), 0.5))
    y = head(torch.ones(2, 512))
    torch.testing.assert_close(y, torch.full((2, 8), 256.0), rtol=0.01, atol=0.0)
    y = head(-torch.ones(1, 512))
    torch.testing.assert_close(y, torch.full((1, 8), -256.0), rtol=0.01, atol=0.0)


def test_worker_holds_an_int8_head_with_half_the_bytes(tiny_ckpt):
    plain = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=512))
    int8 = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=512, int8_lm_head=True))
    assert isinstance(int8.model.lm_head, Int8Linear)
    cfg = int8.config
    a, b = plain.model.weight_bytes(), int8.model.weight_bytes()
    assert b["int8"] == cfg.vocab_size * (cfg.hidden_size + 4)
    assert a["dense"] - b["dense"] == cfg.vocab_size * cfg.hidden_size * 2  # the bf16 head is gone
    for x, y in zip(prefill_then_decode(plain, PROMPTS), prefill_then_decode(int8, PROMPTS)):
        rel = (y - x.float()).norm() / x.float().norm()
        assert rel < 0.05, rel


def test_engine_serves_with_int8_head_and_batching_does_not_change_tokens(tiny_ckpt):
    sched = SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)
    engine = Engine(EngineConfig(str(tiny_ckpt), dtype="bfloat16", scheduler=sched, int8_lm_head=True))
    try:
        assert engine.executor.describe()[0]["weight_bytes"]["int8"] > 0
        together = run(engine, greedy_reqs(PROMPTS, "b"))
        alone = [run(engine, greedy_reqs([p], f"a{i}"))[0] for i, p in enumerate(PROMPTS)]
    finally:
        engine.shutdown()
    assert all(len(t) == 12 for t in together)
    assert together == alone


def test_int8_head_on_cuda_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"model\.int8_lm_head: is a CPU speed mode"):
        config_from_dict({"model": {"checkpoint": "/nonexistent", "int8_lm_head": True},
                          "parallel": {"accelerator": "cuda", "gpus_per_rank": 1}}, check_model=False)
    with pytest.raises(ValueError, match="CPU speed mode"):
        Int8Linear(torch.empty(8, 8, device="meta"))
