"""Small helpers the engine tests share: greedy request batches and running them to completion."""
from __future__ import annotations

from expertmesh.actors.sampling_params import SamplingParams
from expertmesh.cluster.engine.types import EngineRequest

N = 12  # new tokens per request


def greedy_reqs(prompts, tag: str, n: int = N) -> list[EngineRequest]:
    return [EngineRequest(f"{tag}{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]


def run(engine, reqs) -> list[list[int]]:
    """Each request's tokens, in order; fails on any request error."""
    out = engine.run_to_completion(reqs)
    assert all(o.error is None for o in out.values()), [o.error for o in out.values()]
    return [out[r.request_id].token_ids for r in reqs]
