"""FP8 weights kept resident vs dequantized at load, same engine, same process, one run.

On the `small` preset written in FP8 (benchmarks/results/ckpt-small-fp8), bf16 compute: each
side's resident weight bytes (what the rank holds, from `weight_bytes`), its greedy tokens (equal:
both sides run the same kernels on the same values, the resident side dequantizing inside them),
and decode throughput at batch 1 and batch 32, alternating which side runs first. On CPU the
resident path pays a per-element dequantization (a table lookup) inside every FP8 matmul, so on a
model whose weights sit in cache it is slower: it exists for memory (R1 on A100: 37.0 vs 70.1 GiB
per rank); on R1's shapes the FP8 projections stream half the bytes and beat bf16 at one row.

    .venv/bin/python benchmarks/bench_fp8.py --repeats 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import fmt, median  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    benchlib.setup_env(args.threads)
    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig
    from expertmesh.cluster.engine.types import EngineRequest

    ckpt = benchlib.ensure_checkpoint("small", fp8=True)
    sched = SchedulerConfig(kv_tokens_per_rank=16384, max_running_requests=32)
    engines = {name: Engine(EngineConfig(str(ckpt), dtype=args.dtype, keep_fp8=keep, scheduler=sched))
               for name, keep in (("resident", True), ("at-load", False))}
    for name, e in engines.items():
        wb = e.executor.describe()[0]["weight_bytes"]
        print(f"{name}: weights {sum(wb.values()) / 2**20:.1f} MiB "
              f"(fp8 {wb['fp8'] / 2**20:.1f}, scales {wb['scales'] / 2**20:.2f}, dense {wb['dense'] / 2**20:.1f})")
    prompts = benchlib.random_prompts(32, 128, 128, seed=3)
    results: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    for rep in range(args.repeats):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for batch in (1, 32):
            for name in order:
                reqs = [EngineRequest(f"{name}-{rep}-{batch}-{i}", p,
                                      SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True))
                        for i, p in enumerate(prompts[:batch])]
                t0 = time.perf_counter()
                out = engines[name].run_to_completion(reqs)
                dt = time.perf_counter() - t0
                results.setdefault((name, batch), []).append(batch * args.new_tokens / dt)
                tokens[(name, batch)] = [out[r.request_id].token_ids for r in reqs]
            r = results[("resident", batch)][-1] / results[("at-load", batch)][-1]
            print(f"repeat {rep} batch {batch}: resident {results[('resident', batch)][-1]:.1f} tok/s, "
                  f"at-load {results[('at-load', batch)][-1]:.1f} tok/s, ratio {r:.2f}", flush=True)
    for batch in (1, 32):
        same = tokens[("resident", batch)] == tokens[("at-load", batch)]
        ratios = [a / b for a, b in zip(results[("resident", batch)], results[("at-load", batch)])]
        print(f"batch {batch}: median resident {fmt(median(results[('resident', batch)]), 1)} / at-load "
              f"{fmt(median(results[('at-load', batch)]), 1)} tok/s; per-repeat ratios "
              f"{', '.join(f'{x:.2f}' for x in ratios)}; tokens equal: {same}")
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":
    main()
