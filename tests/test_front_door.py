"""The front door under big inputs: a request over the size limit is refused at once with a code
of its own (gRPC INVALID_ARGUMENT naming the limit, HTTP 413 in OpenAI's error object), before the
body is read where the server allows it; a big prompt inside the limit is tokenized off the event
loop, so small requests around it keep their latency."""
from __future__ import annotations

import threading
import time

import grpc
import httpx2 as httpx  # the HTTP client the openai package ships with
import pytest

from _router_env import LoopThread, real_engine, start_replica, start_router
from expertmesh.cluster.router.client import GenerationClient

LIMIT = 4 << 20  # 4 MiB: the 3 MB prompts below are inside it, the 10 MB body is not


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    lt = LoopThread()
    engine = real_engine(tiny_ckpt, kv_tokens=4096)
    replica = start_replica(lt, engine, tiny_ckpt, replica_id="r0")
    router = start_router(lt, [f"r0={replica.address}"], http_port=0, max_request_bytes=LIMIT)
    yield router
    lt.run(router.stop(0))
    lt.run(replica.stop(0))
    engine.shutdown()
    lt.close()


def small_latencies(address: str, n: int = 20) -> list[float]:
    """n concurrent 2-token requests; their latencies."""
    out: list[float] = []

    def one() -> None:
        t0 = time.monotonic()
        with GenerationClient(address, timeout=60) as c:
            assert len(c.complete([0, 5, 6], max_tokens=2, ignore_eos=True).token_ids) == 2
        out.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == n
    return sorted(out)


def p99(xs: list[float]) -> float:
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def test_oversized_requests_get_their_own_refusal(env):
    with GenerationClient(env.grpc_address, timeout=60) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.complete("x" * (LIMIT + 10), max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED ("queue full")
    assert "router.max_request_bytes" in err.value.details()
    url = f"{env.http_address}/v1/completions"
    body = b'{"model": "", "prompt": "' + b"x" * (10 << 20) + b'", "max_tokens": 2}'
    t0 = time.monotonic()
    r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large" and "x-request-id" in r.headers

    def chunks():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * (1 << 20)

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert time.monotonic() - t0 < 30  # generous: both refused without parsing 10 MB of JSON
    with GenerationClient(env.grpc_address, timeout=60) as c:  # and the router serves on
        assert len(c.complete([0, 5, 6], max_tokens=2).token_ids) == 2


def test_a_big_prompt_costs_its_sender_not_the_others(env):
    small_latencies(env.grpc_address, 4)  # warm
    alone = p99(small_latencies(env.grpc_address))
    big_text = "hello world " * 250_000  # 3 MB: tokenizing it takes a while; then it is over the context
    errors: list[grpc.StatusCode] = []

    def big_grpc() -> None:
        with GenerationClient(env.grpc_address, timeout=120) as c:
            try:
                c.complete(big_text, max_tokens=2)
            except grpc.RpcError as exc:
                errors.append(exc.code())

    def big_http() -> None:
        r = httpx.post(f"{env.http_address}/v1/completions", json={"prompt": big_text, "max_tokens": 2}, timeout=120)
        errors.append(r.status_code)

    bigs = [threading.Thread(target=big_grpc), threading.Thread(target=big_http)]
    for t in bigs:
        t.start()
    time.sleep(0.2)  # the big ones are being read and tokenized
    during = p99(small_latencies(env.grpc_address))
    for t in bigs:
        t.join(120)
    assert sorted(map(str, errors)) == sorted(map(str, [grpc.StatusCode.INVALID_ARGUMENT, 400])), errors
    print(f"\nsmall-request p99 alone {alone * 1000:.0f} ms, beside a 3 MB gRPC + 3 MB HTTP prompt {during * 1000:.0f} ms")
    # generous: the big prompts still take a core of this shared 2-core machine (on the loop: ~5 s here)
    assert during < max(2 * alone, alone + 1.5)


@pytest.mark.parametrize("sampling, field", [
    (dict(temperature=9.0), "sampling.temperature"),
    (dict(temperature=1e30), "sampling.temperature"),
    (dict(top_k=10**9), "sampling.top_k"),
    (dict(stop=["x" * 1_000_000]), "sampling.stop"),
    (dict(stop_token_ids=list(range(100_000))), "sampling.stop_token_ids"),
    (dict(stop_token_ids=[10**8]), "sampling.stop_token_ids"),
])
def test_out_of_range_sampling_is_refused_naming_the_field(env, sampling, field):
    with GenerationClient(env.grpc_address, timeout=60) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.complete([0, 5, 6], max_tokens=2, **sampling)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
        assert len(c.complete([0, 5, 6], max_tokens=2).token_ids) == 2  # and the next request is served
    http_field = field.removeprefix("sampling.")
    r = httpx.post(f"{env.http_address}/v1/completions", json={"prompt": [0, 5, 6], "max_tokens": 2, **sampling},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == http_field, r.text[:300]


OVERLOAD_BURSTS, OVERLOAD_CONCURRENCY, MAX_RUNNING, MAX_WAITING = 3, 200, 32, 4


def test_overload_is_refused_fast_and_fills_every_running_slot(tiny_ckpt):
    """200 concurrent requests against 32 running slots and a 4-deep queue, the client and the
    router each in a process of its own (as a user's client is), the replica (the real tiny
    engine) here so its running count can be watched: the burst fills every running slot before
    anything is refused, refusals come from the router's door (it knows the replica's slots and
    queue from GetLoad and counts what it sent there), fast, and every admitted request finishes."""
    import json
    import subprocess
    import sys

    from expertmesh.cluster.devtools.overload import pct

    lt = LoopThread()
    engine = real_engine(tiny_ckpt, kv_tokens=8192, max_waiting=MAX_WAITING, max_running=MAX_RUNNING)
    replica = start_replica(lt, engine, tiny_ckpt, replica_id="r0")
    tool = [sys.executable, "-m", "expertmesh.cluster.devtools.overload"]
    router = subprocess.Popen(tool + ["router", f"r0={replica.address}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    peak, running = [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], engine.load().running)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        address = router.stdout.readline().strip()
        assert address, "the router process did not start"
        client = subprocess.run(tool + ["client", address, "--bursts", str(OVERLOAD_BURSTS), "--concurrency",
                                        str(OVERLOAD_CONCURRENCY), "--max-tokens", "8", "--second-after", "0.3"],
                                capture_output=True, text=True, timeout=240)
        assert client.returncode == 0, client.stderr[-2000:]
        bursts = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    finally:
        running[0] = False
        router.stdin.close()
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(5)
        watcher.join(5)
        lt.run(replica.stop(0))
        engine.shutdown()
        lt.close()
    assert len(bursts) == OVERLOAD_BURSTS
    refused = [x for b in bursts for x in b["refused"]]
    p50, p99 = pct(refused, 0.5), pct(refused, 0.99)
    while_full = [x for b in bursts for x in b["refused_while_full"]]
    print(f"\noverload, {OVERLOAD_BURSTS} bursts of {OVERLOAD_CONCURRENCY}: served {[len(b['served']) for b in bursts]}, "
          f"refused at the door {[b['at_router'] for b in bursts]}, by the replica {[b['by_replica'] for b in bursts]}; "
          f"refusal p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; a second burst while every slot is held: "
          f"{len(while_full)} refused, p50 {pct(while_full, 0.5) * 1000:.0f} ms, p99 {pct(while_full, 0.99) * 1000:.0f} ms; "
          f"peak running {peak[0]} of {MAX_RUNNING}")
    for b in bursts:
        assert b["other"] == [] and b["short"] == 0, b["other"][:3]  # every admitted request finished, whole
        assert len(b["served"]) + len(b["refused"]) == OVERLOAD_CONCURRENCY
        assert b["served_second"] + len(b["refused_while_full"]) == OVERLOAD_CONCURRENCY
        assert len(b["served"]) >= MAX_RUNNING
    assert peak[0] == MAX_RUNNING  # every running slot filled before the queue counted as full
    # the router's door refuses, not the replica (whose refusal waits for its busy event loop)
    # (before, 2-51 refusals a burst came from the replica; a stray one may race a probe)
    assert sum(b["by_replica"] for b in bursts) <= OVERLOAD_BURSTS
    # Goal 50 ms p99. Here 200 concurrent ListModels calls alone take 30-110 ms p99 (grpc's
    # per-call cost: the server accepts calls one at a time, and client, router and replica share
    # 2 cores with whatever else runs), and refusals 95-135 ms; so a generous bound, on the median
    # burst (a burst that a neighbour's CPU spike lands on says nothing of the router). On a slower
    # CI machine (AVX2-only, the whole suite 1.7x longer) the bursts' p99 were 0.25, 0.29, 0.45 s.
    per_burst = sorted(pct(b["refused"], 0.99) for b in bursts)
    assert per_burst[len(per_burst) // 2] <= 0.75, (p50, p99, per_burst)


@pytest.mark.parametrize("path, body, message, param", [
    ("/v1/completions", b'{"prompt": "hi", ', "not valid JSON", None),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', "could not be decoded", None),
    ("/v1/chat/completions", b'{"messages": [{"role": 5, "content": "x"}]}', "messages[0].role", "messages[0].role"),
])
def test_undecodable_bodies_get_openai_errors(env, path, body, message, param):
    r = httpx.post(env.http_address + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_a_full_replica_is_refused_at_the_router_until_a_slot_frees(tiny_ckpt):
    """After a replica refuses for a full queue, new requests are refused by the router itself
    (no tokenizing, no replica call) until one of its requests ends; then the next is served."""
    from expertmesh.cluster.devtools.synthetic import SyntheticEngine

    lt = LoopThread()
    replica = start_replica(lt, SyntheticEngine(tiny_ckpt, token_interval_s=0.05, max_running=1), tiny_ckpt, "r0")
    router = start_router(lt, [f"r0={replica.address}"], http_port=0)
    try:
        with GenerationClient(router.grpc_address, timeout=60) as c:
            long = c.generate([0, 5, 6], max_tokens=20, ignore_eos=True)  # holds the only slot ~1 s
            next(iter(long))
            details = []
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    c.complete([0, 5, 6], max_tokens=2)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details.append(err.value.details())
            assert "replica r0" in details[0] and all("retry later" in d for d in details[1:]), details
            r = httpx.post(f"{router.http_address}/v1/completions", json={"prompt": [0, 5], "max_tokens": 2}, timeout=60)
            assert r.status_code == 429 and "retry later" in r.json()["error"]["message"], r.text[:300]
            assert sum(len(m.token_ids) for m in long) == 19  # the held stream ends: its slot is free
            assert len(c.complete([0, 5, 6], max_tokens=2).token_ids) == 2
    finally:
        lt.run(router.stop(0))
        lt.run(replica.stop(0))
        lt.close()
