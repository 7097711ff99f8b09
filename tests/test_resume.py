"""Resuming a request on another engine from its prompt plus the tokens already streamed (what the
router does when a replica or rank dies mid-stream): the continuation equals the fault-free run,
token for token and character for character, for greedy, seeded and penalised sampling, and a
stop string that straddles the resume point still stops the text."""
from __future__ import annotations

import pytest
import torch

from expertmesh.actors.sampling_params import SamplingParams
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig
from expertmesh.cluster.engine.types import EngineRequest

torch.set_num_threads(1)
PROMPT = [0, 15, 27, 31, 99, 7, 250, 11, 4, 5]


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    e = Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    yield e
    e.shutdown()


def run(engine: Engine, req: EngineRequest) -> list:
    engine.add_request(req)
    deltas = []
    while engine.has_work():
        deltas += [d for d in engine.step() if d.request_id == req.request_id]
    return deltas


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_p=0.9, seed=1234),
    dict(temperature=0.8, top_k=20, seed=7, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2),
], ids=["greedy", "seeded", "penalised"])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resumed_stream_equals_the_fault_free_one(engine, sampling, cut):
    params = SamplingParams(max_tokens=16, ignore_eos=True, **sampling)
    full = run(engine, EngineRequest("full", PROMPT, params))
    ids = [t for d in full for t in d.token_ids]
    text = "".join(d.text for d in full)
    streamed = [d for d in full if d.token_ids][:cut]  # what reached the client before the fault
    sent_ids = [t for d in streamed for t in d.token_ids]
    sent_text = "".join(d.text for d in streamed)
    engine.flush_cache()  # the other replica has nothing cached
    rest = run(engine, EngineRequest("resumed", PROMPT, params, resume_token_ids=sent_ids,
                                     resume_text_chars=len(sent_text)))
    assert sent_ids + [t for d in rest for t in d.token_ids] == ids
    assert sent_text + "".join(d.text for d in rest) == text
    final = rest[-1]
    assert final.finished and final.finish_reason == full[-1].finish_reason
    assert (final.prompt_tokens, final.completion_tokens) == (full[-1].prompt_tokens, full[-1].completion_tokens)


def test_a_stop_string_across_the_resume_point_still_stops(engine, tiny_ckpt):
    free = run(engine, EngineRequest("free", PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))
    text = "".join(d.text for d in free)
    ids = [t for d in free for t in d.token_ids]
    assert len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 4]  # somewhere in the middle of the text
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    stopped = run(engine, EngineRequest("stopped", PROMPT, params))
    want_text = "".join(d.text for d in stopped)
    want_ids = [t for d in stopped for t in d.token_ids]
    assert want_text == text[: text.index(stop)]
    for cut in range(1, len(want_ids)):  # a fault after every token the stopped stream sent
        sent, chars, n = [], 0, 0
        for d in stopped:
            if n >= cut:
                break
            sent += d.token_ids
            chars += len(d.text)
            n += len(d.token_ids)
        engine.flush_cache()
        rest = run(engine, EngineRequest(f"r{cut}", PROMPT, params, resume_token_ids=sent, resume_text_chars=chars))
        assert want_text[:chars] + "".join(d.text for d in rest) == want_text, cut
        assert sent + [t for d in rest for t in d.token_ids] == want_ids, cut
        assert rest[-1].finish_reason == "stop"
    assert ids[: len(want_ids)] == want_ids


# ---- through the router: a replica whose group fails in prefill or in decode -------------------
class FailingExecutor:
    """The real local executor, failing its group on step `fail_at` the way a dead rank does."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.steps, self.failed = inner, fail_at, 0, None

    def step(self, inputs):
        from expertmesh.cluster.engine.executor import GroupFailure

        self.steps += 1
        if self.failed or self.steps == self.fail_at:
            self.failed = self.failed or f"rank 0 failed in a step (injected at step {self.fail_at})"
            raise GroupFailure(self.failed)
        return self.inner.step(inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("fail_at", [1, 6], ids=["in-prefill", "in-decode"])
def test_router_resumes_a_stream_whose_replica_group_fails(tiny_ckpt, fail_at):
    from _router_env import LoopThread, real_engine, start_replica, start_router
    from expertmesh.cluster.router.client import GenerationClient

    lt = LoopThread()
    broken, healthy = real_engine(tiny_ckpt), real_engine(tiny_ckpt)
    broken.engine.executor = FailingExecutor(broken.engine.executor, fail_at)
    a = start_replica(lt, broken, tiny_ckpt, replica_id="a-breaks")
    b = start_replica(lt, healthy, tiny_ckpt, replica_id="b-healthy")
    router = start_router(lt, replicas=[f"a-breaks={a.address}"], policy="round_robin")
    kw = dict(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    try:
        # fault-free reference from the healthy replica alone
        ref_router = start_router(lt, replicas=[f"b-healthy={b.address}"])
        with GenerationClient(ref_router.grpc_address, timeout=60) as c:
            want = c.complete(PROMPT, **kw)
        lt.run(ref_router.stop(0))
        # the failing replica takes the request; the healthy one joins as the group breaks
        router.source.set([f"a-breaks={a.address}", f"b-healthy={b.address}"])
        lt.run(router.watcher.poll_once())
        got = None
        with GenerationClient(router.grpc_address, timeout=60) as c:
            for _ in range(2):  # round robin: one of two requests starts on the failing replica
                got = c.complete(PROMPT, **kw)
                assert got.token_ids == want.token_ids and got.text == want.text
                assert got.usage == want.usage
        assert broken.engine.executor.failed  # it did fail under a request
        assert router.dispatcher.failures_total == 1
        assert all(r.replica_id != "a-breaks" for r in router.replicas.available())
        lt.run(router.stop(0))
    finally:
        lt.run(a.stop(0))
        lt.run(b.stop(0))
        for e in (broken, healthy):
            e.shutdown()
        lt.close()
