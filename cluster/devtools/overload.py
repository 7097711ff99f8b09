"""Overload at the front door, driven from processes of their own: a router, and a client that
sends bursts of concurrent Generate calls and times each refusal.

A user's client is not in the router's process (nor in the replica's): measured from one, a
refusal also pays for the other side's GIL. `tests/test_front_door.py` and
`benchmarks/bench_overload.py` both run these as separate processes.

    python -m expertmesh.cluster.devtools.overload router r0=127.0.0.1:PORT     # prints its address
    python -m expertmesh.cluster.devtools.overload client 127.0.0.1:PORT --concurrency 200 --bursts 3

The client prints one JSON object per burst: seconds to each refusal (`refused`, RESOURCE_EXHAUSTED)
and to each served request's end (`served`), refusals by the router's door (`at_router`, "retry
later") and by a replica (`by_replica`), served requests that came back short (`short`) and any
other status (`other`); with `--second-after S`, also the refusals of a second burst sent S
seconds later, while the first still holds every slot (`refused_while_full`, `served_second`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

DOOR_REFUSAL = "retry later"  # the router's own refusal says so; a replica's does not


async def burst(address: str, concurrency: int, max_tokens: int, timeout_s: float = 120.0,
                list_models: bool = False, second_after_s: float | None = None) -> dict:
    """One burst of `concurrency` calls at once on one channel. `list_models`: ListModels calls
    instead (grpc's own per-call cost, the floor under any refusal), timed as `served`.
    `second_after_s`: that long after the burst, a second one of the same size, while the first's
    admitted requests still hold every slot: its refusals (`refused_while_full`) cost the router
    only the door, with no admitted request's work beside them."""
    import grpc
    from grpc import aio

    from expertmesh.v1 import generate_pb2, generate_pb2_grpc

    out: dict = {"refused": [], "served": [], "other": [], "at_router": 0, "by_replica": 0, "short": 0,
                 "refused_while_full": [], "served_second": 0}
    async with aio.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        await stub.ListModels(generate_pb2.ListModelsRequest(), timeout=30)  # connected before timing
        requests = []
        for i in range(concurrency):
            req = generate_pb2.GenerateRequest(sampling=generate_pb2.SamplingParams(max_tokens=max_tokens,
                                                                                    ignore_eos=True))
            req.token_ids.ids.extend([0, 5 + i % 50, 6])
            requests.append(req)

        async def one(req: generate_pb2.GenerateRequest, second: bool = False) -> None:
            t0 = time.monotonic()
            if list_models:
                await stub.ListModels(generate_pb2.ListModelsRequest(), timeout=timeout_s)
                out["served"].append(time.monotonic() - t0)
                return
            try:
                n = 0
                async for msg in stub.Generate(req, timeout=timeout_s):
                    n += len(msg.token_ids)
                if second:  # a slot had freed already (a fast engine): not part of the first burst
                    out["served_second"] += 1
                else:
                    out["served"].append(time.monotonic() - t0)
                out["short"] += n != max_tokens
            except aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    out["refused_while_full" if second else "refused"].append(time.monotonic() - t0)
                    out["at_router" if DOOR_REFUSAL in (exc.details() or "") else "by_replica"] += 1
                else:
                    out["other"].append(f"{exc.code().name}: {exc.details()}")

        async def second_wave() -> None:
            if second_after_s is not None:
                await asyncio.sleep(second_after_s)
                await asyncio.gather(*(one(r, second=True) for r in requests))

        await asyncio.gather(second_wave(), *(one(r) for r in requests))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def serve_router(replicas: list[str], probe_interval_s: float = 0.2) -> None:
    from expertmesh.cluster.router.config import RouterConfig
    from expertmesh.cluster.router.server import RouterServer

    router = RouterServer(RouterConfig(grpc_port=0, replicas=replicas, probe_interval_s=probe_interval_s))
    await router.start()
    print(router.grpc_address, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin (or kills us)
    await router.stop(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("router", help="serve a router in front of REPLICA (id=host:port); print its address")
    r.add_argument("replicas", nargs="+")
    r.add_argument("--probe-interval", type=float, default=0.2)
    c = sub.add_parser("client", help="send bursts of concurrent Generate calls to ADDRESS")
    c.add_argument("address")
    c.add_argument("--concurrency", type=int, default=200)
    c.add_argument("--max-tokens", type=int, default=8)
    c.add_argument("--bursts", type=int, default=1)
    c.add_argument("--warm", type=int, default=8, help="requests sent once before the bursts (0: none)")
    c.add_argument("--pause", type=float, default=0.5, help="seconds between bursts")
    c.add_argument("--list-models", action="store_true", help="ListModels calls instead: the floor")
    c.add_argument("--second-after", type=float, default=None, help="a second burst this long after each")
    args = p.parse_args(argv)
    if args.cmd == "router":
        asyncio.run(serve_router(args.replicas, args.probe_interval))
        return
    if args.warm:
        asyncio.run(burst(args.address, args.warm, args.max_tokens))
    for i in range(args.bursts):
        if i:
            time.sleep(args.pause)
        out = asyncio.run(burst(args.address, args.concurrency, args.max_tokens, list_models=args.list_models,
                                second_after_s=args.second_after))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
