"""Decode tok/s at R1's sampling defaults vs greedy, same engine, one run: what top-p costs, with
the full-sort top-k/top-p (old) and the fast exact path (new) side by side; then the sampler alone.

    .venv/bin/python benchmarks/bench_sampling.py                 # both parts
    .venv/bin/python benchmarks/bench_sampling.py --sampler-only  # no engine, ~1 min
    .venv/bin/python benchmarks/bench_sampling.py --engine-only

The engine part runs the `small` random-weight checkpoint: its logits are nearly flat (the top-p
0.95 nucleus holds ~64k of 129,280 tokens), the worst case for the fast path, which then often
falls back to the sort. The sampler part times 129,280-logit rows of two shapes: "lm" (a long low
tail and a few strong candidates, as a trained model's) and "flat" (as the random checkpoint's).
"""
import argparse
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import benchlib  # noqa: E402

benchlib.setup_env(2)
import expertmesh.actors.sampler as sampler_mod  # noqa: E402
from expertmesh.actors.sampling_params import SamplingParams  # noqa: E402

VOCAB = 129280


class FastCounter:
    """Counts rows the fast path decided vs sent to the reference."""

    def __init__(self):
        self.fast = self.slow = 0
        self._real = sampler_mod._fast_row

    def __call__(self, *a, **kw):
        res = self._real(*a, **kw)
        if res is None:
            self.slow += 1
        else:
            self.fast += 1
        return res


def engine_part(repeats: int) -> None:
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig
    from expertmesh.cluster.engine.types import EngineRequest

    ck = benchlib.ensure_checkpoint("small")
    e = Engine(EngineConfig(str(ck), dtype="float32", scheduler=SchedulerConfig(kv_tokens_per_rank=16384, max_running_requests=8)))
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 120000) for _ in range(256)] for _ in range(4)]
    n_new = 40
    counter = FastCounter()
    sampler_mod._fast_row = counter
    modes = [("greedy", dict(temperature=0), None),
             ("seeded 0.6/0.95 old", dict(temperature=0.6, top_p=0.95, seed=5), False),
             ("seeded 0.6/0.95 new", dict(temperature=0.6, top_p=0.95, seed=5), True),
             ("unseeded 0.6/0.95 old", dict(temperature=0.6, top_p=0.95), False),
             ("unseeded 0.6/0.95 new", dict(temperature=0.6, top_p=0.95), True)]
    rates: dict[str, list[float]] = {m[0]: [] for m in modes}
    tokens: dict[str, list[int]] = {}
    for rep in range(repeats):
        for name, kw, fast in modes:  # alternating within each repeat
            if fast is not None:
                sampler_mod._FAST_DEFAULT = fast
            reqs = [EngineRequest(f"{name}{rep}-{i}", p, SamplingParams(max_tokens=n_new, ignore_eos=True, **kw))
                    for i, p in enumerate(prompts)]
            e.flush_cache()
            t0 = time.perf_counter()
            outs = e.run_to_completion(reqs)
            dt = time.perf_counter() - t0
            rates[name].append(len(prompts) * n_new / dt)
            if kw.get("seed") is not None:
                tokens[name] = [t for r in reqs for t in outs[r.request_id].token_ids]
            print(f"  repeat {rep}: {name}: {rates[name][-1]:.1f} tok/s ({dt:.1f}s)", flush=True)
    sampler_mod._FAST_DEFAULT = True
    sampler_mod._fast_row = counter._real
    e.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nengine, small checkpoint fp32, batch {len(prompts)} x ({len(prompts[0])} prompt + {n_new} new), "
          f"medians of {repeats}:")
    for name, v in med.items():
        print(f"  {name:24s} {v:6.1f} tok/s   / greedy {v / med['greedy']:.2f}")
    for kind in ("seeded", "unseeded"):
        print(f"  {kind}: new / old {med[kind + ' 0.6/0.95 new'] / med[kind + ' 0.6/0.95 old']:.2f}")
    print(f"  fast path decided {counter.fast} rows, fell back on {counter.slow} "
          f"({counter.slow / max(1, counter.fast + counter.slow):.0%})")
    print(f"  seeded tokens old == new: {tokens['seeded 0.6/0.95 old'] == tokens['seeded 0.6/0.95 new']}")


def _logits(kind: str, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "lm":
        x = torch.randn(rows, VOCAB, generator=g) * 2.0
        heads = torch.randint(0, VOCAB, (rows, 40), generator=g)
        x.scatter_add_(1, heads, torch.rand(rows, 40, generator=g) * 12)
    else:  # flat, as the random-weight checkpoint's (temperature 0.6 gives ~64k-token nuclei)
        x = torch.randn(rows, VOCAB, generator=g) * 0.75
    return x.to(torch.bfloat16)


def sampler_part(repeats: int) -> None:
    torch.set_num_threads(1)  # shared machine: one thread, stable ratios
    print("\nsampler alone (Sampler call, bf16 logits -> token, temperature 0.6, top_p 0.95, seeded), "
          f"1 thread, median ms of {repeats}:")
    print(f"  {'logits':6s} {'rows':>4s} {'old ms':>8s} {'new ms':>8s} {'old/new':>8s} {'fallback':>8s}")
    for kind in ("lm", "flat"):
        for rows in (1, 4, 32):
            params = [SamplingParams(temperature=0.6, top_p=0.95, seed=s) for s in range(rows)]
            x = _logits(kind, rows, seed=rows)
            times = {False: [], True: []}
            toks = {}
            counter = FastCounter()
            sampler_mod._fast_row = counter
            for _ in range(repeats):
                for fast in (False, True):
                    sampler_mod._FAST_DEFAULT = fast
                    states = [sampler_mod.SamplingState(p, [1, 2]) for p in params]
                    t0 = time.perf_counter()
                    res = sampler_mod.Sampler(seed=0)(x, states)
                    times[fast].append(time.perf_counter() - t0)
                    toks[fast] = res.token_ids
            sampler_mod._fast_row = counter._real
            sampler_mod._FAST_DEFAULT = True
            assert toks[True] == toks[False], "fast path changed a token"
            old, new = (statistics.median(times[f]) * 1e3 for f in (False, True))
            fb = counter.slow / max(1, counter.fast + counter.slow)
            print(f"  {kind:6s} {rows:4d} {old:8.1f} {new:8.1f} {old / new:8.2f} {fb:8.0%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sampler-only", action="store_true")
    ap.add_argument("--engine-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not args.sampler_only:
        engine_part(args.repeats)
    if not args.engine_only:
        sampler_part(max(3, args.repeats))


if __name__ == "__main__":
    main()
