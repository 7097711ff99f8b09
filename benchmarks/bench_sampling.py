"""Decode tok/s at R1's sampling defaults vs greedy, same engine, one run: what top-p costs.

    .venv/bin/python benchmarks/bench_sampling.py
"""
import time, torch, sys
sys.path.insert(0, "benchmarks")
import benchlib
benchlib.setup_env(2)
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig
from expertmesh.cluster.engine.types import EngineRequest
from expertmesh.actors.sampling_params import SamplingParams
ck = benchlib.ensure_checkpoint("small")
e = Engine(EngineConfig(str(ck), dtype="float32", scheduler=SchedulerConfig(kv_tokens_per_rank=16384, max_running_requests=8)))
import random
rng = random.Random(1)
prompts = [[rng.randrange(2, 120000) for _ in range(256)] for _ in range(4)]
for name, kw in [("greedy", dict(temperature=0)), ("seeded 0.6/0.95", dict(temperature=0.6, top_p=0.95, seed=5)),
                 ("unseeded 0.6/0.95", dict(temperature=0.6, top_p=0.95))]:
    reqs = [EngineRequest(f"{name}{i}", p, SamplingParams(max_tokens=40, ignore_eos=True, **kw)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter(); e.run_to_completion(reqs); dt = time.perf_counter() - t0
    print(f"{name}: {4*40/dt:.1f} tok/s ({dt:.1f}s)", flush=True)
e.shutdown()
