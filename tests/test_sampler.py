"""Sampler semantics: greedy, filters, penalties, seeded batch invariance, logprobs, validation."""
from __future__ import annotations

import math

import pytest
import torch

from expertmesh.actors.sampler import (Sampler, SamplingState, apply_min_p, apply_penalties,
                                       apply_top_k_top_p, first_argmax, mix_seed)
from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _states(*params: SamplingParams, prompt: list[int] | None = None) -> list[SamplingState]:
    return [SamplingState(p, list(prompt or [])) for p in params]


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype, device: str) -> None:
    logits = _logits(6, 5000).to(dtype).to(device)
    logits[2, 7] = logits[2, 4000] = logits[2].max() + 1  # tie: lowest id wins, as torch.argmax
    res = Sampler(seed=0)(logits, _states(*[SamplingParams(temperature=0.0)] * 6))
    assert res.token_ids == logits.argmax(dim=-1).tolist()
    assert res.token_ids[2] == 7
    assert res.logprobs == [None] * 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 4096, 5000, 129280, 129281])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_equals_argmax(vocab: int, dtype: torch.dtype, device: str) -> None:
    logits = _logits(7, vocab, seed=vocab).to(dtype).to(device)
    top = logits.max() + 1
    logits[1, vocab - 1] = top  # in a short last block
    logits[2, 3] = logits[2, vocab - 2] = top  # tie across blocks: the lower id
    logits[3, 10] = logits[3, 11] = top  # tie inside a block
    logits[4] = 0.5  # all equal
    logits[5, vocab // 2] = float("nan")  # NaN wins, as in max()
    logits[6] = float("-inf")  # all -inf: the first id
    assert first_argmax(logits).tolist() == logits.max(dim=-1).indices.tolist()
    assert first_argmax(logits)[:5].tolist() == logits[:5].argmax(dim=-1).tolist()
    if device == "cpu":  # the CPU kernels' one-pass argmax (actors/model/kernels/argmax_cpu.cpp)
        from expertmesh.actors.model.kernels import cpu_kernels

        if cpu_kernels() is not None:
            assert first_argmax(logits, cpu_kernels()).tolist() == logits.max(dim=-1).indices.tolist()


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(8, 3000, seed=1)
    want = logits.argmax(dim=-1).tolist()
    sampler = Sampler(seed=0)
    for _ in range(5):
        assert sampler(logits, _states(*[SamplingParams(top_k=1, temperature=1.5)] * 8)).token_ids == want
        tiny = [SamplingParams(top_p=1e-6, temperature=1.0, seed=s if s % 2 else None) for s in range(8)]
        assert sampler(logits, _states(*tiny)).token_ids == want


def test_top_k_restricts_support() -> None:
    logits = _logits(1, 200, seed=2).expand(2000, 200).contiguous()
    res = Sampler(seed=0)(logits, _states(*[SamplingParams(top_k=5, temperature=2.0)] * 2000))
    top5 = set(logits[0].topk(5).indices.tolist())
    assert set(res.token_ids) == top5


def test_top_p_nucleus_and_keeps_one() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = apply_top_k_top_p(probs.log(), torch.tensor([4]), torch.tensor([0.75]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]
    masked = apply_top_k_top_p(probs.log(), torch.tensor([4]), torch.tensor([0.85]))
    assert torch.isfinite(masked).tolist() == [[True, True, True, False]]
    masked = apply_top_k_top_p(probs.log(), torch.tensor([4]), torch.tensor([1e-9]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]
    # top-k first, then top-p over the renormalized top-k: [0.625, 0.375] -> 0.6 needs one token
    masked = apply_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.6]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]
    masked = apply_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.7]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]


def test_min_p() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    masked = apply_min_p(probs.log(), torch.tensor([0.3]))  # threshold 0.12
    assert torch.isfinite(masked).tolist() == [[True, True, True, False, False]]
    logits = probs.log().expand(3000, 5).contiguous()
    res = Sampler(seed=0)(logits, _states(*[SamplingParams(min_p=0.3)] * 3000))
    assert set(res.token_ids) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    res = Sampler(seed=123)(base.expand(n, 4).contiguous(),
                            _states(*[SamplingParams(temperature=temperature)] * n))
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=4).float() / n
    want = (base / temperature).softmax(-1)
    # 4.5 sigma of a binomial proportion, per token
    bound = 4.5 * (want * (1 - want) / n).sqrt() + 1e-3
    assert ((freq - want).abs() <= bound).all(), (freq, want)


def test_temperature_sharpens_and_flattens() -> None:
    base = torch.tensor([1.0, 0.0, 0.0, 0.0])
    n = 5000
    top_share = {}
    for t in (0.25, 1.0, 4.0):
        res = Sampler(seed=7)(base.expand(n, 4).contiguous(), _states(*[SamplingParams(temperature=t)] * n))
        top_share[t] = res.token_ids.count(0) / n
    assert top_share[0.25] > 0.9 > top_share[1.0] > top_share[4.0] > 0.25


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    state = SamplingState(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                         frequency_penalty=0.25),
                          prompt_token_ids=[0, 1], output_token_ids=[3, 3, 4])
    apply_penalties(logits, [state])
    # token 0: prompt, positive -> 2/2 = 1.0 ; token 1: prompt, negative -> -1*2 = -2.0
    # token 2: unseen -> 0.5 ; token 3: output x2, positive -> 3/2 - 0.25*2 - 0.5 = 0.5
    # token 4: output x1, negative -> -2*2 - 0.25 - 0.5 = -4.75 ; token 5: unseen -> 0.0
    assert logits.tolist() == [[1.0, -2.0, 0.5, 0.5, -4.75, 0.0]]


def test_penalties_only_repetition_and_only_output_counts() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    states = [SamplingState(SamplingParams(repetition_penalty=1.25), [0], [1]),
              SamplingState(SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), [0], [1, 1])]
    apply_penalties(logits, states)
    want = torch.tensor([[0.8, 0.8, 1.0, 1.0], [1.0, -2.0, 1.0, 1.0]])  # prompt not in counts
    assert torch.allclose(logits, want, rtol=0, atol=1e-6)


def test_penalty_cache_follows_appended_tokens() -> None:
    vocab = 50
    sampler = Sampler(seed=0)
    state = SamplingState(SamplingParams(frequency_penalty=0.7, repetition_penalty=1.3, seed=3),
                          prompt_token_ids=[1, 2, 3])
    for step in range(6):
        sampler(_logits(1, vocab, seed=step), [state])
    seen, counts = state.penalty_tensors(vocab, torch.device("cpu"))
    assert len(state.output_token_ids) == 6
    want = torch.bincount(torch.tensor(state.output_token_ids), minlength=vocab).float()
    assert torch.equal(counts, want)
    assert seen.nonzero().flatten().tolist() == sorted(set(state.output_token_ids) | {1, 2, 3})


def test_greedy_with_repetition_penalty_changes_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    state = SamplingState(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0])
    assert Sampler()(logits, [state]).token_ids == [1]
    assert state.output_token_ids == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_batch_invariant(device: str) -> None:
    vocab, steps = 32000, 4
    target_params = [SamplingParams(temperature=0.8, top_p=0.9, seed=42),
                     SamplingParams(temperature=1.2, top_k=40, min_p=0.02, seed=7,
                                    repetition_penalty=1.1, frequency_penalty=0.2)]
    others = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=20),
              SamplingParams(seed=5, top_p=0.5), SamplingParams(min_p=0.1, logprobs=3),
              SamplingParams(temperature=0.7, presence_penalty=0.4),
              SamplingParams(seed=42, temperature=0.8, top_p=0.9)]  # same seed, other logits

    def run(params: SamplingParams, position: int | None, sampler_seed: int) -> list[int]:
        sampler = Sampler(seed=sampler_seed)
        mine = SamplingState(params, [5, 6, 7])
        rest = _states(*others, prompt=[1, 2])
        for step in range(steps):
            own = _logits(1, vocab, seed=100 + step)
            if position is None:
                sampler(own.to(device), [mine])
                continue
            batch = rest[:position] + [mine] + rest[position:]
            logits = _logits(len(batch), vocab, seed=200 + step)
            logits[position] = own[0]
            sampler(logits.to(device), batch)
        return mine.output_token_ids

    for params in target_params:
        alone = run(params, None, sampler_seed=0)
        for position, sampler_seed in ((0, 1), (3, 2), (7, 3)):
            assert run(params, position, sampler_seed) == alone
    assert run(target_params[0], None, 0) != run(SamplingParams(temperature=0.8, top_p=0.9, seed=43), None, 0)


def test_mix_seed_is_stable() -> None:
    assert mix_seed(42, 0) == mix_seed(42, 0)
    assert len({mix_seed(s, t) for s in range(20) for t in range(20)}) == 400
    assert 0 <= mix_seed(2**64 + 5, 10**9) < 2**63


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(3, 1000, seed=9).to(torch.bfloat16)
    states = _states(SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.5),
                     SamplingParams(), SamplingParams(logprobs=2, temperature=0.0), prompt=[1, 2, 3])
    res = Sampler(seed=0)(logits, states)
    ref = logits.float().log_softmax(-1)
    assert res.logprobs[1] is None
    for row, n in ((0, 5), (2, 2)):
        lp = res.logprobs[row]
        assert lp is not None and lp.token_id == res.token_ids[row] and len(lp.top) == n
        assert math.isclose(lp.logprob, ref[row, lp.token_id].item(), rel_tol=0, abs_tol=1e-6)
        want = ref[row].topk(n)
        assert [i for i, _ in lp.top] == want.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), want.values, atol=1e-6)
    assert res.logprobs[2].top[0][0] == res.token_ids[2]  # greedy: chosen is the top-1


def test_input_logits_not_modified() -> None:
    logits = _logits(2, 100)
    before = logits.clone()
    Sampler(seed=0)(logits, _states(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0),
                                    SamplingParams(top_k=3), prompt=list(range(50))))
    assert torch.equal(logits, before)


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), _states(SamplingParams()))


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", 0), ("top_k", -2), ("top_k", 1.5),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", True),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")), ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", float("nan")), ("seed", -1),
    ("logprobs", 21), ("stop", [""]),
])
def test_validate_rejects(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.field == field


def test_validate_accepts_edges() -> None:
    for kw in ({"temperature": 0.0}, {"top_p": 1.0}, {"top_k": -1}, {"top_k": 1}, {"max_tokens": 1},
               {"presence_penalty": -2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 0.5},
               {"seed": 0}, {"logprobs": 20}, {"min_p": 1.0}):
        SamplingParams(**kw).validate()
    assert SamplingParams(temperature=1e-7).greedy and not SamplingParams(temperature=0.1).greedy
