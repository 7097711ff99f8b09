"""The fast top-k/top-p path equals the full-sort reference bit for bit: filters, sampler, engine."""
from __future__ import annotations

import pytest
import torch

import expertmesh.actors.sampler as sampler_mod
from expertmesh.actors.sampler import (Sampler, SamplingState, apply_top_k_top_p,
                                       apply_top_k_top_p_sorted)
from expertmesh.actors.sampling_params import SamplingParams

torch.set_num_threads(1)
V = 129280


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(kind: str, n: int, vocab: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "gauss":  # from near-flat to very peaked
        scales = torch.tensor([0.05, 0.3, 1.0, 2.0, 4.0, 8.0, 20.0, 100.0])
        return torch.randn(n, vocab, generator=g) * scales[torch.arange(n) % len(scales), None]
    if kind == "lm":  # a long low tail and a few strong candidates, as a real model's logits
        x = torch.randn(n, vocab, generator=g) * 2.0
        heads = torch.randint(0, vocab, (n, 40), generator=g)
        return x.scatter_add_(1, heads, torch.rand(n, 40, generator=g) * 18)
    if kind == "ties":  # coarse values: ties everywhere, at the boundary too
        return (torch.randn(n, vocab, generator=g) * 3).round_() / 2
    if kind == "tied_top":  # several tokens share the max, and the runner-up
        x = torch.randn(n, vocab, generator=g)
        idx = torch.randint(0, vocab, (n, 6), generator=g)
        x.scatter_(1, idx[:, :3], 12.0)
        return x.scatter_(1, idx[:, 3:], 11.0)
    if kind == "flat":
        return torch.zeros(n, vocab).add_(torch.arange(n)[:, None] * 0.1)
    if kind == "neg_inf":  # already masked tokens (e.g. by an earlier filter)
        x = torch.randn(n, vocab, generator=g) * 3
        return x.masked_fill_(torch.rand(n, vocab, generator=g) < 0.3, float("-inf"))
    raise ValueError(kind)


def _params(n: int, vocab: int, seed: int, top_k: str, top_p: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed + 1)
    ks = {"off": torch.full((n,), vocab),
          "small": torch.randint(1, 60, (n,), generator=g),
          "large": torch.randint(1025, 40000, (n,), generator=g),
          "mixed": torch.tensor([[vocab, 1, 40, 5000, vocab, 1024][i % 6] for i in range(n)])}[top_k]
    ps = {"r1": torch.full((n,), 0.95),
          "one": torch.ones(n),
          "tiny": torch.full((n,), 1e-6),
          "mixed": torch.tensor([[0.95, 0.5, 0.99, 1.0, 0.1, 0.9][i % 6] for i in range(n)])}[top_p]
    return ks.to(torch.long), ps.to(torch.float32)


def _check(x: torch.Tensor, ks: torch.Tensor, ps: torch.Tensor) -> None:
    want = apply_top_k_top_p_sorted(x, ks, ps)
    got = apply_top_k_top_p(x, ks, ps, fast=True)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got, want)  # kept values are the logits themselves, the rest -inf
    # row by row too: a row's result does not depend on the rest of the batch
    for r in range(0, x.shape[0], max(1, x.shape[0] // 3)):
        assert torch.equal(apply_top_k_top_p(x[r:r + 1], ks[r:r + 1], ps[r:r + 1], fast=True), want[r:r + 1])


@pytest.mark.parametrize("kind", ["gauss", "lm", "ties", "tied_top", "neg_inf"])
@pytest.mark.parametrize("top_k,top_p", [("off", "r1"), ("off", "mixed"), ("small", "r1"),
                                         ("mixed", "mixed"), ("large", "r1"), ("small", "one"),
                                         ("mixed", "one"), ("off", "tiny")])
def test_fast_equals_sorted(kind: str, top_k: str, top_p: str) -> None:
    n, vocab = 8, 32000
    seed = hash((kind, top_k, top_p)) % 1000
    x = _rows(kind, n, vocab, seed)
    ks, ps = _params(n, vocab, seed, top_k, top_p)
    _check(x, ks, ps)


@pytest.mark.parametrize("kind", ["gauss", "lm", "ties"])
def test_fast_equals_sorted_full_vocab(kind: str) -> None:
    x = _rows(kind, 8, V, seed=3)
    ks, ps = _params(8, V, 3, "mixed", "mixed")
    _check(x, ks, ps)
    _check(x, torch.full((8,), V), torch.full((8,), 0.95))


def test_fast_path_is_taken_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peaked rows are decided by the fast path; flat and all-tied rows go to the reference."""
    calls = {"fast": 0, "slow": 0}
    real = sampler_mod._fast_row

    def counting(*a, **kw):
        res = real(*a, **kw)
        calls["slow" if res is None else "fast"] += 1
        return res

    monkeypatch.setattr(sampler_mod, "_fast_row", counting)
    x = _rows("lm", 6, V, seed=5)
    _check(x, torch.full((6,), V), torch.full((6,), 0.95))
    assert calls == {"fast": 6 + 3, "slow": 0}  # _check runs the batch, then rows 0, 2, 4 alone
    calls.update(fast=0, slow=0)
    flat = _rows("flat", 3, V, seed=0)
    _check(flat, torch.full((3,), V), torch.full((3,), 0.95))
    assert calls["fast"] == 0
    # top_p 1.0 with a huge logit range: tokens of probability 0 are the reference's business
    wide = torch.linspace(-500, 0, V)[None].repeat(2, 1)
    _check(wide, torch.tensor([V, 100]), torch.tensor([1.0, 1.0]))


def test_fast_handles_nan_and_small_vocab() -> None:
    x = _rows("gauss", 4, 8192, seed=9)
    x[1, 7] = float("nan")
    ks, ps = torch.full((4,), 8192), torch.full((4,), 0.9)
    want = apply_top_k_top_p_sorted(x, ks, ps)
    got = apply_top_k_top_p(x, ks, ps, fast=True)
    assert torch.equal(got.nan_to_num(nan=7.0), want.nan_to_num(nan=7.0))
    small = _rows("gauss", 5, 100, seed=2)  # below _FAST_MIN_VOCAB: the reference itself
    _check(small, torch.full((5,), 100), torch.full((5,), 0.8))


def test_margin_covers_reference_rounding() -> None:
    """The reference's tail masses differ from exact float64 ones by far less than the margin."""
    worst = 0.0
    for seed in range(12):
        x = _rows("gauss", 1, V, seed)[0] + 0.0
        s, _ = torch.sort(x, stable=True)
        cum = s.softmax(-1).cumsum(-1).double()
        e = torch.exp(s - s.max()).double()
        exact = e.cumsum(0) / e.sum()
        sel = (exact > 1e-4) & (exact < 0.99)
        if sel.any():
            worst = max(worst, float((cum[sel] / exact[sel] - 1).abs().max()))
    assert worst < sampler_mod._FAST_REL_TOL / 5, worst


def _run_sampler(fast: bool, monkeypatch: pytest.MonkeyPatch, params: list[SamplingParams],
                 steps: int = 5) -> list[list[int]]:
    monkeypatch.setattr(sampler_mod, "_FAST_DEFAULT", fast)
    sampler = Sampler(seed=11)
    states = [SamplingState(p, [1, 2, 3]) for p in params]
    for step in range(steps):
        logits = _rows("lm", len(params), V, seed=50 + step)
        if step % 2:
            logits[::3] = _rows("gauss", len(logits[::3]), V, seed=80 + step)
        sampler(logits.to(torch.bfloat16), states)
    return [s.output_token_ids for s in states]


def test_sampler_tokens_equal_with_and_without_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [SamplingParams(temperature=0.6, top_p=0.95, seed=5),
              SamplingParams(temperature=0.6, top_p=0.95),  # unseeded: the sampler's generator
              SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1),
              SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05, seed=2),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.2,
                             frequency_penalty=0.3, presence_penalty=0.2, seed=3),
              SamplingParams(temperature=1.3, top_k=2000, seed=4),
              SamplingParams(temperature=0.6, top_p=0.95, logprobs=2, seed=6)]
    assert _run_sampler(True, monkeypatch, params) == _run_sampler(False, monkeypatch, params)


@pytest.mark.slow
def test_engine_seeded_generation_equal_with_and_without_fast_path(tiny_ckpt, monkeypatch) -> None:
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig
    from expertmesh.cluster.engine.types import EngineRequest

    calls = {"fast": 0}
    real = sampler_mod._fast_row

    def counting(*a, **kw):
        res = real(*a, **kw)
        calls["fast"] += res is not None
        return res

    monkeypatch.setattr(sampler_mod, "_fast_row", counting)
    engine = Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    kinds = [dict(temperature=0.6, top_p=0.95, seed=5), dict(temperature=0.2, top_p=0.9, seed=6),
             dict(temperature=0.3, top_k=40, seed=7), dict(temperature=0.25, top_p=0.95, min_p=0.1, seed=8)]
    prompts = [[0, 5, 6, 7], [0, 9, 10], [0, 11, 12, 13, 14], [0, 15]]

    def run(fast: bool, tag: str) -> list[list[int]]:
        monkeypatch.setattr(sampler_mod, "_FAST_DEFAULT", fast)
        reqs = [EngineRequest(f"{tag}{i}", p, SamplingParams(max_tokens=12, ignore_eos=True, **kw))
                for i, (p, kw) in enumerate(zip(prompts, kinds))]
        engine.flush_cache()
        outs = engine.run_to_completion(reqs)
        return [list(outs[r.request_id].token_ids) for r in reqs]

    try:
        fast, slow = run(True, "f"), run(False, "s")
    finally:
        engine.shutdown()
    assert fast == slow
    assert calls["fast"] > 0
