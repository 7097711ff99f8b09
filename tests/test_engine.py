"""Issue 3: continuous batching, radix-cache prefix reuse, KV admission, aborts, sampling rules."""
from __future__ import annotations

import asyncio

import pytest
import torch

from _reference import PROMPTS, hf_greedy
from expertmesh.actors.sampling_params import InvalidRequestError, SamplingParams
from expertmesh.cluster.engine.async_engine import AsyncEngine
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig
from expertmesh.cluster.engine.types import EngineRequest

torch.set_num_threads(1)


def make_engine(ckpt, **sched) -> Engine:
    cfg = SchedulerConfig(**{"kv_tokens_per_rank": 2048, "page_size": 4, **sched})
    return Engine(EngineConfig(str(ckpt), scheduler=cfg))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def drain(engine: Engine, outs: dict) -> None:
    while engine.has_work():
        for d in engine.step():
            acc = outs.setdefault(d.request_id, {"ids": [], "text": "", "final": None})
            acc["ids"] += d.token_ids
            acc["text"] += d.text
            if d.finished:
                acc["final"] = d


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    e = make_engine(tiny_ckpt)
    yield e
    e.shutdown()


def test_staggered_continuous_batch_equals_transformers(tiny_ckpt, engine):
    ref = hf_greedy(tiny_ckpt, PROMPTS, 16)
    outs: dict = {}
    pending = [EngineRequest(f"s{i}", p, greedy(16)) for i, p in enumerate(PROMPTS)]
    step = 0
    while pending or engine.has_work():
        if pending and step % 3 == 0:  # a new request joins every third step
            engine.add_request(pending.pop(0))
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
    assert [outs[f"s{i}"] for i in range(len(PROMPTS))] == ref


def test_shared_prefix_hits_radix_cache_and_computes_only_the_rest(tiny_ckpt, engine):
    engine.flush_cache()
    prefix = [0] + [500 + 7 * i for i in range(100)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    out1 = engine.run_to_completion([EngineRequest("a", first, greedy(4))])["a"]
    before = engine.stats.prefill_tokens
    out2 = engine.run_to_completion([EngineRequest("b", second, greedy(4))])["b"]
    computed = engine.stats.prefill_tokens - before
    page = engine.config.scheduler.page_size
    assert out1.cached_tokens == 0
    assert out2.cached_tokens >= len(prefix) // page * page
    assert computed == len(second) - out2.cached_tokens
    assert out2.metrics.prefill_tokens == computed
    assert out2.token_ids == hf_greedy(tiny_ckpt, [second], 4)[0]


def test_radix_hits_in_a_batch_keep_tokens_exact(tiny_ckpt, engine):
    engine.flush_cache()
    engine.run_to_completion([EngineRequest(f"w{i}", p, greedy(16)) for i, p in enumerate(PROMPTS)])
    again = engine.run_to_completion([EngineRequest(f"h{i}", p, greedy(16)) for i, p in enumerate(PROMPTS)])
    assert sum(o.cached_tokens for o in again.values()) > 100
    assert [again[f"h{i}"].token_ids for i in range(len(PROMPTS))] == hf_greedy(tiny_ckpt, PROMPTS, 16)


def test_small_pool_queues_evicts_and_leaks_nothing(tiny_ckpt):
    engine = make_engine(tiny_ckpt, kv_tokens_per_rank=256, page_size=4)
    prompts = [[0] + [3000 + 11 * i + j for j in range(60)] for i in range(6)] + PROMPTS[:3]
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"k{i}", p, greedy(24)))
    outs: dict = {}
    most_running, queued_while_running = 0, False
    while engine.has_work():
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        most_running = max(most_running, len(engine.scheduler.running))
        queued_while_running |= bool(engine.scheduler.waiting) and bool(engine.scheduler.running)
    assert [outs[f"k{i}"] for i in range(len(prompts))] == hf_greedy(tiny_ckpt, prompts, 24)
    assert queued_while_running and most_running < len(prompts)  # KV, not the batch limit, held them back
    engine.flush_cache()
    assert engine.kv_free_slots() == engine.kv_total_slots()


def test_abort_mid_prefill_and_mid_decode_frees_everything(tiny_ckpt):
    engine = make_engine(tiny_ckpt, chunked_prefill_tokens=8, max_batch_tokens=8)
    long_prompt = [0] + list(range(700, 800))
    engine.add_request(EngineRequest("pre", long_prompt, greedy(8)))
    engine.add_request(EngineRequest("dec", PROMPTS[1], greedy(50)))
    engine.add_request(EngineRequest("wait", PROMPTS[2], greedy(8)))
    for _ in range(4):
        engine.step()
    pre = engine.requests["pre"]
    assert pre.prefilling and pre.computed > 0
    done = engine.abort("pre")
    assert done.finished and done.finish_reason == "abort"
    for _ in range(6):
        engine.step()
    assert len(engine.requests["dec"].output) > 0
    assert engine.abort("dec").finish_reason == "abort"
    assert engine.abort("nope") is None
    drain(engine, {})
    engine.flush_cache()
    assert engine.kv_free_slots() == engine.kv_total_slots()
    assert engine.scheduler.reserved == [0]


def test_seeded_sampling_is_batch_invariant(engine):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.run_to_completion([EngineRequest("x", PROMPTS[3], SamplingParams(**params))])["x"].token_ids
    others = [EngineRequest(f"o{i}", p, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
              for i, p in enumerate(PROMPTS[:5])]
    batch = others[:2] + [EngineRequest("y", PROMPTS[3], SamplingParams(**params))] + others[2:]
    together = engine.run_to_completion(batch)["y"].token_ids
    assert alone == together
    unseeded = engine.run_to_completion([EngineRequest("z", PROMPTS[3], SamplingParams(**{**params, "seed": 99}))])
    assert unseeded["z"].token_ids != alone


def test_stop_string_cuts_text_exactly(engine):
    full = engine.run_to_completion([EngineRequest("f", PROMPTS[3], greedy(24))])["f"]
    text = full.text
    assert len(text) > 12
    stop = text[8:12]
    cut = engine.run_to_completion([EngineRequest("c", PROMPTS[3], greedy(24, stop=[stop]))])["c"]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_stop_token_ids_and_max_tokens(engine):
    full = engine.run_to_completion([EngineRequest("f2", PROMPTS[2], greedy(10))])["f2"]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_id = full.token_ids[5]
    cut = engine.run_to_completion([EngineRequest("c2", PROMPTS[2], greedy(10, stop_token_ids=[stop_id]))])["c2"]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_logprobs(engine):
    out = engine.run_to_completion([EngineRequest("lp", PROMPTS[2], greedy(3, logprobs=3))])["lp"]
    assert len(out.logprobs) == 3
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", {"temperature": -0.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -2}),
    ("max_tokens", {"max_tokens": 0}),
])
def test_invalid_sampling_parameters_are_refused_and_engine_keeps_serving(engine, field, kwargs):
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(EngineRequest("bad", PROMPTS[1], SamplingParams(**kwargs)))
    assert err.value.field == field
    assert engine.run_to_completion([EngineRequest("ok", PROMPTS[1], greedy(2))])["ok"].finish_reason == "length"


def test_prompt_longer_than_context_is_refused(engine):
    ctx = engine.model_config.max_position_embeddings
    with pytest.raises(InvalidRequestError, match="longer than the model's context") as err:
        engine.add_request(EngineRequest("long", [5] * (ctx + 1), greedy(1)))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(EngineRequest("vocab", [10**7], greedy(1)))
    assert err.value.field == "prompt"


def test_async_engine_cancel_frees_kv(tiny_ckpt):
    engine = AsyncEngine(make_engine(tiny_ckpt))

    async def run():
        total = engine.kv_total_slots()
        got = []
        async for d in engine.generate(EngineRequest("as", PROMPTS[4], greedy(200))):
            got += d.token_ids
            if len(got) >= 5:
                break  # the client goes away mid-stream
        for _ in range(100):
            if engine.in_flight() == 0 and not engine.engine.has_work():
                break
            await asyncio.sleep(0.02)
        engine.engine.flush_cache()
        return total, engine.kv_free_slots(), got

    try:
        total, free, got = asyncio.run(run())
    finally:
        engine.shutdown()
    assert len(got) >= 5 and free == total


def test_requests_arriving_together_share_one_prefill(tiny_ckpt):
    engine = make_engine(tiny_ckpt, page_size=4, chunked_prefill_tokens=32, max_batch_tokens=64)
    prefix = [0] + [2000 + 3 * i for i in range(99)]
    prompts = [prefix + [50 + i, 60 + i, 70 + i] for i in range(4)]
    out = engine.run_to_completion([EngineRequest(f"t{i}", p, greedy(4)) for i, p in enumerate(prompts)])
    # the prefix is computed once; later requests wait for it to land in the radix cache
    assert engine.stats.prefill_tokens <= len(prompts[0]) + 3 * (len(prompts[0]) - 100 + 4)
    assert sorted(o.cached_tokens for o in out.values())[1:] == [100, 100, 100]
    assert [out[f"t{i}"].token_ids for i in range(4)] == hf_greedy(tiny_ckpt, prompts, 4)


def test_expert_load_sliding_window(tiny_ckpt):
    import time as _time

    engine = make_engine(tiny_ckpt)
    engine.run_to_completion([EngineRequest("e1", PROMPTS[3], greedy(4))])
    first = torch.tensor(engine.executor.expert_load())
    _time.sleep(1.1)
    engine.run_to_completion([EngineRequest("e2", PROMPTS[1], greedy(4))])
    total = torch.tensor(engine.executor.expert_load())
    recent = torch.tensor(engine.executor.expert_load(window_s=0.5))
    k = engine.model_config.num_experts_per_tok
    moe_layers = total.shape[1]
    tokens_e2 = len(PROMPTS[1]) + 3  # prompt + 3 decode steps (the 4th token is sampled, not fed)
    assert int(first.sum()) == (len(PROMPTS[3]) + 3) * k * moe_layers
    assert int(recent.sum()) == tokens_e2 * k * moe_layers
    assert torch.equal(total, first + recent)
