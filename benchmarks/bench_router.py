"""What the router costs, what Ray Serve's gRPC proxy would cost instead, and what cache-aware
routing buys.

  overhead  Router-added latency per request and per streamed token (p50/p99) against calling the
            replica's EngineService directly, and requests/s through each. The replica runs the
            model-free SyntheticEngine (so only transport and routing are measured) in its own
            process, the router in another, the client in this one: 3 processes on 127.0.0.1.
  serve     Streamed tokens through Ray Serve's gRPC proxy (a Serve deployment streaming
            GenerateResponse messages; the proxy binds [::]:PORT, we call 127.0.0.1:PORT) against
            the same stream through our router-owned grpcio server in front of a synthetic replica.
  cache     Prefix-cache hit rates of cache_aware vs round_robin on two real tiny-model replicas,
            8 tenants, over several seeds, for two orderings: shuffled rounds and a full shuffle.

    python benchmarks/bench_router.py overhead serve cache --json benchmarks/results/router.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

import benchlib
from grpc import aio

from expertmesh.v1 import engine_pb2, engine_pb2_grpc, generate_pb2, generate_pb2_grpc

log = logging.getLogger("bench_router")


# ---- server processes ---------------------------------------------------------------------------
def _replica_proc(ckpt: str, q: mp.Queue) -> None:
    from expertmesh.cluster.engine.grpc_service import EngineServer
    from expertmesh.cluster.devtools.synthetic import SyntheticEngine

    async def main() -> None:
        server = EngineServer(SyntheticEngine(ckpt, max_running=100_000), replica_id="bench-r0",
                              tokenizer_path=ckpt)
        q.put(await server.start())
        await asyncio.Event().wait()

    asyncio.run(main())


def _router_proc(replica: str, policy: str, q: mp.Queue) -> None:
    from expertmesh.cluster.router.config import RouterConfig
    from expertmesh.cluster.router.server import RouterServer

    async def main() -> None:
        router = RouterServer(RouterConfig(grpc_port=0, replicas=[f"bench-r0={replica}"], policy=policy))
        await router.start()
        q.put(router.grpc_address)
        await asyncio.Event().wait()

    asyncio.run(main())


def _spawn(target, *args) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    return p, q.get(timeout=120)


# ---- clients ------------------------------------------------------------------------------------
class Target:
    """One way to stream N tokens for a prompt: straight to the replica, or through a router."""

    def __init__(self, address: str, direct: bool, prompt_ids: list[int]) -> None:
        self.channel = aio.insecure_channel(address)
        if direct:
            stub = engine_pb2_grpc.EngineServiceStub(self.channel)
            self._call = lambda n, i: stub.Generate(engine_pb2.EngineGenerateRequest(
                request_id=f"direct-{i}", prompt_token_ids=prompt_ids,
                sampling=generate_pb2.SamplingParams(max_tokens=n)))
        else:
            stub = generate_pb2_grpc.GenerationStub(self.channel)
            self._call = lambda n, i: stub.Generate(generate_pb2.GenerateRequest(
                token_ids=generate_pb2.TokenIds(ids=prompt_ids), sampling=generate_pb2.SamplingParams(max_tokens=n)))

    async def stream(self, n: int, i: int = 0) -> tuple[float, list[float]]:
        """(total seconds, arrival times of each message relative to the start)."""
        t0 = time.perf_counter()
        arrivals = []
        async for _ in self._call(n, i):
            arrivals.append(time.perf_counter() - t0)
        return time.perf_counter() - t0, arrivals

    async def close(self) -> None:
        await self.channel.close()


def _cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process: robust to other load on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(xs: list[float], q: float) -> float:
    return benchlib.quantile(xs, q) * 1e3


async def _latency(target: Target, n_tokens: int, reps: int) -> dict:
    for i in range(20):  # warm up channels and code paths
        await target.stream(n_tokens, i)
    totals, gaps = [], []
    for i in range(reps):
        total, arrivals = await target.stream(n_tokens, i)
        totals.append(total)
        gaps += [b - a for a, b in zip(arrivals, arrivals[1:])]
    out = {"p50_ms": _ms(totals, 0.5), "p99_ms": _ms(totals, 0.99), "mean_ms": statistics.mean(totals) * 1e3}
    if gaps:
        out |= {"gap_p50_ms": _ms(gaps, 0.5), "gap_p99_ms": _ms(gaps, 0.99),
                "per_token_ms": statistics.mean(totals) * 1e3 / n_tokens}
    return out


async def _throughput(target: Target, concurrency: int, seconds: float, n_tokens: int) -> float:
    done, stop = 0, time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            await target.stream(n_tokens, w * 1_000_000 + i)
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - t0)


def bench_overhead(ckpt: Path, reps: int, stream_tokens: int, policy: str) -> dict:
    replica_p, replica = _spawn(_replica_proc, str(ckpt))
    router_p, router = _spawn(_router_proc, replica, policy)
    prompt = list(range(1000, 1064))

    async def run() -> dict:
        res: dict = {}
        for name, addr, direct in (("direct", replica, True), ("router", router, False)):
            t = Target(addr, direct, prompt)
            res[name] = {
                "request_1_token": await _latency(t, 1, reps),
                f"stream_{stream_tokens}_tokens": await _latency(t, stream_tokens, max(20, reps // 10)),
                "requests_per_s_c16_1tok": await _throughput(t, 16, 5.0, 1),
                "tokens_per_s_c16_stream": await _throughput(t, 16, 5.0, stream_tokens) * stream_tokens,
            }
            if not direct:  # the router process's own CPU per request and per streamed token
                c0 = _cpu_s(router_p.pid)
                for i in range(200):
                    await t.stream(1, i)
                c1 = _cpu_s(router_p.pid)
                for i in range(20):
                    await t.stream(stream_tokens, i)
                c2 = _cpu_s(router_p.pid)
                res[name]["router_cpu_ms_per_request"] = (c1 - c0) / 200 * 1e3
                res[name]["router_cpu_ms_per_token"] = ((c2 - c1) / 20 - (c1 - c0) / 200) / stream_tokens * 1e3
            await t.close()
        d, r = res["direct"], res["router"]
        k = f"stream_{stream_tokens}_tokens"
        res["router_added"] = {
            "per_request_p50_ms": r["request_1_token"]["p50_ms"] - d["request_1_token"]["p50_ms"],
            "per_request_p99_ms": r["request_1_token"]["p99_ms"] - d["request_1_token"]["p99_ms"],
            "per_token_mean_ms": r[k]["per_token_ms"] - d[k]["per_token_ms"],
            "per_token_gap_p50_ms": r[k]["gap_p50_ms"] - d[k]["gap_p50_ms"],
            "per_token_gap_p99_ms": r[k]["gap_p99_ms"] - d[k]["gap_p99_ms"],
        }
        return res

    try:
        return asyncio.run(run())
    finally:
        for p in (router_p, replica_p):
            p.kill()
            p.join()


# ---- Ray Serve's gRPC proxy -------------------------------------------------------------------------
def bench_serve(ckpt: Path, stream_tokens: int, reps: int) -> dict:
    """Serve proxy → Serve replica streaming N messages, vs our router → EngineService replica."""
    import tempfile

    from expertmesh.cluster.ray_cluster import local_env

    benchlib.setup_env()
    local_env()  # before Ray is imported: it reads the loopback switch at import
    import ray

    # address="local": a private cluster, never one another process on this machine started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="expertmesh-bench",
             _temp_dir=tempfile.mkdtemp(prefix="em-bench-ray-", dir="/tmp"))
    from ray import serve
    from ray.serve.config import gRPCOptions

    port = _free_port()  # not 9000: other Serve apps on this machine may hold it
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[
                    "expertmesh.v1.generate_pb2_grpc.add_GenerationServicer_to_server"]))

    # Access logs off, as ours: each logged call costs the Serve replica time.
    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000,
                      logging_config={"enable_access_log": False})
    class Streamer:
        def Generate(self, request: generate_pb2.GenerateRequest):
            n = request.sampling.max_tokens
            for i in range(n):
                yield generate_pb2.GenerateResponse(text=" hello", token_ids=[44388],
                                                    finish_reason=2 if i == n - 1 else 0)

    serve.run(Streamer.bind(), name="streamer", route_prefix="/streamer")
    replica_p, replica = _spawn(_replica_proc, str(ckpt))
    router_p, router = _spawn(_router_proc, replica, "round_robin")
    md = (("application", "streamer"),)

    async def serve_stream(stub, n: int) -> tuple[float, list[float]]:
        t0, arrivals = time.perf_counter(), []
        async for _ in stub.Generate(generate_pb2.GenerateRequest(text="hi", sampling=generate_pb2.SamplingParams(
                max_tokens=n)), metadata=md):
            arrivals.append(time.perf_counter() - t0)
        return time.perf_counter() - t0, arrivals

    async def run() -> dict:
        out: dict = {}
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # Serve binds [::]:port; we stay on loopback
            stub = generate_pb2_grpc.GenerationStub(ch)
            for n in (1, stream_tokens):
                for _ in range(5):
                    await serve_stream(stub, n)
                totals, gaps = [], []
                for _ in range(reps if n == 1 else max(10, reps // 10)):
                    total, arr = await serve_stream(stub, n)
                    totals.append(total)
                    gaps += [b - a for a, b in zip(arr, arr[1:])]
                out[f"serve_proxy_{n}"] = {"p50_ms": _ms(totals, 0.5), "p99_ms": _ms(totals, 0.99),
                                           **({"gap_p50_ms": _ms(gaps, 0.5), "per_token_ms":
                                               statistics.mean(totals) * 1e3 / n} if gaps else {})}
        t = Target(router, False, list(range(1000, 1064)))
        out["our_router_1"] = await _latency(t, 1, reps)
        out[f"our_router_{stream_tokens}"] = await _latency(t, stream_tokens, max(10, reps // 10))
        await t.close()
        return out

    try:
        return asyncio.run(run())
    finally:
        for p in (router_p, replica_p):
            p.kill()
            p.join()
        serve.shutdown()
        ray.shutdown()


# ---- cache-aware vs round-robin ------------------------------------------------------------------------
def bench_cache(ckpt: Path, seeds: list[int], kv_tokens: int, rounds: int) -> dict:
    sys.path.insert(0, str(benchlib.REPO / "tests"))
    from _router_env import LoopThread, real_engine, start_replica, start_router
    from test_router_cache import WORDS, tenant_prompts

    from expertmesh.cluster.router.client import GenerationClient

    def orders(seed: int) -> dict[str, list[tuple[int, int]]]:
        rng = random.Random(seed)
        by_rounds = []
        for i in range(rounds):
            r = [(t, i) for t in range(8)]
            rng.shuffle(r)
            by_rounds += r
        full = [(t, i) for t in range(8) for i in range(rounds)]
        random.Random(seed).shuffle(full)
        return {"shuffled_rounds": by_rounds, "full_shuffle": full}

    lt = LoopThread()
    results: dict = {"kv_tokens_per_replica": kv_tokens, "rounds": rounds, "tenants": 8, "runs": []}
    for seed in seeds:
        for kind, order in orders(seed).items():
            engines = [real_engine(ckpt, kv_tokens=kv_tokens) for _ in range(2)]
            servers = [start_replica(lt, e, ckpt, replica_id=f"r{i}") for i, e in enumerate(engines)]
            addrs = [f"r{i}={s.address}" for i, s in enumerate(servers)]
            rates = {}
            for policy in ("round_robin", "cache_aware"):
                router = start_router(lt, addrs, policy=policy)
                prompts, cached, total = tenant_prompts(f"{policy}-{seed}", seed), 0, 0
                with GenerationClient(router.grpc_address, timeout=60) as c:
                    for tenant, i in order:
                        out = c.chat_complete([{"role": "system", "content": prompts[tenant]},
                                               {"role": "user", "content": f"Question {i}: tell me about "
                                                f"{WORDS[(tenant * 7 + i) % len(WORDS)]}."}], max_tokens=2,
                                              temperature=0.0)
                        cached += out.usage["cached_tokens"]
                        total += out.usage["prompt_tokens"]
                rates[policy] = cached / total
                lt.run(router.stop(0))
            for s in servers:
                lt.run(s.stop(0))
            for e in engines:
                e.shutdown()
            ratio = rates["cache_aware"] / max(rates["round_robin"], 1e-9)
            results["runs"].append({"seed": seed, "order": kind, **rates, "ratio": ratio})
            log.info("seed %d %-15s rr %.3f ca %.3f ratio %.2f", seed, kind, rates["round_robin"],
                     rates["cache_aware"], ratio)
    lt.close()
    for kind in ("shuffled_rounds", "full_shuffle"):
        ratios = sorted(r["ratio"] for r in results["runs"] if r["order"] == kind)
        results[kind] = {"min_ratio": ratios[0], "median_ratio": statistics.median(ratios),
                         "runs_below_2x": sum(r < 2 for r in ratios), "runs": len(ratios)}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["overhead", "serve", "cache"])
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--kv-tokens", type=int, default=1152)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ckpt = benchlib.ensure_checkpoint("tiny")
    report: dict = {"machine": benchlib.machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    if "overhead" in args.parts:
        report["overhead"] = bench_overhead(ckpt, args.reps, args.stream_tokens, args.policy)
        print(json.dumps(report["overhead"], indent=2))
    if "serve" in args.parts:
        report["serve"] = bench_serve(ckpt, args.stream_tokens, max(50, args.reps // 4))
        print(json.dumps(report["serve"], indent=2))
    if "cache" in args.parts:
        report["cache"] = bench_cache(ckpt, [int(s) for s in args.seeds.split(",")], args.kv_tokens, args.rounds)
        print(json.dumps({k: v for k, v in report["cache"].items() if k != "runs"}, indent=2))
    if args.json:
        benchlib.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
