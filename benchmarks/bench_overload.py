"""Overload at the front door: how fast refusals come back when a burst exceeds a replica's slots.

Three processes on 127.0.0.1, so neither side's GIL slows the other: a replica (the real tiny
model, `--max-running` slots and a `--max-waiting` queue; or the model-free synthetic engine), the
router, and this client (grpc.aio, `--concurrency` Generate calls at once; the burst driver is
cluster/devtools/overload.py, which the overload test runs too). Reports refusal latency p50/p99
(RESOURCE_EXHAUSTED), how many were served and refused where (the router's door or the replica),
and, with `--profile FILE`, a py-spy profile of the router process during the bursts.

    .venv/bin/python benchmarks/bench_overload.py --bursts 5
    .venv/bin/python benchmarks/bench_overload.py --bursts 3 --profile /tmp/router.txt
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchlib
from expertmesh.cluster.devtools.overload import burst, pct

log = logging.getLogger("bench_overload")


def _replica_proc(ckpt: str, engine: str, max_running: int, max_waiting: int, q: mp.Queue) -> None:
    benchlib.setup_env(1)
    from expertmesh.cluster.engine.grpc_service import EngineServer

    if engine == "synthetic":
        from expertmesh.cluster.devtools.synthetic import SyntheticEngine

        eng = SyntheticEngine(ckpt, token_interval_s=0.02, max_running=max_running)
    else:
        from expertmesh.cluster.engine.async_engine import AsyncEngine
        from expertmesh.cluster.engine.engine import Engine, EngineConfig
        from expertmesh.cluster.engine.scheduler import SchedulerConfig

        sched = SchedulerConfig(kv_tokens_per_rank=8192, page_size=16, max_waiting_requests=max_waiting,
                                max_running_requests=max_running)
        eng = AsyncEngine(Engine(EngineConfig(ckpt, scheduler=sched)))

    async def main() -> None:
        server = EngineServer(eng, replica_id="r0", tokenizer_path=ckpt)
        q.put(await server.start())
        await asyncio.Event().wait()

    asyncio.run(main())


def _router_proc(replica: str, q: mp.Queue) -> None:
    from expertmesh.cluster.router.config import RouterConfig
    from expertmesh.cluster.router.server import RouterServer

    async def main() -> None:
        router = RouterServer(RouterConfig(grpc_port=0, replicas=[f"r0={replica}"], probe_interval_s=0.2))
        await router.start()
        q.put(router.grpc_address)
        await asyncio.Event().wait()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["tiny", "synthetic"], default="tiny")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--max-waiting", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--bursts", type=int, default=5)
    p.add_argument("--second-after", type=float, default=1.0,
                   help="a second burst this long after each (all slots still held): refusals at the door alone")
    p.add_argument("--profile", default=None, help="py-spy the router during the bursts; write its output here")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ckpt = str(benchlib.ensure_checkpoint("tiny"))
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_replica_proc, args=(ckpt, args.engine, args.max_running, args.max_waiting, q),
                         daemon=True)]
    procs[0].start()
    replica = q.get(timeout=300)
    procs.append(ctx.Process(target=_router_proc, args=(replica, q), daemon=True))
    procs[1].start()
    address = q.get(timeout=300)
    spy = None
    try:
        asyncio.run(burst(address, 8, args.max_tokens))  # warm
        if args.profile:
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen([spy_bin, "record", "-p", str(procs[1].pid), "-o", args.profile, "-f", "raw",
                                    "-r", "200"] + (["--idle"] if os.environ.get("SPY_IDLE") else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
        floor = []  # 200 concurrent ListModels: grpc's own per-call cost, under any refusal
        for _ in range(args.bursts):
            floor += asyncio.run(burst(address, args.concurrency, args.max_tokens, list_models=True))["served"]
        runs, router_cpu = [], 0.0
        for _ in range(args.bursts):
            c0 = cpu_seconds(procs[1].pid)
            runs.append(asyncio.run(burst(address, args.concurrency, args.max_tokens,
                                          second_after_s=args.second_after)))
            router_cpu += cpu_seconds(procs[1].pid) - c0
            time.sleep(0.5)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
            if spy.returncode:
                log.warning("py-spy: %s", err.decode()[-500:])
        for proc in procs:
            proc.kill()
    refused = [x for r in runs for x in r["refused"]]
    out = {"engine": args.engine, "concurrency": args.concurrency, "bursts": args.bursts,
           "max_running": args.max_running, "max_waiting": args.max_waiting,
           "served_per_burst": [len(r["served"]) for r in runs],
           "refused_by_replica_per_burst": [r["by_replica"] for r in runs], "refused": len(refused),
           "refused_at_router": sum(r["at_router"] for r in runs),
           "short": sum(r["short"] for r in runs), "other": sorted({c for r in runs for c in r["other"]}),
           "refusal_p50_ms": round(1000 * pct(refused, 0.5), 1), "refusal_p99_ms": round(1000 * pct(refused, 0.99), 1),
           "refusal_max_ms": round(1000 * max(refused, default=float("nan")), 1),
           "burst_p99_ms": [round(1000 * pct(r["refused"], 0.99), 1) for r in runs],
           "while_full_p50_ms": round(1000 * pct([x for r in runs for x in r["refused_while_full"]], 0.5), 1),
           "while_full_p99_ms": round(1000 * pct([x for r in runs for x in r["refused_while_full"]], 0.99), 1),
           "while_full_refused": sum(len(r["refused_while_full"]) for r in runs),
           "list_models_p50_ms": round(1000 * pct(floor, 0.5), 1), "list_models_p99_ms": round(1000 * pct(floor, 0.99), 1),
           "router_cpu_ms_per_request": round(1000 * router_cpu / (args.bursts * args.concurrency), 3),
           "served_p50_ms": round(1000 * statistics.median([x for r in runs for x in r["served"]] or [0]), 1),
           "load": os.getloadavg()[0]}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
