"""Faults lose nothing: a Serve app with two replicas (EP2 each) under 8 streaming clients; kill -9
one rank actor (its replica rebuilds the group in place), then one EngineReplica process (its
streams resume on the other replica). No request fails, and every completed stream equals,
token for token, the same prompt's stream without a fault (greedy and seeded sampling)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from _serve_env import deploy, small_app_config
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.cluster.router.registry import RegistryRef, get_registry

APP = "em-faults"
MAX_TOKENS = 24
PROMPTS = [[0] + [100 + 37 * i + j for j in range(12 + i)] for i in range(8)]


def sampling(i: int) -> dict:
    """Even clients greedy, odd ones seeded sampling (resumed draws must continue the same)."""
    base = dict(max_tokens=MAX_TOKENS, ignore_eos=True)
    return base | (dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.95, seed=1000 + i))


def stream(address: str, i: int) -> tuple[list[int], float]:
    """(token ids, the longest gap between two streamed messages)."""
    ids, gap, last = [], 0.0, time.monotonic()
    with GenerationClient(address, timeout=180) as c:
        for d in c.generate(PROMPTS[i], **sampling(i)):
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            ids += d.token_ids
    return ids, gap


def entries() -> list[dict]:
    import ray

    return ray.get(get_registry(RegistryRef(APP)).snapshot.remote())[1]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_ckpt):
    from ray import serve

    cfg = small_app_config(APP, tiny_ckpt, parallel={"collective_timeout_s": 20},
                           scheduler={"max_running_requests": 8}, router={"policy": "round_robin"},
                           autoscaling={"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2},
                           telemetry={"service_name": "em-faults", "metrics": False})
    address = deploy(cfg)
    wait_for(lambda: len(entries()) == 2, 240, "two replicas registered")

    def router_sees_two() -> bool:
        try:
            with GenerationClient(address, timeout=5) as c:
                return sum(r.healthy for r in c.load().replicas) == 2
        except Exception:  # noqa: BLE001 - the router is still starting
            return False

    wait_for(router_sees_two, 120, "the router to see both replicas")
    yield address
    serve.delete(APP)


def test_kill_rank_then_replica_loses_no_request_and_no_token(app):
    import ray

    reference = {i: stream(app, i)[0] for i in range(len(PROMPTS))}  # fault-free, one at a time
    assert all(len(ids) == MAX_TOKENS for ids in reference.values())
    failures: list[str] = []
    mismatches: list[int] = []
    done = [0]
    max_gap = [0.0]
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                ids, gap = stream(app, i)
            except Exception as exc:  # noqa: BLE001 - any failed request fails the test
                failures.append(f"client {i}: {exc!r}")
                continue
            max_gap[0] = max(max_gap[0], gap)
            if ids != reference[i]:
                mismatches.append(i)
            done[0] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 8, 120, "load to run")
        # 1. kill -9 one rank actor of one replica, mid-load
        victim = entries()[0]
        rank = json.loads(victim["metadata"]["ranks"])[1]
        actor = ray.get_actor(rank["actor_name"], namespace="expertmesh")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        t_kill = time.monotonic()
        before = done[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: done[0] >= before + 8, 120, "requests to complete after the rank kill")
        rank_recovered_s = time.monotonic() - t_kill

        def rebuilt() -> list:  # the replica re-formed its group in place and stayed registered
            e = next((e for e in entries() if e["replica_id"] == victim["replica_id"]), None)
            return json.loads(e["metadata"].get("rebuilds", "[]")) if e else []

        rebuild = wait_for(rebuilt, 30, "the replica to report its in-place rebuild")[-1]
        assert rebuild["ranks"] == [1], rebuild
        new_rank = json.loads(next(e for e in entries() if e["replica_id"] == victim["replica_id"])
                              ["metadata"]["ranks"])[1]
        assert new_rank["pid"] != pid and new_rank["actor_name"] != rank["actor_name"]
        # 2. kill -9 one EngineReplica process (the other one), while it holds requests
        victim = next(e for e in entries() if e["replica_id"] != victim["replica_id"])

        from ray import serve

        busy_polls = [0]

        def victim_busy() -> bool:  # the router's own count, not a probe's report up to 0.5 s old
            # on two polls in a row (0.2 s apart): a request that has just arrived has no token yet,
            # and a replica dying under it is a refusal the router retries, not a failure mid-stream
            status = serve.get_app_handle(APP).status.remote().result(timeout_s=30)
            busy = status["inflight"].get(victim["replica_id"], 0) >= 2
            busy_polls[0] = busy_polls[0] + 1 if busy else 0
            return busy_polls[0] >= 2

        wait_for(victim_busy, 60, "the victim replica to hold requests")
        t_kill = time.monotonic()
        before = done[0]
        os.kill(int(victim["metadata"]["pid"]), signal.SIGKILL)
        wait_for(lambda: done[0] >= before + 8, 120, "requests to complete after the replica kill")
        replica_recovered_s = time.monotonic() - t_kill
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=240)
    from ray import serve

    router = serve.get_app_handle(APP).status.remote().result(timeout_s=30)
    print(f"\nfaults: {router['replica_failures']} replica failures under requests, "
          f"{router['resumed_requests']} streams resumed mid-way; {done[0]} streams, longest stall {max_gap[0]:.2f}s, "
          f"in-place rebuild after the rank kill {rebuild['seconds']:.1f}s (8 completions in {rank_recovered_s:.1f}s), "
          f"8 completions after the replica kill in {replica_recovered_s:.1f}s")
    assert router["replica_failures"] >= 1  # the replica kill hit running requests, and they all went on
    assert not failures, failures[:3]
    assert not mismatches, f"streams that differ from the fault-free run: clients {sorted(set(mismatches))}"
    with GenerationClient(app, timeout=30) as c:  # nothing left running or queued
        assert all(r.running == 0 and r.waiting == 0 for r in c.load().replicas if r.healthy)


def test_engine_service_wants_the_apps_internal_credential(app):
    """A replica's EngineService (its address is in GetLoad) refuses callers without the app's token."""
    import grpc
    import ray

    from expertmesh.v1 import engine_pb2, engine_pb2_grpc

    registry = get_registry(RegistryRef(APP))
    address = entries()[0]["address"]
    request = engine_pb2.EngineGenerateRequest(request_id="sneak", prompt_token_ids=[0, 5, 6])
    with grpc.insecure_channel(address) as ch:
        stub = engine_pb2_grpc.EngineServiceStub(ch)
        for call in (lambda md: list(stub.Generate(request, timeout=30, metadata=md)),
                     lambda md: stub.Abort(engine_pb2.AbortRequest(request_id="x"), timeout=30, metadata=md)):
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = ray.get(registry.internal_token.remote())
        load = stub.GetLoad(engine_pb2.EngineLoadRequest(), timeout=30, metadata=(("authorization", f"Bearer {token}"),))
        assert load.replica_id


def test_no_socket_of_ours_listens_on_a_wildcard_address(app):
    """The router, every EngineService and the rank actors (no TCPStore: a local group meets through
    a file) listen on loopback only. Ray's own listeners (Serve's inter-deployment gRPC on [::]:0)
    are Ray's and documented in the README."""
    import shutil
    import subprocess

    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    ours = {int(app.rsplit(":", 1)[1])} | {int(e["address"].rsplit(":", 1)[1]) for e in entries()}
    for line in out:
        local = line.split()[3]
        host, port = local.rsplit(":", 1)
        wildcard = host in ("*", "0.0.0.0", "[::]", "::")
        if int(port) in ours:
            assert host in ("127.0.0.1", "[::ffff:127.0.0.1]"), line  # grpc binds v4 as v4-mapped v6
        assert not (wildcard and "RankActor" in line), line
