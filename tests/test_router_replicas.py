"""Routing behaviour that needs no model: replicas joining, leaving, dying, draining and refusing
(queue full); reasoning split on crafted token streams; HTTP auth and disconnects; the CLI
clients. Replicas are the real EngineService over SyntheticEngine (model-free, paced tokens)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai package ships with
import pytest

from _router_env import LoopThread, start_replica, start_router, wait_for
from expertmesh.cluster.router.client import GenerationClient
from expertmesh.cluster.router.client_cli import chat_main, client_generate_main
from expertmesh.cluster.router.registry import (ReplicaRegistry, RegistryWatcher, StaticReplicaSource,
                                                parse_static)
from expertmesh.cluster.router.replicas import ReplicaEndpoint, ReplicaSet
from expertmesh.cluster.devtools.synthetic import SyntheticEngine
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

REASONING = "Okay, the user greets me. I should greet back."
ANSWER = "\n\nHello! How can I help you today?"


@pytest.fixture(scope="module")
def lt():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture()
def cleanup(lt):
    servers = []
    yield servers
    for s in reversed(servers):
        lt.run(s.stop(0))


def _replica(lt, ckpt: Path, cleanup, rid: str, **engine_kw):
    engine = SyntheticEngine(ckpt, **engine_kw)
    server = start_replica(lt, engine, ckpt, replica_id=rid)
    cleanup.append(server)
    return engine, server


def _router(lt, cleanup, replicas=None, source=None, **kw):
    router = start_router(lt, replicas, source=source, **kw)
    cleanup.insert(0, router)
    return router


def _gen(address: str, n: int = 3, **kw) -> list[generate_pb2.GenerateResponse]:
    with GenerationClient(address, timeout=20) as c:
        return list(c.generate("hello", max_tokens=n, **kw))


# ---- reasoning split on crafted token streams -----------------------------------------------------
def test_chat_reasoning_split_grpc_and_openai(lt, tiny_ckpt, cleanup):
    import openai

    _, rep = _replica(lt, tiny_ckpt, cleanup, "think", script=REASONING + "</think>" + ANSWER)
    router = _router(lt, cleanup, [f"think={rep.address}"], http_port=0)
    with GenerationClient(router.grpc_address) as c:
        msgs = list(c.chat([{"role": "user", "content": "hi"}], max_tokens=200))
        out = c.chat_complete([{"role": "user", "content": "hi"}], max_tokens=200)
        merged = c.chat_complete([{"role": "user", "content": "hi"}], max_tokens=200, merge_reasoning=True)
    assert "".join(m.reasoning for m in msgs) == REASONING and "".join(m.text for m in msgs) == ANSWER
    assert sum(1 for m in msgs if m.reasoning) > 3, "reasoning should stream, not arrive at the end"
    assert out.finish_reason == "stop" and (out.reasoning, out.text) == (REASONING, ANSWER)
    assert merged.text == REASONING + "</think>" + ANSWER and merged.reasoning == ""

    client = openai.OpenAI(base_url=router.http_address + "/v1", api_key="x", max_retries=0)
    reasoning = content = ""
    for chunk in client.chat.completions.create(model=router.frontend.model_name, stream=True, max_tokens=200,
                                                messages=[{"role": "user", "content": "hi"}]):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == (REASONING, ANSWER)
    full = client.chat.completions.create(model=router.frontend.model_name, max_tokens=200,
                                          messages=[{"role": "user", "content": "hi"}]).choices[0].message
    assert (full.model_extra["reasoning_content"], full.content) == (REASONING, ANSWER)


def test_reasoning_tags_split_across_tokens(lt, tiny_ckpt, cleanup):
    tok = SyntheticEngine(tiny_ckpt).tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # '<think>' and '</think>' spelled in pieces ('<', 'th', 'ink', '>'), as a model could emit them.
    script = enc("<") + enc("think") + enc(">") + enc("plan it") + enc("</") + enc("th") + enc("ink") + enc(">") + enc("done")
    _, rep = _replica(lt, tiny_ckpt, cleanup, "pieces", script=script)
    router = _router(lt, cleanup, [rep.address])
    with GenerationClient(router.grpc_address) as c:
        split = c.complete("Q:", max_tokens=100, separate_reasoning=True)
        raw = c.complete("Q:", max_tokens=100)
    assert (split.reasoning, split.text) == ("plan it", "done")
    assert raw.text == "<think>plan it</think>done" and raw.reasoning == ""


# ---- replicas dying, leaving, joining, refusing -----------------------------------------------------
def test_dead_replica_leaves_rotation_and_requests_retry(lt, tiny_ckpt, cleanup):
    _, a = _replica(lt, tiny_ckpt, cleanup, "a")
    _, b = _replica(lt, tiny_ckpt, cleanup, "b")
    router = _router(lt, cleanup, [f"a={a.address}", f"b={b.address}"], policy="round_robin", probe_interval_s=30)
    assert all(len(_gen(router.grpc_address)) == 3 for _ in range(2))
    lt.run(b.stop(0))
    for _ in range(6):  # every request lands: those sent to b are retried on a
        assert sum(len(m.token_ids) for m in _gen(router.grpc_address)) == 3
    with GenerationClient(router.grpc_address) as c:
        healthy = {r.replica_id: r.healthy for r in c.load().replicas}
    assert healthy == {"a": True, "b": False}
    lt.run(a.stop(0))
    with pytest.raises(grpc.RpcError) as err:
        _gen(router.grpc_address)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with GenerationClient(router.grpc_address) as c:  # no replica left: health says so
        assert wait_for(lambda: c.health() == "NOT_SERVING")


def test_replicas_join_and_leave(lt, tiny_ckpt, cleanup):
    ea, a = _replica(lt, tiny_ckpt, cleanup, "a")
    eb, b = _replica(lt, tiny_ckpt, cleanup, "b")
    source = StaticReplicaSource([f"a={a.address}"])
    router = _router(lt, cleanup, source=source, policy="round_robin")
    for _ in range(4):
        _gen(router.grpc_address)
    assert (ea.prompt_tokens_total > 0, eb.prompt_tokens_total) == (True, 0)
    source.set([f"a={a.address}", f"b={b.address}"])  # the autoscaler added b
    assert wait_for(lambda: len(router.replicas.available()) == 2)
    for _ in range(4):
        _gen(router.grpc_address)
    assert eb.prompt_tokens_total > 0
    source.set([f"b={b.address}"])  # a is being scaled down
    assert wait_for(lambda: [r.replica_id for r in router.replicas.available()] == ["b"])
    before = ea.prompt_tokens_total
    for _ in range(4):
        _gen(router.grpc_address)
    assert ea.prompt_tokens_total == before


def test_draining_replica_gets_no_new_requests(lt, tiny_ckpt, cleanup):
    ea, a = _replica(lt, tiny_ckpt, cleanup, "a")
    eb, b = _replica(lt, tiny_ckpt, cleanup, "b", token_interval_s=0.01)
    router = _router(lt, cleanup, [f"a={a.address}", f"b={b.address}"], policy="round_robin")
    with GenerationClient(router.grpc_address) as c:
        stream = c.generate("long", max_tokens=40)
        first = next(stream)
        busy = "b" if eb.load().running else "a"
        draining, (engine, other) = (b, (eb, ea)) if busy == "b" else (a, (ea, eb))
        lt.run(draining.drain())
        rest = list(stream)  # the running request finishes on the draining replica
        assert sum(len(m.token_ids) for m in [first, *rest]) == 40
        before = engine.prompt_tokens_total
        for _ in range(4):
            assert sum(len(m.token_ids) for m in c.generate("x", max_tokens=2)) == 2
        assert engine.prompt_tokens_total == before
    assert wait_for(lambda: len(router.replicas.available()) == 1)


def test_queue_full_is_resource_exhausted(lt, tiny_ckpt, cleanup):
    _, full = _replica(lt, tiny_ckpt, cleanup, "full", max_running=0)
    router = _router(lt, cleanup, [f"full={full.address}"])
    with pytest.raises(grpc.RpcError) as err:
        _gen(router.grpc_address)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in err.value.details()
    # With a replica that has room, the request goes there instead.
    _, ok = _replica(lt, tiny_ckpt, cleanup, "ok")
    router2 = _router(lt, cleanup, [f"full={full.address}", f"ok={ok.address}"], policy="round_robin")
    for _ in range(3):
        assert len(_gen(router2.grpc_address)) == 3


# ---- HTTP: auth, disconnects ------------------------------------------------------------------------
def test_http_auth_and_disconnect_aborts(lt, tiny_ckpt, cleanup):
    engine, rep = _replica(lt, tiny_ckpt, cleanup, "slow", token_interval_s=0.02)
    router = _router(lt, cleanup, [rep.address], http_port=0, auth_token="tok")
    url = router.http_address + "/v1/chat/completions"
    body = {"model": router.frontend.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
            "stream": True}
    with httpx.Client(timeout=20) as http:
        r = http.post(url, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get(router.http_address + "/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
        headers = {"authorization": "Bearer tok", "x-request-id": "http-1"}
        with http.stream("POST", url, json=body, headers=headers) as resp:
            assert resp.status_code == 200 and resp.headers["x-request-id"] == "http-1"
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.load().running == 1
        # Leaving the stream closes the connection: the router cancels and the replica aborts.
        assert wait_for(lambda: engine.load().running == 0 and engine.kv_free_slots() == engine.kv_total_slots(),
                        timeout=10)
        r = http.post(url, json=body | {"stream": False, "max_tokens": 3}, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    with grpc.insecure_channel(router.grpc_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerationStub(ch).ListModels(generate_pb2.ListModelsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- registry ----------------------------------------------------------------------------------------
def test_registry_versions_and_ttl(monkeypatch):
    reg = ReplicaRegistry(ttl_s=10.0)
    v1 = reg.register("r1", "127.0.0.1:1")
    assert reg.register("r1", "127.0.0.1:1") == v1  # heartbeat-style re-register: no change
    v2 = reg.register("r2", "127.0.0.1:2")
    assert v2 > v1 and [e["replica_id"] for e in reg.snapshot()[1]] == ["r1", "r2"]
    assert reg.deregister("r1") > v2 and reg.deregister("r1") == reg.version
    import time as _time

    now = _time.time()
    monkeypatch.setattr("expertmesh.cluster.router.registry.time.time", lambda: now + 60)
    assert reg.snapshot()[1] == [] and not reg.heartbeat("r2")
    assert parse_static("x=127.0.0.1:5") == ReplicaEndpoint("x", "127.0.0.1:5")
    with pytest.raises(ValueError, match="replicas"):
        parse_static("nohostport")


def test_registry_watcher_syncs_replica_set(lt):
    reg = ReplicaRegistry()

    class Source:
        async def snapshot(self):
            version, entries = reg.snapshot()
            return version, [ReplicaEndpoint(e["replica_id"], e["address"]) for e in entries]

    async def scenario():
        removed: list[str] = []
        rs = ReplicaSet(on_removed=removed.append)
        watcher = RegistryWatcher(Source(), rs, interval_s=0.05)
        reg.register("r1", "127.0.0.1:9")
        await watcher.start()
        ids1 = sorted(rs.replicas)
        reg.register("r2", "127.0.0.1:10")
        reg.deregister("r1")
        await watcher.poll_once()
        ids2 = sorted(rs.replicas)
        await watcher.stop()
        await rs.stop()
        return ids1, ids2, removed

    assert lt.run(scenario()) == (["r1"], ["r2"], ["r1"])


def test_the_door_counts_each_replicas_slots_and_queue(lt):
    """The router refuses at its door once every replica holds its reported running slots + queue
    of this router's requests, counting those let in and not yet sent; routing skips a full replica;
    a replica that reports no bound never makes the door refuse."""
    async def scenario():
        rs = ReplicaSet()
        rs.sync([ReplicaEndpoint("a", "127.0.0.1:9"), ReplicaEndpoint("b", "127.0.0.1:10")])
        a, b = rs.get("a"), rs.get("b")
        a.load = generate_pb2.ReplicaLoad(max_running=2, max_waiting=1)  # room for 3
        b.load = generate_pb2.ReplicaLoad(max_running=1, max_waiting=1)  # room for 2
        seen = []
        tickets = [rs.admit() for _ in range(4)]  # let in, not sent yet: 4 of 5 places
        seen.append(rs.saturated())
        tickets.append(rs.admit())
        seen.append(rs.saturated())  # 5 of 5
        for t in tickets[:3]:  # three land on a
            rs.request_started(a)
            t.placed()
            t.release()  # idempotent
        seen.append((rs.admitting, rs.saturated(), [r.replica_id for r in rs.with_room([a, b])]))
        rs.request_ended(a)  # one of a's ends: a place frees
        seen.append(rs.saturated())
        for t in tickets[3:]:
            t.release()  # never sent (refused later, cancelled)
        seen.append(rs.admitting)
        b.load = generate_pb2.ReplicaLoad(max_waiting=0)  # b reports no bound: never full at the door
        for _ in range(2):
            rs.request_started(a)
        seen.append((rs.saturated(), [r.replica_id for r in rs.with_room([a, b])]))
        await rs.stop()
        return seen

    assert lt.run(scenario()) == [False, True, (2, True, ["b"]), False, 0, (False, ["b"])]


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_generate_and_chat(lt, tiny_ckpt, cleanup):
    _, rep = _replica(lt, tiny_ckpt, cleanup, "cli", script=REASONING + "</think>" + ANSWER)
    router = _router(lt, cleanup, [rep.address])
    out, err = io.StringIO(), io.StringIO()
    rc = client_generate_main(["--address", router.grpc_address, "--prompt", "hi", "--chat", "--max-tokens", "100",
                               "--json"], out=out, err=err)
    assert rc == 0, err.getvalue()
    result = json.loads(out.getvalue())
    assert (result["reasoning"], result["text"], result["finish_reason"]) == (REASONING, ANSWER, "stop")
    assert result["usage"]["completion_tokens"] == len(result["token_ids"])
    out = io.StringIO()
    assert client_generate_main(["--address", router.grpc_address, "--prompt", "hi", "--max-tokens", "3"], out=out) == 0
    assert out.getvalue().startswith(REASONING[:5])
    err = io.StringIO()
    assert client_generate_main(["--address", router.grpc_address, "--prompt", "hi", "--temperature", "-2"],
                                out=io.StringIO(), err=err) == 1
    assert "INVALID_ARGUMENT" in err.getvalue() and "sampling.temperature" in err.getvalue()
    out = io.StringIO()
    rc = chat_main(["--address", router.grpc_address, "--max-tokens", "100"],
                   stdin=io.StringIO("hello\n/reset\nagain\n/exit\n"), out=out, err=io.StringIO())
    text = out.getvalue()
    assert rc == 0 and text.count("[reasoning] " + REASONING + " [/reasoning]") == 2 and text.count(ANSWER) == 2
