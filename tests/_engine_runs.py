"""Small helpers the engine tests share: greedy request batches and running them to completion."""
from __future__ import annotations

import torch

from expertmesh.actors.forward_batch import ForwardBatch

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


def ep_and_local_outputs(ep_weights, local_weights, store, gen: torch.Generator, tokens: int = 10, k: int = 3):
    """(EP backend's output on `ep_weights` over a 1-rank gloo group, local backend's on
    `local_weights`) for the same random bf16 tokens and routing."""
    import torch.distributed as dist

    from expertmesh.actors.model.ep import ExpertParallelExperts
    from expertmesh.actors.model.experts import LocalExperts

    n, hidden = ep_weights.count, ep_weights.hidden
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        ep = ExpertParallelExperts(ep_weights, dist.group.WORLD, 1, n)
        return ep(x, ids, weights), LocalExperts(local_weights)(x, ids, weights)
    finally:
        dist.destroy_process_group()


def prefill_then_decode(worker, prompts: list[list[int]], steps: int = 3) -> list[torch.Tensor]:
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
