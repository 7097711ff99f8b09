"""Issue 14: greedy rows through the lm_head's int8 screen (actors/model/greedy_head.py,
kernels/head_cpu.cpp). It is not a speed mode: the token must be the bf16 head's argmax. Checked
against the full head on random heads (rows of different scales, a head whose rows do not fill
the packed blocks), undecidable rows (flat, non-finite) falling back to the full head, the engine's
tokens with and without it, its bytes, and the knob that turns it off."""
from __future__ import annotations

import pytest
import torch

from _engine_runs import greedy_reqs, run
from expertmesh.actors.model.greedy_head import MAX_CANDIDATES, ScreenedHead
from expertmesh.actors.model.kernels import cpu_kernels
from expertmesh.actors.model.packed import PairPackedLinear
from expertmesh.actors.worker import ModelWorker, WorkerSpec
from expertmesh.cluster.config import config_from_dict
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig

ops = cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None or not ops.has_packed_linear(),
                                reason="no packed bf16 head on this CPU (AVX512-BF16 or AVX2 kernels)")
torch.set_num_threads(2)


def _head(n: int, k: int, seed: int) -> tuple[PairPackedLinear, ScreenedHead, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    with torch.no_grad():  # rows of different scales, so per-row scales and bounds matter
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.logspace(-3, -1, n)[torch.randperm(n, generator=g), None])
    head = PairPackedLinear(lin, ops)
    return head, ScreenedHead(lin.weight, head, ops), lin.weight


def _argmax_set(logits: torch.Tensor) -> list[set[int]]:
    """Per row, the ids whose bf16 logit equals the row's max or lies one bf16 step below it: where
    two fp32 summation orders may round differently, either answer is the bf16 head's."""
    out = []
    for row in logits.float():
        top = row.max()
        out.append(set((row >= top - top.abs() * 2 ** -7).nonzero().flatten().tolist()))
    return out


@pytest.mark.parametrize("n,k", [(4000, 64), (1000, 200), (129280, 64)])
def test_screened_argmax_is_the_full_heads(n, k):
    head, screen, _ = _head(n, k, seed=n + k)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, k, generator=g) * torch.logspace(-1, 1, 64)[:, None]).to(torch.bfloat16)
    want = _argmax_set(head(x))
    for rows in (1, 2, 7, 13, 32):  # the VNNI path's row tiles (12) and their tails
        for i in range(0, 64, rows):
            got = ops.head_screen_argmax(x[i : i + rows], head.packed, n, screen.w8, screen.stats,
                                         screen.rowsum128, MAX_CANDIDATES)
            for j, tok in enumerate(got.tolist()):
                assert tok in want[i + j], (i + j, tok, want[i + j])
    assert all(t in w for t, w in zip(screen.greedy(x[:2], head).tolist(), want[:2]))


def test_rows_the_screen_cannot_decide_take_the_full_head():
    head, screen, _ = _head(3000, 64, seed=5)
    flat = torch.zeros(1, 64, dtype=torch.bfloat16)  # every logit 0: all are candidates
    bad = torch.full((1, 64), float("nan"), dtype=torch.bfloat16)
    raw = ops.head_screen_argmax(torch.cat([flat, bad]), head.packed, 3000, screen.w8, screen.stats,
                                 screen.rowsum128, MAX_CANDIDATES)
    assert raw.tolist() == [-1, -1]
    got = screen.greedy(torch.cat([flat, bad]), head)
    assert got.tolist() == ops.argmax_rows(head(torch.cat([flat, bad]))).tolist()
    with pytest.raises(RuntimeError, match="one scale and bound per row"):
        ops.head_screen_argmax(flat, head.packed, 3000, screen.w8, screen.stats[:, :-1], screen.rowsum128,
                               MAX_CANDIDATES)


def test_engine_tokens_with_the_screen_equal_the_full_head(tiny_ckpt):
    """bf16 greedy at batch 1 (through the screen) and batch 3 (full head): the same tokens as an
    engine without the screen; the screen's bytes are reported apart and only where it is on."""
    prompts = [[5, 7, 9, 11, 300, 2], list(range(40, 90)), [1000 + 3 * i for i in range(17)]]
    outs = {}
    for screen in (True, False):
        sched = SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)
        engine = Engine(EngineConfig(str(tiny_ckpt), dtype="bfloat16", scheduler=sched, greedy_head_screen=screen))
        alone = [run(engine, greedy_reqs([p], f"a{i}-", 24))[0] for i, p in enumerate(prompts)]
        together = run(engine, greedy_reqs(prompts, "b-", 24))
        engine.shutdown()
        outs[screen] = (alone, together)
    assert outs[True] == outs[False]
    on = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=256))
    off = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=256, greedy_head_screen=False))
    cfg = on.config
    a, b = on.model.weight_bytes(), off.model.weight_bytes()
    blocks = on.model.lm_head.packed.shape[0]
    assert a["head_screen"] == blocks * 16 * (-(-cfg.hidden_size // 4) * 4 + 20) and "head_screen" not in b
    assert a["dense"] == b["dense"]


def test_the_screen_serves_every_greedy_batch_where_int8_dot_products_run():
    """With AVX512-VNNI (and no AMX tiles for the bf16 head) the screen is faster than the full
    head at any batch (twice the multiply-adds per instruction); elsewhere it serves 1-2 rows."""
    head, screen, _ = _head(512, 64, seed=9)
    x = torch.randn(64, 64).to(torch.bfloat16)
    wide = ops.head_screen_vnni() and not ops.has_amx()
    assert screen.serves(head, x[:2]) and screen.serves(head, x[:64]) == wide
    assert not screen.serves(head, x[:0]) and not screen.serves(head, x[:2].float())


def test_the_knob_reaches_the_engine():
    cfg = config_from_dict({"model": {"checkpoint": "/nonexistent", "greedy_head_screen": False}}, check_model=False)
    assert cfg.model.greedy_head_screen is False
    assert config_from_dict({"model": {"checkpoint": "/nonexistent"}}, check_model=False).model.greedy_head_screen
